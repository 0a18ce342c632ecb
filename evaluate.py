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
    flops.png          with --plot: the first metric against FLOPs, for runs whose meta.json has a `flops` field
                       (`<run>.meta.json`, `<run folder>/meta.json` or `<exp>/encode/{queries,corpus}/meta.json`)
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
from lsr_core.utils import (InputError, atomic_open, atomic_write_json, load_texts, read_json, read_qrels,
                            run_script)

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
    """The `flops` recorded in the first meta.json found next to a run (see the module docstring)."""
    run = Path(run_path)
    encode = run.parent.parent / "encode"
    for meta in [Path(f"{run}.meta.json"), run.with_suffix(".meta.json"), run.parent / "meta.json",
                 encode / "meta.json", encode / "queries" / "meta.json", encode / "corpus" / "meta.json"]:
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


def markdown_table(means: dict, p_values: dict, alpha: float) -> str:
    metrics = list(next(iter(means.values())))
    lines = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, scores in means.items():
        cells = [f"{scores[m]:.4f}" + ("†" if p_values.get(name, {}).get(m, 1.0) < alpha else "") for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(means) > 1:
        lines.append(f"\n† p < {alpha} (two-sided paired t-test against {next(iter(means))})")
    return "\n".join(lines)


def plot_flops(means: dict, run_paths: dict, metric: str, path: Path) -> bool:
    points = {}
    for name, run_path in run_paths.items():
        flops = find_flops(run_path)
        if flops is None:
            logger.warning("no meta.json with 'flops' found for run %s (%s): left out of the plot", name, run_path)
        else:
            points[name] = (flops, means[name][metric])
    if not points:
        logger.warning("--plot: no run has a FLOPs estimate; plot skipped")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (flops, value) in points.items():
        ax.scatter(flops, value)
        ax.annotate(name, (flops, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FLOPs (expected multiplications per query-doc pair)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


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
        plot_flops(means, run_paths, ev.metrics[0], out / "flops.png")
    logger.info("evaluated %d run(s) on %d queries -> %s", len(means), len(qrels), out / "metrics.json")
    return means


if __name__ == "__main__":
    run_script(main)
