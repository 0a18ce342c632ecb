"""A synthetic SPLADE-like corpus as an encoded shard folder, to measure index.py's memory and time at scale.

    .venv/bin/python bench/scale.py --out /tmp/scale --docs 200000
    /usr/bin/time -v .venv/bin/python index.py --index.input=/tmp/scale --index.output=/tmp/scale-index \
        --index.engine=exact

Each document holds about --terms distinct tokens of a --vocab-token vocabulary, drawn with a Zipf-like skew (a few
tokens in most documents, as in a real corpus), with weights in (0, 3]. Written as encode.py writes: part-*.jsonl.gz
shards of --shard-docs lines and a meta.json (count, shards, nnz stats), so index.py accepts the folder. Prints the
CSR bytes index.py's matrix takes (float32 data, int32 column ids, int32 or int64 row pointers), against which its
peak RSS is compared. --tiny: a few hundred documents over 2,000 tokens (the smoke test).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.sparse import nnz_stats, shard_name, write_meta  # noqa: E402
from lsr_core.utils import write_gzip_lines  # noqa: E402


def doc_lines(rng, start: int, n: int, vocab: int, terms: int) -> tuple[list[str], list[int]]:
    """JSON lines of documents start..start+n-1 and their numbers of terms."""
    tokens = [f"t{j}" for j in range(vocab)]
    lines, nnz = [], []
    for i in range(start, start + n):
        # |power draw| skews columns towards 0; duplicates are dropped, so draw a few more than wanted
        cols = np.unique((rng.power(0.3, int(terms * 1.07)) * vocab).astype(np.int64))
        weights = np.round(rng.uniform(0.01, 3.0, cols.size), 2)
        vector = dict(zip([tokens[c] for c in cols.tolist()], weights.tolist()))
        lines.append(json.dumps({"id": f"d{i}", "vector": vector}))
        nnz.append(len(vector))
    return lines, nnz


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="shard folder to write (replaced files, same names)")
    parser.add_argument("--docs", type=int, default=200000)
    parser.add_argument("--terms", type=int, default=110, help="about how many tokens a document holds")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--shard-docs", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="300 documents over 2,000 tokens, 100-line shards")
    args = parser.parse_args(argv)
    if args.tiny:
        args.docs, args.vocab, args.shard_docs, args.terms = 300, 2000, 100, 30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    nnz: list[int] = []
    shards = 0
    for start in range(0, args.docs, args.shard_docs):
        lines, counts = doc_lines(rng, start, min(args.shard_docs, args.docs - start), args.vocab, args.terms)
        write_gzip_lines(out / shard_name(shards), lines)
        nnz += counts
        shards += 1
    stats = nnz_stats(nnz)
    write_meta(out, {"model": "synthetic", "vocab_size": args.vocab, **stats, "shards": shards})
    total = int(sum(nnz))
    index_bytes = 8 if total >= 2**31 - 1 else 4
    csr_bytes = total * (4 + 4) + (args.docs + 1) * index_bytes
    result = {"docs": args.docs, "nnz": total, "nnz_mean": round(stats["nnz_mean"], 1), "shards": shards,
              "csr_bytes": csr_bytes, "csr_mib": round(csr_bytes / 2**20, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
