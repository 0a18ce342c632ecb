"""Packed encoding (model.packed): an encoder batch run as one row of its texts end to end, each attending to itself
only, gives the vectors of the padded batch, for every model type it is enabled for; it is taken only where it
applies, and refused with a clear error where asked for and unsupported."""
import pytest
import torch

from lsr_core import modeling
from lsr_core.config import ModelConfig
from lsr_core.modeling import PACKED_POSITION_OFFSET, ModelLoadError, build_model
from tests.tiny import make_collection, make_model

# lengths 3 to 24 words: each batch pads most of its texts
TEXTS = ["star planet orbit", "the recipe of the bread with butter and sugar in the kitchen of a castle",
         "planet", " ".join(["orbit moon star comet"] * 6), "bread and butter"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_models")
    words = make_collection(root / "data")["words"]
    return {arch: str(make_model(root / arch, arch, words)) for arch in [*PACKED_POSITION_OFFSET, "llama"]}


def encode(folder, texts, is_query=False, **overrides):
    model = build_model(ModelConfig(name_or_path=folder, **overrides)).eval()
    with torch.inference_mode():
        return model, model.encode(texts, is_query=is_query)


@pytest.fixture
def packed_calls(monkeypatch):
    """How many batches ran packed."""
    calls = []
    original = modeling._packed_inputs
    monkeypatch.setattr(modeling, "_packed_inputs", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("arch", list(PACKED_POSITION_OFFSET))
def test_packed_vectors_equal_padded_ones(tiny, arch, packed_calls):
    _, padded = encode(tiny[arch], TEXTS, packed="false")
    assert not packed_calls
    model, packed = encode(tiny[arch], TEXTS, packed="true")
    assert packed_calls and model.doc_backbone.config._attn_implementation == modeling.PACKED_ATTENTION
    assert (padded > 0).sum() > 0
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packed_queries_and_length_buckets(tiny, packed_calls):
    _, padded = encode(tiny["bert"], TEXTS, is_query=True, packed="false")
    _, packed = encode(tiny["bert"], TEXTS, is_query=True, packed="true", length_buckets=2, pad_to_multiple=16)
    assert len(packed_calls) == 2  # one packed row per length bucket
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packed_rows_through_the_fused_kernel(tiny):
    """The kernel reads each text's span of the packed row (Triton's interpreter on the CPU) and gives the chunked
    torch path's values on the padded batch; a wrong span would pool a neighbour's positions."""
    _, padded = encode(tiny["bert"], TEXTS, packed="false", head_kernel="torch")
    _, packed = encode(tiny["bert"], TEXTS, packed="true", head_kernel="triton")
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_calibration_logits_and_training_mode_stay_padded_where_packing_cannot_apply(tiny, packed_calls):
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true")).eval()
    batch = model.tokenize(TEXTS, is_query=False)
    raw = model.pooled_doc_logits(batch)
    assert len(packed_calls) == 1
    unpacked = build_model(ModelConfig(name_or_path=tiny["bert"], packed="false")).eval().pooled_doc_logits(batch)
    torch.testing.assert_close(raw, unpacked, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # a gradient needs the padded training head
        model.encode(TEXTS[:2], is_query=False).sum().backward()
    assert len(packed_calls) == 1
    trained = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true"), training=True)
    assert trained.packed == "false" and trained.doc_backbone.config._attn_implementation == "sdpa"


def test_auto_packs_only_on_cuda_and_skips_unsupported_backbones(tiny, packed_calls):
    model, _ = encode(tiny["bert"], TEXTS, packed="auto")
    assert model.packed == "auto" and not packed_calls  # enabled, but this is a CPU
    model, _ = encode(tiny["llama"], TEXTS, packed="auto")
    assert model.packed == "false"


def test_packed_true_refuses_what_it_cannot_pack(tiny):
    with pytest.raises(ModelLoadError, match="model.packed=true needs an encoder.*'llama'"):
        build_model(ModelConfig(name_or_path=tiny["llama"], packed="true"))
    with pytest.raises(ModelLoadError, match="model.packed=true needs .*'eager' attention"):
        build_model(ModelConfig(name_or_path=tiny["bert"], packed="true", attn_implementation="eager"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_varlen_flash_attention_on_cuda(tiny, packed_calls):
    """On CUDA in bf16 `auto` packs (varlen flash attention + the fused kernel on spans): as close to the float32
    padded vectors as the padded bf16 run is."""
    def run(**overrides):
        model = build_model(ModelConfig(name_or_path=tiny["bert"], **overrides)).eval().to("cuda")
        with torch.inference_mode():
            return model.encode(TEXTS * 40, is_query=False).float().cpu()
    reference = run(packed="false", dtype="float32")
    padded = run(packed="false", dtype="bfloat16")
    assert not packed_calls
    packed = run(packed="auto", dtype="bfloat16")
    assert packed_calls
    err_padded, err_packed = (padded - reference).abs().max(), (packed - reference).abs().max()
    assert err_packed <= 2 * err_padded + 1e-3, (err_packed, err_padded)
