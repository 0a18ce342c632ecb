"""Our vectors equal the paper's code's (JingfenQiao/Decoder4LSR, a fork of thongnt99/learned-sparse-retrieval) for
every model class the RQ recipes use, on tiny random weights in float32: identical term sets, max |diff| <= 1e-5.

The reference is restated here as formulas in plain torch, calling the Hugging Face modules directly and none of our
pooling code. Tokenized as its collator does: one padded batch (right padding), special_tokens_mask returned.
With m the attention mask, s the special-tokens mask, shift(x) = [x0', x0, x1, ...] (the first entry replaced by the
start token for ids, by 0 for masks) and pool = max over positions of log1p(relu(.)):
| class (reference file)                           | vector                                                          |
|--------------------------------------------------|-----------------------------------------------------------------|
| BERT/DistilBERT MLM (mlm.py)                     | pool(MLM logits * m * (1 - s))                                  |
| OPT multi-token MLM (mlm_de_multi_opt.py)        | pool(causal-LM logits * m * (1 - s))                            |
| T5 encoder-only MLM (mlm_en_multi.py)            | pool(lm_head(encoder states) * m)                               |
| T5 multi-token MLM (mlm_en_de_multi.py)          | pool(logits(decoder fed shift(ids)) * shift(m))                 |
| T5 decoder-only MLM (mlm_de_multi_t5.py)         | pool(lm_head(decoder stack alone on shift(ids), mask m) * shift(m)) |
| T5 single-token MLM (mlm_en_de_single.py)        | log1p(relu(logits of the one step from the start token)) (* m broadcast: any real token) |
| T5 multi-token MLP (mlp_en_de_multi.py, RQ3)     | w_t = relu(Linear(decoder state t)) * shift(m)_t, scattered to ids_t (norm identity, asm_* configs) |
| BERT MLP (mlp.py)                                | w_t = relu(Linear(last state t)) * m_t * (1 - s_t), scattered to ids_t |
MLP vectors are densified with scatter_reduce: sum for queries, amax for documents (lsr/models/__init__.py).
The reference's shifted mask also covers decoder step n of a text padded in its batch (reading </s>); ours never
pools it, so for the encoder-decoder classes a padded text is compared with the reference run on that text alone
and the batch's longest (unpadded) text with the reference run on the whole batch.
"""
import pytest
import torch
import torch.nn as nn

from lsr_core.config import ModelConfig
from lsr_core.modeling import build_model, new_mlp_head
from lsr_core.tiny import make_collection, make_model, make_tokenizer

# different lengths, repeated words (MLP merges), the longest text last
TEXTS = ["star star planet", "music", "the recipe of the bread with butter and sugar and the bread in the kitchen"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_models")
    words = make_collection(root / "data")["words"]
    folders = {arch: str(make_model(root / arch, arch, words)) for arch in ("bert", "distilbert", "opt")}
    folders["t5"] = str(_untied_t5(root / "t5", words))
    return folders


def _untied_t5(folder, words):
    """A tiny T5 with an untied lm_head, as Flan-T5 (the paper's backbone) has."""
    import transformers

    tok = make_tokenizer(folder, "encoder_decoder", words)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, tie_word_embeddings=False, feed_forward_proj="gated-gelu")
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ the reference's formulas

def ref_batch(tok, texts, max_len=64):
    return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
               return_special_tokens_mask=True)


def shift(x, first):
    return torch.cat([torch.full_like(x[:, :1], first), x[:, :-1]], dim=1)


def pool(logits, weight):
    """max over positions of log1p(relu(logits * weight)); weight [B, L]."""
    return torch.log1p(torch.relu(logits * weight[..., None].float())).amax(dim=1)


def densify(ids, weights, vocab, reduce):
    return torch.zeros(ids.shape[0], vocab).scatter_reduce_(1, ids, weights, reduce=reduce)


def ref_encoder_mlm(hf, tok, texts):
    enc = ref_batch(tok, texts)
    logits = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return pool(logits, enc["attention_mask"] * (1 - enc["special_tokens_mask"]))


def ref_t5(hf, tok, texts, decoding, mlp=None, reduce=None):
    enc = ref_batch(tok, texts)
    ids, m = enc["input_ids"], enc["attention_mask"]
    start = hf.config.decoder_start_token_id
    if decoding == "encoder_only":
        return pool(hf.lm_head(hf.encoder(input_ids=ids, attention_mask=m).last_hidden_state), m)
    if decoding == "single_token":
        logits = hf(input_ids=ids, attention_mask=m, decoder_input_ids=torch.full((len(texts), 1), start)).logits
        return pool(logits, m)  # [B, 1, V] * [B, L, 1]: the one step, repeated over the real tokens
    if decoding == "decoder_only":
        states = hf.decoder(input_ids=shift(ids, start), attention_mask=m).last_hidden_state
        return pool(hf.lm_head(states), shift(m, 0))
    out = hf(input_ids=ids, attention_mask=m, decoder_input_ids=shift(ids, start), output_hidden_states=True)
    if mlp is None:
        return pool(out.logits, shift(m, 0))
    weights = torch.relu(mlp(out.decoder_hidden_states[-1])).squeeze(-1) * shift(m, 0)
    return densify(ids, weights, hf.config.vocab_size, reduce)


def ref_bert_mlp(hf, tok, texts, mlp, reduce):
    enc = ref_batch(tok, texts)
    states = hf.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    weights = torch.relu(mlp(states)).squeeze(-1) * enc["attention_mask"] * (1 - enc["special_tokens_mask"])
    return densify(enc["input_ids"], weights, hf.config.vocab_size, reduce)


# ------------------------------------------------------------------------------------------ comparison

def assert_same_vectors(ours, expected):
    assert ours.shape == expected.shape
    for row_ours, row_ref in zip(ours, expected):
        assert torch.equal(row_ours > 0, row_ref > 0)  # identical term sets
        assert (row_ours - row_ref).abs().max() <= 1e-5
    assert (expected > 0).sum(1).min() > 0


def load(folder, **overrides):
    model = build_model(ModelConfig(name_or_path=folder, max_query_len=64, max_doc_len=64, **overrides)).eval()
    gen = torch.Generator().manual_seed(1)
    for mlp in (model.query_mlp, model.doc_mlp):  # most tokens get a positive weight, and they differ
        if mlp is not None:
            mlp.weight.copy_(torch.randn(mlp.weight.shape, generator=gen) * 0.1)
            mlp.bias.fill_(2.0)
    return model


def encode_both(model, is_query):
    """Our vectors from the padded batch, and from each text alone."""
    batch = model.encode(TEXTS, is_query)
    alone = torch.cat([model.encode([t], is_query) for t in TEXTS])
    return batch, alone


@pytest.mark.parametrize("arch", ["bert", "distilbert", "opt"])
@torch.no_grad()
def test_mlm_leaves_special_tokens_out_as_the_reference_does(tiny, arch):
    model = load(tiny[arch])
    ours, alone = encode_both(model, is_query=False)
    expected = ref_encoder_mlm(model.doc_backbone, model.tokenizer, TEXTS)
    assert_same_vectors(ours, expected)
    assert_same_vectors(alone, expected)
    # the other choice is sentence-transformers' SPLADE: [CLS]/[SEP]/BOS pool too, and the vectors differ
    keep = load(tiny[arch], special_tokens="keep").encode(TEXTS, is_query=False)
    enc = ref_batch(model.tokenizer, TEXTS)
    logits = model.doc_backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert_same_vectors(keep, pool(logits, enc["attention_mask"]))
    assert not torch.allclose(keep, ours, atol=1e-4)


@pytest.mark.parametrize("decoding", ["encoder_only", "single_token"])
@torch.no_grad()
def test_t5_encoder_only_and_single_token(tiny, decoding):
    model = load(tiny["t5"], decoding=decoding)
    ours, alone = encode_both(model, is_query=False)
    expected = ref_t5(model.doc_backbone, model.tokenizer, TEXTS, decoding)
    assert_same_vectors(ours, expected)
    assert_same_vectors(alone, expected)


@pytest.mark.parametrize("decoding", ["multi_token", "decoder_only"])
@torch.no_grad()
def test_t5_shifted_decoding_equals_the_reference_on_unpadded_texts(tiny, decoding):
    model = load(tiny["t5"], decoding=decoding)
    hf, tok = model.doc_backbone, model.tokenizer
    ours, alone = encode_both(model, is_query=False)
    assert_same_vectors(ours, alone)  # ours does not depend on the batch
    assert_same_vectors(ours, torch.cat([ref_t5(hf, tok, [t], decoding) for t in TEXTS]))
    batched = ref_t5(hf, tok, TEXTS, decoding)
    assert_same_vectors(ours[-1:], batched[-1:])  # the longest text is not padded
    # the reference's quirk: a padded text also pools step n (it reads </s>), so its batched vector differs
    assert not torch.allclose(batched[0], ours[0], atol=1e-4)


@pytest.mark.parametrize("is_query,reduce", [(True, "sum"), (False, "amax")])
@torch.no_grad()
def test_t5_multi_token_mlp_head(tiny, is_query, reduce):
    model = load(tiny["t5"], query_head="mlp", doc_head="mlp")
    mlp = model.query_mlp if is_query else model.doc_mlp
    hf, tok = model.doc_backbone, model.tokenizer
    ours, alone = encode_both(model, is_query)
    assert_same_vectors(ours, alone)
    assert_same_vectors(ours, torch.cat([ref_t5(hf, tok, [t], "multi_token", mlp, reduce) for t in TEXTS]))
    assert_same_vectors(ours[-1:], ref_t5(hf, tok, TEXTS, "multi_token", mlp, reduce)[-1:])
    # </s> (the last step) is weighted, the first token (step 0) is not; "star" repeats: summed or max
    star, planet, eos = tok.convert_tokens_to_ids(["star", "planet", tok.eos_token])
    assert ours[0, eos] > 0
    steps = hf(input_ids=tok(TEXTS[:1], return_tensors="pt")["input_ids"],
               decoder_input_ids=shift(tok(TEXTS[:1], return_tensors="pt")["input_ids"], 0),
               output_hidden_states=True).decoder_hidden_states[-1]
    weights = torch.relu(mlp(steps)).squeeze(-1)[0]  # steps: star star planet </s>
    torch.testing.assert_close(ours[0, star], weights[1], atol=1e-5, rtol=0)  # step 0 never pools
    torch.testing.assert_close(ours[0, planet], weights[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("is_query,reduce", [(True, "sum"), (False, "amax")])
@torch.no_grad()
def test_bert_mlp_head(tiny, is_query, reduce):
    model = load(tiny["bert"], query_head="mlp", doc_head="mlp")
    mlp = model.query_mlp if is_query else model.doc_mlp
    ours, alone = encode_both(model, is_query)
    expected = ref_bert_mlp(model.doc_backbone, model.tokenizer, TEXTS, mlp, reduce)
    assert_same_vectors(ours, expected)
    assert_same_vectors(alone, expected)
    star = model.tokenizer.convert_tokens_to_ids("star")
    sum_and_max = ref_bert_mlp(model.doc_backbone, model.tokenizer, TEXTS[:1], mlp, "sum")[0, star], \
        ref_bert_mlp(model.doc_backbone, model.tokenizer, TEXTS[:1], mlp, "amax")[0, star]
    assert sum_and_max[0] > sum_and_max[1] > 0  # the repeat really merges differently


@pytest.mark.parametrize("query_head,doc_head", [("mlp", "mlm"), ("mlm", "mlp")])
@torch.no_grad()
def test_asymmetric_t5(tiny, query_head, doc_head):
    """RQ3's qMLP-dMLM and qMLM-dMLP: two backbones, each encoded with its own head."""
    model = load(tiny["t5"], query_head=query_head, doc_head=doc_head, shared=False)
    gen = torch.Generator().manual_seed(2)
    for param in model.query_backbone.parameters():  # make the two backbones differ
        param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    tok = model.tokenizer
    for is_query, backbone, head, mlp, reduce in ((True, model.query_backbone, query_head, model.query_mlp, "sum"),
                                                  (False, model.doc_backbone, doc_head, model.doc_mlp, "amax")):
        ours = model.encode(TEXTS, is_query)
        expected = torch.cat([ref_t5(backbone, tok, [t], "multi_token", mlp if head == "mlp" else None, reduce)
                              for t in TEXTS])
        assert_same_vectors(ours, expected)
    other = ref_t5(model.doc_backbone, tok, TEXTS[-1:], "multi_token", model.query_mlp, "sum") \
        if query_head == "mlp" else ref_t5(model.doc_backbone, tok, TEXTS[-1:], "multi_token")
    assert not torch.allclose(model.encode(TEXTS[-1:], True), other, atol=1e-4)  # queries used their own backbone


def test_mlp_head_initialisation_is_the_references():
    """BERT's MLP head (mlp.py) redraws the weight with kaiming_normal_ for ReLU after nn.Linear's init; the T5
    and OPT heads keep nn.Linear's init."""
    torch.manual_seed(5)
    expected = nn.Linear(48, 1)
    nn.init.kaiming_normal_(expected.weight, nonlinearity="relu")
    torch.manual_seed(5)
    ours = new_mlp_head("encoder", 48)
    assert torch.equal(ours.weight, expected.weight) and torch.equal(ours.bias, expected.bias)
    torch.manual_seed(5)
    plain = nn.Linear(48, 1)
    torch.manual_seed(5)
    for kind in ("encoder_decoder", "decoder"):
        torch.manual_seed(5)
        head = new_mlp_head(kind, 48)
        assert torch.equal(head.weight, plain.weight) and torch.equal(head.bias, plain.bias)
    assert not torch.equal(ours.weight, plain.weight)
