"""The fused Triton encoding head (lsr_core/head_kernel.py) against a direct computation.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1; float32 and float16: the interpreter
misreads bf16), which executes the same program: tiling, the grouped program order, skipped tiles, the max per text
within a tile and the atomic max across tiles. On a GPU (marked) it runs compiled in bf16 against the torch path.
"""
import pytest
import torch

from lsr_core import head_kernel
from lsr_core.config import ModelConfig
from lsr_core.heads import max_pool_inference
from lsr_core.modeling import build_model
from lsr_core.tiny import make_collection, make_model

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(not head_kernel.INTERPRET, reason="runs in Triton's interpreter (CPU machines)")


def _masks(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Every pattern the kernel must honour: holes, an empty text, left padding, right padding, echo (second
    half only), a single position, and texts longer than one tile."""
    mask = (torch.rand(batch, length, generator=gen) > 0.3).long()
    mask[1] = 0
    mask[2, :length // 2] = 0
    mask[3, length - 5:] = 0
    mask[4] = 0
    mask[4, length // 2:] = 1
    mask[5] = 0
    mask[5, 7] = 1
    return mask


def _reference(feats, weight, mask):
    logits = feats.float() @ weight.float().T
    return logits.masked_fill(~mask.bool()[:, :, None], float("-inf")).amax(1)


def test_segment_max_matmul_rejects_inputs_past_32_bit_offsets():
    feats = torch.empty(2**16, 2**15, dtype=torch.float16, device="meta")  # 2**31 elements, none allocated
    weight = torch.empty(8, 2**15, dtype=torch.float16, device="meta")
    assert not head_kernel.usable(feats, weight, torch.float16)
    with pytest.raises(ValueError, match=r"2\*\*31 elements or more: split the batch"):
        head_kernel.segment_max_matmul(feats, weight, torch.zeros(2**16, dtype=torch.int32, device="meta"), 2)


def test_forced_kernel_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(head_kernel, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs a CUDA device, got cpu"):
        head_kernel.check_runnable(torch.zeros(1, 1, 8))
    monkeypatch.setattr(head_kernel, "triton", None)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        head_kernel.check_runnable(torch.zeros(1, 1, 8))


@interpreted
def test_segment_max_matmul_no_positions_or_no_texts():
    out = head_kernel.segment_max_matmul(torch.zeros(0, 8), torch.zeros(5, 8), torch.zeros(0, dtype=torch.int32), 3)
    assert out.shape == (3, 5) and torch.isinf(out).all()
    assert head_kernel.segment_max_matmul(torch.zeros(4, 8), torch.zeros(5, 8), torch.full((4,), -1), 0).shape == (0, 5)


@interpreted
def test_model_encodes_the_same_with_the_kernel_and_the_torch_path(tmp_path):
    """Through build_model and encode_batch (bias, ReLU, log1p, dispatch): `model.head_kernel=triton` (the kernel,
    interpreted) gives the vectors of `model.head_kernel=torch`; `auto` does not pick the kernel on the CPU."""
    words = make_collection(tmp_path / "data")["words"]
    folder = make_model(tmp_path / "bert", "bert", words)
    texts = ["star planet orbit", "the recipe of the bread with butter and sugar in the kitchen of a castle", "goal"]
    reps = {}
    for kernel in ("triton", "torch"):
        model = build_model(ModelConfig(name_or_path=str(folder), head_kernel=kernel)).eval()
        with torch.inference_mode():
            reps[kernel] = model.encode_batch(model.tokenize(texts, is_query=False), is_query=False)
    assert (reps["torch"] > 0).sum() > 0
    torch.testing.assert_close(reps["triton"], reps["torch"], rtol=1e-4, atol=1e-5)
    assert not head_kernel.usable(torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.zeros(4, 8), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,hidden", [(30522, 768), (128256, 2048)])
def test_kernel_on_gpu_equals_torch_path_in_bf16(vocab, hidden):
    gen = torch.Generator().manual_seed(0)
    batch, length = 24, 200
    feats = torch.randn(batch, length, hidden, generator=gen).to("cuda", torch.bfloat16)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.03).to("cuda", torch.bfloat16)
    bias = (torch.randn(vocab, generator=gen) * 0.1).cuda()
    mask = _masks(batch, length, gen).cuda()
    assert head_kernel.usable(feats, weight, torch.bfloat16)
    with torch.inference_mode():
        got = max_pool_inference(feats, weight, bias, mask, 0, kernel="auto")
        ref = max_pool_inference(feats, weight, bias, mask, 0, kernel="torch")
    assert (ref > 0).float().mean() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def _owners(mask: torch.Tensor) -> torch.Tensor:
    """A padded batch's mask [B, L] -> the text id of each flattened position, -1 where nothing is pooled."""
    return torch.where(mask.bool(), torch.arange(mask.shape[0])[:, None], -1).reshape(-1).to(torch.int32)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,length,hidden,vocab", [(11, 37, 40, 150), (6, 16, 16, 32), (9, 70, 24, 65)])
@pytest.mark.parametrize("tile", [None, (32, 16, 16, 4, 1, 2, 1)], ids=["one-tile-per-program", "persistent"])
def test_segment_max_matmul_equals_masked_max_of_the_logits(dtype, batch, length, hidden, vocab, tile):
    """Padded batches flattened (the same mask patterns), and packed texts: many texts per tile, texts spanning
    tiles, empty texts, runs of unpooled positions. Persistent: 4 programs (the CPU's SM count) loop over the
    tiles, and compute the unpooled ones too."""
    gen = torch.Generator().manual_seed(batch + 1)
    feats = torch.randn(batch, length, hidden, generator=gen).to(dtype)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    mask = _masks(batch, length, gen)
    ref = _reference(feats, weight, mask)
    got = head_kernel.segment_max_matmul(feats.reshape(-1, hidden), weight, _owners(mask), batch, tile)
    assert got.dtype == torch.float32 and got.shape == (batch, vocab)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.isinf(got[1]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-4, atol=1e-4)

    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = 1, 0
    keep = torch.arange(length)[None, :] < lengths[:, None]
    packed = head_kernel.segment_max_matmul(feats[keep], weight, _owners(keep & mask.bool())[keep.reshape(-1)],
                                            batch, tile)
    ref = _reference(feats, weight, keep & mask.bool())
    assert torch.equal(torch.isinf(packed), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(packed[finite], ref[finite], rtol=1e-4, atol=1e-4)


def test_segment_max_matmul_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="does not match"):
        head_kernel.segment_max_matmul(torch.zeros(3, 8), torch.zeros(5, 8, dtype=torch.float16),
                                       torch.zeros(3, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match=r"text ids \(4,\) do not match feats \(3, 8\)"):
        head_kernel.segment_max_matmul(torch.zeros(3, 8), torch.zeros(5, 8), torch.zeros(4, dtype=torch.int32), 1)
