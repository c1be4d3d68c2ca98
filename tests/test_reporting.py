"""Reporting: markdown tables, and the figure helper (written file, labels that overlap
neither each other nor the points, nothing without matplotlib)."""
import itertools
import sys

import pytest

from sparsekern import reporting


def test_markdown_table_hand_checked():
    rows = [{"a": 1, "b": 0.5}, {"a": 2}]
    cols = [("A", "a", "d"), ("B", "b", ".0%"), ("twice", lambda r: 2 * r["a"], "d")]
    assert reporting.markdown_table(rows, cols) == "| A | B | twice |\n|---|---|---|\n| 1 | 50% | 2 |\n| 2 |  | 4 |"


def test_ratio_and_spread_text():
    """The one speed-up format (the demo, the suite's summaries, the bench scripts and the
    README/docs tables all print through it)."""
    assert reporting.ratio_text(1.523, "faster") == "1.5x"
    assert reporting.ratio_text(0.8, "slower") == "0.80x"
    assert reporting.ratio_text(1.012, "no difference") == "no difference (1.0x)"
    assert reporting.ratio_text(1.0, "baseline") == "1 (baseline)"
    assert reporting.ratio_text(1.3) == "1.3x" and reporting.ratio_text(None) == ""
    assert reporting.ratio_text(2.0, "faster", 1.83, 2.2) == "2.0x (1.8–2.2)"
    assert reporting.ratio_text(1.05, "no difference", 0.95, 1.16) == "no difference (0.95–1.2)"
    assert reporting.ratio_text(1.96, None, 1.8, 2.1, digits=3) == "1.96x (1.80–2.10)"  # not "2.0x" below 2
    assert [reporting.ratio_number(x) for x in (0.0123, 0.666, 0.999, 1.83, 7.45, 9.96, 12.4, 140.2)] == \
        ["0.012", "0.67", "1.0", "1.8", "7.5", "10", "12", "140"]
    assert reporting.spread_text(0.1234, 0.2) == "0.123-0.2" and reporting.spread_text(None, 1.0) == ""


def test_bench_console_columns_use_the_same_numbers():
    from sparsekern.bench import common

    r = {"speedup": 1.523, "speedup_p20": 1.41, "speedup_p80": 1.6, "noise_floor": 0.012, "verdict": "faster"}
    assert common.ratio_text(r).split() == ["1.5", "1.4-1.6", "1.2%", "faster"]
    assert common.ratio_text(dict(r, noise_floor=None)).split() == ["1.5", "1.4-1.6", "faster"]


def test_format_sweep_and_sensitivity():
    rows = [{"amount": 0.5, "metric": 0.25, "sparsity": 0.5, "nonzero_params": 10, "dense_bytes": 80,
             "bitmask_bytes": 43}]
    assert reporting.format_sweep(rows).splitlines()[-1] == "| 0.50 | 0.2500 | 0.500 | 10 | 80 | 43 |"
    sens = {"baseline": 1.0, "sparsities": [0.5], "layers": {"fc": {"params": 8, "metric": {0.5: 0.75}}}}
    assert reporting.format_sensitivity(sens).splitlines() == ["| layer | params | drop @ 50% |", "|---|---|---|",
                                                               "| fc | 8 | 0.2500 |"]


def test_save_plot_spreads_point_labels(tmp_path):
    pytest.importorskip("matplotlib")
    seen = {}

    def draw(axes):
        # a tight cluster: every label would land on its neighbours at the default offset
        xs = [1.0, 1.02, 1.04, 1.0, 1.02, 3.0]
        ys = [5.0, 5.0, 5.0, 4.98, 4.98, 1.0]
        reporting.label_points(axes[0], xs, ys, [f"method {i}" for i in range(len(xs))])
        seen["ax"] = axes[0]

    path = tmp_path / "sub" / "plot.png"
    assert reporting.save_plot(str(path), draw, dpi=100) and path.stat().st_size > 1000  # dpi: measured as saved
    ax = seen["ax"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(ax.figure).get_renderer()  # save_plot closed the figure
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts if t.get_gid() == reporting.POINT_LABEL]
    assert len(boxes) == 6
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), "two point labels overlap"
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_save_plot_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    path = tmp_path / "none.png"
    assert reporting.save_plot(str(path), lambda axes: None) is False
    assert not path.exists()
    assert reporting.write_sweep([{"amount": 0.0, "metric": 1.0, "sparsity": 0.0, "nonzero_params": 1,
                                   "dense_bytes": 4, "bitmask_bytes": 5}], str(tmp_path)) == \
        [str(tmp_path / "sweep.json"), str(tmp_path / "sweep.md")]
