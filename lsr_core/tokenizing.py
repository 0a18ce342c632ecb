"""Texts -> the tensors a sparse encoder reads: input_ids, attention_mask and pool_mask (which positions pool).

Prefixes, echo, BOS dropping, the padding side and the special tokens left out of pooling are all decided here, from
the model's `LSRSpec` and its kind's row (`backbones.KINDS`), so every path (padded, packed, the Triton head, the MLP
head) reads one pool mask.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from lsr_core.backbones import KINDS, decoding_of
from lsr_core.packing import round_up


def drops_special_tokens(spec, head: str) -> bool:
    """Whether `head` leaves special tokens ([CLS], [SEP], BOS) out of pooling. model.special_tokens=reference: as the
    reference does for this kind and head (`Kind.drops_special`); keep: none is left out."""
    return spec.special_tokens == "reference" and head in KINDS[spec.kind].drops_special


def pools_shifted(spec) -> bool:
    """Whether pooling reads decoder steps 1..n-1 of an n-token text (step t has read tokens < t and predicts token t,
    so an MLP weight read there goes to token t). The reference multiplies the decoder's outputs by the attention mask
    shifted right ([0, m0, m1, ...]): step 0, which has read only the start token, never pools. For a text padded in
    its batch that mask also covers step n (it reads </s> and predicts a pad), so the reference's vector depends on
    the batch; we leave step n out for every text, which equals the reference for a text that is not padded."""
    return decoding_of(spec).pools_shifted


def padding_side(spec, tokenizer) -> str:
    """Kinds with explicit positions may pad on either side (the tokenizer's); shift-right decoding needs right."""
    own = KINDS[spec.kind].padding_side == "tokenizer" and tokenizer.padding_side == "left"
    return "left" if own else "right"


def tokenize(spec, tokenizer, texts: list[str], is_query: bool, pad_multiple: int = 0) -> dict:
    """Tokenize and pad so that echo, prefixes, BOS dropping and padding side are explicit.

    Returns input_ids, attention_mask, pool_mask: [B, L] long tensors. The tokenizer pads and the masks are
    computed on whole tensors; echo, which doubles each text, builds its rows one by one (`tokenize_rows`, the
    reference the tests compare the tensor path against).
    """
    prefix = spec.query_prefix if is_query else spec.doc_prefix
    texts = [prefix + t for t in texts]
    text_options = KINDS[spec.kind].text_options
    if not texts or (text_options and spec.echo):
        return tokenize_rows(spec, tokenizer, texts, is_query, pad_multiple)
    head = spec.query_head if is_query else spec.doc_head
    drop = drops_special_tokens(spec, head)
    # numpy, then torch without a copy: faster than the tokenizer's own torch conversion (bench/RESULTS.md, tokenisation)
    encoded = tokenizer(texts, truncation=True, max_length=spec.max_query_len if is_query else spec.max_doc_len,
                        return_special_tokens_mask=drop, padding=True, padding_side=padding_side(spec, tokenizer),
                        pad_to_multiple_of=pad_multiple if pad_multiple > 1 else None, return_tensors="np")
    ids, attention = (torch.from_numpy(encoded[key]).long() for key in ("input_ids", "attention_mask"))
    special = torch.from_numpy(encoded["special_tokens_mask"]).long() if drop else 0
    pool = attention * (1 - special)
    if pools_shifted(spec):
        pool[:, 0] = 0  # right-padded: column 0 is every text's decoder step 0
    if text_options and spec.drop_bos:
        rows, first = torch.arange(len(texts)), attention.argmax(1)
        pool[rows, first] *= ((ids[rows, first] != tokenizer.bos_token_id) | (attention[rows, first] == 0)).long()
    return {"input_ids": ids, "attention_mask": attention, "pool_mask": pool}


def tokenize_rows(spec, tokenizer, texts: list[str], is_query: bool, pad_multiple: int = 0) -> dict:
    """`tokenize` one row at a time (prefixes already added)."""
    tok = tokenizer
    max_len = spec.max_query_len if is_query else spec.max_doc_len
    encoded = tok(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True)
    head = spec.query_head if is_query else spec.doc_head
    drop = drops_special_tokens(spec, head)
    text_options = KINDS[spec.kind].text_options
    rows, pools = [], []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        pool = [0 if (drop and s) else 1 for s in special]
        if pools_shifted(spec) and pool:
            pool[0] = 0
        if text_options and spec.drop_bos and ids and ids[0] == tok.bos_token_id:
            pool[0] = 0
        if text_options and spec.echo:
            # pool only the second copy: there every position has seen the whole text
            body = ids[1:] if ids and ids[0] == tok.bos_token_id else ids
            pool = [0] * len(ids) + [0 if (drop and s) else 1 for s in special[len(ids) - len(body):]]
            ids = ids + body
        rows.append(ids)
        pools.append(pool)
    length = round_up(max(len(r) for r in rows), pad_multiple)
    left = padding_side(spec, tok) == "left"
    input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    pool_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, pool) in enumerate(zip(rows, pools)):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids)
        attention[i, span] = 1
        pool_mask[i, span] = torch.tensor(pool)
    return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool_mask}


def tokenize_packed(spec, encode_batch, texts: list[str], is_query: bool, pad_multiple: int = 0) -> dict:
    """`pack_batch(tokenize(texts))` for a packing kind with an MLM head, without the padded batch in between: the
    Rust tokenizer's encodings (no offsets; `encode_batch` from `packing_tokenizer`) joined end to end. Faster than
    the padded path on a CPU core (bench/tokenize_cpu.py), which is what feeds packed BERT on a GPU."""
    prefix = spec.query_prefix if is_query else spec.doc_prefix
    encodings = encode_batch([prefix + t for t in texts])
    rows = [e.ids for e in encodings]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    ends = lengths.cumsum(0, dtype=torch.int32)
    total = int(ends[-1])
    ids = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total))
    if drops_special_tokens(spec, "mlm"):
        special = np.fromiter(itertools.chain.from_iterable(e.special_tokens_mask for e in encodings),
                              dtype=np.int64, count=total)
        pool = 1 - torch.from_numpy(special)
    else:
        pool = torch.ones(total, dtype=torch.long)
    starts = (ends - lengths).long().repeat_interleave(lengths.long(), output_size=total)
    width = round_up(round_up(int(lengths.max()), pad_multiple), 64)
    return {"input_ids": ids, "position_ids": torch.arange(total) - starts,
            "pool_mask": pool, "cu_seq_lens": torch.cat([ends.new_zeros(1), ends]),
            "max_length": width}


def packing_tokenizer(tokenizer, max_len: int):
    """The batch encoding function of a copy of the fast tokenizer's Rust backend that truncates as `tokenize`'s
    call does and never pads (the wrapper's backend is left as it is)."""
    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    rust.no_padding()
    rust.enable_truncation(max_len, direction=tokenizer.truncation_side)
    # tokenizers < 0.21 lacks encode_batch_fast: encode_batch gives the same ids, with offsets
    return getattr(rust, "encode_batch_fast", rust.encode_batch)
