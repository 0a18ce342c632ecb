"""Build a retrieval index over encoded documents (DESIGN §6).

    python index.py --cfg yamls/demo.yaml [--index.engine=seismic] [--index.input=runs/demo/encode/corpus]

Input:  --index.input, default <output_dir>/encode/corpus: a shard folder (part-*.jsonl.gz) of
        {"id": docid, "vector": {token: weight}} lines, as written by encode.py / zeroshot_prompt.py.
Output: --index.output, default <output_dir>/index/<engine>/:
        the engine's files (see lsr_core/engines.py: engine.json, ids.json, vocab.json + engine data),
        meta.json  {engine, params, input, count, vocab_size, build_seconds, size_bytes},
        config.yaml (the resolved config; `search.py --cfg <it>` finds this index).
Engines: exact | qdrant-edge | seismic | milvus; their params are the `index.<engine>_*` config keys.
The index is built in a temp folder beside the output and renamed into place, so a crash never leaves a half-built
index behind; an existing index at the output path is replaced.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from lsr_core import engines
from lsr_core.config import load_config, save_config
from lsr_core.sparse import load_vectors, write_meta
from lsr_core.utils import InputError, run_script

logger = logging.getLogger("index")


def folder_size(folder: Path) -> int:
    """Bytes allocated on disk (like `du`): qdrant preallocates sparse 32 MiB files that hold far less."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv, runs_model=False)
    engine = cfg.index.engine
    source = Path(cfg.index.input or cfg.output_dir / "encode" / "corpus")
    output = Path(cfg.index.output or cfg.output_dir / "index" / engine)
    params = engines.config_params(engine, cfg.index)
    logger.info("index: engine=%s params=%s input=%s output=%s", engine, params, source, output)

    if not source.exists():
        raise InputError(f"encoded documents not found: {source} (run encode.py first)")
    doc_ids, doc_vectors = load_vectors(source)  # duplicate ids raise InputError here
    logger.info("loaded %d documents", len(doc_ids))

    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        index = engines.build(engine, doc_ids, doc_vectors, tmp, params)
        build_seconds = time.perf_counter() - start
        index.close()  # milvus-lite holds its folder until closed
        meta = {"engine": engine, "params": params, "input": str(source), "count": len(doc_ids),
                "vocab_size": len(index.vocab), "build_seconds": round(build_seconds, 3),
                "size_bytes": folder_size(tmp)}
        write_meta(tmp, meta)
        save_config(cfg, tmp)
        # Swap in the new index: the old one is only removed once the new one is in place.
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    print(f"index: {engine} over {len(doc_ids)} docs ({len(index.vocab)} tokens) in {build_seconds:.1f}s, "
          f"{meta['size_bytes'] / 2**20:.1f} MiB -> {output}")
    return output


if __name__ == "__main__":
    run_script(main)
