"""The sparse heads' pooling (DESIGN §2): one masked pooling function for every backbone.

MLM head: vocabulary logits -> ReLU -> log1p -> max (or sum) over the positions a pool mask keeps. `sparse_mlm_pool`
never builds [batch, length, vocab] in full: chunked over the vocabulary, with a custom backward that keeps only the
argmax position of each (row, term); at encoding time on CUDA its max pooling runs as one Triton kernel
(`head_kernel.py`) that writes no logits at all. `naive_mlm_pool` is the reference the tests compare against.
MLP head: one ReLU'd weight per input token, scattered to its token id (`mlp_pool`).
The vocabulary projection is swapped for the pooling during a backbone's forward (`projection_swapped`), so the
pooling runs inside the projection module's own call and DeepSpeed ZeRO-3 still gathers its weight.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from lsr_core import head_kernel

def naive_mlm_pool(logits: torch.Tensor, mask: torch.Tensor, pooling: str = "max") -> torch.Tensor:
    """Reference pooling. logits [B, L, V], mask [B, L] (1 = pool this position) -> reps [B, V]."""
    acts = torch.log1p(torch.relu(logits.float())) * mask.unsqueeze(-1).float()
    return acts.amax(dim=1) if pooling == "max" else acts.sum(dim=1)


def _auto_chunk(batch: int, vocab: int, length: int, device: torch.device) -> int:
    """Vocabulary rows per chunk of the MLM head. GPU: ~32M float32 logits (128 MB) per chunk keeps the matmul
    efficient (8192 rows at 16 x 256 positions). CPU: ~4M (16 MB) stays under glibc's mmap threshold, so the buffer
    is reused instead of page-faulted in afresh for every chunk."""
    budget = 1 << 25 if device.type == "cuda" else 1 << 22
    return max(1, min(vocab, budget // max(1, batch * length)))


_MM_OUT_DTYPE = {"ok": True}  # flipped off once if this torch/device lacks mm(..., out_dtype=)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. On CUDA, bf16/fp16 operands keep the tensor-core rate and accumulate in float32
    without rounding the product to 16 bits: rounding would create ties among positions and move the argmax (a
    gradient error at bf16 worth avoiding: bench/RESULTS.md)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE["ok"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["ok"] = False
    return (a @ b).float()


class _SparseMLMPool(torch.autograd.Function):
    """log1p(relu(feats @ W.T + b)) pooled over masked positions, chunked over the vocabulary.

    Vocabulary chunks (not position chunks) make each chunk's pooled value final and let the backward write each
    slice of grad_W once, so no [V, H] float32 accumulator is needed. Matmuls run in the autocast dtype (else the
    input dtype) with float32 results.
    max pooling: log1p(relu(.)) is monotonic and the bias is constant over positions, so the max is taken on the raw
    product (masked positions set to -inf), then bias and activation are applied once on [B, V]. The backward needs
    no recomputation: the gradient reaches only the argmax position of each (row, term), with
    d/dz log1p(relu(z)) = exp(-s) where s is the pooled value (0 where s == 0). It is scattered into a
    [B, L, chunk] matrix G, then grad_feats += G @ W_chunk and grad_W[chunk] = G^T @ feats.
    sum pooling: activations are summed per chunk; the backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, feats, weight, bias, mask, pooling, chunk):
        batch, length, hidden = feats.shape
        vocab = weight.shape[0]
        chunk = chunk or _auto_chunk(batch, vocab, length, feats.device)
        dtype = torch.get_autocast_dtype(feats.device.type) if torch.is_autocast_enabled(feats.device.type) \
            else feats.dtype
        flat = feats.reshape(batch * length, hidden).to(dtype)
        keep = mask.bool()  # masked even without padding: checking for it would stall the host on the GPU
        out = feats.new_empty(batch, vocab, dtype=torch.float32)
        argmax = torch.empty(batch, vocab, dtype=torch.long, device=feats.device) if pooling == "max" else None
        for start in range(0, vocab, chunk):
            stop = min(vocab, start + chunk)
            w_chunk = weight[start:stop].to(dtype).T
            if pooling == "max" and not feats.is_cuda:
                # CPU matmuls round to the operand dtype anyway: keep bf16 logits, halving the mask and max passes
                logits = (flat @ w_chunk).view(batch, length, stop - start)
            else:
                logits = _mm_float32(flat, w_chunk).view(batch, length, stop - start)
            if pooling == "max":
                logits.masked_fill_(~keep[:, :, None], float("-inf"))
                values, argmax[:, start:stop] = logits.max(dim=1)
                values = values.float()
                if bias is not None:
                    values += bias[start:stop].float()
                out[:, start:stop] = torch.log1p(torch.relu(values))
            else:
                if bias is not None:
                    logits += bias[start:stop].float()
                acts = torch.log1p(torch.relu(logits)).mul_(keep[:, :, None])
                out[:, start:stop] = acts.sum(dim=1)
        ctx.pooling, ctx.chunk, ctx.dtype = pooling, chunk, dtype
        ctx.save_for_backward(feats, weight, bias, keep, out if pooling == "max" else None, argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, bias, keep, out, argmax = ctx.saved_tensors
        batch, length, hidden = feats.shape
        vocab, dtype = weight.shape[0], ctx.dtype
        flat = feats.reshape(batch * length, hidden).to(dtype)
        need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_flat = torch.zeros(batch * length, hidden, dtype=torch.float32, device=feats.device) \
            if need_feats else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
        if ctx.pooling == "max":
            # gradient w.r.t. the winning logit of each (row, term); zero where the max is 0 (ReLU inactive)
            grad_logit = grad_out.float() * torch.exp(-out) * (out > 0)
            if grad_bias is not None:
                grad_bias = grad_logit.sum(0)
        for start in range(0, vocab, ctx.chunk):
            stop = min(vocab, start + ctx.chunk)
            w_chunk = weight[start:stop].to(dtype)
            if ctx.pooling == "max":
                grad_chunk = torch.zeros(batch, length, stop - start, dtype=dtype, device=feats.device)
                grad_chunk.scatter_(1, argmax[:, None, start:stop], grad_logit[:, None, start:stop].to(dtype))
            else:
                logits = _mm_float32(flat, w_chunk.T).view(batch, length, stop - start)
                if bias is not None:
                    logits += bias[start:stop].float()
                grad_f32 = grad_out[:, None, start:stop].float() * (logits > 0) / (1 + logits.clamp(min=0))
                grad_f32.mul_(keep[:, :, None])
                if grad_bias is not None:
                    grad_bias[start:stop] = grad_f32.sum((0, 1))
                grad_chunk = grad_f32.to(dtype)
                del logits, grad_f32
            grad_chunk = grad_chunk.view(batch * length, stop - start)
            if grad_flat is not None:
                grad_flat += _mm_float32(grad_chunk, w_chunk)
            if grad_weight is not None:
                grad_weight[start:stop] = _mm_float32(grad_chunk.T, flat) if weight.dtype == torch.float32 \
                    else grad_chunk.T @ flat
        grad_feats = grad_flat.view(batch, length, hidden).to(feats.dtype) if grad_flat is not None else None
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_feats, grad_weight, grad_bias, None, None, None


def sparse_mlm_pool(feats, weight, bias, mask, pooling="max", chunk=0, kernel="auto"):
    """Memory-lean MLM head. feats [B, L, H], weight [V, H], bias [V] or None, mask [B, L] -> reps [B, V] float32.
    `chunk`: vocabulary rows per chunk (0 = automatic). `kernel`: "auto" encodes (max pooling, no gradient) with the
    fused Triton kernel on CUDA in bf16/fp16 (lsr_core/head_kernel.py), "torch" always with the chunked torch path,
    "triton" always with the kernel (an error where it cannot run)."""
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} entries for a vocabulary of {weight.shape[0]}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, weight, bias))
    if pooling == "max" and not needs_grad:
        return max_pool_inference(feats, weight, bias, mask, chunk, kernel=kernel)
    return _SparseMLMPool.apply(feats, weight, bias, mask, pooling, chunk)


def max_pool_inference(feats, weight, bias, mask, chunk, activate: bool = True, kernel: str = "auto",
                        packed: torch.Tensor | None = None):
    """Encoding path of max pooling: no argmax to keep. On CUDA in bf16/fp16 the fused Triton kernel (no logits
    written); otherwise chunked, and on the CPU the logits stay in the matmul dtype (bf16 halves the memory passes
    of masking and max; faster than the training path on the CPU).
    `activate=False` returns the pooled logits before ReLU and log1p (what calibration thresholds).
    `packed`: the texts' offsets cu_seq_lens [B + 1] when feats [1, T, H] and mask [1, T] hold them end to end
    (`packing.packed_inputs`); the kernel reads them in place, the torch path unpads first."""
    dtype = torch.get_autocast_dtype(feats.device.type) if torch.is_autocast_enabled(feats.device.type) \
        else feats.dtype
    if kernel == "triton":
        head_kernel.check_runnable(feats)
    use_kernel = kernel == "triton" or (kernel == "auto" and head_kernel.usable(feats, weight, dtype))
    if use_kernel:  # texts end to end, or the padded batch flattened: each position tagged with its text
        rows = packed.shape[0] - 1 if packed is not None else feats.shape[0]
        texts = torch.arange(rows, device=feats.device, dtype=torch.int32)
        if packed is not None:
            owner = texts.repeat_interleave(packed.diff(), output_size=feats.shape[1])
        else:
            owner = texts[:, None].expand(feats.shape[:2]).reshape(-1)
        pooled = torch.where(mask.reshape(-1) != 0, owner, -1)
        out = head_kernel.segment_max_matmul(feats.reshape(-1, feats.shape[-1]).to(dtype), weight.to(dtype),
                                             pooled, rows)
        return _activate(out, bias, activate)
    if packed is not None:
        lengths = packed.diff()
        keep = torch.arange(int(lengths.max()), device=feats.device)[None] < lengths[:, None]
        feats = feats.new_zeros(*keep.shape, feats.shape[-1]).index_put_((keep,), feats[0])
        mask = mask.new_zeros(keep.shape).index_put_((keep,), mask[0])
    batch, length, hidden = feats.shape
    vocab = weight.shape[0]
    chunk = chunk or 4 * _auto_chunk(batch, vocab, length, feats.device)
    flat = feats.reshape(batch * length, hidden).to(dtype)
    pad = ~mask.bool()[:, :, None]
    out = torch.empty(batch, vocab, dtype=torch.float32, device=feats.device)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        w_chunk = weight[start:stop].to(dtype).T
        logits = _mm_float32(flat, w_chunk) if feats.is_cuda else flat @ w_chunk
        logits = logits.view(batch, length, stop - start).masked_fill_(pad, float("-inf"))
        out[:, start:stop] = logits.amax(dim=1).float()
    return _activate(out, bias, activate)


def _activate(pooled: torch.Tensor, bias, activate: bool) -> torch.Tensor:
    if bias is not None:
        pooled += bias.float()
    return torch.log1p(torch.relu(pooled)) if activate else pooled


def mlp_pool(token_weights: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, vocab: int,
             merge: str = "amax") -> torch.Tensor:
    """token_weights [B, L] (already ReLU'd), input_ids [B, L], mask [B, L] -> reps [B, V]. The weights of a token
    that repeats merge by `merge`: "sum" for queries and "amax" for documents, as the reference's dual encoder
    densifies query and document vectors (lsr/models/__init__.py)."""
    reps = token_weights.new_zeros(input_ids.shape[0], vocab, dtype=torch.float32)
    weights = token_weights.float() * mask.float()
    return reps.scatter_reduce(1, input_ids, weights, reduce=merge, include_self=True)


@contextlib.contextmanager
def projection_swapped(projection: nn.Module, replacement):
    """Run the backbone with its vocabulary projection's forward replaced (an instance attribute shadows the
    class method); restored afterwards even on error."""
    projection.forward = replacement
    try:
        yield
    finally:
        del projection.forward


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also while DeepSpeed ZeRO-3 holds it partitioned (outside the owning module's forward
    the local tensor is then empty and the real shape is `ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def head_bias(projection: nn.Module, shift: float):
    """The MLM head's bias: the projection's own (BERT) plus the constant `logit_shift`; None when both are absent."""
    if not shift:
        return projection.bias
    if projection.bias is not None:
        return projection.bias + shift
    return torch.full((full_shape(projection.weight)[0],), shift, dtype=torch.float32, device=projection.weight.device)

