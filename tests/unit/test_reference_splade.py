"""Our SPLADE vectors equal an independent SPLADE implementation (sentence-transformers' SparseEncoder:
MLM transformer + SpladePooling max) on the same real weights (SPLADE-tiny, DESIGN §8)."""
import pytest
import torch

from lsr_core.config import load_config
from lsr_core.backbones import resolve_model_path
from lsr_core.modeling import build_model
from lsr_core.sparse import id_to_token_list, prune, to_vector

st = pytest.importorskip("sentence_transformers.sparse_encoder")

TEXTS = [
    "Paris: Paris is the capital and largest city of France.",
    "Swedish pop group",
    "SPLADE learns sparse lexical and expansion representations for first-stage retrieval, " * 6,
    "a",
]


def test_vectors_equal_sentence_transformers_splade():
    path = resolve_model_path("pkg:cognition/model")
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    reference = st.SparseEncoder(modules=[MLMTransformer(path, max_seq_length=64), SpladePooling("max")],
                                 device="cpu")
    expected = reference.encode(TEXTS, convert_to_sparse_tensor=False, batch_size=2)
    model = build_model(load_config([f"--model.name_or_path={path}", "--model.max_doc_len=64",
                                     "--model.special_tokens=keep"]).model).eval()
    with torch.inference_mode():
        ours = model.encode(TEXTS, is_query=False)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
    # and after the one pruning/serialisation path: same terms, same weights
    vocab = id_to_token_list(model.tokenizer)
    for row_ours, row_ref in zip(prune(ours), prune(expected.float())):
        vec_ours, vec_ref = to_vector(*row_ours, vocab), to_vector(*row_ref, vocab)
        assert vec_ours.keys() == vec_ref.keys()
        assert all(abs(vec_ours[t] - vec_ref[t]) <= 2e-5 for t in vec_ref)
