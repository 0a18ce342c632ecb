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
  --writers: the whole conversion to JSON lines (to_vector, json, ShardWriter.add_json) for --batches pruned
         batches, as encode.py runs it with encode.num_writers N (`VectorWriters`: N worker processes while the
         main process goes on; 0 = in the main process), per N: documents per second, as if the model were free
         (what encode.py can take at most), and the main process's CPU time per batch (what is left of this work
         on the thread that also launches the model). Worker start-up is outside the clock.
  --shard-docs: ShardWriter.close on that many documents' lines (gzip level 5): one gzip stream written line by
         line on one thread (before) against `write_gzip_lines`, deflated in pieces on 1 and on every core (now);
         seconds, MB/s of JSON and the compressed size. The files must decompress to the same lines.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.sparse import ShardWriter, kept_columns, prune, to_vector, vector_rows  # noqa: E402
from lsr_core.writers import VectorWriters  # noqa: E402
from lsr_core.utils import atomic_open, write_gzip_lines  # noqa: E402


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


def time_writers(processes: int, pruned: list, vocab: list[str], args) -> dict:
    """encode.py's loop after `prune`, N writer processes: every batch submitted, drained, written as lines."""
    expected = vector_rows(pruned, vocab, 0.0)
    with VectorWriters(processes, vocab) as writers:
        writers.submit(-1, pruned[:1])  # start the workers before the clock
        writers.drain()
        began, cpu = time.perf_counter(), time.process_time()
        shard = ShardWriter("unused.jsonl.gz")  # lines only; never closed, so nothing is written
        done = []
        for key in range(args.batches):
            done += writers.submit(key, pruned)
        done += writers.drain()
        for key, batch_rows in done:
            for i, (vector_json, nnz) in enumerate(batch_rows):
                shard.add_json(f"{key}-{i}", vector_json, nnz)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    assert [key for key, _ in done] == list(range(args.batches)) and all(r == expected for _, r in done)
    return {"system": f"JSON lines, encode.num_writers {processes}", "ms_per_batch": 1e3 * seconds / args.batches,
            "docs_per_s": args.batches * args.batch / seconds, "main_cpu_ms_per_batch": 1e3 * cpu / args.batches}


def time_shard_close(pruned: list, vocab: list[str], args) -> list[dict]:
    """The shard file: the same lines compressed before (one stream, one thread) and now (pieces, N threads)."""
    rows = vector_rows(pruned, vocab, 0.0)
    shard = ShardWriter("unused.jsonl.gz")  # its lines only; each system writes them itself
    for i in range(args.shard_docs):
        shard.add_json(f"d{i}", *rows[i % len(rows)])
    lines = shard.rows
    mb = sum(len(line) + 1 for line in lines) / 1e6

    def before(path):
        with atomic_open(path) as f:
            for line in lines:
                f.write(line + "\n")

    systems = {"one gzip stream, 1 thread (before)": before}
    for threads in dict.fromkeys([1, os.cpu_count() or 1]):
        systems[f"pieces, {threads} thread(s) (now)"] = lambda path, t=threads: write_gzip_lines(path, lines, threads=t)
    out = []
    with tempfile.TemporaryDirectory(prefix="shard_close_") as folder:
        for name, write in systems.items():
            path = Path(folder) / f"{len(out)}.jsonl.gz"
            seconds = best_ms(lambda: write(path), args.repeats) / 1e3
            assert gzip.open(path, "rt").read().splitlines() == lines
            out.append({"system": f"ShardWriter.close, {args.shard_docs} documents: {name}", "seconds": seconds,
                        "ms_per_batch": 1e3 * seconds * args.batch / args.shard_docs, "json_mb_per_s": mb / seconds,
                        "gz_mb": path.stat().st_size / 1e6})
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--nnz", type=int, default=150, help="terms per document")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--writers", default="", help="comma list of encode.num_writers values to time the whole "
                        "conversion to JSON lines with (e.g. 0,1,2)")
    parser.add_argument("--batches", type=int, default=40, help="batches per --writers timing")
    parser.add_argument("--shard-docs", type=int, default=0, help="also time ShardWriter.close on this many "
                        "documents' lines (e.g. 20480)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.vocab, args.nnz, args.repeats, args.batches = 8, 500, 20, 1, 3
        args.shard_docs = args.shard_docs and 50
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
    rows += [time_writers(int(n), pruned, vocab, args) for n in filter(None, args.writers.split(","))]
    rows += time_shard_close(pruned, vocab, args) if args.shard_docs else []
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
        rate = f" ({row['docs_per_s']:.0f} docs/s; main process CPU {row['main_cpu_ms_per_batch']:.1f} ms)" \
            if "docs_per_s" in row else ""
        if "json_mb_per_s" in row:
            rate = f" ({row['seconds']:.2f} s, {row['json_mb_per_s']:.0f} MB/s of JSON, {row['gz_mb']:.1f} MB gzip)"
        print(f"| {row['system']} | {row['ms_per_batch']:.1f}{rate} | {mb} |")
    return rows


if __name__ == "__main__":
    main()
