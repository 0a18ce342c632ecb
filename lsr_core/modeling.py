"""Sparse encoders over any transformer backbone (DESIGN §2): the spec, the forward, the model, building it.

Heads: `mlm` (logits -> ReLU -> log1p -> max/sum over pooled positions, with expansion) and `mlp`
(Linear(hidden, 1) -> ReLU per input token, scattered to its token id; a repeated token's weights summed in queries,
max in documents; no expansion); their pooling is lsr_core/heads.py. How each kind of backbone is run is its row of
`backbones.KINDS`; which positions pool, lsr_core/tokenizing.py; packed encoding, lsr_core/packing.py.
`SparseModel` holds the backbones (one when shared) and heads; `sparse_forward` runs one of them on a batch.

The MLM head never builds [batch, length, vocab] in full: the backbone's output projection (`get_output_embeddings()`)
is swapped, for the duration of our forward, for `heads.sparse_mlm_pool`.

Saved layout (`SparseModel.save`): `lsr_config.json` + an HF folder at the root (shared) or in `query/` and `doc/`
(asymmetric), + `mlp_head.safetensors` for MLP heads. LoRA adapters are merged before saving.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from lsr_core import tokenizing
from lsr_core.backbones import (KINDS, ModelLoadError, decoding_of, load_backbone, load_tokenizer, merged,
                                prepare_for_training)
from lsr_core.heads import (full_shape, head_bias, max_pool_inference, mlp_pool, projection_swapped,
                            sparse_mlm_pool)
from lsr_core.hub import model_folder
from lsr_core.packing import enable_packing, is_packed, pack_batch, packed_inputs, round_up, varlen_attn

LSR_CONFIG = "lsr_config.json"
RUNTIME_FIELDS = ("head_chunk", "head_kernel")  # LSRSpec fields that say how to compute, set by each run's config
MLP_HEAD = "mlp_head.safetensors"


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
        bias = head_bias(projection, spec.logit_shift)
        if raw or unpad is not None:
            return max_pool_inference(feats, projection.weight, bias, mask, spec.head_chunk, activate=not raw,
                                       kernel=spec.head_kernel, packed=unpad)
        return sparse_mlm_pool(feats, projection.weight, bias, mask, spec.pooling, spec.head_chunk, spec.head_kernel)

    if packed:
        inputs, mask, unpad = packed_inputs(backbone, batch)
        with projection_swapped(projection, mlm):
            return backbone(**inputs).logits

    decoding = decoding_of(spec)
    mask = torch.ones_like(batch["input_ids"][:, :1]) if decoding.one_step else batch["pool_mask"]
    if decoding.states is not None:
        hidden = decoding.states(backbone, batch)
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
    inputs = decoding.inputs(backbone, spec, batch)
    if head == "mlm":
        with projection_swapped(projection, mlm):
            return backbone(**inputs, use_cache=False).logits
    # MLP: last hidden state -> one weight per input token; the vocabulary projection is skipped entirely
    with projection_swapped(projection, lambda feats: feats[..., :1]):
        out = backbone(**inputs, use_cache=False, output_hidden_states=True)
    hidden = getattr(out, decoding.hidden)[-1]
    return mlp_pool(torch.relu(mlp(hidden.to(mlp.weight.dtype))).squeeze(-1), batch["input_ids"], mask, vocab, merge)


def new_mlp_head(kind: str, hidden: int) -> nn.Linear:
    """A fresh MLP head Linear(hidden, 1), initialised as the reference's: its encoder (BERT) MLP head redraws the
    weight with kaiming_normal_ for ReLU (lsr/models/mlp.py); its T5 and OPT MLP heads keep nn.Linear's own init."""
    layer = nn.Linear(hidden, 1)
    if KINDS[kind].mlp_kaiming:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return layer


class SparseModel(nn.Module):
    """Query and document encoders + the tokenizer. Each parameter is registered once: `query_backbone` exists only
    for asymmetric (unshared) models, `query_mlp` / `doc_mlp` only for MLP heads.

    `forward(q_batch, d_batch) -> (q_reps [B, V], d_reps [D, V])` is what training calls (one module for DDP).
    """

    def __init__(self, spec: LSRSpec, tokenizer, doc_backbone, query_backbone=None, mlps: dict | None = None,
                 length_buckets: int = 1, pad_multiple: int = 0, packed: str = "false"):
        """`length_buckets`: model.length_buckets (`encode_batch`); `pad_multiple`: batch widths are rounded up to a
        multiple (fewer shapes); `packed`: model.packed where `enable_packing` accepted the backbone, else "false"."""
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.length_buckets, self.pad_multiple, self.packed = length_buckets, pad_multiple, packed
        self._packing_tokenizers = {}
        self.doc_backbone = doc_backbone
        self.query_backbone = query_backbone if query_backbone is not doc_backbone else None
        hidden = full_shape(doc_backbone.get_input_embeddings().weight)[1]
        mlps = mlps or {}
        self.query_mlp = (mlps.get("query") or new_mlp_head(spec.kind, hidden)) if spec.query_head == "mlp" else None
        self.doc_mlp = (mlps.get("doc") or new_mlp_head(spec.kind, hidden)) if spec.doc_head == "mlp" else None

    @property
    def vocab_size(self) -> int:
        return full_shape(self.doc_backbone.get_output_embeddings().weight)[0]

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
        left = tokenizing.padding_side(self.spec, self.tokenizer) == "left"
        reps = []
        for idx in order.chunk(self.length_buckets):
            width = min(batch["input_ids"].shape[1], round_up(int(lengths[idx].max()), self.pad_multiple))
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
        """texts -> input_ids, attention_mask, pool_mask [B, L] (`tokenizing.tokenize`)."""
        return tokenizing.tokenize(self.spec, self.tokenizer, texts, is_query, self.pad_multiple)

    def host_batch(self, texts: list[str], is_query: bool, pack: bool) -> dict:
        """`tokenize`, or with `pack` (where `packs` holds for the device that will run it) the texts packed as
        `pack_batch` gives them: what encode's tokenizer workers hand over, so the device gets the packed texts
        without a synchronisation. A packing kind with a fast tokenizer packs straight from the Rust tokenizer, never
        padding (`tokenizing.tokenize_packed`)."""
        head = self.spec.query_head if is_query else self.spec.doc_head
        if pack and texts and KINDS[self.spec.kind].packs and head == "mlm" and \
                hasattr(self.tokenizer, "backend_tokenizer"):
            max_len = self.spec.max_query_len if is_query else self.spec.max_doc_len
            if max_len not in self._packing_tokenizers:
                self._packing_tokenizers[max_len] = tokenizing.packing_tokenizer(self.tokenizer, max_len)
            return tokenizing.tokenize_packed(self.spec, self._packing_tokenizers[max_len], texts, is_query,
                                              self.pad_multiple)
        batch = self.tokenize(texts, is_query)
        return pack_batch(batch) if pack else batch

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
            merged(backbone).save_pretrained(sub, **kwargs)
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


def read_spec(folder: Path, runtime: dict | None = None) -> LSRSpec:
    """The LSRSpec of a folder saved by `SparseModel.save` (its lsr_config.json), with `runtime`'s RUNTIME_FIELDS
    (a saved folder's are not used); anything else is a one-line ModelLoadError naming the file."""
    path = folder / LSR_CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a model folder saved by train.py (no {LSR_CONFIG})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
    data = {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}
    data.setdefault("special_tokens", "keep")  # a folder saved before the key existed pooled them (MLM heads)
    unknown = set(data) - {f.name for f in fields(LSRSpec)}
    if unknown:
        raise ModelLoadError(f"{path}: unknown keys {sorted(unknown)}")
    return LSRSpec(**data, **(runtime or {}))


def build_model(mcfg, training: bool = False, max_lengths: dict[str, int] | None = None) -> SparseModel:
    """Build a SparseModel from `cfg.model`: a folder saved by `SparseModel.save` (its lsr_config.json decides
    everything about the heads), or any HF backbone (the model section decides). `max_lengths` ({"max_query_len":
    n} and/or {"max_doc_len": n}) overrides the lengths either source gives, as encode.max_length does."""
    name = mcfg.name_or_path
    if not name:
        raise ModelLoadError("model.name_or_path is empty")
    name = model_folder(name)  # a repository decoder-lsr pushed: its snapshot, so its lsr_config.json decides
    # what the model computes comes from a saved folder; how this run computes it, from the model section
    saved = (Path(name) / LSR_CONFIG).is_file()
    spec = read_spec(Path(name), {key: getattr(mcfg, key) for key in RUNTIME_FIELDS}) if saved else None
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
    if max_lengths:
        spec = replace(spec, **max_lengths)
    if spec.decoding not in KINDS[spec.kind].decodings:
        owners = " / ".join(k for k, row in KINDS.items() if spec.decoding in row.decodings)
        raise ModelLoadError(f"model.decoding={spec.decoding} applies only to {owners} backbones "
                             f"('{name}' is {spec.kind})")
    if KINDS[kind].padding_side == "tokenizer" and tokenizer.padding_side not in ("left", "right"):
        tokenizer.padding_side = "right"
    if training:
        q_backbone, d_backbone = prepare_for_training(mcfg, q_backbone, d_backbone)
    mlps = _load_mlp_heads(Path(name)) if saved else {}
    packs = not training and all([enable_packing(backbone, spec.kind, mcfg.packed, mcfg.attention_kernel)
                                  for backbone in dict.fromkeys([q_backbone, d_backbone])])
    if mcfg.compile != "none":
        for backbone in dict.fromkeys([q_backbone, d_backbone]):
            compile_blocks(backbone, mcfg.compile, mcfg.compile_scope)
    return SparseModel(spec, tokenizer, d_backbone, q_backbone, mlps, length_buckets=mcfg.length_buckets,
                       pad_multiple=mcfg.pad_to_multiple or (16 if mcfg.compile != "none" else 0),
                       packed=mcfg.packed if packs else "false")


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
