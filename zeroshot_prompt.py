"""Zero-shot sparse vectors from a prompted LLM, no training (DESIGN §4, the paper's RQ1; PromptReps-style).

    python zeroshot_prompt.py --cfg yamls/rq1/smollm2_135m.yaml --encode.input=data/wiki/corpus.jsonl --encode.kind=doc
    python zeroshot_prompt.py --cfg yamls/rq1/smollm2_135m.yaml --encode.input=data/wiki/queries.test.jsonl --encode.kind=query
    python zeroshot_prompt.py --cfg yamls/rq1/smollm2_135m.yaml --cfg yamls/zeroshot/next_token.yaml ...  # our method
    accelerate launch --num_processes 4 zeroshot_prompt.py --cfg ... --encode.input=...      # one shard per process

Model: `model.name_or_path` (+ `model.gguf_file`; `pkg:<module>` = an installed package's folder), kind detected
(how each kind is prompted is its `Prompting` row in lsr_core.backbones.KINDS):
  decoder          prompt (through the tokenizer's chat template when it has one and `zeroshot.use_chat_template`),
                   left-padded so the last position is the next-token position for every row;
  encoder_decoder  prompt to the encoder, logits of the decoder's first step (from the decoder start token);
  encoder (BERT)   the prompt ends with the mask token (appended when the template has none); MLM logits there.
Prompt: `zeroshot.query_template` / `doc_template` with `{text}` (the text cut to model.max_query_len/max_doc_len
tokens first, so the instruction is never truncated), optional `system_prompt`, then `answer_prefix` (after the chat
template's generation prompt, or on a new line after a plain prompt).
Vector: log1p(relu(next-token logits)), max over `zeroshot.steps` greedy steps (decoders and encoder-decoders), then
  `in_text_only`: keep only vocabulary ids of the input's non-stopword words (see `text_token_ids`); a text where that
                  leaves no positive weight (e.g. only stopwords) falls back to the whole vocabulary;
  top-k: `zeroshot.query_topk` / `doc_topk` (0 = all), `encode.threshold`, quantisation `encode.quant_scale` — the
  same `prune`/`to_vector` as encode.py.
`zeroshot.method: multi_token` — the reference's RQ1 method (JingfenQiao/Decoder4LSR lsr/inference_zeroshot.py with
  the model classes of its zero-shot experiments), used by yamls/rq1:
  input     template with {text} (the whole text; the reference's prompt is "<s>[INST] ... Query: " + text), the
            tokenizer's special tokens added, right-padded, cut at `zeroshot.max_length` tokens in all;
  logits    at every position: decoders and encoders read the input itself (mask = attention x not-special-token,
            lsr/models/mlm_de_multi_opt.py, mlm.py); encoder-decoders teacher-force the input shifted right through the
            decoder (mask = the attention mask shifted right, its first column 0: lsr/models/mlm_en_de_multi.py);
  pooling   rep[v] = max over kept positions of log1p(relu(logits[v])) (lsr_core.modeling.sparse_forward), cut to
            the tokenizer's vocabulary;
  terms     `reference_text_ids`: vocabulary ids of the text's NLTK-tokenized, lower-cased words without NLTK's
            English stopwords, each with weight int(rep * encode.quant_scale) (truncated, as the reference's
            `.to(torch.int)`; floats rounded to 5 decimals when quant_scale is 0); no top-k and no threshold on them;
  fallback  a text whose in-text weights are all 0 (or that has no in-text ids) keeps the `query_topk`/`doc_topk`
            largest weights of the whole vocabulary instead (zeros dropped); with `in_text_only: false` every
            text takes that top-k (the reference has no such mode);
  `use_chat_template`, `answer_prefix`, `steps`, model.max_query_len/max_doc_len and `emit_dense` are not used.
Output: exactly encode.py's (default `<output_dir>/encode/corpus` or `.../queries`): `part-NNNNN.jsonl.gz` shards of
{"id", "vector": {token: weight}}, `meta.json` (the same keys; config_hash covers the model and zeroshot sections),
`config.yaml`. With `zeroshot.emit_dense`, each shard also gets `dense-part-NNNNN.npy` (float32 [n, hidden]: the
last hidden state at the position whose logits are read, i.e. PromptReps' dense vector) and `dense-part-NNNNN.ids.json`
(the n ids, same order). One shard per process; a rerun skips finished shards (a shard is written last, atomically).
"""
from __future__ import annotations

import inspect
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from lsr_core.inputs import read_input
from lsr_core.outputs import finish
from lsr_core.config import ConfigError, load_config
from lsr_core import tokenizing
from lsr_core.backbones import KINDS, ModelLoadError, load_backbone, load_tokenizer
from lsr_core.heads import projection_swapped
from lsr_core.intext import TextVocabulary, keep_text_terms, truncate_texts
from lsr_core.modeling import LSRSpec, sparse_forward
from lsr_core.sparse import ShardWriter, id_to_token_list, prune, shard_name, to_vector
from lsr_core.stopwords import NLTK_ENGLISH_STOPWORDS
from lsr_core.utils import atomic_open, atomic_write_json, accelerator_kwargs, run_script

logger = get_logger(__name__)

# ------------------------------------------------------------------------------------------------------- prompts

def build_prompt(tokenizer, kind: str, template: str, text: str, zs) -> tuple[str, bool]:
    """The prompt string and whether the tokenizer should add its special tokens (not when a chat template did)."""
    body = template.replace("{text}", text)  # not str.format: texts and templates may hold braces
    prompting = KINDS[kind].prompting
    if prompting.chat and zs.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": zs.system_prompt}] if zs.system_prompt else []) + \
            [{"role": "user", "content": body}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + zs.answer_prefix, False
    prompt = body + ("\n" + zs.answer_prefix if zs.answer_prefix else "")  # plain prompts: the answer on a new line
    if prompting.reads == "mask" and tokenizer.mask_token not in prompt:
        prompt += tokenizer.mask_token
    return prompt, True


def tokenize_prompts(tokenizer, kind: str, prompts: list[str], add_special: bool) -> dict:
    """Pad on the kind's prompting side: left for decoders (the last column is every row's next-token position),
    right otherwise.

    Returns input_ids, attention_mask [B, L] and read_pos [B] (the position whose logits are read: the last for
    decoders, the mask token for encoders; unused for encoder-decoders, which read the decoder's step).
    """
    prompting = KINDS[kind].prompting
    enc = tokenizer(prompts, add_special_tokens=add_special, padding=True, padding_side=prompting.padding_side,
                    return_tensors="pt")
    input_ids, attention = enc["input_ids"].long(), enc["attention_mask"].long()
    read_pos = torch.full((len(prompts),), input_ids.shape[1] - 1, dtype=torch.long)
    if prompting.reads == "mask":  # the last mask token of each row
        columns = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        read_pos = torch.where(input_ids == tokenizer.mask_token_id, columns, -1).amax(1)
    return {"input_ids": input_ids, "attention_mask": attention, "read_pos": read_pos}


# ----------------------------------------------------------------------------------------------------- the model

def project_only(model, positions: torch.Tensor | None):
    """Run the vocabulary projection only at `positions` ([B], None = the last position), so that no
    [B, L, V] logits tensor is built: logits come out as [B, 1, V]. Works for every kind because the projection
    itself is swapped (BERT's transform runs per position before it)."""
    projection = model.get_output_embeddings()
    project = projection.forward

    def pick(feats):
        rows = torch.arange(feats.shape[0], device=feats.device)
        cols = positions.to(feats.device) if positions is not None else feats.shape[1] - 1
        return project(feats[rows, cols][:, None])

    return projection_swapped(projection, pick)


def _accepts(model, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def next_token_reps(model, kind: str, batch: dict, steps: int, emit_dense: bool):
    """One batch -> (reps [B, V] float32 = max over steps of log1p(relu(next-token logits)),
    dense [B, H] float32 (last hidden state at the first read position) or None)."""
    ids, attn, read_pos = batch["input_ids"], batch["attention_mask"], batch["read_pos"]
    rows = torch.arange(ids.shape[0], device=ids.device)
    use_cache = steps > 1
    reads = KINDS[kind].prompting.reads
    # explicit positions: a left-padded row gets the same positions as it would alone
    explicit_positions = KINDS[kind].prompting.padding_side == "left" and _accepts(model, "position_ids")
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.x
    if reads == "start":  # the encoder runs once; each step feeds the decoder one token
        encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=attn)
        start = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, device=ids.device)
        inputs = {"encoder_outputs": encoder_outputs, "attention_mask": attn, "decoder_input_ids": start}
    else:
        inputs = {"input_ids": ids, "attention_mask": attn}
        if explicit_positions:
            inputs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)
    with project_only(model, read_pos if reads == "mask" else None):
        out = model(**inputs, use_cache=use_cache, output_hidden_states=emit_dense)
    reps = torch.log1p(torch.relu(out.logits[:, -1].float()))
    dense = None
    if emit_dense:
        hidden = out.decoder_hidden_states[-1] if reads == "start" else out.hidden_states[-1]
        dense = hidden[rows, read_pos if reads == "mask" else -1].float()
    for _ in range(steps - 1):  # greedy continuation with the KV cache; one new position a step
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        if reads == "start":
            inputs = {"encoder_outputs": encoder_outputs, "attention_mask": attn, "decoder_input_ids": next_ids}
        else:
            attn = torch.cat([attn, torch.ones_like(next_ids)], dim=1)
            inputs = {"input_ids": next_ids, "attention_mask": attn}
            if explicit_positions:
                inputs["position_ids"] = attn.sum(-1, keepdim=True) - 1
        with project_only(model, None):
            out = model(**inputs, **{cache_arg: getattr(out, cache_arg)}, use_cache=True)
        reps = torch.maximum(reps, torch.log1p(torch.relu(out.logits[:, -1].float())))
    return reps, dense


# ------------------------------------------------------------------------------- multi_token (the reference's RQ1)

TREEBANK_WORD = re.compile(r"``|''|\.\.\.|--|n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[.,]\w+)*|[^\w\s]")


def treebank_words(text: str) -> list[str]:
    """NLTK's `word_tokenize` (Treebank rules), approximated without nltk: an opening double quote becomes ``, a
    closing one '', contractions split before n't 's 're 've 'll 'd 'm, numbers keep their inner . and , and every
    other punctuation mark is a word of its own. (NLTK differs on rare forms, e.g. it keeps "u.s." whole.)"""
    text = re.sub(r'(^|[\s(\[{<])"', r"\1 `` ", text).replace('"', " '' ")
    text = re.sub(r"(\w)(n't|'(?:s|re|ve|ll|d|m))\b", r"\1 \2", text, flags=re.IGNORECASE)
    return TREEBANK_WORD.findall(text)


def reference_words(text: str) -> str:
    """The lower-cased text's Treebank words without NLTK's English stopwords, joined by spaces."""
    return " ".join(w for w in treebank_words(text.lower()) if w not in NLTK_ENGLISH_STOPWORDS)


def reference_text_ids(tokenizer, prefix: str, texts: list[str]) -> list[list[int]]:
    """The reference's in-text ids of each text: tokenize (special tokens added) the words of prompt prefix + text,
    then drop as many leading ids as the prefix's words alone give. Where the tokenizer appends its special tokens
    (T5's </s>, BERT's [SEP]) this drops the text's first id and keeps the appended one, as the reference does."""
    skip = len(tokenizer(reference_words(prefix))["input_ids"])
    return [ids[skip:] for ids in tokenizer([reference_words(prefix + t) for t in texts])["input_ids"]]


def multi_token_reps(model, spec: LSRSpec, batch: dict) -> torch.Tensor:
    """One right-padded batch (`tokenizing.tokenize`) -> reps [B, V] float32: max over the kept positions of
    log1p(relu(vocabulary logits)), the kept positions as the reference masks them (`sparse_forward` with an MLM
    head). Where pooling reads shifted decoder steps, the reference's mask is the attention mask shifted right,
    whose first column is T5's start id 0: it also covers step n of a padded text (it reads </s>), which the
    trained models' pool mask leaves out."""
    if tokenizing.pools_shifted(spec):
        attn = batch["attention_mask"]
        batch = dict(batch, pool_mask=torch.cat([torch.zeros_like(attn[:, :1]), attn[:, :-1]], 1))
    return sparse_forward(model, spec, "mlm", None, batch)


def reference_vector(rep: torch.Tensor, text_ids: list[int], topk: int, scale: float,
                     vocab: list[str]) -> tuple[dict, bool]:
    """rep [V] -> ({token: weight}, whether it fell back to the top-k): the in-text ids' weights, or, when they are
    all 0, the `topk` (0 = all) largest weights of the vocabulary. Weights: int(w * scale) when scale > 0."""
    rep = rep[:len(vocab)].float()
    weights = (rep * scale).int() if scale > 0 else rep

    def as_vector(token_ids: torch.Tensor) -> dict:
        values = weights[token_ids].tolist()
        values = values if scale > 0 else [round(v, 5) for v in values]
        return {vocab[t]: v for t, v in zip(token_ids.tolist(), values) if v}

    in_text = as_vector(torch.tensor([t for t in text_ids if 0 <= t < len(vocab)], dtype=torch.long))
    if in_text:
        return in_text, False
    k = min(topk or len(vocab), len(vocab))
    return as_vector(rep.topk(k).indices), True


def multi_token_batch(model, kind: str, tokenizer, template: str, batch_texts: list[str], zs, device) -> torch.Tensor:
    """Texts -> reps [B, V]: the template filled with each whole text, tokenized as the reference does."""
    prompts = [template.replace("{text}", t) for t in batch_texts]
    tokenizer.padding_side = "right"  # every real position keeps the position id it has unpadded
    # the reference's MLM pooling: special tokens out where its heads leave them out, the whole text kept
    spec = LSRSpec(kind=kind, special_tokens="reference", max_doc_len=zs.max_length)
    batch = {k: v.to(device) for k, v in tokenizing.tokenize(spec, tokenizer, prompts, is_query=False).items()}
    with torch.inference_mode():
        return multi_token_reps(model, spec, batch)


# ------------------------------------------------------------------------------------------------------------ main

def dense_name(shard: int) -> str:
    return f"dense-part-{shard:05d}.npy"


def main(argv=None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    enc, zs = cfg.encode, cfg.zeroshot
    if not enc.input:
        raise ConfigError("'encode.input' is empty: give the corpus or queries file")
    is_query = enc.kind == "query"
    template = zs.query_template if is_query else zs.doc_template
    if "{text}" not in template:
        raise ConfigError(f"'zeroshot.{'query' if is_query else 'doc'}_template' must contain {{text}}")
    topk = zs.query_topk if is_query else zs.doc_topk
    max_len = cfg.model.max_query_len if is_query else cfg.model.max_doc_len
    out = Path(enc.output or cfg.output_dir / "encode" / ("queries" if is_query else "corpus"))
    ids, texts = read_input(enc.input, enc.kind)

    accelerator = Accelerator(**accelerator_kwargs())
    if accelerator.device.type == "cuda" and cfg.model.dtype == "float32":
        cfg.model.dtype = "bfloat16"  # inference in bf16 on GPU; activations are taken in float32
    started = time.time()
    model, kind = load_backbone(cfg.model.name_or_path, cfg.model.kind, gguf_file=cfg.model.gguf_file,
                                dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(accelerator.device).eval()
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.trust_remote_code)
    if KINDS[kind].prompting.reads == "mask" and tokenizer.mask_token is None:
        raise ModelLoadError(f"'{cfg.model.name_or_path}' is an encoder without a mask token: cannot be prompted")
    if KINDS[kind].prompting.reads == "mask" and zs.steps > 1:
        raise ConfigError(f"'zeroshot.steps' must be 1 for an encoder (MLM) model, got {zs.steps}")
    load_seconds = time.time() - started
    vocab = id_to_token_list(tokenizer)
    multi = zs.method == "multi_token"
    if multi and zs.emit_dense:
        raise ConfigError("'zeroshot.emit_dense' needs 'zeroshot.method: next_token' (multi_token reads no answer "
                          "position)")
    text_vocab = TextVocabulary(tokenizer) if zs.in_text_only and not multi else None

    per_shard = enc.shard_size or math.ceil(len(ids) / accelerator.num_processes)
    n_shards = math.ceil(len(ids) / per_shard)

    def finished(shard: int) -> bool:
        return (out / shard_name(shard)).is_file() and (not zs.emit_dense or (out / dense_name(shard)).is_file())

    mine = [s for s in range(accelerator.process_index, n_shards, accelerator.num_processes) if not finished(s)]
    out.mkdir(parents=True, exist_ok=True)
    todo = sum(min(per_shard, len(ids) - s * per_shard) for s in mine)
    logger.info(f"zero-shot {kind} {cfg.model.name_or_path} (loaded in {load_seconds:.1f}s, {cfg.model.dtype}): "
                f"{len(ids)} {'queries' if is_query else 'documents'} into {n_shards} shard(s) on "
                f"{accelerator.num_processes} process(es), batch {enc.batch_size}; this process: {len(mine)} to do",
                main_process_only=False)
    started = time.time()
    fallbacks = 0
    progress = tqdm(total=todo, disable=not accelerator.is_main_process, desc="zeroshot", unit="text")
    for shard in mine:
        lo, hi = shard * per_shard, min(len(ids), (shard + 1) * per_shard)
        shard_texts = texts[lo:hi]
        vectors: list[dict | None] = [None] * (hi - lo)
        dense = None
        order = sorted(range(len(shard_texts)), key=lambda i: len(shard_texts[i]))  # less padding per batch
        for start in range(0, len(order), enc.batch_size):
            positions = order[start:start + enc.batch_size]
            if multi:
                raw = [shard_texts[i] for i in positions]
                reps = multi_token_batch(model, kind, tokenizer, template, raw, zs, accelerator.device)
                in_text = reference_text_ids(tokenizer, template[:template.index("{text}")], raw) \
                    if zs.in_text_only else [[] for _ in raw]
                for pos, text_ids, rep in zip(positions, in_text, reps):
                    vectors[pos], fell_back = reference_vector(rep, text_ids, topk, enc.quant_scale, vocab)
                    fallbacks += fell_back
                progress.update(len(positions))
                continue
            batch_texts = truncate_texts(tokenizer, [shard_texts[i] for i in positions], max_len)
            prompts = [build_prompt(tokenizer, kind, template, t, zs) for t in batch_texts]
            batch = tokenize_prompts(tokenizer, kind, [p for p, _ in prompts], prompts[0][1])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with torch.inference_mode():
                reps, dense_batch = next_token_reps(model, kind, batch, zs.steps, zs.emit_dense)
            if text_vocab is not None:
                reps, fell_back = keep_text_terms(reps, [text_vocab(t) for t in batch_texts])
                fallbacks += fell_back
            for pos, (token_ids, weights) in zip(positions, prune(reps, topk, enc.threshold)):
                vectors[pos] = to_vector(token_ids, weights, vocab, enc.quant_scale)
            if dense_batch is not None:
                if dense is None:
                    dense = np.zeros((hi - lo, dense_batch.shape[1]), dtype=np.float32)
                dense[positions] = dense_batch.cpu().numpy()
            progress.update(len(positions))
        if dense is not None:
            atomic_write_json(out / dense_name(shard).replace(".npy", ".ids.json"), ids[lo:hi])
            with atomic_open(out / dense_name(shard), "wb") as f:
                np.save(f, dense)
        writer = ShardWriter(out / shard_name(shard))
        for rid, vec in zip(ids[lo:hi], vectors):
            writer.add(rid, vec)
        writer.close()  # last and atomic: the shard (and its dense part) count as done only once it exists
    progress.close()
    elapsed = time.time() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cfg.encode.topk = topk  # meta.json records the top-k actually applied
        counted = text_vocab is not None or multi
        finish(cfg, out, ids, n_shards, is_query, len(vocab), todo, elapsed, hash_sections=("model", "zeroshot"),
               label="zero-shot encoded", note=f", in_text_only fallbacks {fallbacks if counted else 'n/a'}",
               vocab=vocab)
    return out


if __name__ == "__main__":
    run_script(main)
