"""Attention over texts packed end to end, at inference, for CUDA (Triton): each text attends to itself only.

    out[t] = softmax(q[t] . k[s] * scale over the positions s of t's text) @ v[s]

torch's `varlen_attn` (FlashAttention-2) cuts each text into query and key tiles of 128 positions, so a text of
130 positions costs as much as one of 256, so on MS MARCO-like documents most of its attention work is padding
(bench/RESULTS.md, "Where BERT-base's encoding time goes"). Here the tile sizes are autotuned per head size and per bucket of the longest text, down to 32 x 32.
Online softmax (exp2, float32 statistics and accumulator), one program per (query tile, text, head); a program
whose tile starts past its text's end exits. Forward only: training keeps `varlen_attn`, which has a backward.
Tested on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import math

import torch

from lsr_core.head_kernel import INTERPRET, triton

if triton is not None:
    import triton.language as tl

    # (BLOCK_M query rows, BLOCK_N key columns, warps, stages)
    _TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (64, 128, 4, 2),
              (128, 128, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)]
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _TILES]
    if INTERPRET:
        _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]

    @triton.autotune(configs=_CONFIGS, key=["HEAD_D", "LEN_BUCKET"])
    @triton.jit
    def _packed_attention(q, k, v, out, cu, qk_scale, LEN_BUCKET, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                          HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tile, text, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu + text)
        length = tl.load(cu + text + 1) - start
        if tile * BLOCK_M < length:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_D)
            in_m = offs_m < length
            rows = q + (start + offs_m)[:, None] * s_qt + head * s_qh + offs_d[None, :]
            queries = tl.load(rows, mask=in_m[:, None], other=0.0)
            best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
            for n0 in range(0, length, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                in_n = offs_n < length
                keys = tl.load(k + (start + offs_n)[None, :] * s_kt + head * s_kh + offs_d[:, None],
                               mask=in_n[None, :], other=0.0)
                scores = tl.where(in_n[None, :], tl.dot(queries, keys) * qk_scale, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, axis=1))
                weights = tl.math.exp2(scores - new_best[:, None])
                rescale = tl.math.exp2(best - new_best)
                total = total * rescale + tl.sum(weights, axis=1)
                values = tl.load(v + (start + offs_n)[:, None] * s_vt + head * s_vh + offs_d[None, :],
                                 mask=in_n[:, None], other=0.0)
                acc = tl.dot(weights.to(values.dtype), values, acc * rescale[:, None])
                best = new_best
            acc = acc / total[:, None]
            tl.store(out + (start + offs_m)[:, None] * s_ot + head * s_oh + offs_d[None, :],
                     acc.to(out.dtype.element_ty), mask=in_m[:, None])


def usable(q: torch.Tensor) -> bool:
    """Where packed attention at inference uses the kernel: CUDA tensors in bf16/fp16 with a power-of-two head size
    of 16-256 (tl.dot's and tl.arange's constraints)."""
    d = q.shape[-1]
    return (triton is not None and not INTERPRET and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and 16 <= d <= 256 and d & (d - 1) == 0)


@torch.library.custom_op("lsr::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, scale: float) -> torch.Tensor:
    """q, k, v [T, heads, d] (texts end to end), cu_seq_lens [B + 1] int32 offsets, max_length an upper bound on a
    text's length -> out [T, heads, d] in q's dtype. No host synchronisation. A custom op, so that torch.compile
    keeps it whole inside a compiled transformer stack."""
    positions, heads, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"packed attention needs q, k, v of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    texts = cu_seq_lens.shape[0] - 1
    if positions == 0 or texts == 0 or max_length <= 0:
        return out

    def grid(meta):
        return (triton.cdiv(max_length, meta["BLOCK_M"]), texts, heads)

    # tuned per power of two of the longest text (a host-side bound: no synchronisation); every configuration writes
    # the same positions, so the autotuner's repeated launches leave `out` right
    _packed_attention[grid](q, k, v, out, cu_seq_lens.to(torch.int32), scale * math.log2(math.e),
                            triton.next_power_of_2(max_length), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), out.stride(0), out.stride(1), HEAD_D=d)
    return out


@packed_attention.register_fake
def _(q, k, v, cu_seq_lens, max_length, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def autotuned_tiles() -> dict[str, str]:
    """`head_kernel.tiles_chosen` of the attention kernel; empty without triton."""
    from lsr_core.head_kernel import tiles_chosen

    return {} if triton is None else tiles_chosen(_packed_attention)
