"""What encode.py's main process does with each batch's vectors, on the CPU: `sparse.prune` (its host side) and
`sparse.to_vector`, now against before, on BERT-sized batches (vocabulary 30,522) of random SPLADE-like vectors.

    .venv/bin/python bench/vectors_cpu.py --out $OUT/vectors_cpu.jsonl

On a GPU the model runs ahead (encode_shard's lookahead) while this process prunes and converts the batch before;
what it spends here per batch is host time the GPU does not wait for only while it stays below the model's time
(BERT-base, 256 documents: ~22 ms on an H200, bench/RESULTS.md).
  prune: after the sort on the device, the columns up to the last kept weight of any row are copied to the host,
         then masked per row; before: all [batch x vocabulary] columns (the copy itself is timed only on a GPU,
         so here only the bytes are counted and the masking is timed);
  to_vector: {token: weight} per document with weights rounded to 5 decimals (encode.quant_scale 0) or quantised
         (100); before, each weight was rounded as a numpy scalar.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.sparse import kept_columns, prune, to_vector  # noqa: E402


def vectors_before(token_ids, weights, vocab, scale):
    values = [int(v) for v in np.rint(weights * scale)] if scale > 0 else [round(float(v), 5) for v in weights]
    return {vocab[t]: w for t, w in zip(token_ids.tolist(), values) if w}


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * min(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--nnz", type=int, default=150, help="terms per document")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.vocab, args.nnz, args.repeats = 8, 500, 20, 1
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    reps = torch.zeros(args.batch, args.vocab)
    for row in reps:
        row[torch.randperm(args.vocab, generator=generator)[:args.nnz]] = torch.rand(args.nnz, generator=generator) * 3
    vocab = [f"w{i}" for i in range(args.vocab)]
    values, ids = reps.sort(dim=1, descending=True)
    keep = values > 0
    full = [t.numpy() for t in (values, ids, keep)]
    columns = kept_columns(keep)
    prefix = [t[:, :columns].numpy() for t in (values, ids, keep)]
    rows = [{"system": "prune, host side: all columns (before)", "columns": args.vocab,
             "ms_per_batch": best_ms(lambda: [(full[1][i][full[2][i]], full[0][i][full[2][i]])
                                              for i in range(args.batch)], args.repeats)},
            {"system": "prune, host side: kept prefix (now)", "columns": columns,
             "ms_per_batch": best_ms(lambda: [(prefix[1][i][prefix[2][i]], prefix[0][i][prefix[2][i]])
                                              for i in range(args.batch)], args.repeats)}]
    for row in rows:
        row["mb_to_host"] = args.batch * row["columns"] * (4 + 8 + 1) / 1e6
    pruned = prune(reps)
    for scale in (0.0, 100.0):
        assert [to_vector(*p, vocab, scale) for p in pruned] == [vectors_before(*p, vocab, scale) for p in pruned]
        for name, fn in (("before", vectors_before), ("now", to_vector)):
            rows.append({"system": f"to_vector, quant_scale {scale:g} ({name})", "ms_per_batch": best_ms(
                lambda: [fn(*p, vocab, scale) for p in pruned], args.repeats)})
    for row in rows:
        row.update(batch=args.batch, vocab=args.vocab, nnz=args.nnz)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"| system ({args.batch} documents x {args.vocab} terms, {args.nnz} kept) | ms per batch | MB to the host |")
    print("|---|---:|---:|")
    for row in rows:
        mb = f"{row['mb_to_host']:.1f}" if "mb_to_host" in row else "–"
        print(f"| {row['system']} | {row['ms_per_batch']:.1f} | {mb} |")
    return rows


if __name__ == "__main__":
    main()
