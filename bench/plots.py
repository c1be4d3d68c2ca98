"""Tables and plots from stored benchmark rows, so any run can be redrawn:

    python bench/plots.py bench/results/<run>/results.json

summary_markdown(env, rows) -> markdown tables; draw(rows, env, out_dir) -> PNGs:
speed-up against batch per pattern, speed-up against density (batch 1), and the fraction
of the measured copy bandwidth reached (memory-bound roofline) at batch 1.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def _fmt(v, f):
    return "" if v is None else format(v, f)


def summary_markdown(env: dict, rows: list[dict]) -> str:
    out = [f"# sparsekern benchmark: {env.get('device_name')}",
           f"sparsekern {env.get('sparsekern')} commit `{env.get('commit')}`, torch {env.get('torch')}, "
           f"Triton {env.get('triton')}, {env.get('threads')} threads, {env.get('date')}; "
           f"measured copy bandwidth {env.get('copy_gbs', 0):.1f} GB/s. Speed-ups are against dense torch "
           "in the same run; every row passed its correctness check first.", ""]
    lin = [r for r in rows if r.get("op") == "linear" and "median_ms" in r and r["provider"] != "torch.dense"]
    if lin:
        out += ["## Kernels (x dense, median)", "",
                "| shape | pattern | density | provider | batch | median ms | p20-p80 ms | GB/s | x dense |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in lin:
            out.append(f"| {r['shape']} | {r['pattern']} | {r['density']:.0%} | {r['provider']} | {r['batch']} | "
                       f"{r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['gb_per_s']:.1f} | "
                       f"**{r['speedup_vs_dense']:.2f}** |")
        out.append("")
    mod = [r for r in rows if r.get("op") == "model" and "value" in r]
    if mod:
        out += ["## Models", "", "| model | variant | metric | batch | value | x dense | sparse layers | params MB | "
                "checkpoint MB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mod:
            out.append(f"| {r['model']} | {r['variant']} | {r['metric']} | {r['batch']} | {r['value']:.1f} | "
                       f"{r['speedup_vs_dense']:.2f} | {r['sparse_layers']} | {r['param_bytes'] / 2**20:.2f} | "
                       f"{r['checkpoint_bytes'] / 2**20:.2f} |")
        out.append("")
    masks = [r for r in rows if r.get("op") in ("nm_mask_compress", "group_norm_nm_l2") and "median_ms" in r]
    if masks:
        out += ["## Mask generation", "", "| op | provider | shape | median ms | GB/s | x eager |", "|---|---|---|---|---|---|"]
        for r in masks:
            out.append(f"| {r['op']} | {r['provider']} | {r['shape']} | {r['median_ms']:.3f} | {r['gb_per_s']:.1f} | "
                       f"{_fmt(r.get('speedup_vs_eager'), '.2f')} |")
        out.append("")
    qual = [r for r in rows if r.get("op") == "quality" and "value" in r]
    if qual:
        out += ["## Pruning quality (one-shot)", "", "| model | metric | method | pattern | value |", "|---|---|---|---|---|"]
        for r in qual:
            out.append(f"| {r['model']} | {r['metric']} | {r['method']} | {r['pattern']} | {r['value']:.4f} |")
        out.append("")
    errs = [r for r in rows if "error" in r]
    if errs:
        out += ["## Did not run", ""] + [f"- {r.get('provider', r.get('model'))} {r.get('pattern', r.get('variant', ''))}"
                                         f" {r.get('shape', '')}: {r['error']}" for r in errs] + [""]
    return "\n".join(out)


def draw(rows: list[dict], env: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    lin = [r for r in rows if r.get("op") == "linear" and "median_ms" in r and r["provider"] != "torch.dense"]
    written = []
    if not lin:
        return written
    shape = max({r["shape"] for r in lin}, key=lambda s: sum(1 for r in lin if r["shape"] == s))
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, "speedup_vs_batch.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    b1 = [r for r in lin if r["batch"] == 1 and r["provider"].startswith("sparsekern") and r["pattern"] == "unstructured"]
    if b1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for s in sorted({r["shape"] for r in b1}):
            pts = sorted((r["density"], r["speedup_vs_dense"]) for r in b1 if r["shape"] == s)
            ax.plot([1 - p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speed-up over dense (batch 1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup_vs_density.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if env.get("copy_gbs"):
        rb = [r for r in rows if r.get("op") == "linear" and r.get("batch") == 1 and "gb_per_s" in r]
        if rb:
            fig, ax = plt.subplots(figsize=(6.5, 3.8))
            labels = [f"{r['provider']} {r['pattern']} {r['density']:.0%} {r['shape']}" for r in rb]
            ax.barh(range(len(rb)), [r["gb_per_s"] / env["copy_gbs"] for r in rb])
            ax.set_yticks(range(len(rb)), labels, fontsize=5)
            ax.set_xlabel("fraction of measured copy bandwidth (batch 1)")
            fig.tight_layout()
            path = os.path.join(out_dir, "roofline_fraction.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    d = os.path.dirname(os.path.abspath(sys.argv[1]))
    print("\n".join(draw(data["rows"], data["environment"], d)))
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(summary_markdown(data["environment"], data["rows"]))
