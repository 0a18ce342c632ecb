"""The Python API: load a model, encode texts, build and search an index, evaluate a run. Thin wrappers over the
functions the scripts use (encode.py's batches and pruning, lsr_core.engines, lsr_core.metrics), so the vectors,
rankings and scores are the scripts' own.

    import lsr_core
    model = lsr_core.load("runs/demo/trained")              # a train.py run, its final/, a folder or a hub name
    docs = model.encode(["a document", ...], kind="document")             # [{token: weight}, ...]
    index = lsr_core.build_index(["d1", ...], docs, "runs/demo/api-index")   # engine: qdrant-edge by default
    run = lsr_core.search(index, {"q1": model.encode(["a query"], kind="query")[0]}, topk=10)
    lsr_core.evaluate(run, "data/wiki/qrels.test.tsv")      # {"mrr@10": ..., "ndcg@10": ..., ...}

Heavy modules (torch, transformers, the engines) are imported when a function first needs them.
"""
from __future__ import annotations

from pathlib import Path

IS_QUERY = {"query": True, "document": False, "doc": False}  # encode(kind=...) -> encodes queries


class Encoder:
    """A loaded sparse encoder: `encode(texts, kind)` gives the vectors encode.py writes for the same model."""

    def __init__(self, model, name: str, why: str):
        from lsr_core.sparse import id_to_token_list

        self.model, self.name, self.why = model, name, why  # the model as loaded, and why that one (encode.py's)
        self.vocab = id_to_token_list(model.tokenizer)

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, {self.model.spec.kind}, vocabulary {len(self.vocab)})"

    def encode(self, texts: list[str], kind: str = "query", batch_size: int = 32, topk: int = 0,
               threshold: float = 0.0, quant_scale: float = 0.0) -> list[dict[str, float]]:
        """texts -> one {token: weight} per text, in order. `kind`: query | document; `topk`, `threshold`,
        `quant_scale` as encode.py's `encode.*` keys (0: keep every weight > 0, as floats rounded to 5 decimals)."""
        from tqdm.auto import tqdm

        from lsr_core.pipeline import check_finite, encode_shard
        from lsr_core.sparse import prune, to_vector

        if kind not in IS_QUERY:
            raise ValueError(f"kind must be one of {sorted(IS_QUERY)}, got {kind!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        vectors: list[dict | None] = [None] * len(texts)
        with tqdm(total=len(texts), disable=True) as progress:  # encode_shard reports progress to it
            for positions, reps in encode_shard(self.model, texts, IS_QUERY[kind], batch_size, progress):
                check_finite(reps, [str(p) for p in positions], "encode")
                for pos, (token_ids, weights) in zip(positions, prune(reps, topk, threshold)):
                    vectors[pos] = to_vector(token_ids, weights, self.vocab, quant_scale)
        return vectors


def load(name_or_path: str | Path, *overrides: str, device: str | None = None) -> Encoder:
    """A sparse encoder, found as encode.py finds it: a train.py output folder (its config.yaml, then final/ once
    trained: `inputs.resolve_model_path`), a folder saved by train.py (lsr_config.json), a hub repository pushed by
    push_to_hub.py (downloaded with its lsr_config.json), or any backbone (folder, hub name, `pkg:` name) with
    `overrides` setting its heads like the scripts' `--model.key=value` arguments. `device`: cpu | cuda | ...
    (default: cuda where there is one); on CUDA a float32 model computes in bfloat16, as encode.py does."""
    import torch

    from lsr_core.config import load_config
    from lsr_core.inputs import local_path, resolve_model_path
    from lsr_core.modeling import build_model

    path = Path(name_or_path)
    if (path / "config.yaml").is_file() and not (path / "lsr_config.json").is_file():  # a train.py output folder
        cfg = load_config(["--cfg", str(path / "config.yaml"), f"--exp.output_dir={path}", *overrides])
        name, why, _ = resolve_model_path(cfg)
    else:
        cfg = load_config(list(overrides))
        name, why = str(name_or_path), "given"  # a pushed hub repository: build_model fetches its snapshot
    cfg.model.name_or_path = local_path(name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and cfg.model.dtype == "float32":
        cfg.model.dtype = "bfloat16"  # as encode.py: inference in bf16 on GPU, the head pools in float32
    return Encoder(build_model(cfg.model).to(device).eval(), cfg.model.name_or_path, why)


def build_index(doc_ids, doc_vectors: list[dict], folder: str | Path, engine: str = "qdrant-edge", **params):
    """An index of `doc_vectors` ({token: weight} each, ids `doc_ids`) built into `folder` by `engine` (exact |
    qdrant-edge | seismic | milvus; `params` as index.py's `index.<engine>_*` keys without the prefix); returns it,
    ready to `search`. Unlike index.py it writes no meta.json or config.yaml beside the engine's files."""
    from lsr_core import engines

    return engines.build(engine, list(doc_ids), list(doc_vectors), folder, params)


def load_index(folder: str | Path, **params):
    """An index built by `build_index` or index.py; `params`: search-time engine params (seismic query_cut...)."""
    from lsr_core import engines

    return engines.load(folder, params=params)


def search(index, queries: dict[str, dict], topk: int = 1000, threads: int = 1) -> dict[str, dict[str, float]]:
    """{qid: {token: weight}} -> the run {qid: {docid: score}} of the `topk` best documents; a query without any token
    the index knows gets {} (and a warning), as search.py writes no line for it."""
    qids = list(queries)
    hits = index.search([queries[q] for q in qids], topk, threads)
    return {qid: dict(row) for qid, row in zip(qids, hits)}


def evaluate(run: dict | str | Path, qrels: dict | str | Path,
             metrics: tuple[str, ...] = ("mrr@10", "ndcg@10", "recall@100", "recall@1000")) -> dict[str, float]:
    """Mean of each metric over the qrels' queries, as evaluate.py computes it (trec_eval's semantics: a judged query
    missing from the run scores 0). `run`: {qid: {docid: score}} or a TREC run file; `qrels`: {qid: {docid: grade}}
    or a TREC qrels file."""
    from lsr_core.metrics import evaluate_run, mean_scores, parse_metric, read_run
    from lsr_core.utils import read_qrels

    for metric in metrics:
        parse_metric(metric)  # an unknown name: ValueError naming it
    run = read_run(run) if isinstance(run, (str, Path)) else run
    qrels = read_qrels(qrels) if isinstance(qrels, (str, Path)) else qrels
    return mean_scores(evaluate_run(qrels, run, list(metrics)))
