"""Tiny random models and a tiny collection, built in a folder, so tests run offline in seconds (tests/, and bench/
and scripts/prepare_msmarco.py --tiny, which is why they live here and not in tests/).

Tokenizers are trained here (word-level, ~300 entries) on the collection's own words, with the special tokens each
kind expects: [CLS]/[SEP] for encoders, <s> BOS for decoders, </s> EOS for T5.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "astronomy": "star planet orbit telescope galaxy comet moon solar light cosmic",
    "cooking": "recipe bake oven flour sugar butter dough bread taste kitchen",
    "football": "goal team match league player score coach stadium ball season",
    "music": "song guitar melody rhythm band concert piano note album singer",
    "medicine": "doctor patient disease vaccine hospital treatment drug nurse health virus",
    "computing": "computer software program code data network memory processor chip algorithm",
    "ocean": "sea wave fish coral whale tide boat ship salt shore",
    "history": "empire king war ancient battle castle century dynasty treaty revolution",
}
FILLER = "the a of and in to is was for with on by as from that this which it an are".split()


def make_collection(folder: str | Path, docs_per_topic: int = 6, seed: int = 0) -> dict:
    """Write corpus.jsonl, queries.jsonl, qrels.tsv and train.jsonl (qid, pos, negs) into `folder`."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels, train = [], [], [], []
    for t, (topic, words) in enumerate(TOPICS.items()):
        vocab = words.split()
        for i in range(docs_per_topic):
            did = f"d{t}_{i}"
            key = vocab[i % len(vocab)], vocab[(i + 3) % len(vocab)]
            body = [rng.choice(vocab + FILLER) for _ in range(rng.randint(12, 30))]
            text = f"{topic} {key[0]} {key[1]} " + " ".join(body)
            corpus.append({"id": did, "text": text})
            qid = f"q{t}_{i}"
            queries.append({"id": qid, "text": f"{key[0]} {key[1]} {topic}"})
            qrels.append(f"{qid} 0 {did} 1")
    doc_ids = [d["id"] for d in corpus]
    for q in queries:
        pos = q["id"].replace("q", "d", 1)
        negs = rng.sample([d for d in doc_ids if d != pos], 3)
        train.append({"qid": q["id"], "pos": [pos], "negs": negs})
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries), ("train.jsonl", train)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    words = sorted({w for d in corpus for w in d["text"].split()} | set(FILLER))
    return {"folder": folder, "words": words, "corpus": corpus, "queries": queries}


# per backbone kind: the special tokens (pad first, unk second), the template that adds them, the tokenizer's names
TOKENIZERS = {
    "encoder": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]",
                dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")),
    "decoder": (["<pad>", "<unk>", "<s>", "</s>"], "<s> $A",
                dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")),
    "encoder_decoder": (["<pad>", "<unk>", "</s>"], "$A </s>", dict(pad_token="<pad>", unk_token="<unk>", eos_token="</s>")),
}


def make_tokenizer(folder: str | Path, kind: str, words: list[str]):
    """A word-level fast tokenizer saved into `folder`; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, template, names = TOKENIZERS[kind]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    added = [t for t in template.split() if t in vocab]
    core.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in added])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **names)
    tok.save_pretrained(folder)
    return tok


def make_model(folder: str | Path, arch: str, words: list[str], seed: int = 0, hidden: int = 32) -> Path:
    """Save a tiny random model of `arch` (bert | llama | opt | t5, and the other MLM encoders: distilbert | electra |
    roberta | xlm-roberta) with a matching tokenizer into `folder`.
    `hidden` (llama only): bitsandbytes' CPU 4-bit kernels need widths of at least its block size (64)."""
    import torch
    import transformers

    kind = {"llama": "decoder", "opt": "decoder", "t5": "encoder_decoder"}.get(arch, "encoder")
    folder = Path(folder)
    tok = make_tokenizer(folder, kind, words)
    vocab = len(tok)
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
        model = transformers.BertForMaskedLM(cfg)
    elif arch == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=128, pad_token_id=tok.pad_token_id)
        model = transformers.DistilBertForMaskedLM(cfg)
    elif arch == "electra":
        cfg = transformers.ElectraConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                         pad_token_id=tok.pad_token_id)
        model = transformers.ElectraForMaskedLM(cfg)
    elif arch in ("roberta", "xlm-roberta"):  # positions start after the padding index
        cls = transformers.RobertaConfig if arch == "roberta" else transformers.XLMRobertaConfig
        cfg = cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=128 + tok.pad_token_id + 1, pad_token_id=tok.pad_token_id)
        model = transformers.AutoModelForMaskedLM.from_config(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=256,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     ffn_dim=64, max_position_embeddings=256, word_embed_proj_dim=32,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        model = transformers.OPTForCausalLM(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                    decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
        model = transformers.T5ForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    return folder
