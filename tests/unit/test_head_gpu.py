"""The sparse MLM head on a CUDA GPU in bf16: same gradients as the naive head, a fraction of its memory.

The reference is the naive head on the same bf16 values upcast to float32: the naive head run in bf16 rounds its
logits to 8 bits of mantissa, which ties and reorders positions and moves ~10% of the gradient (bench/head.py
reports it), so it is no reference for a head that keeps float32 logits.
"""
import pytest
import torch
import torch.nn.functional as F

from lsr_core.heads import naive_mlm_pool, sparse_mlm_pool

pytestmark = pytest.mark.gpu


def _inputs(batch, length, hidden, vocab, bias, seed, weight_dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, hidden, generator=gen).to("cuda", torch.bfloat16)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.03).to("cuda", weight_dtype)
    b = (torch.randn(vocab, generator=gen) * 0.1).to("cuda", weight_dtype) if bias else None
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    lengths[0] = 0  # an empty row must give an all-zero vector and no gradient
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long().cuda()
    upstream = torch.randn(batch, vocab, generator=gen).cuda()
    return feats, weight, b, mask, upstream


def _grads(head, feats, weight, bias, mask, upstream, dtype=None, autocast=False):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (feats, weight, bias)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        reps = head(*leaves, mask)
    (reps.float() * upstream).sum().backward()
    return reps.float(), [t.grad.float() if t is not None else None for t in leaves]


def _rel(got, ref):
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [0, 1000])
def test_sparse_head_matches_naive_in_bf16(pooling, bias, chunk):
    feats, weight, b, mask, upstream = _inputs(4, 96, 512, 32000, bias, seed=hash((pooling, bias, chunk)) % 1000)
    ref_reps, ref = _grads(lambda f, w, bb, m: naive_mlm_pool(F.linear(f, w, bb), m, pooling),
                           feats, weight, b, mask, upstream, dtype=torch.float32)
    reps, got = _grads(lambda f, w, bb, m: sparse_mlm_pool(f, w, bb, m, pooling, chunk),
                       feats, weight, b, mask, upstream)
    assert reps.dtype == torch.float32 and torch.isfinite(reps).all()
    assert reps[0].abs().max() == 0
    assert _rel(reps, ref_reps) < 1e-3
    for g, r in zip(got, ref):
        if r is not None:
            assert _rel(g, r) < 1e-2


def test_sparse_head_under_autocast_with_float32_weights():
    """BERT-style training: float32 master weights, bf16 autocast; gradients come back in float32."""
    feats, weight, b, mask, upstream = _inputs(4, 64, 256, 30522, True, seed=7, weight_dtype=torch.float32)
    feats = feats.float()
    _, ref = _grads(lambda f, w, bb, m: naive_mlm_pool(F.linear(f, w, bb), m),
                    feats.bfloat16(), weight.bfloat16(), b.bfloat16(), mask, upstream, dtype=torch.float32)
    _, got = _grads(sparse_mlm_pool, feats, weight, b, mask, upstream, autocast=True)
    assert got[1].dtype == torch.float32
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-2


def _peak_extra(head, feats, weight, bias, mask, upstream):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (feats, weight, bias)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (head(*leaves, mask) * upstream).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_sparse_head_uses_a_quarter_of_the_naive_memory():
    feats, weight, b, mask, upstream = _inputs(8, 256, 1024, 32000, False, seed=3)
    naive = _peak_extra(lambda f, w, bb, m: naive_mlm_pool(F.linear(f, w, bb), m), feats, weight, b, mask, upstream)
    sparse = _peak_extra(sparse_mlm_pool, feats, weight, b, mask, upstream)
    assert sparse <= naive / 4, (sparse, naive)
