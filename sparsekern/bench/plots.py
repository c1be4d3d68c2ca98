"""Tables and plots from stored benchmark rows, so any run can be redrawn:

    python -m sparsekern.bench.plots RUN/results.json

`summary_markdown(env, rows)` -> markdown tables; `draw(rows, env, out_dir)` -> PNGs:
speed-up against batch per pattern, speed-up against density (batch 1), and the fraction
of the measured copy bandwidth reached (memory-bound roofline) at batch 1.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from ..reporting import markdown_table, save_plot

# Mask-generation ops; runs stored before the rename of group_norm to group_score keep
# their old row name.
MASK_OPS = ("nm_mask_compress", "group_score_nm_l2", "group_norm_nm_l2")


def _linear_rows(rows):
    return [r for r in rows if r.get("op") == "linear" and "median_ms" in r and r["provider"] != "torch.dense"]


def summary_markdown(env: dict, rows: list[dict]) -> str:
    out = [f"# sparsekern benchmark: {env.get('device_name')}",
           f"sparsekern {env.get('sparsekern')} commit `{env.get('commit')}`, torch {env.get('torch')}, "
           f"Triton {env.get('triton')}, {env.get('threads')} threads, {env.get('date')}; "
           f"measured copy bandwidth {env.get('copy_gbs', 0):.1f} GB/s. Speed-ups are against dense torch "
           "in the same run; every row passed its correctness check first.", ""]
    lin = _linear_rows(rows)
    if lin:
        out += ["## Kernels (x dense, median)", "", markdown_table(lin, [
            ("shape", "shape", ""), ("pattern", "pattern", ""), ("density", "density", ".0%"),
            ("provider", "provider", ""), ("batch", "batch", "d"), ("median ms", "median_ms", ".3f"),
            ("p20-p80 ms", lambda r: f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", ""), ("GB/s", "gb_per_s", ".1f"),
            ("x dense", lambda r: f"**{r['speedup_vs_dense']:.2f}**", "")]), ""]
    mod = [r for r in rows if r.get("op") == "model" and "value" in r]
    if mod:
        out += ["## Models", "", markdown_table(mod, [
            ("model", "model", ""), ("variant", "variant", ""), ("metric", "metric", ""), ("batch", "batch", "d"),
            ("value", "value", ".1f"), ("x dense", "speedup_vs_dense", ".2f"), ("sparse layers", "sparse_layers", "d"),
            ("params MB", lambda r: r["param_bytes"] / 2**20, ".2f"),
            ("checkpoint MB", lambda r: r["checkpoint_bytes"] / 2**20, ".2f")]), ""]
    masks = [r for r in rows if r.get("op") in MASK_OPS and "median_ms" in r]
    if masks:
        out += ["## Mask generation", "", markdown_table(masks, [
            ("op", "op", ""), ("provider", "provider", ""), ("shape", "shape", ""), ("median ms", "median_ms", ".3f"),
            ("GB/s", "gb_per_s", ".1f"), ("x eager", "speedup_vs_eager", ".2f")]), ""]
    qual = [r for r in rows if r.get("op") == "quality" and "value" in r]
    if qual:
        out += ["## Pruning quality (one-shot)", "", markdown_table(qual, [
            ("model", "model", ""), ("metric", "metric", ""), ("method", "method", ""), ("pattern", "pattern", ""),
            ("value", "value", ".4f")]), ""]
    errs = [r for r in rows if "error" in r]
    if errs:
        what = [(r.get("provider", r.get("model")), r.get("pattern", r.get("variant")), r.get("shape")) for r in errs]
        out += ["## Did not run", ""] + [f"- {' '.join(str(w) for w in ws if w)}: {r['error']}"
                                         for ws, r in zip(what, errs)] + [""]
    return "\n".join(out)


def draw(rows: list[dict], env: dict, out_dir: str) -> list[str]:
    """The plots of a run's kernel rows, as PNGs in out_dir; returns the paths written
    (none without matplotlib or without kernel rows)."""
    lin = _linear_rows(rows)
    written = []
    if not lin:
        return written
    shape = max({r["shape"] for r in lin}, key=lambda s: sum(1 for r in lin if r["shape"] == s))

    def by_batch(axes):
        ax = axes[0]
        series = defaultdict(list)
        for r in lin:
            if r["shape"] == shape:
                series[(r["provider"], r["pattern"], r["density"])].append((r["batch"], r["speedup_vs_dense"]))
        for (prov, pat, d), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{prov} {pat} {d:.0%}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("speed-up over dense")
        ax.set_title(f"{shape}, {env.get('device_name')}", fontsize=9)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))

    path = os.path.join(out_dir, "speedup_vs_batch.png")
    if save_plot(path, by_batch, figsize=(8, 4)):
        written.append(path)
    b1 = [r for r in lin if r["batch"] == 1 and r["provider"].startswith("sparsekern") and r["pattern"] == "unstructured"]
    if b1:
        def by_density(axes):
            ax = axes[0]
            for s in sorted({r["shape"] for r in b1}):
                pts = sorted((r["density"], r["speedup_vs_dense"]) for r in b1 if r["shape"] == s)
                ax.plot([1 - p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("speed-up over dense (batch 1)")
            ax.legend(fontsize=7)

        path = os.path.join(out_dir, "speedup_vs_density.png")
        if save_plot(path, by_density, figsize=(5, 3.5)):
            written.append(path)
    rb = [r for r in rows if r.get("op") == "linear" and r.get("batch") == 1 and "gb_per_s" in r]
    if env.get("copy_gbs") and rb:
        def roofline(axes):
            ax = axes[0]
            labels = [f"{r['provider']} {r['pattern']} {r['density']:.0%} {r['shape']}" for r in rb]
            ax.barh(range(len(rb)), [r["gb_per_s"] / env["copy_gbs"] for r in rb])
            ax.set_yticks(range(len(rb)), labels, fontsize=5)
            ax.set_xlabel("fraction of measured copy bandwidth (batch 1)")

        path = os.path.join(out_dir, "roofline_fraction.png")
        if save_plot(path, roofline, figsize=(6.5, max(3.8, 0.09 * len(rb) + 1))):
            written.append(path)
    return written


def redraw(results_json: str) -> list[str]:
    """summary.md and the plots again, beside a stored results.json."""
    with open(results_json) as f:
        data = json.load(f)
    d = os.path.dirname(os.path.abspath(results_json))
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(summary_markdown(data["environment"], data["rows"]))
    return [os.path.join(d, "summary.md")] + draw(data["rows"], data["environment"], d)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m sparsekern.bench.plots RUN/results.json")
    print("\n".join(redraw(sys.argv[1])))
