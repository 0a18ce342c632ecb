"""Sparse MLM head vs the naive head: gradient error, peak extra memory, time (forward + backward).

    python bench/head.py --out $OUT/head.jsonl              # GPU: V in {30522, 32000, 128256}, H 4096, 16 x 256, bf16
    python bench/head.py --chunks 2048,4096,16384           # also time other vocabulary chunk sizes
    python bench/head.py --tiny                             # CPU smoke run in seconds

Both heads map feats [B, L, H] (bf16, requires grad) and W [V, H] (bf16 parameter; a bias for V=30522, BERT-like)
to reps [B, V] = max over unpadded positions of log1p(relu(feats @ W.T + b)); the loss is sum(reps * r) for a random
r, so the backward sees a dense random upstream gradient. Rows are padded to random lengths in [L/2, L].
  naive:  F.linear (bf16 logits [B, L, V]) + `naive_mlm_pool` (autograd keeps its float32 intermediates)
  sparse: `sparse_mlm_pool` (chunked over V, float32-result bf16 matmuls, argmax-scatter backward)
Gradient error: ||g - g_ref|| / ||g_ref|| against the naive head run on the same bf16 values upcast to float32
(the function both compute, without bf16 rounding of the logits); the naive bf16 head's own error is reported too.
Peak extra memory: max allocated during forward + backward minus the allocation before it (inputs and weights);
both include the [V, H] weight gradient. Time: median of CUDA-event timings after warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.heads import naive_mlm_pool, sparse_mlm_pool  # noqa: E402


def make_inputs(batch, length, hidden, vocab, bias, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(batch, length, hidden, generator=gen).to(device, torch.bfloat16)
    # std 0.02 * sqrt(H) ~ 1.3 logit std, like a freshly initialised LM head on layer-normed states
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, torch.bfloat16)
    b = (torch.randn(vocab, generator=gen) * 0.1).to(device, torch.bfloat16) if bias else None
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
    upstream = torch.randn(batch, vocab, generator=gen).to(device)
    return feats, weight, b, mask, upstream


def naive_head(feats, weight, bias, mask):
    return naive_mlm_pool(F.linear(feats, weight, bias), mask)


def sparse_head(feats, weight, bias, mask, chunk=0):
    return sparse_mlm_pool(feats, weight, bias, mask, chunk=chunk)


def run_once(head, feats, weight, bias, mask, upstream, dtype=None):
    """Forward + backward; returns the gradients (feats, weight, bias) as float32."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (feats, weight, bias)]
    reps = head(leaves[0], leaves[1], leaves[2], mask)
    (reps.float() * upstream).sum().backward()
    return [t.grad.float() if t is not None else None for t in leaves]


def rel_err(got, ref):
    errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref) if r is not None]
    return max(errs), errs


def measure(head, inputs, device, warmup, repeats):
    feats, weight, bias, mask, upstream = inputs
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (feats, weight, bias)]

    def step():
        for t in leaves:
            if t is not None:
                t.grad = None
        reps = head(leaves[0], leaves[1], leaves[2], mask)
        (reps * upstream).sum().backward()

    for _ in range(warmup):
        step()
    times = []
    peak = 0
    for _ in range(repeats):
        for t in leaves:
            if t is not None:
                t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            reps = head(leaves[0], leaves[1], leaves[2], mask)
            (reps * upstream).sum().backward()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    parser.add_argument("--vocabs", default="30522,32000,128256")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--chunks", default="", help="also time the sparse head at these vocabulary chunk sizes")
    parser.add_argument("--out", default="", help="append one JSON line per vocabulary size")
    args = parser.parse_args(argv)
    if args.tiny:
        args.vocabs, args.hidden, args.batch, args.length, args.warmup, args.repeats = "300,320,1000", 64, 2, 16, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rows = []
    for i, vocab in enumerate(int(v) for v in args.vocabs.split(",")):
        inputs = make_inputs(args.batch, args.length, args.hidden, vocab, vocab == 30522 or args.tiny, device, seed=i)
        feats, weight, bias, mask, upstream = inputs
        ref = run_once(naive_head, feats, weight, bias, mask, upstream, dtype=torch.float32)
        err_sparse, errs = rel_err(run_once(sparse_head, *inputs), ref)
        err_naive_bf16, _ = rel_err(run_once(naive_head, *inputs), ref)
        del ref
        naive_ms, naive_peak = measure(naive_head, inputs, device, args.warmup, args.repeats)
        sparse_ms, sparse_peak = measure(sparse_head, inputs, device, args.warmup, args.repeats)
        row = {"vocab": vocab, "hidden": args.hidden, "batch": args.batch, "length": args.length,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "grad_rel_err_sparse": err_sparse, "grad_rel_err_sparse_each": errs,
               "grad_rel_err_naive_bf16": err_naive_bf16,
               "naive_ms": naive_ms, "sparse_ms": sparse_ms, "time_ratio": sparse_ms / naive_ms,
               "naive_peak_mib": naive_peak / 2**20, "sparse_peak_mib": sparse_peak / 2**20,
               "memory_ratio": sparse_peak / naive_peak if naive_peak else None, "by_chunk": {}}
        for chunk in (int(c) for c in args.chunks.split(",") if c):
            ms, peak = measure(lambda *t, c=chunk: sparse_head(*t, chunk=c), inputs, device, args.warmup, args.repeats)
            row["by_chunk"][chunk] = {"ms": ms, "peak_mib": peak / 2**20}
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del inputs, feats, weight, bias, mask, upstream
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("| V | grad rel err sparse (naive bf16) vs fp32 ref | naive ms | sparse ms | time ratio "
          "| naive peak MiB | sparse peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['memory_ratio']:.3f}" if r["memory_ratio"] is not None else "n/a"
        print(f"| {r['vocab']} | {r['grad_rel_err_sparse']:.1e} ({r['grad_rel_err_naive_bf16']:.1e}) "
              f"| {r['naive_ms']:.2f} | {r['sparse_ms']:.2f} | {r['time_ratio']:.2f} | {r['naive_peak_mib']:.0f} "
              f"| {r['sparse_peak_mib']:.0f} | {mem} |")
    for r in rows:
        for chunk, m in r["by_chunk"].items():
            print(f"V={r['vocab']} chunk={chunk}: {m['ms']:.2f} ms, peak {m['peak_mib']:.0f} MiB")
    return rows


if __name__ == "__main__":
    main()
