"""Build a retrieval index over encoded documents (DESIGN §6).

    python index.py --cfg yamls/demo.yaml [--index.engine=seismic] [--index.input=runs/demo/encode/corpus]

Input:  --index.input, default <output_dir>/encode/corpus: a shard folder (part-*.jsonl.gz) of
        {"id": docid, "vector": {token: weight}} lines and its meta.json, as written by encode.py /
        zeroshot_prompt.py. An unfinished folder is refused: no meta.json, fewer or other shards, or fewer lines than
        meta.json records.
Output: --index.output, default <output_dir>/index/<engine>/:
        the engine's files (see lsr_core/engines.py: engine.json, ids.json, vocab.json + engine data),
        meta.json  {engine, params, input, count, vocab_size, build_seconds, size_bytes,
                    docs: {model, vocab_hash, config_hash} of the documents' meta.json (search.py checks the queries
                    against it)},
        config.yaml (the resolved config; `search.py --cfg <it>` finds this index).
Engines: exact | qdrant-edge | seismic | milvus; their params are the `index.<engine>_*` config keys.
The index is built in a temp folder `.<name>.tmp-<host>-<pid>` beside the output and renamed into place, so a crash
never leaves a half-built index behind; an existing index at the output path is replaced. An exception removes the temp
folder; what a killed run left (its process gone) is removed by the next run for the same output.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from lsr_core import engines
from lsr_core.engine_base import folder_size
from lsr_core.config import load_config, save_config
from lsr_core.sparse import load_encoded, write_meta
from lsr_core.utils import InputError, owner_tag, run_script, sweep_stale

logger = logging.getLogger("index")


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv, runs_model=False)
    engine = cfg.index.engine
    source = Path(cfg.index.input or cfg.output_dir / "encode" / "corpus")
    output = Path(cfg.index.output or cfg.output_dir / "index" / engine)
    params = engines.config_params(engine, cfg.index)
    logger.info("index: engine=%s params=%s input=%s output=%s", engine, params, source, output)

    if not source.exists():
        raise InputError(f"encoded documents not found: {source} (run encode.py first)")
    # streamed into one CSR matrix, never a dict per document: a corpus costs about its CSR bytes in memory
    doc_ids, (doc_matrix, doc_vocab), source_meta = load_encoded(source, csr=True)  # incomplete, duplicates: InputError
    logger.info("loaded %d documents", len(doc_ids))

    stale = sweep_stale(output.parent, [f".{output.name}.tmp-", f".{output.name}.old-"])
    if stale:
        logger.warning("removed %d folder(s) left by killed runs: %s", len(stale), ", ".join(map(str, stale)))
    tmp = output.parent / f".{output.name}.tmp-{owner_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)  # ours by name: a killed run whose pid this process now has
    try:
        start = time.perf_counter()
        # release: an engine that copies the corpus into its own structures frees the loaded matrix before it builds
        index = engines.build(engine, doc_ids, doc_matrix, tmp, params, vocab=doc_vocab, release=True)
        build_seconds = time.perf_counter() - start
        index.close()  # milvus-lite holds its folder until closed
        meta = {"engine": engine, "params": params, "input": str(source), "count": len(doc_ids),
                "vocab_size": len(index.vocab), "build_seconds": round(build_seconds, 3),
                "size_bytes": folder_size(tmp),
                "docs": {key: source_meta.get(key) for key in ("model", "vocab_hash", "config_hash")}}
        write_meta(tmp, meta)
        save_config(cfg, tmp)
        # Swap in the new index: the old one is only removed once the new one is in place.
        old = output.parent / f".{output.name}.old-{owner_tag()}"
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
