"""The effectiveness-against-FLOPs plot that `evaluate.py --plot` and `scripts/tables.py` draw (matplotlib, Agg).

    flops_plot(path, {"splade": (flops, ndcg), ...}, {"bm25": ndcg}, "ndcg@10", "title")

Runs with a FLOPs estimate are points on a log FLOPs axis; runs without one (BM25, any run whose meta.json records
no FLOPs) are dashed horizontal reference lines with their name, so no run is left out silently. Labels are placed
deterministically (points in order of FLOPs, each label at the first candidate offset whose box overlaps no label or
marker already placed, with a leader line to its point), so no two labels overlap.
"""
from __future__ import annotations

import math
from pathlib import Path

from lsr_core.utils import atomic_open

FLOPS_LABEL = "FLOPs (expected multiplications per query-document pair)"
MARKER_PX = 5  # half the side of the box kept free around each marker
STEP = 11  # points between two stacked candidate positions (one 8-point text line and its gap)
# a line from each label to its point: among crowded points a label may sit nearer to another run's marker
LEADER = dict(arrowstyle="-", color="0.5", linewidth=0.6, shrinkA=0, shrinkB=3)


def _candidates(rings: int = 40):
    """Label offsets in points, with their alignment: the four corners first, then stacked further up and down."""
    yield 6, 6, "left", "bottom"
    yield 6, -6, "left", "top"
    yield -6, 6, "right", "bottom"
    yield -6, -6, "right", "top"
    for ring in range(1, rings):
        for dx, ha in ((6, "left"), (-6, "right")):
            yield dx, 6 + ring * STEP, ha, "bottom"
            yield dx, -6 - ring * STEP, ha, "top"


def _text_box(text, renderer):
    """The box of a label's text alone (an annotation's own extent includes its leader line)."""
    from matplotlib.text import Annotation, Text

    if isinstance(text, Annotation):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer).padded(1)


def _baseline_offsets(rings: int = 40):
    """A reference line's label: just above its line at the right edge, else below, then stacked further away."""
    yield 2, "bottom"
    yield -2, "top"
    for ring in range(1, rings):
        yield 2 + ring * STEP, "bottom"
        yield -2 - ring * STEP, "top"


def _place(text, offsets, taken: list, inside, renderer) -> None:
    """Move `text` to the first offset whose box is free of `taken` and inside the axes (else the first free one),
    and add its box to `taken`."""
    chosen = None
    for offset in offsets:
        _move(text, *offset)
        box = _text_box(text, renderer)
        if not any(box.overlaps(other) for other in taken):
            chosen = chosen or offset
            if (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1):
                chosen = offset
                break
    _move(text, *(chosen or offset))  # nothing free within reach: the farthest offset tried
    taken.append(_text_box(text, renderer))


def _move(text, dx: float, dy: float, ha: str, va: str) -> None:
    text.xyann = (dx, dy)
    text.set_ha(ha)
    text.set_va(va)


def draw_flops(points: dict[str, tuple[float, float]], baselines: dict[str, float], metric: str, title: str):
    """(figure, the label texts) of the plot: `points` name -> (FLOPs > 0, value), `baselines` name -> value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import Bbox

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ordered = sorted(points.items(), key=lambda item: (item[1][0], item[1][1], item[0]))
    for name, (flops, value) in ordered:
        ax.scatter([flops], [value], s=24, zorder=3)
    for name, value in baselines.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="0.45", zorder=2)
    values = [v for _, v in points.values()] + list(baselines.values())
    low, high = min(values), max(values)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    if points:
        xs = [f for f, _ in points.values()]
        low_x, high_x = min(xs) / 10 ** 0.4, max(xs) * 10 ** 0.4  # room for labels on either side of the end points
        ax.set_xlim(low_x, high_x)
        # plain numbers at 1-2-5 steps over a few decades, at powers of ten beyond: matplotlib's default labels
        # minor ticks of a narrow range as 3x10^-1, 4x10^-1 side by side, which overlap
        subs = (1.0, 2.0, 5.0) if math.log10(high_x / low_x) <= 3 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(0.1, 10)
        ax.set_xticks([])
    ax.set_xlabel(FLOPS_LABEL)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()  # before labels go in: they are placed in the display coordinates this fixes

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(x - MARKER_PX, y - MARKER_PX, 2 * MARKER_PX, 2 * MARKER_PX)
             for x, y in (ax.transData.transform(p) for p in points.values())]
    labels = []
    for name, value in sorted(baselines.items(), key=lambda item: (item[1], item[0])):
        text = ax.annotate(name, (1, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                           xytext=(0, 0), fontsize=8, color="0.3", annotation_clip=False)
        _place(text, [(-4, dy, "right", va) for dy, va in _baseline_offsets()], taken, inside, renderer)
        labels.append(text)
    for name, (flops, value) in ordered:
        text = ax.annotate(name, (flops, value), textcoords="offset points", xytext=(0, 0), fontsize=8,
                           annotation_clip=False, arrowprops=LEADER)
        _place(text, _candidates(), taken, inside, renderer)
        labels.append(text)
    return fig, labels


def flops_plot(path: str | Path, points: dict[str, tuple[float, float]], baselines: dict[str, float], metric: str,
               title: str) -> None:
    """Draw (see `draw_flops`) and write the PNG atomically. Points need FLOPs > 0 (a log axis)."""
    import matplotlib.pyplot as plt

    bad = {name: flops for name, (flops, _) in points.items() if not (flops > 0 and math.isfinite(flops))}
    if bad:
        raise ValueError(f"FLOPs must be finite and > 0 on a log axis: {bad}")
    fig, _ = draw_flops(points, baselines, metric, title)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
