"""Evaluate one model on BEIR datasets: encode -> index -> search -> evaluate each, then one nDCG@10 table.

    python scripts/beir.py --model runs/demo/trained/final --datasets irds:beir/scifact/test data/beir/nfcorpus \
        [--cfg yamls/demo.yaml] [--split test] [--engine qdrant-edge] [--out runs/beir] [--name NAME] \
        [--section.key=value ...]

Datasets: `irds:<ir_datasets id>` of a set with qrels (irds:beir/scifact/test: its documents, queries and qrels;
a document's title is joined before its text, lsr_core.inputs.join_title), or a folder in BEIR's layout:
    corpus.jsonl         {"_id", "title", "text"} a line (the title joined as for irds)
    queries.jsonl        {"_id", "text"} a line; only the queries judged in the qrels are encoded (as BEIR does)
    qrels/<split>.tsv    `query-id<TAB>corpus-id<TAB>score`, after the header row `query-id corpus-id score`
Every other `--section.key=value` (and --cfg) goes to encode.py, index.py and search.py as it is, e.g.
`--model.dtype=float32 --encode.batch_size=64`.

Outputs, per dataset in <out>/<dataset> (the folder's name, or the irds id with '/' -> '-'); one model per --out:
    data/                   BEIR folders: corpus.jsonl.gz {"id", "text"}, queries.jsonl (the judged ones); both kinds:
                            qrels.tsv (TREC `qid 0 docid score`, written last: the data is complete)
    encode/{corpus,queries}/ index/<engine>/ search/<name>.trec eval/    the steps' outputs (encode.py ... evaluate.py)
In <out>: beir.md (printed too) and beir.json {"model", "engine", "datasets": {dataset: {metric: value, "docs",
"queries"}}, "mean": {metric: value}}, written atomically.
Each step is skipped when its output exists (meta.json, the run file), as scripts/rq_common.sh does, so a rerun
resumes; outputs encoded by another model are refused (use another --out). Evaluation is rerun each time (seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import encode  # noqa: E402
import evaluate  # noqa: E402
import index  # noqa: E402
import search  # noqa: E402
from lsr_core.config import ConfigError, IndexConfig  # noqa: E402
from lsr_core.inputs import join_title, local_path  # noqa: E402
from lsr_core.utils import (InputError, atomic_open, atomic_write_json, atomic_write_text, check_id,  # noqa: E402
                            open_text, read_json, read_jsonl, run_script)

logger = logging.getLogger("beir")

METRICS = ["ndcg@10", "recall@100"]
LABELS = {"ndcg@10": "nDCG@10", "recall@100": "R@100"}
HEADER = ["query-id", "corpus-id", "score"]


def read_beir_qrels(path: Path) -> list[tuple[int, str, str, int]]:
    """(line number, qid, docid, score) rows of a BEIR qrels file. The header row is recognised by its fields (BEIR's
    own loader skips the first line whatever it holds); a row without 3 tab-separated fields, an id with whitespace,
    a score that is not an integer, or a pair judged twice with different scores is an InputError naming file:line."""
    rows, seen, first = [], {}, True
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if first and [x.strip().lower() for x in fields] == HEADER:
                first = False
                continue
            first = False
            if len(fields) != 3:
                raise InputError(f"{path}:{lineno}: expected 3 tab-separated fields 'query-id<TAB>corpus-id<TAB>"
                                 f"score', got {len(fields)}")
            qid, docid = check_id(path, lineno, fields[0]), check_id(path, lineno, fields[1])
            try:
                score = int(fields[2])
            except ValueError:
                raise InputError(f"{path}:{lineno}: field 'score' must be an integer, got {fields[2]!r}") from None
            if seen.setdefault((qid, docid), score) != score:
                raise InputError(f"{path}:{lineno}: corpus-id {docid!r} of query-id {qid!r} judged again with another "
                                 f"score ({seen[qid, docid]} then {score})")
            rows.append((lineno, qid, docid, score))
    if not rows:
        raise InputError(f"{path}: no judgments")
    return rows


def _field(path: Path, lineno: int, obj: dict, key: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise InputError(f"{path}:{lineno}: missing field '{key}'")
    if not isinstance(value, str):
        raise InputError(f"{path}:{lineno}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def prepare_folder(src: Path, split: str, data: Path) -> tuple[str, str, Path]:
    """A BEIR folder -> <data>/corpus.jsonl.gz, queries.jsonl (judged only), qrels.tsv; (corpus, queries, qrels)."""
    corpus, queries, qrels = data / "corpus.jsonl.gz", data / "queries.jsonl", data / "qrels.tsv"
    if qrels.is_file():
        return str(corpus), str(queries), qrels
    qrels_src = src / "qrels" / f"{split}.tsv"
    judgments = read_beir_qrels(qrels_src)
    judged = {qid: lineno for lineno, qid, _, _ in reversed(judgments)}  # qid -> its first line
    with atomic_open(corpus) as out:
        seen = set()
        for lineno, obj in read_jsonl(src / "corpus.jsonl"):
            rid = check_id(src / "corpus.jsonl", lineno, obj.get("_id"))
            if rid in seen:
                raise InputError(f"{src / 'corpus.jsonl'}:{lineno}: duplicate _id '{rid}'")
            seen.add(rid)
            text = join_title(_field(src / "corpus.jsonl", lineno, obj, "title", optional=True),
                              _field(src / "corpus.jsonl", lineno, obj, "text"))
            out.write(json.dumps({"id": rid, "text": text}, ensure_ascii=False) + "\n")
    kept, total = {}, 0
    for lineno, obj in read_jsonl(src / "queries.jsonl"):
        total += 1
        rid = check_id(src / "queries.jsonl", lineno, obj.get("_id"))
        if rid in kept:
            raise InputError(f"{src / 'queries.jsonl'}:{lineno}: duplicate _id '{rid}'")
        if rid in judged:
            kept[rid] = _field(src / "queries.jsonl", lineno, obj, "text")
    missing = [qid for qid in judged if qid not in kept]
    if missing:
        raise InputError(f"{qrels_src}:{judged[missing[0]]}: query-id {missing[0]!r} is not in {src / 'queries.jsonl'}"
                         + (f" ({len(missing)} judged queries are not)" if len(missing) > 1 else ""))
    logger.info("%s: %d of %d queries are judged in %s: those are encoded", src, len(kept), total, qrels_src)
    atomic_write_text(queries, "".join(json.dumps({"id": q, "text": t}, ensure_ascii=False) + "\n"
                                       for q, t in kept.items()))
    _write_trec_qrels(qrels, [row[1:] for row in judgments])  # last: its presence says the data is complete
    return str(corpus), str(queries), qrels


def prepare_irds(name: str, data: Path) -> tuple[str, str, Path]:
    """An ir_datasets id -> <data>/qrels.tsv; the documents and queries are read by encode.py from `irds:<id>`."""
    qrels = data / "qrels.tsv"
    if not qrels.is_file():
        import ir_datasets

        dataset = ir_datasets.load(name)
        if not dataset.has_qrels():
            raise InputError(f"irds:{name}: no qrels (name a split with judgments, e.g. beir/scifact/test)")
        where = f"irds:{name} qrels"
        _write_trec_qrels(qrels, [(check_id(where, row, q.query_id, row=True), check_id(where, row, q.doc_id, row=True),
                                   q.relevance) for row, q in enumerate(dataset.qrels_iter(), 1)])
    return f"irds:{name}", f"irds:{name}", qrels


def _write_trec_qrels(path: Path, rows) -> None:
    atomic_write_text(path, "".join(f"{qid} 0 {docid} {score}\n" for qid, docid, score in rows))


def dataset_name(spec: str) -> str:
    return spec[len("irds:"):].replace("/", "-") if spec.startswith("irds:") else Path(spec).resolve().name


def check_model(meta_path: Path, model: str) -> bool:
    """Whether `meta_path` exists (the step is done); an output encoded by another model is an error."""
    if not meta_path.is_file():
        return False
    meta = read_json(meta_path)
    recorded = meta.get("model") if isinstance(meta, dict) else None
    if recorded != local_path(model):
        raise InputError(f"{meta_path}: encoded by {recorded!r}, not {local_path(model)!r}: give another --out")
    return True


def run_dataset(spec: str, folder: Path, args, overrides: list[str]) -> dict:
    """The chain for one dataset; its evaluate.py means {metric: value} plus docs/queries counts."""
    if spec.startswith("irds:"):
        corpus, queries, qrels = prepare_irds(spec[len("irds:"):], folder / "data")
    else:
        if not (Path(spec) / "corpus.jsonl").is_file():
            raise InputError(f"{spec}: not a BEIR folder (no corpus.jsonl) and not an irds: id")
        corpus, queries, qrels = prepare_folder(Path(spec), args.split, folder / "data")
    docs_dir, queries_dir = folder / "encode" / "corpus", folder / "encode" / "queries"
    index_dir, run = folder / "index" / args.engine, folder / "search" / f"{args.name}.trec"
    common = [*(x for cfg in args.cfg for x in ("--cfg", cfg)), f"--exp.output_dir={folder}",
              f"--encode.model={args.model}", *overrides, f"--index.engine={args.engine}",
              f"--search.engine={args.engine}", f"--index.input={docs_dir}", f"--index.output={index_dir}",
              f"--search.index={index_dir}", f"--search.queries={queries_dir}"]
    if not check_model(docs_dir / "meta.json", args.model):
        encode.main(common + [f"--encode.input={corpus}", "--encode.kind=doc", f"--encode.output={docs_dir}"])
    if not check_model(queries_dir / "meta.json", args.model):
        encode.main(common + [f"--encode.input={queries}", "--encode.kind=query", f"--encode.output={queries_dir}",
                              f"--encode.flops_docs={docs_dir}"])
    if not (index_dir / "meta.json").is_file():
        index.main(common)
    if not run.is_file():
        search.main(common + [f"--search.name={args.name}", f"--search.output={run}"])
    means = evaluate.main(["--qrels", str(qrels), "--run", str(run), "--metrics", ",".join(METRICS),
                           "--out", str(folder / "eval")])[args.name]
    judged = read_json(folder / "eval" / "significance.json")["queries"]
    return {**means, "docs": read_json(docs_dir / "meta.json")["count"], "queries": judged}


def markdown(model: str, results: dict, mean: dict) -> str:
    lines = [f"### BEIR: {model}", "", "| dataset | docs | queries | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|---:|---:|" + "---:|" * len(METRICS)]
    lines += [f"| {name} | {r['docs']} | {r['queries']} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + " |"
              for name, r in results.items()]
    lines.append(f"| mean ({len(results)}) | | | " + " | ".join(f"{mean[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder (train.py's final/, a hub name, pkg:...)")
    p.add_argument("--datasets", nargs="+", required=True, help="irds:<id> and/or BEIR-layout folders")
    p.add_argument("--cfg", action="append", default=[], help="config yaml(s) for the steps (prefixes, lengths)")
    p.add_argument("--split", default="test", help="BEIR folders: qrels/<split>.tsv (default test)")
    p.add_argument("--engine", default=IndexConfig().engine)
    p.add_argument("--out", default="runs/beir")
    p.add_argument("--name", default="", help="run name (default: the model folder's name)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o and "." in o.split("=", 1)[0])]
    if bad:
        raise ConfigError(f"unknown argument(s) {bad}: expected --section.key=value overrides for the steps")
    args.name = args.name or Path(args.model.rstrip("/")).name.replace(":", "_") or "model"
    names = [dataset_name(spec) for spec in args.datasets]
    if len(set(names)) < len(names):
        raise ConfigError(f"--datasets: two datasets share an output folder name: {names}")
    out = Path(args.out)
    results = {}
    for spec, name in zip(args.datasets, names):
        logger.info("== %s (%s) -> %s", name, spec, out / name)
        results[name] = run_dataset(spec, out / name, args, overrides)
    mean = {m: sum(r[m] for r in results.values()) / len(results) for m in METRICS}
    text = markdown(args.model, results, mean)
    print(text)
    atomic_write_text(out / "beir.md", text)
    atomic_write_json(out / "beir.json", {"model": args.model, "engine": args.engine, "datasets": results,
                                          "mean": mean})
    return {"datasets": results, "mean": mean}


if __name__ == "__main__":
    run_script(main)
