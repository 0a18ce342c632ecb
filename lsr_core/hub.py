"""A model card (README.md) for a trained run, and the upload of a model folder to the Hugging Face Hub.

    python push_to_hub.py --run runs/demo/trained --repo user/splade-tiny-wiki [--private] [--dry-run]
    python -m lsr_core.hub --run runs/demo/trained --repo user/splade-tiny-wiki      # the same

Reads (a missing or damaged file is a one-line error naming it):
    <run>/config.yaml               train.py's resolved config: backbone, heads, training data, loss, regularisers
    <run>/train_log.jsonl           its last line: the final logged loss and query/document nnz
    <folder>/lsr_config.json        the saved model's spec, when the folder is train.py's final/ (heads, pooling)
    <run>/eval/metrics.json         evaluate.py's {run: {metric: mean}} (--metrics FILE), with the config.yaml
                                    evaluate.py wrote beside it (qrels and runs, for the reproduce commands)
    <run>/encode/queries/meta.json  encode.py's queries: count, nnz, FLOPs (--encoded DIR: its queries/ and corpus/)
    <run>/encode/corpus/meta.json   encode.py's documents: count, nnz
Writes README.md (the card) and train_config.yaml (config.yaml, for the card's `python train.py --cfg`) into the
folder to upload (--folder, default <run>/final; any folder, e.g. a sentence-transformers export), each atomically,
then uploads that folder with huggingface_hub: `HfApi().create_repo(exist_ok=True)` + `upload_folder`, with the
credentials huggingface_hub finds (HF_TOKEN, or `hf auth login`). --dry-run writes both files and lists what would
be uploaded, without the network.
The card's evaluation numbers are metrics.json's and meta.json's exactly (Python's shortest round-trip repr).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from lsr_core.utils import InputError, atomic_write_text, read_json, read_jsonl

CARD = "README.md"
TRAIN_CONFIG = "train_config.yaml"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
HEAD_TEXT = {"mlm": "MLM: vocabulary logits -> ReLU -> log1p, pooled over the text's positions (expansion)",
             "mlp": "MLP: Linear(hidden, 1) -> ReLU per input token, weight on that token's id (no expansion)"}
SPECIAL_TEXT = {"reference": "reference: [CLS], [SEP] and BOS left out of MLM pooling, as the paper's code",
                "keep": "keep: pooled like every other position (sentence-transformers' SPLADE)"}


def is_hub_name(name: str) -> bool:
    """`owner/name` that is not a local path: a Hub repository."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def number(value) -> str:
    """A value as the card prints it: the shortest text that reads back as the same float."""
    return repr(float(value)) if type(value) in (int, float) else "—"


def read_metrics(path: Path) -> dict:
    """evaluate.py's metrics.json: {run: {metric: finite number}}."""
    data = read_json(path, "run evaluate.py first (its --out folder holds metrics.json)")
    if not isinstance(data, dict) or not data or not all(
            isinstance(scores, dict) and scores and all(type(v) in (int, float) and math.isfinite(v)
                                                        for v in scores.values()) for scores in data.values()):
        raise InputError(f"{path}: expected evaluate.py's {{run: {{metric: number}}}}")
    metrics = list(next(iter(data.values())))
    for name, scores in data.items():
        if list(scores) != metrics:
            raise InputError(f"{path}: run '{name}' has metrics {list(scores)}, the first run {metrics}")
    return data


def read_encoded_meta(folder: Path, fields: tuple[str, ...]) -> dict:
    """encode.py's meta.json in `folder`, with `fields` present."""
    path = folder / "meta.json"
    meta = read_json(path, "run encode.py first (or give --encoded)")
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in fields:
        if meta.get(key) is None:
            why = " (queries get FLOPs when encoded after the corpus, beside it or at encode.flops_docs)" \
                if key == "flops" else ""
            raise InputError(f"{path}: no field '{key}'{why}")
    return meta


def last_log_line(path: Path) -> dict:
    """The last record of train.py's train_log.jsonl."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; the run folder holds no finished train.py run")
    last = None
    for _, record in read_jsonl(path):
        last = record
    if last is None or type(last.get("step")) is not int:
        raise InputError(f"{path}: no logged step")
    return last


def read_run(run: str | Path, folder: str | Path | None = None, metrics: str | Path | None = None,
             encoded: str | Path | None = None) -> dict:
    """Everything the card is made of, read and checked. `folder`: what will be uploaded (default <run>/final)."""
    from lsr_core.config import load_config

    run = Path(run)
    folder = Path(folder) if folder else run / "final"
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found (train.py writes final/ at the end of a run; or give --folder)")
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise InputError(f"{config_path}: file not found; --run takes train.py's output folder")
    cfg = load_config(["--cfg", str(config_path)], runs_model=False)
    spec_path = run / "final" / "lsr_config.json"  # the trained model, whichever folder is uploaded
    spec = read_json(spec_path, "train.py writes it into final/ at the end of a run")
    if not isinstance(spec, dict):
        raise InputError(f"{spec_path}: expected a JSON object")
    metrics_path = Path(metrics) if metrics else run / "eval" / "metrics.json"
    eval_config = metrics_path.parent / "config.yaml"
    scores = read_metrics(metrics_path)
    if not eval_config.is_file():
        raise InputError(f"{eval_config}: file not found (evaluate.py writes it beside metrics.json)")
    encoded = Path(encoded) if encoded else run / "encode"
    return {"run": run, "folder": folder, "cfg": cfg, "config_text": config_path.read_text(encoding="utf-8"),
            "spec": spec, "hf_config": _hf_config(run / "final", spec), "log": last_log_line(run / "train_log.jsonl"),
            "metrics": scores, "metrics_path": metrics_path,
            "eval_cfg": load_config(["--cfg", str(eval_config)], runs_model=False),
            "queries": read_encoded_meta(encoded / "queries", ("count", "nnz_mean", "flops")),
            "corpus": read_encoded_meta(encoded / "corpus", ("count", "nnz_mean")),
            "encoded": encoded}


def _hf_config(folder: Path, spec: dict) -> dict:
    """The backbone's config.json (of doc/ for an asymmetric model), {} where the folder has none."""
    sub = folder / "doc" if spec.get("shared") is False else folder
    path = sub / "config.json"
    data = read_json(path) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def base_model(cfg, given: str = "") -> str:
    """The hub id the run was trained from ('' when it was a local folder or a packaged model)."""
    if given:
        return given
    name = cfg.model.name_or_path
    return name if is_hub_name(name) else ""


def _rows(pairs) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in pairs if value is not None]


def model_card(src: dict, repo: str, base: str = "") -> str:
    """The README.md of `repo` for the run `src` (`read_run`)."""
    cfg, spec, log, m, t, d = src["cfg"], src["spec"], src["log"], src["cfg"].model, src["cfg"].train, \
        src["cfg"].data
    kind = spec.get("kind", m.kind)
    base = base_model(cfg, base)
    tags = ["learned-sparse-retrieval", "sparse-retrieval", "decoder-lsr", str(kind).replace("_", "-"), t.loss]
    front = ["---", "library_name: transformers"] + ([f"base_model: {base}"] if base else []) + \
        ["tags:"] + [f"- {tag}" for tag in dict.fromkeys(tags)] + ["---", ""]
    text_options = any(spec.get(key) for key in ("bidirectional", "echo", "drop_bos"))  # decoders' options, if set
    archs = ", ".join(src["hf_config"].get("architectures") or []) or None
    two = spec.get("shared") is False
    lines = front + [
        f"# {repo.split('/')[-1]}", "",
        "A learned sparse retrieval (LSR) model trained with decoder-lsr: it maps a query or a document to a "
        "non-negative weight per vocabulary token, `{token: weight}`, and a document's score is the dot product "
        "with the query's.", "",
        "## Backbone", "",
        *_rows([("trained from", f"`{m.name_or_path}`"), ("kind", kind), ("architecture", archs),
                ("vocabulary", f"{src['queries'].get('vocab_size')} tokens" if src['queries'].get('vocab_size')
                 else None),
                ("encoders", "two: query/ and doc/ (asymmetric)" if two else "one, shared by queries and documents"),
                ("LoRA", f"r {m.lora_r}, alpha {m.lora_alpha}, merged into the weights" if m.lora else None),
                ("quantisation while training", m.quantization if m.quantization != "none" else None)]), "",
        "## Heads and pooling", "",
        *_rows([("query head", HEAD_TEXT.get(spec.get("query_head"), spec.get("query_head"))),
                ("document head", HEAD_TEXT.get(spec.get("doc_head"), spec.get("doc_head"))),
                ("pooling over positions", spec.get("pooling")),
                ("decoding", spec.get("decoding")),
                ("special tokens", SPECIAL_TEXT.get(spec.get("special_tokens"), spec.get("special_tokens"))),
                ("bidirectional / echo / drop BOS", f"{spec.get('bidirectional')} / {spec.get('echo')} / "
                                                    f"{spec.get('drop_bos')}" if text_options else None),
                ("prefixes", f"query {json.dumps(spec.get('query_prefix'))}, document "
                             f"{json.dumps(spec.get('doc_prefix'))}"),
                ("max length", f"query {spec.get('max_query_len')}, document {spec.get('max_doc_len')} tokens"),
                ("logit shift", number(spec.get("logit_shift")))]), "",
        "## Training data", "",
        *_rows([("format", d.format), ("training examples", f"`{d.train_file}`" if d.train_file else None),
                ("corpus", f"`{d.corpus}`" if d.corpus else None), ("queries", f"`{d.queries}`" if d.queries else None),
                ("qrels", f"`{d.qrels}`" if d.qrels else None),
                ("teacher scores", f"`{d.teacher_scores}`" if d.teacher_scores else None),
                ("negatives per query", d.n_negatives),
                ("examples used", d.max_examples or "all"),
                ("steps", f"{t.max_steps} optimizer steps x batch {t.batch_size} per process x {t.grad_accum} "
                          f"accumulation"),
                ("optimiser", f"{t.optimizer}, lr {t.lr:g} ({t.scheduler}, {t.warmup_steps} warm-up steps), "
                              f"weight decay {t.weight_decay:g}"),
                ("precision", f"weights {m.dtype}, mixed precision {t.mixed_precision}"),
                ("seed", cfg.exp.seed)]), "",
        "## Loss and regularisers", "",
        *_rows([("loss", t.loss + (f", temperature {t.temperature:g}" if t.loss in ("kl", "infonce") else "")
                 + (f", in-batch negatives {'on' if t.in_batch_negatives else 'off'}" if t.loss == "infonce" else "")),
                ("query regulariser", f"{t.q_reg}, weight {t.q_reg_weight:g}"),
                ("document regulariser", f"{t.d_reg}, weight {t.d_reg_weight:g} ({t.d_reg_form})"),
                ("regulariser warm-up", f"quadratic over {t.reg_warmup_steps} steps" if t.reg_warmup_steps else "none"),
                ("last logged step", f"step {log['step']}: loss {number(log.get('loss'))}, regulariser "
                                     f"{number(log.get('reg'))}, query nnz {number(log.get('q_nnz'))}, document nnz "
                                     f"{number(log.get('d_nnz'))}")]), "",
        *evaluation(src), "",
        "## Reproduce", "",
        "From the root of a decoder-lsr checkout, with the data at the paths the run used "
        f"(`{TRAIN_CONFIG}` is this repository's copy of the run's config.yaml):", "",
        "```bash", *commands(src), "```", "",
        "## Use it", "", "```python", "import lsr_core  # pip install -e <decoder-lsr checkout>", "",
        f'model = lsr_core.load("{repo}")',
        'vectors = model.encode(["what is a sparse vector"], kind="query")  # [{token: weight}]', "```", ""]
    return "\n".join(lines)


def evaluation(src: dict) -> list[str]:
    """The evaluation section: metrics.json as a table, then meta.json's counts, nnz and FLOPs."""
    scores, ev = src["metrics"], src["eval_cfg"].eval
    metrics = list(next(iter(scores.values())))
    out = ["## Evaluation", "",
           f"`evaluate.py` on qrels `{ev.qrels}` (runs named by their file; `{src['metrics_path'].name}`'s "
           f"numbers as written):", "",
           "| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    out += [f"| {name} | " + " | ".join(number(row[k]) for k in metrics) + " |" for name, row in scores.items()]
    q, c = src["queries"], src["corpus"]
    out += ["", "Sparsity and cost (encode.py's meta.json; FLOPs: expected multiplications per query-document "
                "pair):", "",
            "| vectors | input | count | nnz mean | nnz p99 | empty | FLOPs |", "|---|---|---:|---:|---:|---:|---:|",
            f"| queries | `{q.get('input')}` | {q['count']} | {number(q['nnz_mean'])} | {number(q.get('nnz_p99'))} "
            f"| {q.get('empty', '—')} | {number(q['flops'])} |",
            f"| documents | `{c.get('input')}` | {c['count']} | {number(c['nnz_mean'])} | "
            f"{number(c.get('nnz_p99'))} | {c.get('empty', '—')} | |"]
    return out


def commands(src: dict) -> list[str]:
    """train / encode / index / search / evaluate, as the run's files record them."""
    cfg, ev = src["cfg"], src["eval_cfg"].eval
    out_dir = cfg.output_dir
    run_cfg = f"--cfg {out_dir / 'config.yaml'}"
    lines = [f"python train.py    --cfg {TRAIN_CONFIG}"]
    for kind, meta in (("doc", src["corpus"]), ("query", src["queries"])):
        flags = [f"--encode.input={meta.get('input')}", f"--encode.kind={kind}"]
        for key, flag in (("topk", "topk"), ("threshold", "threshold"), ("scale", "quant_scale"),
                          ("max_length", "max_length")):
            if meta.get(key):
                flags.append(f"--encode.{flag}={meta[key]:g}" if isinstance(meta[key], float) else
                             f"--encode.{flag}={meta[key]}")
        lines.append(f"python encode.py   {run_cfg} " + " ".join(flags))
    for trec in ev.runs:  # runs that search.py wrote record their engine beside them
        search_meta = Path(trec).with_suffix(".meta.json")  # as search.py names it
        meta = read_json(search_meta) if search_meta.is_file() else None
        if not isinstance(meta, dict) or not meta.get("engine"):
            continue
        engine, index = meta["engine"], meta.get("index")
        moved = index and Path(index).resolve() != (out_dir / "index" / engine).resolve()
        lines.append(f"python index.py    {run_cfg} --index.engine={engine}" +
                     (f" --index.output={index}" if moved else ""))
        lines.append(f"python search.py   {run_cfg} --search.engine={engine}" +
                     (f" --search.index={index}" if moved else "") +
                     (f" --search.topk={meta['topk']}" if meta.get("topk") not in (None, 1000) else "") +
                     f" --search.output={trec}")
    lines.append(f"python evaluate.py --qrels {ev.qrels} --run {' '.join(ev.runs)} --metrics {','.join(ev.metrics)}"
                 + (f" --out {ev.output}" if ev.output else ""))
    return lines


def write_card(src: dict, repo: str, base: str = "") -> Path:
    """README.md and train_config.yaml into the folder to upload, each atomically; returns the card's path."""
    folder = src["folder"]
    atomic_write_text(folder / TRAIN_CONFIG, src["config_text"])
    path = folder / CARD
    atomic_write_text(path, model_card(src, repo, base))
    return path


def upload(folder: str | Path, repo: str, private: bool = False) -> str:
    """Create `repo` (a model repository; kept if it exists) and upload `folder` to it; returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="Upload decoder-lsr model", ignore_patterns=["*.tmp", ".*"])
    except (HfHubHTTPError, OSError) as err:  # auth, network, offline mode: the user's to fix, in one line
        message = " ".join(str(err).split())[:300]
        raise InputError(f"{repo}: upload of {folder} failed ({type(err).__name__}: {message})") from None
    return str(getattr(info, "commit_url", info))


def model_folder(name: str) -> str:
    """A hub repository that decoder-lsr pushed (it holds lsr_config.json) -> its local snapshot, so that the model
    loads with its own heads and pooling (`modeling.build_model` reads lsr_config.json from a folder); a local path,
    a `pkg:` name or a hub repository without lsr_config.json (a plain backbone) is returned unchanged."""
    if not is_hub_name(name):
        return name
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(name, "lsr_config.json")
    except (EntryNotFoundError, RepositoryNotFoundError, LocalEntryNotFoundError):
        # no such file (a plain backbone), no such repository, or offline without it cached: a snapshot that
        # decoder-lsr pushed and that was downloaded holds the file, so the name is a backbone's (or unknown, and
        # loading it says so)
        return name
    return snapshot_download(name)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="push_to_hub.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="train.py's output folder (exp.output_dir)")
    parser.add_argument("--repo", required=True, help="the Hub repository, owner/name")
    parser.add_argument("--folder", default="", help="the folder to upload (default: <run>/final)")
    parser.add_argument("--metrics", default="", help="evaluate.py's metrics.json (default: <run>/eval/metrics.json)")
    parser.add_argument("--encoded", default="", help="encode.py's folder with queries/ and corpus/ "
                                                      "(default: <run>/encode)")
    parser.add_argument("--base-model", default="", help="the card's base_model (default: model.name_or_path when "
                                                         "it is a hub id)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="write the card, list the files, upload nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not HUB_ID.match(args.repo):
        raise InputError(f"--repo {args.repo!r}: expected owner/name")
    src = read_run(args.run, args.folder or None, args.metrics or None, args.encoded or None)
    card = write_card(src, args.repo, args.base_model)
    if args.dry_run:
        files = sorted(str(p.relative_to(src["folder"])) for p in src["folder"].rglob("*") if p.is_file())
        print(f"dry run: wrote {card}; would upload {len(files)} file(s) of {src['folder']} to {args.repo}"
              f"{' (private)' if args.private else ''}: {', '.join(files)}")
        return str(card)
    url = upload(src["folder"], args.repo, args.private)
    print(f"uploaded {src['folder']} to {args.repo}: {url}")
    return url


if __name__ == "__main__":
    from lsr_core.utils import run_script

    run_script(main)
