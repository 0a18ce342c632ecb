"""Packed encoding: an encoder at inference runs a batch as one row of its texts end to end, without padding.

Attention is then variable-length flash attention (torch.nn.attention.varlen) or lsr_core/attention_kernel.py
instead of SDPA with a padding mask, and the fused head reads each text's span of the row. Speed: bench/RESULTS.md,
"Packed encoding".
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lsr_core import attention_kernel
from lsr_core.backbones import KINDS, ModelLoadError


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


PACKED_ATTENTION = "lsr_packed"  # registered with transformers' AttentionInterface; SDPA when not packed
# model.attention_kernel -> the registered attention function (torch's varlen_attn only, or our kernel at inference)
PACKED_ATTENTIONS = {"auto": PACKED_ATTENTION, "varlen": PACKED_ATTENTION + "_varlen"}
# up to this width (a batch's longest text, rounded up to 64) varlen_attn's 128-wide tiles waste little and it was
# the faster one there (bench/RESULTS.md, "Where BERT-base's encoding time goes")
KERNEL_MIN_LENGTH = 128
# the model types whose packed output is tested equal to the padded one, with their first position id
PACKED_POSITION_OFFSET = {"bert": lambda cfg: 0, "distilbert": lambda cfg: 0, "electra": lambda cfg: 0,
                          "roberta": lambda cfg: cfg.pad_token_id + 1, "xlm-roberta": lambda cfg: cfg.pad_token_id + 1}


try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, kernel: str = "auto", **kwargs):
    """transformers attention function: with `cu_seq_lens_q` (texts packed into one row) each text attends to itself
    only; otherwise exactly transformers' SDPA attention, so the same backbone also runs padded batches.
    On CUDA without gradients, `kernel="auto"` runs lsr_core/attention_kernel.py (tiles sized to short texts) on
    batches wider than KERNEL_MIN_LENGTH."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, heads, T, d] -> [T, heads, d]
    if kernel == "auto" and max_length_q > KERNEL_MIN_LENGTH and not torch.is_grad_enabled() \
            and attention_kernel.usable(q):
        out = attention_kernel.packed_attention(q, k, v, cu_seq_lens_q, max_length_q,
                                                q.shape[-1] ** -0.5 if scaling is None else scaling)
    elif q.is_cuda and varlen_attn is not None:  # (a call here, e.g. find_spec, would break the compiled graph)
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling)
    else:  # CPU (tests, model.packed=true): one SDPA call per text
        ends = cu_seq_lens_q.tolist()
        out = torch.cat([nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scaling).transpose(0, 1)
            for a, b in zip(ends, ends[1:])])
    return out.unsqueeze(0), None


def enable_packing(backbone, kind: str, packed: str, attention: str = "auto") -> bool:
    """model.packed: switch an encoder backbone to the packed-capable attention. "auto" does so where supported
    (a model type of PACKED_POSITION_OFFSET on transformers' default SDPA attention) and packs on CUDA only; "true"
    fails where unsupported and packs on any device (the CPU fallback runs one SDPA call per text).
    `attention`: model.attention_kernel, which attention runs packed texts on CUDA (`_packed_attention`)."""
    cfg = backbone.config
    supported = KINDS[kind].packs and cfg.model_type in PACKED_POSITION_OFFSET and \
        cfg._attn_implementation in ("sdpa", *PACKED_ATTENTIONS.values())
    if packed == "false" or (packed == "auto" and not supported):
        return False
    if not supported:
        raise ModelLoadError(f"model.packed=true needs an encoder of type {sorted(PACKED_POSITION_OFFSET)} with "
                             f"sdpa attention, got {cfg.model_type!r} with {cfg._attn_implementation!r} attention")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    for name, registered in PACKED_ATTENTIONS.items():
        AttentionInterface.register(registered, functools.partial(_packed_attention, kernel=name))
        AttentionMaskInterface.register(registered, sdpa_mask)
    cfg._attn_implementation = PACKED_ATTENTIONS[attention]
    return True


def pack_batch(batch: dict) -> dict:
    """A padded batch -> its texts end to end: input_ids, position_ids (restarting at each text, as padded inputs have
    them) and pool_mask [T]; cu_seq_lens [B + 1] int32, the texts' offsets; max_length, a Python int: the padded width
    rounded up to 64 (an upper bound is enough for the attention kernel, and few values keep compile's graphs few).
    Run on the host (encode's tokenizer workers) it costs the device no synchronisation; on a device it syncs."""
    keep = batch["attention_mask"].bool()
    ends = keep.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"input_ids": batch["input_ids"][keep], "position_ids": (keep.cumsum(1) - 1)[keep],
            "pool_mask": batch["pool_mask"][keep], "cu_seq_lens": torch.cat([ends.new_zeros(1), ends]),
            "max_length": round_up(keep.shape[1], 64)}


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens" in batch


def packed_inputs(backbone, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A padded or already packed batch -> (the backbone's inputs with its texts in one row, the pool mask [1, T],
    the texts' offsets cu_seq_lens [B + 1])."""
    packed = batch if is_packed(batch) else pack_batch(batch)
    ids, cu, width = packed["input_ids"][None], packed["cu_seq_lens"], packed["max_length"]
    first = PACKED_POSITION_OFFSET[backbone.config.model_type](backbone.config)
    inputs = {"input_ids": ids, "position_ids": packed["position_ids"][None] + first,
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}
    if getattr(backbone.config, "type_vocab_size", 0):  # BERT's default token types stop at 512 positions
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs, packed["pool_mask"][None], cu
