"""Packed attention (lsr_core/attention_kernel.py) against SDPA run on each text alone.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1; float32 and float16), with 16 x 16 tiles
so that texts span several query and key tiles and end inside one. On a GPU (marked) it runs compiled in bf16
against torch's varlen_attn, with every autotuned configuration.
"""
import math

import pytest
import torch

from lsr_core import attention_kernel, head_kernel

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(not head_kernel.INTERPRET, reason="runs in Triton's interpreter (CPU machines)")


def _inputs(lengths, heads, d, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, d, generator=gen).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def _per_text(q, k, v, cu, scale):
    ends = cu.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1).float() for t in (q, k, v)), scale=scale).transpose(0, 1)
        for a, b in zip(ends, ends[1:])])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", [[1, 16, 17, 40, 5], [33], [3, 0, 50]])
def test_packed_attention_equals_attention_per_text(dtype, lengths):
    q, k, v, cu = _inputs(lengths, 3, 16, dtype)
    scale = 0.7 / math.sqrt(16)
    got = attention_kernel.packed_attention(q, k, v, cu, 64, scale)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), _per_text(q, k, v, cu, scale), rtol=2e-3, atol=2e-3)


@interpreted
def test_packed_attention_reads_strided_views():
    """q, k, v as transformers hands them over: [1, heads, T, d] views of one projection, transposed to [T, heads,
    d]."""
    lengths, heads, d = [7, 20, 1], 2, 16
    qkv = torch.randn(1, sum(lengths), 3, heads, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2)[0].transpose(0, 1) for i in range(3))
    cu = torch.tensor([0, 7, 27, 28], dtype=torch.int32)
    got = attention_kernel.packed_attention(q, k, v, cu, 32, 0.25)
    torch.testing.assert_close(got, _per_text(q, k, v, cu, 0.25), rtol=1e-4, atol=1e-4)


def test_packed_attention_rejects_mismatched_shapes():
    q = torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="one shape"):
        attention_kernel.packed_attention(q, q, torch.zeros(4, 2, 32), torch.tensor([0, 4], dtype=torch.int32), 4, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[157] * 64, [62, 64, 65, 130, 250, 251, 252, 1, 3]])
def test_packed_attention_on_gpu_equals_varlen_attn_in_bf16(lengths):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu = _inputs(lengths, 12, 64, torch.bfloat16, "cuda")
    max_len = max(lengths)
    ref = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=0.125)
    for config in attention_kernel._CONFIGS:  # every configuration the autotuner may pick
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        out = torch.empty_like(q)
        attention_kernel._packed_attention.fn[(-(-max_len // m), len(lengths), 12)](
            q, k, v, out, cu, 0.125 * math.log2(math.e), 256, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
            *out.stride()[:2], HEAD_D=64, BLOCK_M=m, BLOCK_N=n, num_warps=config.num_warps,
            num_stages=config.num_stages)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=str(config))
    assert attention_kernel.usable(q)
    torch.testing.assert_close(attention_kernel.packed_attention(q, k, v, cu, max_len, 0.125).float(), ref.float(),
                               rtol=2e-2, atol=2e-2)
