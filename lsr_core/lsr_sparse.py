"""A sentence-transformers module that restates decoder-lsr's sparse encoder (lsr_core/modeling.py `sparse_forward`).

lsr_core/st_export.py copies this file into an exported folder as `lsr_sparse.py`; sentence-transformers loads it
from there with `SparseEncoder(folder, trust_remote_code=True)`. It is self-contained on purpose (torch,
transformers, safetensors and sentence-transformers only): the folder must work without decoder-lsr installed.

One backbone and a head per role ("query", "document"; an asymmetric model is two of these under a Router):
texts (prefixed through the model's prompts) -> token rows, truncated at the role's max length, and a pool mask
(special tokens left out where the role says so, decoder step 0 left out for shifted decodings, BOS dropped and echo
as configured) -> the backbone run as `kind` and `decoding` say -> MLM head: log1p(relu(logits + bias +
logit_shift)) max- or sum-pooled over the pooled positions, chunked over the vocabulary; MLP head: relu(Linear(last
state)) per token, scattered to its token id (a repeated token's weights summed in queries, max in documents).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from sentence_transformers.sparse_encoder.modules import InputModule

# this file stands alone (sentence-transformers loads it without our repository), so it keeps its own small tables
# of the backbone kinds instead of lsr_core.backbones.KINDS; tests/e2e/test_st_export.py keeps them in step
AUTO_CLASSES = {"encoder": "AutoModelForMaskedLM", "decoder": "AutoModelForCausalLM",
                "encoder_decoder": "AutoModelForSeq2SeqLM"}
DECODINGS = {"encoder": ("multi_token",), "decoder": ("multi_token",),
             "encoder_decoder": ("multi_token", "single_token", "encoder_only", "decoder_only")}
INPUTS = {"encoder": "_encoder_inputs", "decoder": "_decoder_inputs", "encoder_decoder": "_seq2seq_inputs"}
HIDDEN = {"encoder": "hidden_states", "decoder": "hidden_states", "encoder_decoder": "decoder_hidden_states"}
MLP_FILE = "lsr_mlp_heads.safetensors"
MERGE = {"query": "sum", "document": "amax"}  # how the MLP head merges the weights of a repeated token


class LSRSparse(InputModule):
    """`roles`: {"query" | "document": {"head": "mlm" | "mlp", "max_length": int, "drop_special": bool}}."""

    config_file_name = "lsr_sparse_config.json"  # config.json is the backbone's
    config_keys = ["kind", "decoding", "roles", "pooling", "logit_shift", "pools_shifted", "one_step",
                   "bidirectional", "echo", "drop_bos"]
    save_in_root = True
    forward_kwargs = {"task"}

    def __init__(self, model_name_or_path: str | None = None, *, kind: str, decoding: str, roles: dict,
                 pooling: str = "max", logit_shift: float = 0.0, pools_shifted: bool = False, one_step: bool = False,
                 bidirectional: bool = False, echo: bool = False, drop_bos: bool = False,
                 model_kwargs: dict | None = None, backbone=None, tokenizer=None, mlps: dict | None = None):
        super().__init__()
        if decoding not in DECODINGS.get(kind, ()):
            raise ValueError(f"kind {kind!r} with decoding {decoding!r}: this module knows {DECODINGS}")
        self.kind, self.decoding, self.roles, self.pooling = kind, decoding, roles, pooling
        self.logit_shift, self.pools_shifted, self.one_step = logit_shift, pools_shifted, one_step
        self.bidirectional, self.echo, self.drop_bos = bidirectional, echo, drop_bos
        if backbone is None:
            kwargs = {"dtype": torch.float32, **(model_kwargs or {})}
            backbone = getattr(transformers, AUTO_CLASSES[kind]).from_pretrained(model_name_or_path, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_name_or_path)
            path = os.path.join(model_name_or_path, MLP_FILE)
            mlps = _mlps_from(load_file(path)) if os.path.isfile(path) else {}
        if tokenizer.pad_token_id is None:  # decoder LLMs often ship without one
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.backbone, self.tokenizer = backbone, tokenizer
        self.mlps = nn.ModuleDict({role: mlps[role] for role in roles if roles[role]["head"] == "mlp"})

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, model_kwargs: dict | None = None, **kwargs) -> "LSRSparse":
        hub = dict(token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        return cls(folder, model_kwargs=model_kwargs, **config)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.backbone.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        if len(self.mlps):
            save_file({f"{role}.{name}": p.detach().float().cpu().contiguous() for role, mlp in self.mlps.items()
                       for name, p in mlp.named_parameters()}, os.path.join(output_path, MLP_FILE))

    @property
    def max_seq_length(self) -> int:
        return max(role["max_length"] for role in self.roles.values())

    def get_embedding_dimension(self) -> int:
        return self.backbone.get_output_embeddings().weight.shape[0]

    def role(self, task: str | None) -> str:
        """encode_query -> "query", encode_document -> "document"; a plain encode() (no task) -> documents."""
        task = task or ("document" if "document" in self.roles else next(iter(self.roles)))
        if task not in self.roles:
            raise ValueError(f"task {task!r}: this module encodes {sorted(self.roles)}")
        return task

    # ------------------------------------------------------------------------------------------- texts -> rows
    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict:
        role = self.role(task)
        drop = self.roles[role]["drop_special"]
        tok = self.tokenizer
        texts = [(prompt or "") + text for text in inputs]
        encoded = tok(texts, truncation=True, max_length=self.roles[role]["max_length"],
                      return_special_tokens_mask=True)
        rows, pools = [], []
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            pool = [0 if (drop and s) else 1 for s in special]
            if self.pools_shifted and pool:
                pool[0] = 0  # decoder step 0 has read only the start token
            if self.drop_bos and ids and ids[0] == tok.bos_token_id:
                pool[0] = 0
            if self.echo:  # the text twice; only the second copy pools, where every position has seen it all
                body = ids[1:] if ids and ids[0] == tok.bos_token_id else ids
                pool = [0] * len(ids) + [0 if (drop and s) else 1 for s in special[len(ids) - len(body):]]
                ids = ids + body
            rows.append(ids)
            pools.append(pool)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention, pool_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        for i, (ids, pool) in enumerate(zip(rows, pools)):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, :len(ids)] = 1
            pool_mask[i, :len(ids)] = torch.tensor(pool, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool_mask, "task": role}

    # ------------------------------------------------------------------------------------------- rows -> vectors
    def forward(self, features: dict, task: str | None = None, **kwargs) -> dict:
        role = self.role(features.get("task") or task)
        ids, attn = features["input_ids"], features["attention_mask"]
        mask = torch.ones_like(ids[:, :1]) if self.one_step else features["pool_mask"]
        backbone, mlp = self.backbone, self.mlps[role] if role in self.mlps else None
        projection = backbone.get_output_embeddings()
        if self.decoding in ("encoder_only", "decoder_only"):  # one stack of an encoder-decoder, run alone
            if self.decoding == "encoder_only":
                hidden = backbone.get_encoder()(input_ids=ids, attention_mask=attn).last_hidden_state
            else:
                hidden = backbone.get_decoder()(input_ids=backbone._shift_right(ids),
                                                attention_mask=attn).last_hidden_state
            if mlp is not None:
                reps = self._mlp_pool(mlp, hidden, ids, mask, role)
            else:
                config = backbone.config  # as T5's own forward scales the states before its lm_head
                if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False)):
                    hidden = hidden * config.d_model ** -0.5
                reps = self._mlm_pool(hidden, projection, mask)
        else:
            # the vocabulary projection's forward is swapped for the pooling, so [B, L, V] is never built
            head = (lambda feats: feats[..., :1]) if mlp is not None else \
                (lambda feats: self._mlm_pool(feats, projection, mask))
            projection.forward = head
            try:
                out = backbone(**self._inputs(ids, attn), use_cache=False, output_hidden_states=mlp is not None)
            finally:
                del projection.forward
            if mlp is None:
                reps = out.logits
            else:
                states = getattr(out, HIDDEN[self.kind])
                reps = self._mlp_pool(mlp, states[-1], ids, mask, role)
        features["sentence_embedding"] = reps
        return features

    def _inputs(self, ids: torch.Tensor, attn: torch.Tensor) -> dict:
        return getattr(self, INPUTS[self.kind])(ids, attn)

    def _encoder_inputs(self, ids: torch.Tensor, attn: torch.Tensor) -> dict:
        return {"input_ids": ids, "attention_mask": attn}

    def _decoder_inputs(self, ids: torch.Tensor, attn: torch.Tensor) -> dict:
        """Explicit positions; bidirectional: every position sees every non-pad one."""
        inputs = {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
        if self.bidirectional:
            dtype = self.backbone.get_input_embeddings().weight.dtype
            keys = attn[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1)
            inputs["attention_mask"] = torch.zeros(keys.shape, dtype=dtype, device=ids.device).masked_fill(
                ~keys, torch.finfo(dtype).min)
        return inputs

    def _seq2seq_inputs(self, ids: torch.Tensor, attn: torch.Tensor) -> dict:
        if self.decoding == "single_token":  # one decoder step from the start token
            start = torch.full((ids.shape[0], 1), self.backbone.config.decoder_start_token_id, device=ids.device)
            return {"input_ids": ids, "attention_mask": attn, "decoder_input_ids": start}
        # teacher-forced copy: decoder step t reads tokens < t
        shifted = torch.cat([torch.ones_like(attn[:, :1]), attn[:, :-1]], dim=1)
        return {"input_ids": ids, "attention_mask": attn, "decoder_input_ids": self.backbone._shift_right(ids),
                "decoder_attention_mask": shifted}

    def _mlm_pool(self, feats: torch.Tensor, projection: nn.Module, mask: torch.Tensor) -> torch.Tensor:
        """feats [B, L, H] -> reps [B, V] float32, chunked over the vocabulary (max: over the raw products, the
        bias added once, as log1p(relu(.)) is monotonic)."""
        weight = projection.weight
        vocab, (batch, length) = weight.shape[0], feats.shape[:2]
        bias = torch.full((vocab,), float(self.logit_shift), device=weight.device)
        if getattr(projection, "bias", None) is not None:
            bias = projection.bias.float() + self.logit_shift if self.logit_shift else projection.bias.float()
        keep = mask.bool()[:, :, None]
        chunk = max(1, (1 << 22) // max(1, batch * length))
        out = torch.empty(batch, vocab, dtype=torch.float32, device=feats.device)
        for start in range(0, vocab, chunk):
            stop = min(vocab, start + chunk)
            logits = (feats.to(weight.dtype) @ weight[start:stop].T).float()
            if self.pooling == "max":
                out[:, start:stop] = logits.masked_fill(~keep, float("-inf")).amax(1) + bias[start:stop]
            else:
                out[:, start:stop] = (torch.log1p(torch.relu(logits + bias[start:stop])) * keep).sum(1)
        return torch.log1p(torch.relu(out)) if self.pooling == "max" else out

    def _mlp_pool(self, mlp: nn.Linear, hidden, ids, mask, role: str) -> torch.Tensor:
        weights = torch.relu(mlp(hidden.to(mlp.weight.dtype))).squeeze(-1).float() * mask.float()
        reps = weights.new_zeros(ids.shape[0], self.get_embedding_dimension())
        return reps.scatter_reduce(1, ids, weights, reduce=MERGE[role], include_self=True)


def _mlps_from(tensors: dict) -> dict:
    heads = {}
    for role in MERGE:
        if f"{role}.weight" in tensors:
            layer = nn.Linear(tensors[f"{role}.weight"].shape[1], 1)
            layer.load_state_dict({"weight": tensors[f"{role}.weight"], "bias": tensors[f"{role}.bias"]})
            heads[role] = layer
    return heads
