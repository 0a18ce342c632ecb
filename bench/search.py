"""Benchmark the retrieval engines of lsr_core/engines.py on the same sparse vectors (DESIGN §6).

    python bench/search.py --docs 200000 --queries 1000 --threads 1 [--engines exact,qdrant-edge,seismic,milvus]
        [--real runs/demo/encode] [--topk 10] [--seed 0] [--workdir /tmp/bench-search] [--json out.json]

Data: synthetic SPLADE-like vectors (seeded): token ids drawn from a Zipf(1.0) law over a 30,522-id vocabulary (the
popularity order shuffled over ids), ~120 distinct tokens per document and ~30 per query, weights Gamma(2, 0.4).
With --real DIR, the same measurements also run on an encoded collection: DIR/corpus and DIR/queries shard folders
(encode.py output). Synthetic data has no topical structure, which handicaps the pruning of seismic: choose the
default engine on real vectors.
Per engine: build seconds, reload seconds (a fresh object opens the saved index; every search below uses it), size on
disk, ms/query mean/p50/p99 (one query per call, --threads threads, top-k; engines interleaved query by query so that
load from other processes is shared fairly), batch queries/s (all queries in one call), recall@10 against `exact`
(the truth; recall 1.0 by construction). Seismic is built once and swept over (query_cut, heap_factor).
Output: markdown tables on stdout (and the raw numbers with --json).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsr_core.engine_base import folder_size  # noqa: E402
from lsr_core import engines  # noqa: E402
from lsr_core.sparse import load_vectors, p99  # noqa: E402

VOCAB = 30522
# (query_cut, heap_factor): more query terms and a lower heap factor scan more blocks (slower, more exact)
SEISMIC_SWEEP = [(10, 0.7), (10, 0.5), (20, 0.9), (20, 0.8), (20, 0.7), (30, 0.8), (30, 0.6)]


def synthetic(n: int, mean_nnz: int, rng: np.random.Generator, vocab: int = VOCAB, zipf: float = 1.0):
    """CSR [n, vocab] float32 with ~mean_nnz distinct Zipf-distributed tokens per row."""
    probs = 1.0 / np.arange(1, vocab + 1) ** zipf
    cdf = np.cumsum(probs / probs.sum())
    token_of_rank = rng.permutation(vocab)

    def draw(lengths):
        rows = np.repeat(np.arange(len(lengths)), lengths)
        ranks = np.minimum(np.searchsorted(cdf, rng.random(rows.size)), vocab - 1)
        keys = np.unique(rows * vocab + token_of_rank[ranks])  # repeated draws of a token collapse into one
        return keys // vocab, keys % vocab

    # Zipf draws repeat head tokens; scale the draw count so the *distinct* count averages mean_nnz.
    pilot_rows, _ = draw(np.full(2000, mean_nnz))
    oversample = mean_nnz * 2000 / len(pilot_rows)
    rows, cols = draw(rng.poisson(mean_nnz * oversample, n))
    weights = rng.gamma(2.0, 0.4, rows.size).astype(np.float32) + 0.01
    return sp.csr_matrix((weights, (rows, cols)), shape=(n, vocab))


def recall_at_10(run, truth) -> float:
    per_query = [len({d for d, _ in r[:10]} & {d for d, _ in t[:10]}) / len(t[:10]) for r, t in zip(run, truth) if t]
    return float(np.mean(per_query)) if per_query else float("nan")


def bench(doc_ids, docs, queries, names, args, workdir: Path) -> list[dict]:
    """Build and reload every engine, then time the queries *interleaved* (query i on every engine/setting before
    query i+1), so that background load on a shared machine hits all engines alike."""
    variants, rows = [], []  # (row, opened index, search params)
    for name in ["exact"] + [e for e in names if e != "exact"]:  # exact first: it is the truth
        folder = workdir / name
        params = {"n_postings": args.seismic_postings} if name == "seismic" else {}
        start = time.perf_counter()
        engines.build(name, doc_ids, docs, folder, params).close()
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        index = engines.load(folder)
        load_s = time.perf_counter() - start
        base = {"build_s": build_s, "load_s": load_s, "size_mb": folder_size(folder) / 2**20}
        logging.info("%s built in %.1fs, reloaded in %.2fs", name, build_s, load_s)
        for qc, hf in SEISMIC_SWEEP if name == "seismic" else [(None, None)]:
            label = f"seismic qc={qc} hf={hf}" if qc else name
            variants.append(({"engine": label, **base}, index, {"query_cut": qc, "heap_factor": hf} if qc else {}))

    n = queries.shape[0] if sp.issparse(queries) else len(queries)
    latencies = [[] for _ in variants]
    runs = [[] for _ in variants]
    for i in range(n):
        query = queries[i] if sp.issparse(queries) else [queries[i]]
        for v, (_, index, search_params) in enumerate(variants):
            index.params.update(search_params)
            start = time.perf_counter()
            runs[v] += index.search(query, args.topk, args.threads)
            latencies[v].append((time.perf_counter() - start) * 1000)
    for v, (row, index, search_params) in enumerate(variants):
        index.params.update(search_params)
        start = time.perf_counter()
        index.search(queries, args.topk, args.threads)
        row.update(ms_mean=float(np.mean(latencies[v])), ms_p50=float(np.median(latencies[v])),
                   ms_p99=p99(latencies[v]), batch_qps=n / (time.perf_counter() - start),
                   recall=recall_at_10(runs[v], runs[0]))
        logging.info("%s", {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()})
        rows.append(row)
    for _, index, _ in variants:
        index.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    exact = next(r for r in rows if r["engine"] == "exact")
    lines = ["| engine | build s | load s | size MB | ms/query mean | p50 | p99 | batch q/s | recall@10 | "
             "mean vs exact | build vs exact |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['build_s']:.1f} | {r['load_s']:.2f} | {r['size_mb']:.0f} | "
                     f"{r['ms_mean']:.2f} | {r['ms_p50']:.2f} | {r['ms_p99']:.2f} | {r['batch_qps']:.0f} | "
                     f"{r['recall']:.3f} | {r['ms_mean'] / exact['ms_mean']:.2f}x | "
                     f"{r['build_s'] / max(exact['build_s'], 1e-3):.1f}x |")
    return "\n".join(lines)


def default_engine(rows: list[dict]) -> str:
    """The issue's rule: the faster embedded engine (qdrant-edge or seismic) at recall@10 >= 0.99."""
    ok = [r for r in rows if r["engine"].startswith(("qdrant-edge", "seismic")) and r["recall"] >= 0.99]
    if not ok:
        return "none reaches recall@10 >= 0.99"
    best = min(ok, key=lambda r: r["ms_mean"])
    return f"{best['engine']} ({best['ms_mean']:.2f} ms/query at recall@10 {best['recall']:.3f})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--engines", default=",".join(engines.ENGINES))
    parser.add_argument("--seismic-postings", type=int, default=1000)
    parser.add_argument("--real", default="", help="folder with corpus/ and queries/ shard folders (encode.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [e for e in args.engines.split(",") if e]
    for name in names:
        engines.engine_class(name)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-search-"))

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    docs, queries = synthetic(args.docs, 120, rng), synthetic(args.queries, 30, rng)
    doc_ids = [f"d{i}" for i in range(args.docs)]
    nnz = f"{docs.nnz / args.docs:.1f} nnz/doc, {queries.nnz / args.queries:.1f} nnz/query"
    logging.info("synthetic data in %.1fs: %s", time.perf_counter() - start, nnz)
    results = {"synthetic": {"docs": args.docs, "queries": args.queries, "nnz": nnz,
                             "rows": bench(doc_ids, docs, queries, names, args, workdir / "synthetic")}}
    if args.real:
        real_ids, real_docs = load_vectors(Path(args.real) / "corpus")
        _, real_queries = load_vectors(Path(args.real) / "queries")
        results["real"] = {"folder": args.real, "docs": len(real_ids), "queries": len(real_queries),
                           "rows": bench(real_ids, real_docs, real_queries, names, args, workdir / "real")}
    shutil.rmtree(workdir, ignore_errors=True)  # the temp dir itself

    for kind, res in results.items():
        print(f"\n### {kind}: {res['docs']} docs, {res['queries']} queries"
              f"{', ' + res['nnz'] if 'nnz' in res else ''}, top-{args.topk}, {args.threads} thread(s)\n")
        print(table(res["rows"]))
        print(f"\nDefault embedded engine by the rule (faster at recall@10 >= 0.99): {default_engine(res['rows'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
