"""Export a trained model as a sentence-transformers SparseEncoder folder (lsr_core/st_export.py says how).

    python export_st.py --cfg runs/demo/config.yaml [--out=runs/demo/sentence_transformers]
    python export_st.py --encode.model=runs/demo/final --out=exported/demo

Model: as encode.py chooses it (`encode.model`; else `<output_dir>/final`; else `model.name_or_path`), which must be a
folder saved by train.py. Output: `--out`, default `<output_dir>/sentence_transformers`; an existing folder is
refused. Then, in Python:

    from sentence_transformers import SparseEncoder
    model = SparseEncoder("runs/demo/sentence_transformers", trust_remote_code=True)  # the module file, if written
    query_vectors, doc_vectors = model.encode_query(queries), model.encode_document(docs)   # encode(): documents

The module file loads the weights in float32 (encode.py's CPU precision; encode.py runs bf16 on a GPU): pass
`model_kwargs={"dtype": torch.bfloat16}` for the other.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from lsr_core.config import ConfigError, load_config
from lsr_core.inputs import local_path, resolve_model_path
from lsr_core.utils import run_script

logger = logging.getLogger("export_st")


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    outs = [a for a in argv if a.startswith("--out=")]
    if len(outs) > 1 or any(a == "--out" for a in argv):
        raise ConfigError("give the output folder once, as --out=FOLDER")
    cfg = load_config([a for a in argv if a not in outs], runs_model=False)
    model_path, why, _ = resolve_model_path(cfg)
    if not model_path:
        raise ConfigError("no model to export: give encode.model (or a --cfg whose exp.output_dir holds final/)")
    out = Path(outs[0][len("--out="):] if outs else cfg.output_dir / "sentence_transformers")
    from lsr_core.st_export import export

    folder = export(local_path(model_path), out)
    logger.info(f"exported {model_path} ({why}) to {folder}")
    return folder


if __name__ == "__main__":
    run_script(main)
