"""The paper's table for one research question: effectiveness per query set plus FLOPs, as markdown and a PNG plot.

    python scripts/tables.py --root runs/rq2 [--sets dev dl19 dl20] [--names a b ...] [--title "RQ2: backbones"]

Inputs (written by scripts/rqN.sh):
    <root>/eval/<set>/metrics.json        evaluate.py's {run: {metric: mean}} per query set
    <root>/<name>/encode/queries/meta.json  encode.py's / zeroshot_prompt.py's meta: `flops` (expected multiplications
                                          per query-document pair), `nnz_mean` of the queries
    <root>/<name>/encode/corpus/meta.json   `nnz_mean` of the documents
Columns: MS MARCO dev (and any non-TREC set, e.g. the Wikipedia `test` split): MRR@10, R@1000 (and nDCG@10 when it
was computed); TREC DL 2019/2020 (`dl*`): nDCG@10, R@1000 with relevance >= 2 (the TREC convention); then FLOPs and
the mean query/document nnz. A cell is "–" when that run was not evaluated on that set.
Outputs in <root>: table.md (printed too), table.json {name: {column: value}}, table.png (the first metric of the
first set against FLOPs, log x axis; runs without FLOPs as reference lines), each written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsr_core.utils import atomic_write_json, atomic_write_text  # noqa: E402

SET_LABELS = {"dev": "MS MARCO dev", "dl19": "DL19", "dl20": "DL20", "test": "Wiki test"}
METRIC_LABELS = {"mrr@10": "MRR@10", "recall@1000": "R@1000", "ndcg@10": "nDCG@10", "recall@1000-l2": "R@1000"}


def columns_for(set_name: str, available: set[str]) -> list[str]:
    wanted = ["ndcg@10", "recall@1000-l2"] if set_name.startswith("dl") else ["mrr@10", "recall@1000", "ndcg@10"]
    return [m for m in wanted if m in available]


def read_meta(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_table(root: Path, sets: list[str], names: list[str] | None) -> tuple[list[str], dict]:
    """(column names, {run name: {column: value or None}}) in the order of `names` (default: as evaluated)."""
    metrics = {s: read_meta(root / "eval" / s / "metrics.json") for s in sets}
    if names is None:
        names = list(dict.fromkeys(n for m in metrics.values() for n in m))
    columns, rows = [], {name: {} for name in names}
    for s in sets:
        available = {metric for scores in metrics[s].values() for metric in scores}
        for metric in columns_for(s, available):
            column = f"{SET_LABELS.get(s, s)} {METRIC_LABELS.get(metric, metric)}"
            columns.append(column)
            for name in names:
                rows[name][column] = metrics[s].get(name, {}).get(metric)
    columns += ["FLOPs", "q nnz", "d nnz"]
    for name in names:
        queries = read_meta(root / name / "encode" / "queries" / "meta.json")
        corpus = read_meta(root / name / "encode" / "corpus" / "meta.json")
        rows[name].update({"FLOPs": queries.get("flops"), "q nnz": queries.get("nnz_mean"),
                           "d nnz": corpus.get("nnz_mean")})
    return columns, rows


def markdown(title: str, columns: list[str], rows: dict) -> str:
    def cell(column, value):
        if value is None:
            return "–"
        return f"{value:.2f}" if column in ("FLOPs", "q nnz", "d nnz") else f"{value:.4f}"

    lines = [f"### {title}", "", "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, columns: list[str], rows: dict) -> bool:
    """The first metric against FLOPs (lsr_core/plots.py); evaluated runs without FLOPs are reference lines. Whether
    any run has FLOPs; nothing is drawn when no run has the metric."""
    from lsr_core.plots import flops_plot

    metric = next((c for c in columns if c not in ("FLOPs", "q nnz", "d nnz")), None)
    scored = {n: r for n, r in rows.items() if metric and r.get(metric) is not None}
    points = {n: (r["FLOPs"], r[metric]) for n, r in scored.items() if (r.get("FLOPs") or 0) > 0}
    baselines = {n if r.get("FLOPs") is None else f"{n} (FLOPs {r['FLOPs']:g})": r[metric]
                 for n, r in scored.items() if n not in points}
    if scored:
        flops_plot(path, points, baselines, metric, title)
    return bool(points)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="an RQ output folder, e.g. runs/rq2")
    p.add_argument("--sets", nargs="+", default=None, help="query sets (default: the folders in <root>/eval)")
    p.add_argument("--names", nargs="+", default=None, help="runs, in table order (default: as evaluated)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    root = Path(args.root)
    sets = args.sets or sorted(p.name for p in (root / "eval").iterdir() if (p / "metrics.json").is_file())
    if not sets:
        sys.exit(f"error: no {root}/eval/<set>/metrics.json: run evaluate.py first")
    columns, rows = build_table(root, sets, args.names)
    title = args.title or root.name
    text = markdown(title, columns, rows)
    print(text)
    atomic_write_text(root / "table.md", text)
    atomic_write_json(root / "table.json", {"title": title, "columns": columns, "rows": rows})
    plot(root / "table.png", title, columns, rows)
    return rows


if __name__ == "__main__":
    main()
