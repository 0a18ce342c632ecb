"""Evaluate TREC runs against qrels: a markdown table with significance markers, JSON results, an optional plot.

    python evaluate.py --qrels data/wiki/qrels.test.tsv --run data/wiki/test.bm25.trec runs/demo/search/demo.trec \
        [--metrics mrr@10,ndcg@10,recall@100] [--out runs/demo/eval] [--plot] [--corpus data/wiki/corpus.jsonl]
    python evaluate.py --cfg runs/demo/config.yaml --eval.runs=[runs/demo/search/demo.trec] --eval.qrels=QRELS

The short flags are translated into `--eval.*` overrides (`--qrels` -> eval.qrels, `--run` -> eval.runs,
`--metrics` -> eval.metrics, `--out` -> eval.output, `--plot` -> eval.plot, `--corpus`, `--alpha`); `--cfg FILE`
and any `--section.key=value` pass through to `load_config`.

Semantics are trec_eval's (`-c`): every judged query counts, queries missing from a run score 0, unjudged queries are
ignored, score ties are broken by docid descending (see lsr_core/metrics.py; a test checks against pytrec_eval).
Metric names: mrr@10, ndcg@10, recall@100, recall@1000, ...; `-l2` suffix = relevant means grade >= 2 (TREC DL).

Outputs, in --out (default <exp.output_dir>/eval), each written atomically; a run is named by its file stem:
    metrics.json       {run: {metric: mean}}
    per_query.json     {run: {metric: {qid: score}}}
    significance.json  {"baseline": first run, "test": ..., "alpha": a, "p_values": {run: {metric: p}}}
    config.yaml        the resolved config
    flops.png          with --plot: the first metric against FLOPs (log axis) for runs with a `flops` field in a
                       meta.json: `<run>.meta.json`, the queries folder search.py recorded there, `<run
                       folder>/meta.json`, `<exp>/encode/{queries,corpus}/meta.json` (run in <exp>/search/), or
                       `<root>/<run name>/encode/queries/meta.json` (scripts/rq*.sh); other runs (BM25) are drawn
                       as horizontal reference lines with their name
stdout: the table; a dagger marks p < alpha in a two-sided paired t-test against the first run.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from lsr_core.config import ConfigError, load_config, save_config
from lsr_core.metrics import check_qrels, evaluate_run, mean_scores, paired_tests, parse_metric, read_run
from lsr_core.utils import InputError, atomic_write_json, load_texts, read_json, read_qrels, run_script

logger = logging.getLogger("evaluate")

SHORT_FLAGS = {"--qrels": "qrels", "--run": "runs", "--runs": "runs", "--metrics": "metrics", "--out": "output",
               "--plot": "plot", "--corpus": "corpus", "--alpha": "alpha"}
LIST_KEYS = {"runs", "metrics"}


def to_config_argv(argv: list[str]) -> list[str]:
    """`--run a.trec b.trec --metrics mrr@10,ndcg@10 --plot` -> `--eval.runs=["a.trec", "b.trec"]` ... for
    load_config. Values are passed as JSON (valid YAML) so paths stay strings."""
    out, i = [], 0
    while i < len(argv):
        flag, has_eq, value = argv[i].partition("=")
        i += 1
        if flag not in SHORT_FLAGS:
            out.append(argv[i - 1])
            continue
        key = SHORT_FLAGS[flag]
        if key == "plot":
            out.append(f"--eval.plot={value or 'true'}")
            continue
        values = [value] if has_eq else []
        while not has_eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:
            raise ConfigError(f"{flag} needs a value")
        if key == "metrics":
            values = [m.strip() for v in values for m in v.split(",") if m.strip()]
        if key in LIST_KEYS:
            out.append(f"--eval.{key}={json.dumps(values)}")
        elif len(values) > 1:
            raise ConfigError(f"{flag} takes one value, got {values}")
        else:
            out.append(f"--eval.{key}={values[0] if key == 'alpha' else json.dumps(values[0])}")
    return out


def run_name(path: str, taken) -> str:
    """File stem (`x.trec` -> x, `x.trec.gz` -> x); the path without suffix when two runs share a stem."""
    p = Path(path[:-3] if path.endswith(".gz") else path)
    return p.stem if p.stem not in taken else str(p.with_suffix(""))


def find_flops(run_path: str) -> float | None:
    """The `flops` recorded for a run (see the module docstring): in the first of its candidate meta.json files that
    has the field; search.py's `<run>.meta.json` leads to the queries it searched, whose meta.json has it."""
    for meta in _flops_candidates(Path(run_path)):
        if meta.is_file():
            data = read_json(meta)
            if not isinstance(data, dict):
                raise InputError(f"{meta}: expected a JSON object, got {type(data).__name__}")
            flops = data.get("flops")
            if flops is not None:
                if type(flops) not in (int, float) or not math.isfinite(flops):
                    raise InputError(f"{meta}: field 'flops' must be a finite number, got {json.dumps(flops)}")
                return float(flops)
    return None


def _flops_candidates(run: Path):
    """Where a run's FLOPs may be recorded, most specific first: its own meta files, the queries folder its search.py
    meta names, then the layouts of the scripts: `<exp>/search/<run>` beside `<exp>/encode/queries` (encode.py's
    defaults) and `<root>/search/<name>.trec` beside `<root>/<name>/encode/queries` (scripts/rq*.sh)."""
    stem = Path(run.name[:-3] if run.name.endswith(".gz") else run.name).stem
    own = [Path(f"{run}.meta.json"), run.with_suffix(".meta.json")]
    yield from own
    for meta in own:
        if meta.is_file():
            data = read_json(meta)
            if isinstance(data, dict) and isinstance(data.get("queries"), str):
                yield Path(data["queries"]) / "meta.json"
            break
    yield run.parent / "meta.json"
    encode = run.parent.parent / "encode"
    yield from (encode / "meta.json", encode / "queries" / "meta.json", encode / "corpus" / "meta.json")
    yield run.parent.parent / stem / "encode" / "queries" / "meta.json"


def markdown_table(means: dict, p_values: dict, alpha: float) -> str:
    metrics = list(next(iter(means.values())))
    lines = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, scores in means.items():
        cells = [f"{scores[m]:.4f}" + ("†" if p_values.get(name, {}).get(m, 1.0) < alpha else "") for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(means) > 1:
        lines.append(f"\n† p < {alpha} (two-sided paired t-test against {next(iter(means))})")
    return "\n".join(lines)


def plot_flops(means: dict, run_paths: dict, metric: str, path: Path, title: str) -> bool:
    """`metric` against FLOPs (lsr_core/plots.py): runs without a FLOPs estimate are drawn as reference lines."""
    from lsr_core.plots import flops_plot

    points, baselines = {}, {}
    for name, run_path in run_paths.items():
        flops = find_flops(run_path)
        if flops is not None and flops > 0:
            points[name] = (flops, means[name][metric])
        else:
            logger.info("run %s: %s: drawn as a reference line", name,
                        "no meta.json with 'flops' found" if flops is None else f"FLOPs {flops} (not on a log axis)")
            baselines[name if flops is None else f"{name} (FLOPs {flops:g})"] = means[name][metric]
    if not points:
        logger.warning("--plot: no run has a FLOPs estimate; the plot shows reference lines only")
    flops_plot(path, points, baselines, metric, title)
    return bool(points)


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(to_config_argv(sys.argv[1:] if argv is None else list(argv)), runs_model=False)
    ev = cfg.eval
    if not ev.qrels:
        raise ConfigError("'eval.qrels' is required (--qrels FILE)")
    if not ev.runs:
        raise ConfigError("'eval.runs' is required (--run a.trec [b.trec ...])")
    if not ev.metrics:
        raise ConfigError("'eval.metrics' must name at least one metric")
    for metric in ev.metrics:
        try:
            parse_metric(metric)
        except ValueError as err:
            raise ConfigError(f"'eval.metrics': {err}") from None
    if not 0 < ev.alpha < 1:
        raise ConfigError(f"'eval.alpha' must be in (0, 1), got {ev.alpha!r}")
    out = Path(ev.output) if ev.output else cfg.output_dir / "eval"

    qrels = read_qrels(ev.qrels)
    corpus_ids = set(load_texts(ev.corpus, allow_empty=True)) if ev.corpus else None
    check_qrels(qrels, corpus_ids, ev.qrels)
    run_paths: dict[str, str] = {}
    per_query: dict[str, dict] = {}
    for path in ev.runs:
        name = run_name(path, run_paths)
        run = read_run(path)
        missing = sum(qid not in run for qid in qrels)
        if missing:
            logger.warning("%s: %d of %d judged queries have no results (scored 0)", path, missing, len(qrels))
        run_paths[name] = path
        per_query[name] = evaluate_run(qrels, run, ev.metrics)
    means = {name: mean_scores(scores) for name, scores in per_query.items()}
    p_values = paired_tests(per_query)

    print(markdown_table(means, p_values, ev.alpha))
    atomic_write_json(out / "metrics.json", means)
    atomic_write_json(out / "per_query.json", per_query)
    atomic_write_json(out / "significance.json", {
        "baseline": next(iter(per_query)), "test": "two-sided paired t-test (scipy.stats.ttest_rel)",
        "alpha": ev.alpha, "queries": len(qrels), "p_values": p_values})
    save_config(cfg, out)
    if ev.plot:
        plot_flops(means, run_paths, ev.metrics[0], out / "flops.png",
                   f"{ev.metrics[0]} against FLOPs ({Path(ev.qrels).name}, {len(qrels)} queries)")
    logger.info("evaluated %d run(s) on %d queries -> %s", len(means), len(qrels), out / "metrics.json")
    return means


if __name__ == "__main__":
    run_script(main)
