"""A model folder saved by train.py (`SparseModel.save`) -> a folder that sentence-transformers (>= 6) loads as a
`SparseEncoder` and that encodes, with `encode_query` / `encode_document`, to encode.py's vectors (before top-k and
quantisation, which encode.py applies to its output).

- MLM encoders (BERT, DistilBERT, ...) that pool special tokens (`model.special_tokens: keep`) go through
  sentence-transformers' own modules: Transformer (fill-mask, per-task max lengths) + SpladePooling, the
  `logit_shift` folded into the MLM decoder's bias. They load without trust_remote_code.
- Everything else (special tokens left out of pooling as the reference does, decoder-only and encoder-decoder
  backbones, MLP heads, a shift with no bias to hold it) goes through `lsr_sparse.LSRSparse`, a module file
  (lsr_core/lsr_sparse.py) written into the folder: load with `trust_remote_code=True`.
- An asymmetric model (separate query and document backbones) puts one route per role under sentence-transformers'
  Router (task "query" / "document"). Query and document prefixes become the model's prompts "query" / "document".
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from lsr_core.backbones import KINDS, ModelLoadError, decoding_of
from lsr_core.modeling import LSRSpec, read_spec
from lsr_core.tokenizing import drops_special_tokens

MODULE_FILE = Path(__file__).with_name("lsr_sparse.py")
ROLES = {"query": "query", "document": "doc"}  # sentence-transformers' task -> our role name


def uses_st_modules(spec: LSRSpec, projection_has_bias: bool) -> bool:
    """Whether Transformer(fill-mask) + SpladePooling computes our vectors: an MLM encoder on both sides, pooling
    every non-pad position (SpladePooling masks by the attention mask only), and a shift the decoder bias can hold."""
    return (KINDS[spec.kind].auto_class == "AutoModelForMaskedLM" and spec.query_head == spec.doc_head == "mlm"
            and not drops_special_tokens(spec, "mlm") and (projection_has_bias or not spec.logit_shift))


def export(model_folder: str | Path, out_folder: str | Path) -> Path:
    """Write the sentence-transformers folder `out_folder` for `model_folder` (written to a temporary sibling and
    renamed into place, so it exists only complete). Returns `out_folder`."""
    model_folder, out = Path(model_folder), Path(out_folder)
    spec = read_spec(model_folder)
    if out.exists():
        raise ModelLoadError(f"{out} exists: remove it or choose another output folder")
    if spec.decoding not in _module_file().DECODINGS.get(spec.kind, ()):
        raise ModelLoadError(f"{model_folder}: no export for kind {spec.kind!r} with decoding {spec.decoding!r} "
                             f"(lsr_core/lsr_sparse.py restates each row of backbones.KINDS it supports)")
    from sentence_transformers import SparseEncoder

    model = _load(model_folder, spec)
    projection = model.doc_backbone.get_output_embeddings()
    own = uses_st_modules(spec, getattr(projection, "bias", None) is not None)
    backbones = {"query": model.query_backbone or model.doc_backbone, "document": model.doc_backbone}

    def route(tasks: list[str]) -> list:
        """The modules that encode `tasks`: both (shared) or one role (asymmetric, its own backbone)."""
        if own:
            return _st_modules(model_folder / ("" if spec.shared else ROLES[tasks[0]]), spec)
        return [_lsr_module(_module_file().LSRSparse, model, spec, backbones[tasks[0]], tasks)]

    if spec.shared:
        modules = route(list(ROLES))
    else:
        from sentence_transformers.sparse_encoder.modules import Router

        modules = [Router({task: route([task]) for task in ROLES}, default_route="document")]
    # a plain encode() (no task) encodes documents, so it takes the document prefix too
    encoder = SparseEncoder(modules=modules, prompts={"query": spec.query_prefix, "document": spec.doc_prefix},
                            default_prompt_name="document", similarity_fn_name="dot", device="cpu")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a run killed before its rename
    encoder.save(str(tmp), create_model_card=False)
    if not own:
        shutil.copyfile(MODULE_FILE, tmp / "lsr_sparse.py")
    tmp.rename(out)
    return out


def _load(model_folder: Path, spec: LSRSpec):
    """The SparseModel in the dtype its weights were saved in (export neither widens nor narrows them)."""
    from lsr_core.config import ModelConfig
    from lsr_core.modeling import build_model

    hf_config = model_folder / ("config.json" if spec.shared else "doc/config.json")
    saved = json.loads(hf_config.read_text()) if hf_config.is_file() else {}
    dtype = str(saved.get("dtype") or saved.get("torch_dtype") or "float32")
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    # packed=false: packing would switch the backbone's attention to one registered by lsr_core, and save it so
    return build_model(ModelConfig(name_or_path=str(model_folder), dtype=dtype, packed="false")).eval()


def _st_modules(folder: Path, spec: LSRSpec) -> list:
    """sentence-transformers' own SPLADE modules for one backbone, the logit shift added to the decoder bias. A
    text with no task (plain encode()) is cut as a document."""
    import torch
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    transformer = Transformer(str(folder), transformer_task="fill-mask", query_length=spec.max_query_len,
                              document_length=spec.max_doc_len, max_seq_length=spec.max_doc_len)
    if spec.logit_shift:
        with torch.no_grad():
            transformer.model.get_output_embeddings().bias.add_(spec.logit_shift)
    return [transformer, SpladePooling(pooling_strategy=spec.pooling)]


def _module_file():
    """lsr_core/lsr_sparse.py imported under the module name it has in an exported folder (`lsr_sparse`), so that
    sentence-transformers records its class as `lsr_sparse.LSRSparse`. Returns the module."""
    if "lsr_sparse" not in sys.modules:
        module_spec = importlib.util.spec_from_file_location("lsr_sparse", MODULE_FILE)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules["lsr_sparse"] = module
    return sys.modules["lsr_sparse"]


def _lsr_module(module_class, model, spec: LSRSpec, backbone, tasks: list[str]):
    heads = {"query": spec.query_head, "document": spec.doc_head}
    roles = {task: {"head": heads[task], "max_length": spec.max_query_len if task == "query" else spec.max_doc_len,
                    "drop_special": drops_special_tokens(spec, heads[task])} for task in tasks}
    text_options = KINDS[spec.kind].text_options  # the kind's inputs read echo, drop_bos and bidirectional
    decoding = decoding_of(spec)
    return module_class(kind=spec.kind, decoding=spec.decoding, roles=roles, pooling=spec.pooling,
                        logit_shift=spec.logit_shift, pools_shifted=decoding.pools_shifted,
                        one_step=decoding.one_step, bidirectional=spec.bidirectional and text_options,
                        echo=spec.echo and text_options, drop_bos=spec.drop_bos and text_options, backbone=backbone,
                        tokenizer=model.tokenizer, mlps={"query": model.query_mlp, "document": model.doc_mlp})
