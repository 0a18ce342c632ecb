"""Search encoded queries against an index and write a TREC run (DESIGN §6).

    python search.py --cfg runs/demo/index/seismic/config.yaml \
        [--search.index=runs/demo/index/seismic --search.queries=runs/demo/encode/queries \
         --search.topk=1000 --search.threads=2 --search.name=demo-seismic]

Inputs: --search.queries, default <output_dir>/encode/queries: a shard folder of {"id", "vector"} lines and its
        meta.json; an unfinished folder is refused (see index.py).
        --search.index, default <output_dir>/index/<search.engine or index.engine>, built by index.py; the engine is
        the one recorded there (--search.engine, if given, must match). Seismic reads search.seismic_query_cut/
        heap_factor. A missing or corrupt index file is an error naming it.
        Queries encoded by another model or vocabulary than the index's documents (`model`, `vocab_hash` of the
        queries' meta.json against the `docs` entry of the index's meta.json) are refused unless --search.force=true;
        where either side does not record its vocabulary (older outputs), only the models are compared.
Output: --search.output, default <output_dir>/search/<name>.trec (name: --search.name or exp.name), written
        atomically: one line per hit `qid Q0 docid rank score name`, rank from 1, best first.
        <output without .trec>.meta.json: engine, index, queries, counts, empty queries (no token known to the index:
        no hits, warned), batch seconds and queries/s with `threads`, ms/query mean and p99 measured on up to
        search.latency_sample queries re-run one at a time with one thread. config.yaml beside the run.
        Temp files a killed run left beside these outputs (its process gone) are removed by the next run.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lsr_core import engines
from lsr_core.config import load_config, save_config
from lsr_core.sparse import load_encoded, p99
from lsr_core.utils import InputError, atomic_open, atomic_write_json, read_json, run_script, sweep_stale

logger = logging.getLogger("search")


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_same_encoder(queries_dir: Path, queries: dict, index_dir: Path, docs: dict | None, force: bool) -> None:
    """Queries are only comparable with documents of the same model and vocabulary: `queries` is the queries'
    meta.json, `docs` the index's record of its documents'. A difference raises InputError unless `force`."""
    if not docs:
        logger.warning("%s/meta.json does not record the documents' model (index built by an older index.py): the "
                       "queries cannot be checked against it; rebuild the index to check them", index_dir)
        return
    q_model, d_model = queries.get("model"), docs.get("model")
    q_vocab, d_vocab = queries.get("vocab_hash"), docs.get("vocab_hash")
    model_differs = bool(q_model and d_model) and not _same_model(q_model, d_model)
    vocab_differs = bool(q_vocab and d_vocab) and q_vocab != d_vocab
    if model_differs or vocab_differs:
        message = (f"{queries_dir}: queries encoded by model {q_model!r} (vocab {q_vocab or 'unknown'}), the documents "
                   f"of {index_dir} by model {d_model!r} (vocab {d_vocab or 'unknown'}); encode both with one model "
                   f"or pass --search.force=true")
        if not force:
            raise InputError(message)
        logger.warning("%s; searching anyway (--search.force=true)", message)
    unknown = [f"{folder}/meta.json" for folder, known in ((queries_dir, q_vocab), (index_dir, d_vocab)) if not known]
    if unknown:
        logger.warning("vocabulary unknown (no vocab_hash in %s): only the models of queries and documents were "
                       "compared", " or ".join(unknown))


def main(argv: list[str] | None = None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv, runs_model=False)
    queries_dir = Path(cfg.search.queries or cfg.output_dir / "encode" / "queries")
    index_dir = Path(cfg.search.index or cfg.output_dir / "index" / (cfg.search.engine or cfg.index.engine))
    name = cfg.search.name or cfg.exp.name
    output = Path(cfg.search.output or cfg.output_dir / "search" / f"{name}.trec")
    topk, threads = cfg.search.topk, cfg.search.threads

    stale = sweep_stale(output.parent, [f".{output.name}.", f".{output.with_suffix('.meta.json').name}.",
                                        ".config.yaml."])
    if stale:
        logger.warning("removed %d temp file(s) left by killed runs: %s", len(stale), ", ".join(map(str, stale)))

    info = engines.load_info(index_dir)  # no engine.json: "index not found"
    engine_name = cfg.search.engine or info["engine"]
    index_meta = read_json(index_dir / "meta.json", "rebuild the index with index.py")
    if not isinstance(index_meta, dict):
        raise InputError(f"{index_dir}/meta.json: corrupt file (expected a JSON object); rebuild it with index.py")
    if not queries_dir.exists():
        raise InputError(f"encoded queries not found: {queries_dir} (run encode.py first)")
    qids, query_vectors, query_meta = load_encoded(queries_dir)
    check_same_encoder(queries_dir, query_meta, index_dir, index_meta.get("docs"), cfg.search.force)
    index = engines.load(index_dir, cfg.search.engine, engines.config_params(engine_name, cfg.search))
    logger.info("search: %d queries from %s, index %s (%s, %d docs), top-%d, %d thread(s)", len(qids), queries_dir,
                index_dir, engine_name, len(index.doc_ids), topk, threads)

    run, empty = [], 0
    batch = 256 * threads
    start = time.perf_counter()
    for first in tqdm(range(0, len(qids), batch), desc="search", unit="batch"):
        run += index.search(query_vectors[first:first + batch], topk, threads)
        empty += index.empty_queries
    batch_seconds = time.perf_counter() - start

    # Latency: one query at a time, one thread, on the first queries that have hits.
    sample = [i for i, hits in enumerate(run) if hits][:cfg.search.latency_sample]
    latencies_ms = []
    for i in sample:
        start = time.perf_counter()
        index.search([query_vectors[i]], topk, 1)
        latencies_ms.append((time.perf_counter() - start) * 1000)
    index.close()

    with atomic_open(output) as f:
        for qid, hits in zip(qids, run):
            for rank, (docid, score) in enumerate(hits, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {name}\n")
    meta = {"engine": engine_name, "index": str(index_dir), "queries": str(queries_dir), "count": len(qids),
            "empty_queries": empty, "topk": topk, "threads": threads, "batch_seconds": round(batch_seconds, 3),
            "queries_per_second": round(len(qids) / max(batch_seconds, 1e-9), 1),
            "latency_sample": len(latencies_ms),
            "ms_per_query_mean": round(float(np.mean(latencies_ms)), 3) if latencies_ms else None,
            "ms_per_query_p99": round(p99(latencies_ms), 3) if latencies_ms else None}
    atomic_write_json(output.with_suffix(".meta.json"), meta)
    save_config(cfg, output.parent)

    print(f"search: {len(qids)} queries ({empty} empty) on {engine_name} -> {output}; "
          f"{meta['queries_per_second']} q/s with {threads} thread(s), "
          f"{meta['ms_per_query_mean']} ms/query mean, {meta['ms_per_query_p99']} p99 (1 thread)")
    return output


if __name__ == "__main__":
    run_script(main)
