"""The FLOPs plot (lsr_core/plots.py, evaluate.py --plot, scripts/tables.py): a log FLOPs axis, a title, runs
without FLOPs as named reference lines, labels whose rendered boxes never intersect, and FLOPs found from each run's
own meta.json in the demo's and the RQ scripts' layouts."""
import json
import logging
import sys
from itertools import combinations
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import evaluate  # noqa: E402
from lsr_core import plots  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tables  # noqa: E402


def label_boxes(fig, labels):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return {t.get_text(): Text.get_window_extent(t, renderer) for t in labels}


def assert_apart(boxes):
    for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap: {box_a} {box_b}"


def test_crowded_labels_do_not_overlap():
    # eight runs within 3% FLOPs and 0.002 of each other, and two reference lines right through them: a fixed offset
    # would stack every label on the next one
    points = {f"run_{i}": (100 * (1 + 0.004 * i), 0.700 + 0.0003 * i) for i in range(8)}
    points["far_right_long_name_run"] = (5000.0, 0.69)
    baselines = {"bm25": 0.701, "bm25_rm3": 0.7012}
    fig, labels = plots.draw_flops(points, baselines, "ndcg@10", "nDCG@10 against FLOPs")
    boxes = label_boxes(fig, labels)
    assert set(boxes) == set(points) | set(baselines)
    assert_apart(boxes)
    figure_box = fig.bbox
    assert all(figure_box.x0 <= b.x0 and b.x1 <= figure_box.x1 and figure_box.y0 <= b.y0 and b.y1 <= figure_box.y1
               for b in boxes.values())  # nothing cut off at the edge of the PNG
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "nDCG@10 against FLOPs"
    dashed = sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert dashed == [0.701, 0.7012]  # the runs without FLOPs, as horizontal lines
    offsets = {t.get_text(): t.xyann for t in labels}
    assert len({offsets[name] for name in points}) > 2  # crowded labels were moved apart, not left where they began
    assert all(t.arrow_patch is not None for t in labels if t.get_text() in points)  # each with a leader line
    plt.close(fig)


@pytest.mark.parametrize("xs", [(0.27, 1.06, 1.08), (1.0, 300.0, 30000.0), (100.0, 100.5), (1e-3, 1e6)])
def test_flops_tick_labels_do_not_overlap(xs):
    # matplotlib's default labels a narrow log range's minor ticks (3x10^-1 beside 4x10^-1), which overlap
    fig, _ = plots.draw_flops({f"r{i}": (x, 0.5 + 0.1 * i) for i, x in enumerate(xs)}, {}, "m", "t")
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
             if t.get_text() and low <= t.get_position()[0] <= high]
    assert len(ticks) >= 2  # the axis is labelled
    assert_apart({t.get_text(): t.get_window_extent() for t in ticks})
    plt.close(fig)


def test_flops_plot_writes_a_png_and_refuses_flops_a_log_axis_cannot_show(tmp_path):
    path = tmp_path / "p.png"
    plots.flops_plot(path, {"a": (2.0, 0.5)}, {"bm25": 0.4}, "mrr@10", "t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"FLOPs must be finite and > 0 on a log axis: \{'z': 0.0\}"):
        plots.flops_plot(path, {"z": (0.0, 0.5)}, {}, "mrr@10", "t")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def demo_layout(root: Path) -> dict:
    """scripts/demo.sh's outputs: <out>/search/{bm25,splade_tiny,splade_tiny_ft}.trec, the SPLADE runs' search.py
    meta naming their queries folders <out>/{base,trained}/encode/queries, whose meta.json has `flops`."""
    qrels = root / "qrels.tsv"
    root.mkdir(parents=True, exist_ok=True)
    qrels.write_text("q1 0 d1 1\nq2 0 d2 1\nq3 0 d3 1\n")
    runs = {"bm25": ["q1 Q0 d1 1 9 t", "q2 Q0 d9 1 9 t", "q2 Q0 d2 2 8 t", "q3 Q0 d9 1 9 t"],
            "splade_tiny": ["q1 Q0 d1 1 9 t", "q2 Q0 d2 1 9 t", "q3 Q0 d9 1 9 t"],
            "splade_tiny_ft": ["q1 Q0 d1 1 9 t", "q2 Q0 d2 1 9 t", "q3 Q0 d3 1 9 t"]}
    for name, lines in runs.items():
        (root / "search").mkdir(parents=True, exist_ok=True)
        (root / "search" / f"{name}.trec").write_text("\n".join(lines) + "\n")
    for name, folder, flops in (("splade_tiny", "base", 1.8), ("splade_tiny_ft", "trained", 0.9)):
        queries = root / folder / "encode" / "queries"
        write_json(queries / "meta.json", {"count": 3, "flops": flops})
        write_json(root / "search" / f"{name}.meta.json", {"engine": "exact", "queries": str(queries)})
    return {"qrels": str(qrels), "runs": [str(root / "search" / f"{n}.trec") for n in runs]}


def test_find_flops_in_the_demo_and_rq_layouts(tmp_path):
    demo = demo_layout(tmp_path / "demo")
    assert [evaluate.find_flops(r) for r in demo["runs"]] == [None, 1.8, 0.9]
    rq = tmp_path / "rq2"  # scripts/rq*.sh: <root>/search/<name>.trec, <root>/<name>/encode/queries/meta.json
    (rq / "search").mkdir(parents=True)
    (rq / "search" / "opt_350m.trec").write_text("q1 Q0 d1 1 9 t\n")
    write_json(rq / "opt_350m" / "encode" / "queries" / "meta.json", {"flops": 3.5})
    assert evaluate.find_flops(str(rq / "search" / "opt_350m.trec")) == 3.5
    write_json(rq / "search" / "opt_350m.meta.json", {"queries": str(tmp_path / "gone")})  # recorded, since moved
    assert evaluate.find_flops(str(rq / "search" / "opt_350m.trec")) == 3.5


def test_evaluate_plot_on_the_demo_layout(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "evaluate")
    demo = demo_layout(tmp_path)
    drawn = {}
    real = plots.flops_plot
    monkeypatch.setattr(plots, "flops_plot", lambda path, points, baselines, metric, title: drawn.update(
        points=points, baselines=baselines, title=title) or real(path, points, baselines, metric, title))
    means = evaluate.main(["--qrels", demo["qrels"], "--run", *demo["runs"], "--metrics", "mrr@10",
                           "--out", str(tmp_path / "eval"), "--plot"])
    assert drawn["points"] == {"splade_tiny": (1.8, means["splade_tiny"]["mrr@10"]),
                               "splade_tiny_ft": (0.9, means["splade_tiny_ft"]["mrr@10"])}
    assert drawn["baselines"] == {"bm25": means["bm25"]["mrr@10"]} and means["bm25"]["mrr@10"] == 0.5
    assert drawn["title"] == "mrr@10 against FLOPs (qrels.tsv, 3 queries)"
    assert "run bm25: no meta.json with 'flops' found: drawn as a reference line" in caplog.text
    assert (tmp_path / "eval" / "flops.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_plot_draws_runs_without_flops_as_reference_lines(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "flops_plot", lambda path, points, baselines, metric, title: drawn.update(
        points=points, baselines=baselines, metric=metric))
    rows = {"a": {"dev MRR@10": 0.3, "FLOPs": 2.0}, "bm25": {"dev MRR@10": 0.2, "FLOPs": None},
            "empty": {"dev MRR@10": 0.1, "FLOPs": 0.0}, "not_run": {"dev MRR@10": None, "FLOPs": None}}
    assert tables.plot(tmp_path / "t.png", "T", ["dev MRR@10", "FLOPs"], rows) is True
    assert drawn == {"points": {"a": (2.0, 0.3)}, "baselines": {"bm25": 0.2, "empty (FLOPs 0)": 0.1},
                     "metric": "dev MRR@10"}
