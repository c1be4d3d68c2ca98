"""Tables and plots from results: markdown tables, the sweep and sensitivity reports of
sparsekern.selection, and one figure helper that the demo and the benchmark suite share.

- `markdown_table(rows, columns)`: one row per dict, columns (header, key, format).
- `ratio_text(speedup, verdict, p20, p80)`: a speed-up as printed everywhere (the demo, the
  benchmark suite's summaries, the bench scripts and the README/docs tables of
  bench/make_tables.py): "1.5x (1.4–1.6)", "no difference (0.97–1.1)" when the run cannot
  tell it from its baseline, "1 (baseline)"; `ratio_number(x)` is its number alone.
- `spread_text(p20, p80)`: a p20-p80 range of a timing.
- `format_sweep`, `write_sweep`, `plot_sweep`: `selection.sweep` rows as a table, files, plot.
- `format_sensitivity`, `plot_sensitivity`: `selection.sensitivity` as a table and plot.
- `save_plot(path, draw, ...)`: make a figure, let `draw(axes)` fill it, lay it out so
  titles, tick labels and point labels (`label_points`) do not overlap, save it, close it;
  returns whether the file was written (False without matplotlib, which is optional).

Imports nothing from sparsekern: it formats plain dicts and lists.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

POINT_LABEL = "sparsekern-point-label"  # gid of the annotations label_points makes


# ---------------------------------------------------------------------------- tables
def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """columns: (header, key, format spec) with key a dict key or a function of the row;
    a missing or None value gives an empty cell."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, spec in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append("" if v is None else format(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_number(x: float, digits: int = 2) -> str:
    """A ratio to `digits` significant digits in plain notation (digits=2: 0.012, 0.67, 1.0,
    1.8, 12, 140): timings on a shared machine do not support more."""
    if x == 0 or x != x or x in (float("inf"), float("-inf")):
        return f"{x:g}"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:#.{digits}g}".rstrip(".")


def ratio_text(speedup: float | None, verdict: str | None = None, p20: float | None = None,
               p80: float | None = None, digits: int = 2) -> str:
    """A speed-up over the baseline (baseline time / this time; above 1 is faster), the one
    way every table prints it:

    - "1.5x (1.4–1.6)": with the p20–p80 range of the ratio when both ends are given;
      "1.5x" without;
    - "no difference (0.97–1.1)", or "no difference (1.0x)" without a range, when the
      verdict is "no difference" (the ratio is inside the run's noise floor, or its range
      contains 1: sparsekern.bench.common.verdict);
    - "1 (baseline)" for the baseline itself (verdict "baseline"); "" for no speed-up.

    `digits` significant digits (ratio_number)."""
    if verdict == "baseline":
        return "1 (baseline)"
    if speedup is None:
        return ""
    num = lambda v: ratio_number(v, digits)  # noqa: E731
    rng = f"{num(p20)}–{num(p80)}" if p20 is not None and p80 is not None else None
    if verdict == "no difference":
        return f"no difference ({rng or num(speedup) + 'x'})"
    return f"{num(speedup)}x" + (f" ({rng})" if rng else "")


def spread_text(p20: float | None, p80: float | None, spec: str = ".3g") -> str:
    """"p20-p80" of a timing or a ratio ("" when missing)."""
    if p20 is None or p80 is None:
        return ""
    return f"{format(p20, spec)}-{format(p80, spec)}"


SWEEP_COLUMNS = [("amount", "amount", ".2f"), ("metric", "metric", ".4f"), ("sparsity", "sparsity", ".3f"),
                 ("nonzero params", "nonzero_params", "d"), ("dense bytes", "dense_bytes", "d"),
                 ("bitmask bytes", "bitmask_bytes", "d")]


def format_sweep(rows: list[dict]) -> str:
    """selection.sweep rows as a markdown table."""
    return markdown_table(rows, SWEEP_COLUMNS)


def format_sensitivity(sens: dict) -> str:
    """Markdown table of selection.sensitivity: one row per layer, one column per sparsity
    (metric drop from the baseline)."""
    rows = [{"layer": name, "params": v["params"], **{s: sens["baseline"] - v["metric"][s] for s in sens["sparsities"]}}
            for name, v in sens["layers"].items()]
    cols = [("layer", "layer", ""), ("params", "params", "d")] + [
        (f"drop @ {s:.0%}", (lambda r, s=s: r[s]), ".4f") for s in sens["sparsities"]]
    return markdown_table(rows, cols)


def write_sweep(rows: list[dict], out_dir: str, method: str | None = None) -> list[str]:
    """sweep.json (rows), sweep.md (table) and sweep.png (plot, with matplotlib) in
    out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ("sweep.json", "sweep.md", "sweep.png")]
    with open(paths[0], "w") as f:
        json.dump({"method": method, "rows": rows}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(format_sweep(rows) + "\n")
    return paths if plot_sweep(rows, paths[2]) else paths[:2]


# ----------------------------------------------------------------------------- plots
def save_plot(path: str, draw: Callable[[list], None], *, nrows: int = 1, ncols: int = 1,
              figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 120) -> bool:
    """Make a figure of nrows x ncols axes, call draw(axes) (a flat list) to fill it, lay
    it out so labels do not overlap (constrained layout, then `label_points` labels moved
    apart), save it to `path` and close it. False, and nothing written, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False)
    try:
        draw(list(axes.flat))
        fig.draw_without_rendering()  # runs the layout, so text extents are final
        for ax in axes.flat:
            _spread_labels(ax)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return True


def label_points(ax, xs, ys, labels, fontsize: float = 7, **scatter_kw) -> None:
    """Scatter the points and label each; save_plot then moves the labels so they stay
    inside the axes and overlap neither each other nor the points."""
    ax.scatter(xs, ys, **scatter_kw)
    ax.margins(0.12)  # room for labels of the outermost points
    for x, y, text in zip(xs, ys, labels):
        a = ax.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=fontsize,
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="0.6", shrinkA=1, shrinkB=4))
        a.set_gid(POINT_LABEL)


# Offsets (points) tried in turn for a label, relative to its point; "w" is the label's width.
_OFFSETS = [(4, 4), (4, -11), ("-w", 4), ("-w", -11), (4, 14), (4, -21), ("-w", 14), ("-w", -21),
            (4, 24), (4, -31), ("-w", 24), ("-w", -31), (4, 34), (4, -41), ("-w", 34), ("-w", -41)]


def _spread_labels(ax) -> None:
    """Greedy placement: each label takes the first offset whose box overlaps no label
    placed before, no point and nothing outside the axes (else the least bad one)."""
    labels = [t for t in ax.texts if t.get_gid() == POINT_LABEL]
    if not labels:
        return
    from matplotlib.text import Text

    def extent(t):  # the text alone (an Annotation's own extent includes its leader line)
        return Text.get_window_extent(t, renderer)

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pt = fig.dpi / 72.0  # display pixels per point
    frame = ax.get_window_extent(renderer)
    r = 3 * pt  # half the size of a point's marker box
    points = [ax.transData.transform(t.xy) for t in labels]
    obstacles = [(px - r, py - r, px + r, py + r) for px, py in points]
    for t in labels:
        width = extent(t).width / pt
        best, best_cost = None, None
        for dx, dy in _OFFSETS:
            t.set_position((-(width + 4) if dx == "-w" else dx, dy))
            b = extent(t)
            box = (b.x0, b.y0, b.x1, b.y1)
            inside = _overlap_area(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = sum(_overlap_area(box, o) for o in obstacles) + 4 * (b.width * b.height - inside)
            if best_cost is None or cost < best_cost:
                best, best_cost = t.get_position(), cost
            if cost == 0:
                break
        t.set_position(best)
        b = extent(t)
        obstacles.append((b.x0, b.y0, b.x1, b.y1))


def _overlap_area(a, b) -> float:
    """Area shared by two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def plot_sweep(rows: list[dict], path: str) -> bool:
    """Metric against sparsity (selection.sweep rows); False without matplotlib."""
    def draw(axes):
        ax = axes[0]
        ax.plot([r["sparsity"] for r in rows], [r["metric"] for r in rows], "o-")
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.set_ylabel("metric")
        ax.grid(alpha=0.3)

    return save_plot(path, draw, figsize=(5, 3.5))


def plot_sensitivity(sens: dict, path: str) -> bool:
    """One line per layer: metric against that layer's sparsity (selection.sensitivity);
    False without matplotlib."""
    def draw(axes):
        ax = axes[0]
        xs = [0.0] + sens["sparsities"]
        for name, v in sens["layers"].items():
            ax.plot(xs, [sens["baseline"]] + [v["metric"][s] for s in sens["sparsities"]], "o-", label=name)
        ax.set_xlabel("sparsity of the layer alone")
        ax.set_ylabel("metric")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    return save_plot(path, draw)
