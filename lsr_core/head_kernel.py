"""Fused MLM encoding head for CUDA (Triton): the max over positions of feats @ W.T, without writing the logits.

    pooled[b, v] = max over pooled positions l of  sum_h feats[b, l, h] * weight[v, h]     (float32 accumulation)

The torch path (`modeling._max_pool_inference`) writes float32 logits for every (position, term) of a vocabulary
chunk, masks them and max-reduces them: three memory passes over [tokens x vocabulary], about as long as the matmul
itself for BERT-base. Here each program computes a [terms x positions] tile of one text in registers, masks it and
keeps a running max, so only [texts x vocabulary] is written. Rows with no pooled position get -inf, as in the
torch path. Only positions between a text's first and last pooled one are computed (left padding, echo's first
copy). Inference only (no argmax is kept): training uses `modeling._SparseMLMPool`.

Programs run in groups of GROUP_B texts that sweep the vocabulary together, so those texts' hidden states stay in L2
while each weight tile is read once per group. Tile sizes are autotuned once per (hidden, vocabulary, width bucket)
and process.
Tested on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import
_MAX_ELEMENTS = 2**31  # the kernel's offsets are 32-bit


def _addressable(feats: torch.Tensor, weight: torch.Tensor) -> bool:
    """Every element's offset fits 32 bits (offsets, not sizes: packed texts are expanded with stride 0)."""
    return all(sum((n - 1) * s for n, s in zip(t.shape, t.stride())) < _MAX_ELEMENTS - 1 for t in (feats, weight))


def usable(feats: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Where `model.head_kernel=auto` picks the kernel: CUDA tensors in bf16/fp16 (float32 would drop to TF32 in
    tl.dot and differ from the torch path) that 32-bit offsets can address."""
    return (triton is not None and not INTERPRET and feats.is_cuda and dtype in (torch.bfloat16, torch.float16)
            and _addressable(feats, weight))


def check_runnable(feats: torch.Tensor) -> None:
    """For `model.head_kernel=triton`: fail with the reason instead of falling back."""
    if triton is None:
        raise RuntimeError("model.head_kernel=triton needs the 'triton' package (it comes with CUDA builds of torch)")
    if not (feats.is_cuda or INTERPRET):
        raise RuntimeError(f"model.head_kernel=triton needs a CUDA device, got {feats.device} (set "
                           "TRITON_INTERPRET=1 before importing triton to run it on the CPU, slowly)")


if triton is not None:
    # (BLOCK_V, BLOCK_L, BLOCK_H, warps, stages): vocabulary rows are the MMA's M side, positions its N side, so
    # short texts (queries) still fill the tile and the max over positions reduces within each thread's rows
    _TILES = [(128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 32, 64, 4, 4), (256, 64, 64, 8, 3),
              (256, 128, 64, 8, 3), (128, 64, 128, 4, 3), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]
    _CONFIGS = [triton.Config({"BLOCK_V": bv, "BLOCK_L": bl, "BLOCK_H": bh}, num_warps=w, num_stages=s)
                for bv, bl, bh, w, s in _TILES]
    if INTERPRET:  # one small config: the interpreter runs every program in Python
        _CONFIGS = [triton.Config({"BLOCK_V": 32, "BLOCK_L": 16, "BLOCK_H": 16})]

    @triton.autotune(configs=_CONFIGS, key=["H", "V", "L_BUCKET"])
    @triton.jit
    def _masked_max_matmul(feats, weight, mask, start, stop, out, B, H, V, L_BUCKET,
                           s_fb, s_fl, s_fh, s_wv, s_wh, s_mb, s_ml,
                           BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr,
                           GROUP_B: tl.constexpr):
        pid = tl.program_id(0)
        n_v = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_B * n_v
        first = (pid // per_group) * GROUP_B
        rows = tl.minimum(B - first, GROUP_B)
        b = first + (pid % per_group) % rows
        offs_v = ((pid % per_group) // rows) * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_h = tl.arange(0, BLOCK_H)
        in_v = offs_v < V
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        lo = tl.load(start + b)
        hi = tl.load(stop + b)
        for l0 in range(lo, hi, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            in_l = offs_l < hi
            acc = tl.zeros([BLOCK_V, BLOCK_L], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                in_h = (h0 + offs_h) < H
                w = tl.load(weight + offs_v[:, None] * s_wv + (h0 + offs_h)[None, :] * s_wh,
                            mask=in_v[:, None] & in_h[None, :], other=0.0)
                a = tl.load(feats + b * s_fb + offs_l[None, :] * s_fl + (h0 + offs_h)[:, None] * s_fh,
                            mask=in_h[:, None] & in_l[None, :], other=0.0)
                acc = tl.dot(w, a, acc)
            keep = tl.load(mask + b * s_mb + offs_l * s_ml, mask=in_l, other=0) != 0
            acc = tl.where(keep[None, :], acc, float("-inf"))
            best = tl.maximum(best, tl.max(acc, axis=1))
        tl.store(out + b * V + offs_v, best, mask=in_v)


def masked_max_matmul(feats: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, group: int = 8,
                      bounds: tuple[torch.Tensor, torch.Tensor] | None = None, width: int = 0) -> torch.Tensor:
    """feats [B, L, H], weight [V, H] (same dtype), mask [B, L] (nonzero = pool) -> [B, V] float32 maxima of the
    raw products over pooled positions (-inf for a text with none). No host synchronisation.
    `bounds` = (start, stop) [B] int32: text b reads only positions [start, stop) (packed texts: feats [1, T, H] and
    mask [1, T] expanded to B rows with stride 0); by default each row's first and last pooled position.
    `width`: the longest text's length when `bounds` are given (tiles are tuned per width), else feats' length."""
    batch, length, hidden = feats.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden or weight.dtype != feats.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match feats {tuple(feats.shape)} "
                         f"{feats.dtype}")
    if not _addressable(feats, weight):
        raise ValueError(f"feats {tuple(feats.shape)} or weight {tuple(weight.shape)} has 2**31 elements or more: "
                         "split the batch")
    if batch == 0 or length == 0:
        return torch.full((batch, vocab), float("-inf"), device=feats.device)
    if bounds is None:
        keep = mask.bool()
        positions = torch.arange(length, device=feats.device)
        bounds = (torch.where(keep, positions, length).amin(1).to(torch.int32),
                  torch.where(keep, positions + 1, 0).amax(1).to(torch.int32))
    start, stop = bounds
    out = torch.empty(batch, vocab, dtype=torch.float32, device=feats.device)

    def grid(meta):
        return (batch * triton.cdiv(vocab, meta["BLOCK_V"]),)

    # tiles are tuned per padded width (a host-side number: no synchronisation), rounded up to a multiple of 32 up to
    # 256 tokens and to a power of two beyond: positions past a text's end still cost a tile's share of the MMA
    width = width or length
    bucket = -(-width // 32) * 32 if width <= 256 else triton.next_power_of_2(width)
    _masked_max_matmul[grid](feats, weight, mask, start, stop, out, batch, hidden, vocab, bucket,
                             *feats.stride(), *weight.stride(), *mask.stride(), GROUP_B=group)
    return out
