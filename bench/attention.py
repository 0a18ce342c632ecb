"""Packed attention at encoding time, one length-sorted batch per row: our Triton kernel vs torch's varlen_attn
(FlashAttention-2) vs cuDNN's variable-length attention, on the same inputs.

    python bench/attention.py --out $OUT/attention.jsonl     # GPU: BERT-base heads (12 x 64), 256 texts per batch
    python bench/attention.py --tiny                          # CPU smoke run (Triton's interpreter, per-text SDPA)

encode.py sorts texts by length, so a batch holds texts of nearly one length: each row is 256 texts with lengths
uniform in [0.95 L, L], packed end to end, bf16. Systems:
  ours:   lsr_core/attention_kernel.py (autotuned in the warm-up; the chosen tile is printed)
  varlen: torch.nn.attention.varlen.varlen_attn, what packed encoding ran before (`model.attention_kernel=varlen`)
  cudnn:  torch.ops.aten._cudnn_attention_forward with the texts' offsets (what varlen_attn's cuDNN branch calls)
  sdpa:   one scaled_dot_product_attention per text (the CPU path; --tiny only)
TFLOP/s counts the real work, 4 * L_text^2 * head_dim per head and text. Time: median of CUDA-event timings.
Max |difference| against varlen (or sdpa) is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.encode_head import timed  # noqa: E402
from lsr_core import attention_kernel  # noqa: E402


def systems(device):
    def sdpa(q, k, v, cu, max_len, scale):
        ends = cu.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
            for a, b in zip(ends, ends[1:])])

    if device.type != "cuda":
        return {"sdpa": sdpa, "ours": attention_kernel.packed_attention}
    from torch.nn.attention.varlen import varlen_attn

    def cudnn(q, k, v, cu, max_len, scale):
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, False, 0.0, False,
                                                       False, scale=scale)[0]

    return {"varlen": lambda q, k, v, cu, max_len, scale: varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale),
            "ours": attention_kernel.packed_attention, "cudnn": cudnn}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,100,130,160,200,250", help="the longest text of each batch")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.lengths, args.texts, args.heads, args.head_dim, args.warmup, args.repeats = "20,40", 4, 2, 16, 1, 2
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(length)
        lengths = torch.randint(int(0.95 * length), length + 1, (args.texts,), generator=gen)
        q, k, v = (torch.randn(int(lengths.sum()), args.heads, args.head_dim, generator=gen).to(device, dtype)
                   for _ in range(3))
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]).to(device)
        max_len, scale = -(-length // 64) * 64, args.head_dim ** -0.5  # encode's bound: the width rounded up to 64
        flop = 4 * args.head_dim * args.heads * int((lengths ** 2).sum())
        ref_name, ref = None, None
        for name, fn in systems(device).items():
            with torch.inference_mode():
                out = fn(q, k, v, cu, max_len, scale)
                if ref is None:
                    ref_name, ref = name, out.float()
                ms = timed(lambda: fn(q, k, v, cu, max_len, scale), device, args.warmup, args.repeats)
            tile = attention_kernel.autotuned_tiles().get("last", "") if name == "ours" and device.type == "cuda" else ""
            rows.append({"length": length, "texts": args.texts, "heads": args.heads, "head_dim": args.head_dim,
                         "system": name, "ms": ms, "tflops": flop / ms / 1e9, "tile": str(tile),
                         f"max_abs_diff_vs_{ref_name}": (out.float() - ref).abs().max().item(),
                         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    for r in rows:
        base = next(x for x in rows if x["length"] == r["length"] and x["system"] == rows[0]["system"])
        r[f"speedup_vs_{rows[0]['system']}"] = base["ms"] / r["ms"]
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    first = rows[0]["system"]
    print(f"| longest text | system | ms | TFLOP/s (real) | vs {first} | max abs diff vs {first} | tile |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['length']} | {r['system']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r[f'speedup_vs_{first}']:.2f}x "
              f"| {r[f'max_abs_diff_vs_{first}']:.1e} | {r['tile']} |")
    return rows


if __name__ == "__main__":
    main()
