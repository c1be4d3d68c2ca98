"""Tables and plots from stored benchmark rows, so any run can be redrawn:

    python -m sparsekern.bench.plots RUN/results.json

`summary_markdown(env, rows)` -> markdown tables; `draw(rows, env, out_dir)` -> PNGs:
speed-up against batch per pattern, speed-up against density (batch 1), the fraction of
the measured copy bandwidth reached (memory-bound roofline) at batch 1, and the models'
speed-ups with their p20-p80 and the noise floor (models_speedup.png), the peers (rows with
`peer`: what a user runs instead, sparsekern.bench.peers) hatched beside sparsekern's.

Speed-ups print as reporting.ratio_text: "no difference (1.01x)" when the run's verdict
(common.compare) puts them inside the noise floor. Rows stored before verdicts existed
print their plain ratio.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from ..reporting import markdown_table, ratio_text, save_plot, spread_text
from . import peers

# Mask-generation ops; runs stored before the rename of group_norm to group_score keep
# their old row name.
MASK_OPS = ("nm_mask_compress", "group_score_nm_l2", "group_norm_nm_l2")


def _linear_rows(rows):
    return [r for r in rows if r.get("op") == "linear" and "median_ms" in r and r["provider"] != "torch.dense"]


def _speedup(r):
    return r.get("speedup", r.get("speedup_vs_dense"))


def _x(r):
    return ratio_text(_speedup(r), r.get("verdict"))


def _floor(r):
    return "" if r.get("noise_floor") is None else f"{r['noise_floor']:.1%}"


def _load(env):
    m = env.get("machine") or {}
    after = (env.get("machine_after") or {}).get("loadavg")
    if not m.get("loadavg"):
        return ""
    return (f" Load average (1/5/15 min) {m['loadavg']} at the start" + (f", {after} at the end" if after else "") +
            f" on {m.get('cpus')} CPUs.")


def summary_markdown(env: dict, rows: list[dict]) -> str:
    out = [f"# sparsekern benchmark: {env.get('device_name')}",
           f"sparsekern {env.get('sparsekern')} commit `{env.get('commit')}`, torch {env.get('torch')}, "
           f"Triton {env.get('triton')}, {env.get('threads')} threads, {env.get('date')}; "
           f"OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY') or 'unset (libgomp spins)'}; "
           f"measured copy bandwidth {env.get('copy_gbs', 0):.1f} GB/s.{_load(env)} Every row passed its "
           "correctness check (fp64 reference, the test suite's tolerance; a peer: the fp32 model, its own loose "
           "tolerance) before it was timed. Variants are timed "
           "interleaved (round-robin); speed-ups are ratios of medians against the baseline of the same loop "
           "(p20-p80 of the per-round ratios in brackets), and the baseline is timed twice: the difference of "
           "the two is the noise floor. A ratio within the noise floor (at least 2%) of 1, or whose per-round "
           "p20-p80 contains 1, prints as \"no difference\".", ""]
    lin = _linear_rows(rows)
    if lin:
        out += ["## Kernels (x dense, median)", "", markdown_table(lin, [
            ("shape", "shape", ""), ("pattern", "pattern", ""), ("density", "density", ".0%"),
            ("provider", "provider", ""), ("batch", "batch", "d"), ("median ms", "median_ms", ".3f"),
            ("p20-p80 ms", lambda r: spread_text(r.get("p20_ms"), r.get("p80_ms"), ".3f"), ""),
            ("GB/s", "gb_per_s", ".1f"), ("x dense", lambda r: f"**{_x(r)}**", ""),
            ("p20-p80", lambda r: spread_text(r.get("speedup_p20"), r.get("speedup_p80"), ".2f"), ""),
            ("noise floor", _floor, "")]), ""]
    mod = [r for r in rows if r.get("op") == "model" and "value" in r]
    if mod:
        descs = list(dict.fromkeys((r["model"], r.get("model_desc")) for r in mod))
        out += ["## Models", ""] + [f"- {m}: {d}" for m, d in descs if d] + ["", markdown_table(mod, [
            ("model", "model", ""), ("variant", "variant", ""), ("metric", "metric", ""), ("batch", "batch", "d"),
            ("value", "value", ".1f"), ("p20-p80", lambda r: spread_text(r.get("value_p20"), r.get("value_p80"), ".1f"), ""),
            ("median ms", "median_ms", ".1f"), ("x dense", lambda r: f"**{_x(r)}**", ""),
            ("p20-p80 x", lambda r: spread_text(r.get("speedup_p20"), r.get("speedup_p80"), ".2f"), ""),
            ("noise floor", _floor, ""), ("sparse layers", "sparse_layers", "d"),
            ("params MB", lambda r: r["param_bytes"] / 2**20, ".1f"),
            ("held MB", lambda r: r["held_bytes"] / 2**20 if "held_bytes" in r else float("nan"), ".1f"),
            ("weight GB/s", "weight_gb_per_s", ".1f"), ("rel err", "rel_err", ".1e"),
            ("x peers", peers.ratios_text, ""),
            ("first call s", "first_call_s", ".1f"), ("paths", "paths", "")]),
            "", "x dense: against the fp32 dense model of the same loop; x peers: against each peer (what a user "
            "runs instead: sparsekern.bench.peers) timed in the same loop; a peer row's paths column names the "
            "kernels that run its layers, its rel err is against the fp32 model (a 2:4 peer: with the same masks). params MB: the "
            "weights as stored (packed quantized weights included); weight GB/s: the weight bytes the layers read "
            "per call over the median. first call s: the variant's first call of that workload (correctness "
            "check), where each sparse layer measures its paths for the batch bucket; held MB: what the sparse "
            "layers keep beside params (indexes derived for a kernel, such as NMWeight.gemm_panels, and dense "
            "copies), after all workloads ran; paths: what the layers chose per bucket (sparsekern.explain in "
            "explain.txt).", ""]
    masks = [r for r in rows if r.get("op") in MASK_OPS and "median_ms" in r]
    if masks:
        out += ["## Mask generation", "", markdown_table(masks, [
            ("op", "op", ""), ("provider", "provider", ""), ("shape", "shape", ""), ("median ms", "median_ms", ".3f"),
            ("p20-p80 ms", lambda r: spread_text(r.get("p20_ms"), r.get("p80_ms"), ".3f"), ""),
            ("GB/s", "gb_per_s", ".1f"),
            ("x baseline", lambda r: _x(r) if "speedup" in r else ratio_text(r.get("speedup_vs_eager")), ""),
            ("baseline", lambda r: r.get("baseline", "torch.eager"), ""), ("noise floor", _floor, ""),
            ("note", "note", "")]), ""]
    qual = [r for r in rows if r.get("op") == "quality" and "value" in r]
    if qual:
        out += ["## Pruning quality (one-shot), and the peers' quality", "", markdown_table(qual, [
            ("model", "model", ""), ("metric", "metric", ""), ("method", "method", ""), ("pattern", "pattern", ""),
            ("value", "value", ".4f")]), ""]
    skipped = [r for r in rows if "error" in r and r.get("skipped")]
    if skipped:
        out += ["## Peers that did not run here", ""] + [
            f"- {r.get('model', '')} {r.get('peer', r.get('variant', ''))}: {r['error']}" for r in skipped] + [""]
    errs = [r for r in rows if "error" in r and not r.get("skipped")]
    if errs:
        what = [(r.get("provider", r.get("model")), r.get("pattern", r.get("variant")), r.get("shape")) for r in errs]
        out += ["## Did not run", ""] + [f"- {' '.join(str(w) for w in ws if w)}: {r['error']}"
                                         for ws, r in zip(what, errs)] + [""]
    return "\n".join(out)


def draw_models(rows: list[dict], env: dict, path: str) -> bool:
    """Speed-up over dense of every model variant and workload: bars at the median ratio,
    whiskers at the per-round p20-p80, the noise floor shaded around 1; one panel per model."""
    mod = [r for r in rows if r.get("op") == "model" and "value" in r]
    names = list(dict.fromkeys(r["model"] for r in mod))
    if not names:
        return False

    def fill(axes):
        for ax, name in zip(axes, names):
            rs = [r for r in mod if r["model"] == name and r["variant"] != "dense"]
            labels = [f"{r['variant']} | {r['metric'].replace('_per_s', '/s')}" for r in rs]
            sp = [_speedup(r) for r in rs]
            # ratio of medians beside the per-round ratios' p20-p80 (which need not bracket it)
            lo = [max(0.0, s - r.get("speedup_p20", s)) for s, r in zip(sp, rs)]
            hi = [max(0.0, r.get("speedup_p80", s) - s) for s, r in zip(sp, rs)]
            colors = ["0.6" if r.get("verdict") == "no difference" else ("tab:green" if s > 1 else "tab:red")
                      for s, r in zip(sp, rs)]
            bars = ax.barh(range(len(rs)), sp, xerr=[lo, hi], color=colors, capsize=2)
            for bar, r in zip(bars, rs):  # the peers (what a user runs instead), hatched
                if r.get("peer"):
                    bar.set_hatch("///")
                    bar.set_edgecolor("k")
            ax.set_yticks(range(len(rs)), labels, fontsize=7)
            ax.invert_yaxis()
            floor = max((r.get("noise_floor") or 0 for r in rs), default=0)
            ax.axvspan(1 - max(floor, 0.02), 1 + max(floor, 0.02), color="0.85", zorder=0)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xlabel("speed-up over fp32 dense (grey: no difference; hatched: peers)")
            ax.set_title(f"{name} ({env.get('device_name')})", fontsize=8)

    return save_plot(path, fill, nrows=len(names), figsize=(7, 1.2 + 0.28 * sum(
        1 for r in mod if r["variant"] != "dense") + 0.6 * len(names)))


def draw(rows: list[dict], env: dict, out_dir: str) -> list[str]:
    """The plots of a run's kernel and model rows, as PNGs in out_dir; returns the paths
    written (none without matplotlib or without such rows)."""
    lin = _linear_rows(rows)
    written = []
    path = os.path.join(out_dir, "models_speedup.png")
    if draw_models(rows, env, path):
        written.append(path)
    if not lin:
        return written
    shape = max({r["shape"] for r in lin}, key=lambda s: sum(1 for r in lin if r["shape"] == s))

    def by_batch(axes):
        ax = axes[0]
        series = defaultdict(list)
        for r in lin:
            if r["shape"] == shape:
                series[(r["provider"], r["pattern"], r["density"])].append((r["batch"], _speedup(r)))
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
                pts = sorted((r["density"], _speedup(r)) for r in b1 if r["shape"] == s)
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
