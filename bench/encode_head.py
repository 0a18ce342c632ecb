"""The MLM head alone at encoding time (no gradient): the fused Triton kernel vs the chunked torch path vs the naive
head, on encode-sized batches.

    python bench/encode_head.py --out $OUT/encode_head.jsonl     # GPU: BERT-base and Llama-3.2-1B head shapes, bf16
    python bench/encode_head.py --tiny                            # CPU smoke run (torch and naive only)

Shapes: bert-base = H 768, V 30,522 (with a bias), 256 texts; llama1b = H 2048, V 128,256, 64 texts; --length
positions per batch, each text's length uniform in [0.9, 1] x --length (encode.py sorts texts by length, so a
batch's texts are close in length). All map feats [B, L, H] and W [V, H] (bf16) to log1p(relu(max over the text's
positions of feats @ W.T + b)):
  triton: `max_pool_inference(kernel="triton")`: lsr_core/head_kernel.py on the padded batch, no logits written
  torch:  `max_pool_inference(kernel="torch")`: float32 logits per vocabulary chunk, masked, max-reduced
  naive:  F.linear (bf16 logits [B, L, V]) + `naive_mlm_pool`, what sentence-transformers' SpladePooling computes
  packed: the kernel on the texts end to end (packed before the clock starts, as packed encoding has them; the
          torch path on them without a GPU)
--tiles: also each kernel configuration alone on the packed texts ("configs": the autotuner's list, or
BVxBTxBHxWARPSxSTAGESxGROUPxPER_SM items separated by ';'), each checked against the autotuned kernel's output.
TFLOP/s counts 2·H·V per real (unpadded) position. Time: median of CUDA-event timings after warm-up (the kernel's
autotuning happens in the warm-up). Max |difference| of triton and naive against torch is reported.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core import head_kernel  # noqa: E402
from lsr_core.heads import max_pool_inference, naive_mlm_pool  # noqa: E402
from lsr_core.packing import pack_batch  # noqa: E402

SHAPES = {"bert-base": (768, 30522, 256, True), "llama1b": (2048, 128256, 64, False)}


def heads():
    return {
        "triton": lambda f, w, b, m: max_pool_inference(f, w, b, m, 0, kernel="triton"),
        "torch": lambda f, w, b, m: max_pool_inference(f, w, b, m, 0, kernel="torch"),
        "naive": lambda f, w, b, m: naive_mlm_pool(F.linear(f, w, b), m),
    }


def packed_head(feats, mask, kernel: str):
    """The head on the texts of (feats, mask) put end to end (`model.packed`, `pack_batch`), packed before the clock
    starts."""
    packed = pack_batch({"input_ids": mask, "attention_mask": mask, "pool_mask": mask})
    flat = feats[mask.bool()][None]
    return lambda f, w, b, m: max_pool_inference(flat, w, b, packed["pool_mask"][None], 0, kernel=kernel,
                                                  packed=packed["cu_seq_lens"])


def parse_tiles(spec: str) -> list[tuple]:
    tiles = []
    for item in filter(None, spec.split(";")):
        tiles += head_kernel._SEGMENT_TILES if item == "configs" else [tuple(int(n) for n in item.split("x"))]
    return tiles


def time_tiles(tiles, feats, weight, mask, flop, args, device, base: dict) -> list[dict]:
    """Each configuration of the kernel alone on the packed texts; its output against the autotuned kernel's."""
    owners = torch.where(mask.bool(), torch.arange(mask.shape[0], device=device)[:, None], -1).reshape(-1)
    flat, owners = feats.reshape(-1, feats.shape[-1])[owners >= 0], owners[owners >= 0].to(torch.int32)
    ref = head_kernel.segment_max_matmul(flat, weight, owners, mask.shape[0])
    rows = []
    for tile in tiles:
        row = dict(base, system="packed, one tile", tile="x".join(map(str, tile)), device=torch.cuda.get_device_name())
        try:
            got = head_kernel.segment_max_matmul(flat, weight, owners, mask.shape[0], tile)
        except Exception as err:  # a configuration that does not compile (shared memory, registers) is reported
            rows.append(dict(row, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            continue
        ms = timed(lambda: head_kernel.segment_max_matmul(flat, weight, owners, mask.shape[0], tile), device,
                   args.warmup, args.repeats)
        rows.append(dict(row, ms=ms, tflops=flop / ms / 1e9, peak_extra_mib=float("nan"),
                         max_abs_diff_vs_autotuned=(got - ref).abs().max().item()))
    return rows


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="bert-base,llama1b")
    parser.add_argument("--lengths", default="32,160,256", help="positions per batch (queries ~32, documents)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiles", default="", help="also time these kernel configurations alone, packed: 'configs' "
                        "(the autotuner's) and/or BVxBTxBHxWARPSxSTAGESxGROUPxPER_SM, ';'-separated")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = {"tiny": (64, 1000, 8, True)} if args.tiny else {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.tiny:
        args.lengths, args.warmup, args.repeats = "16", 1, 2
    triton_ok = device.type == "cuda"
    rows = []
    for name, (hidden, vocab, batch, with_bias) in shapes.items():
        for length in (int(n) for n in args.lengths.split(",")):
            gen = torch.Generator().manual_seed(length)
            feats = torch.randn(batch, length, hidden, generator=gen).to(device, torch.bfloat16)
            weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, torch.bfloat16)
            bias = (torch.randn(vocab, generator=gen) * 0.1).to(device, torch.bfloat16) if with_bias else None
            lengths = torch.randint(int(0.9 * length), length + 1, (batch,), generator=gen)
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
            flop = 2 * hidden * vocab * int(lengths.sum())
            systems = heads() | {"packed": packed_head(feats, mask, "triton" if triton_ok else "torch")}
            if not triton_ok:
                del systems["triton"]
            with torch.inference_mode():
                ref = systems["torch"](feats, weight, bias, mask)
                for system, head in systems.items():
                    diff = (head(feats, weight, bias, mask).float() - ref).abs().max().item()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    ms = timed(functools.partial(head, feats, weight, bias, mask), device, args.warmup, args.repeats)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else 0.0
                    tile = head_kernel.autotuned_tiles().get("last") \
                        if triton_ok and system in ("triton", "packed") else None
                    rows.append({"shape": name, "tile": str(tile) if tile else "", "hidden": hidden, "vocab": vocab,
                                 "batch": batch, "length": length,
                                 "system": system, "ms": ms, "tflops": flop / ms / 1e9, "peak_extra_mib": peak,
                                 "max_abs_diff_vs_torch": diff,
                                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
                if triton_ok:
                    rows += time_tiles(parse_tiles(args.tiles), feats, weight, mask, flop, args, device,
                                       dict(shape=name, hidden=hidden, vocab=vocab, batch=batch, length=length))
            del feats, weight, bias, mask, ref
    for r in rows:
        base = next(x for x in rows
                    if x["shape"] == r["shape"] and x["length"] == r["length"] and x["system"] == "torch")
        r["speedup_vs_torch"] = base["ms"] / r["ms"] if "ms" in r else float("nan")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("| shape | B x L | system | ms | TFLOP/s | extra MiB | vs torch | max abs diff (one tile: vs autotuned) "
          "| tile |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['batch']} x {r['length']} | {r['system']} | {r['error']} | | | | | "
                  f"{r['tile']} |")
            continue
        diff = r.get("max_abs_diff_vs_torch", r.get("max_abs_diff_vs_autotuned"))
        print(f"| {r['shape']} | {r['batch']} x {r['length']} | {r['system']} | {r['ms']:.2f} | {r['tflops']:.0f} "
              f"| {r['peak_extra_mib']:.0f} | {r['speedup_vs_torch']:.2f}x | {diff:.1e} | {r['tile']} |")
    return rows


if __name__ == "__main__":
    main()
