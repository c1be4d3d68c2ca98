"""Writes the measured tables in README.md and docs/*.md from the committed results.

    python bench/make_tables.py            # rewrite every table between markers
    python bench/make_tables.py --check    # exit 1, with a diff, when a file differs from the JSON
    python bench/make_tables.py --list     # each table, and the results file it is drawn from

A table lives between two marker comments, and everything between them is generated:

    <!-- table:NAME -->
    ...
    <!-- /table -->

NAME is one of TABLES below. The sources are the JSON files under bench/results/ (any depth)
that git tracks (in a checkout: `git add` a new run before running this) and that hold
{"environment": {...}, "rows": [...]} (sparsekern.bench.common.write_json, also
bench/bench_gpu_linear.py and bench/bench_quality.py); other files there (logs, tuning
tables, CSV, plots) are skipped. Rows are recognised by their fields, not by the file that
wrote them, so a folder added later shows up without a change here:

  kernel rows    op linear|nm_linear|bitmask_linear|block_linear, provider, batch, median_ms
                 (or us) with p20/p80; the dense row (provider torch.dense or cublas) of the
                 same shape, batch and dtype is the reference
  model rows     op "model": model, variant, metric, batch, median_ms, p20_ms, p80_ms,
                 speedup_vs_dense; optional value, noise_floor_rel or noise_floor_ms,
                 sparse_layers, param_bytes; the variant "dense" is the reference
  overhead rows  suite "overhead" (python -m sparsekern.bench.overhead --out)
  quality rows   op "quality" or model/metric/method/pattern/value
  mask rows, masked-training rows (suite masked), end-to-end rows (suite e2e), note rows
  (suite ncu); anything else is shown as a plain table of its fields; rows with "error"
  are listed as "did not run".

Where the tables go: the README holds two, `summary` (per machine, the newest full run with
model rows: each model's best sparsekern variant beside every peer variant of that run, a
peer being a variant named "dense..." or "torch..." other than the baseline and its repeat,
PEER_PREFIXES) and `quality-summary` (a real model's held-out quality after one-shot
pruning, recovery and an optimize plan, beside the peers of the same runs). A folder whose
JSON is not in that shape (a one-off probe) is shown with each file flattened into rows,
one per nested record (flatten_records). docs/RESULTS.md holds the rest: `ops` (which backend exists for which op, and
"built, not yet run on a GPU" for a GPU backend no committed GPU run has run), the newest run
of each kind (the newest results file, by environment date, that has rows of that kind on its
device; a folder whose name contains "quick", or whose environment says quick, only when no
full run has such rows), and `all-results`: every file, every row, each under an anchor the
README's links point to (run_anchors).

Speed-ups: dense median / this median from the same run, with the range the p20-p80 spreads
allow (dense p20 / this p80 to dense p80 / this p20), or the row's own per-round p20-p80 and
verdict where the benchmark compared it (sparsekern.bench.common.compare). When that range
contains 1, or the difference is within a noise floor the row carries (two identical runs in
the same loop), the row reads "no difference" instead of a ratio. Every speed-up is written by
sparsekern.reporting.ratio_text, the one formatter the demo and the benchmark suite use too.

This script imports the package (the speed-up formatter, the dispatch table ops.OPS, the
pattern kinds); the package never imports from bench/.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sparsekern.reporting import ratio_text  # noqa: E402  (the one speed-up format)

RESULTS = os.path.join(ROOT, "bench", "results")
MARKER = re.compile(r"<!-- table:([a-z0-9-]+) -->\n(.*?)<!-- /table -->", re.S)
KERNEL_OPS = ("linear", "nm_linear", "bitmask_linear", "block_linear", "conv2d", "nm_conv2d")
DENSE_PROVIDERS = ("torch.dense", "cublas", "dense", "torch.conv2d")
MASK_OPS = ("nm_mask_compress", "group_score_nm_l2", "group_norm_nm_l2")
# Keys shown in the caption or not at all (the run's own metadata).
META_KEYS = ("commit", "timestamp", "device", "suite")
# Environment variables that change libgomp's or the kernels' threading from the default.
THREADING_VARIABLES = ("OMP_WAIT_POLICY", "SPARSEKERN_POOL", "SPARSEKERN_CONTENTION")


# ----------------------------------------------------------------------------- loading
class Run:
    """One results file: its path (relative to the repository), environment and rows."""

    def __init__(self, path: str, env: dict, rows: list, root: str = ROOT):
        self.path = os.path.relpath(path, root).replace(os.sep, "/")
        self.env = env
        self.rows = [_normalise(r) for r in rows if isinstance(r, dict)]
        folder = os.path.basename(os.path.dirname(path))
        self.quick = "quick" in folder or bool(env.get("quick"))
        # Run with libgomp's or the kernels' threading changed from the default (OMP_WAIT_POLICY,
        # SPARSEKERN_POOL, SPARSEKERN_CONTENTION): shown in full, never the source of the summary
        # and goal tables.
        self.default_threading = not any(env.get(v) for v in THREADING_VARIABLES)
        self.gpu = env.get("device") == "cuda" or bool(env.get("gpu"))
        self.flat = False  # rows flattened from a file without an environment (load_runs)
        self.date = str(env.get("date") or env.get("timestamp") or "")
        if not self.date:
            m = re.search(r"(\d{8})", folder)
            self.date = m.group(1) if m else ""

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if row_kind(r) == kind]

    def caption(self) -> str:
        e = self.env
        if self.flat:
            return (f"Run: `{self.path}`, {self.date or 'undated'}: a file without the suite's environment record "
                    f"(the command, machine and commit are in `{os.path.dirname(self.path)}/README.md`); each row is "
                    "one record of the file.")
        machine = e.get("gpu") or e.get("device_name") or e.get("cpu") or "unknown machine"
        parts = [f"`{self.path}`", f"commit `{e.get('commit', 'unknown')}`"]
        if self.gpu:
            parts.append(f"{machine} (CUDA {e.get('cuda', '?')}; host CPU {e.get('cpu', '?')})")
        else:
            th = e.get("threads", "?")
            parts.append(f"{machine}, {th} thread{'' if th == 1 else 's'}")
        load = (e.get("machine") or {}).get("loadavg")
        if load:
            parts[-1] += f", load average {load[0]} at the start"
        parts.append(f"torch {e.get('torch', '?')}")
        parts.append(self.date[:10] if len(self.date) >= 10 else self.date or "undated")
        if self.quick:
            parts.append("quick run (`--quick` sizes)")
        for var in THREADING_VARIABLES:
            if e.get(var):
                parts.append(f"{var}={e[var]}")
        return "Run: " + ", ".join(parts) + "."


def _normalise(r: dict) -> dict:
    """Microsecond timings (the GPU script) become the common millisecond keys."""
    r = dict(r)
    if "median_ms" not in r and isinstance(r.get("us"), (int, float)):
        r["median_ms"] = r["us"] / 1e3
        for q in ("p20", "p80"):
            if isinstance(r.get(f"{q}_us"), (int, float)):
                r[f"{q}_ms"] = r[f"{q}_us"] / 1e3
    if "speedup_vs_dense" not in r and isinstance(r.get("x_cublas"), (int, float)):
        r["speedup_vs_dense"] = r["x_cublas"]
    return r


UNTRACKED: list[str] = []  # results files skipped by the last load_runs (not added to git)


def _tracked(root: str) -> set[str] | None:
    """Files git tracks under root (the index: committed or added), or None outside a checkout."""
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "bench/results"], cwd=root, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {os.path.normpath(os.path.join(root, p)) for p in out.decode().split("\0") if p}


def load_runs(results_dir: str = RESULTS, root: str | None = None) -> list[Run]:
    """Every results file under results_dir, newest first (paths shown relative to root,
    by default the folder above bench/results). In a git checkout only files git tracks
    count (`git add` a new run first), so the tables follow the commit, not whatever a
    benchmark left in the working tree; UNTRACKED lists the others."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(results_dir)))
    tracked = _tracked(root)
    UNTRACKED.clear()
    runs, others = [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "*.json"), recursive=True)):
        if tracked is not None and os.path.normpath(path) not in tracked:
            UNTRACKED.append(os.path.relpath(path, root))
            continue
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("environment"), dict) and isinstance(d.get("rows"), list):
            runs.append(Run(path, d["environment"], d["rows"], root))
        elif isinstance(d, dict):
            others.append((path, d))
    # A folder with no results file in the suite's shape (a one-off probe's JSON) is still
    # shown: each of its files flattened into rows, one per nested record; other JSON beside a
    # real results file (plans, goals, tuning tables) is that run's by-product and is skipped.
    have = {os.path.dirname(r.path) for r in runs}
    for path, d in others:
        if os.path.dirname(os.path.relpath(path, root).replace(os.sep, "/")) not in have:
            run = Run(path, {}, flatten_records(d), root)
            run.flat = True
            runs.append(run)
    runs.sort(key=lambda r: (r.date, r.path), reverse=True)  # newest first
    return runs


def flatten_records(d: dict, where: str = "") -> list[dict]:
    """A nested JSON object as rows: each object reached through nested objects becomes one
    row of its plain fields, named by its path (`before / summary / 2:4`)."""
    plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
    rows = [{"record": where or "(top level)", **plain}] if plain else []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += flatten_records(v, f"{where} / {k}" if where else str(k))
    return rows


def row_kind(r: dict) -> str:
    if "error" in r:
        return "error"
    op, suite = r.get("op"), r.get("suite")
    if suite == "overhead":
        return "overhead"
    if suite == "ncu" or ("note" in r and "median_ms" not in r):
        return "note"
    if suite == "e2e":
        return "e2e"
    if suite == "masked":
        return "masked"
    if op == "model":
        return "model"
    if op == "quality" or (op is None and {"model", "metric", "method", "value"} <= set(r)):
        return "quality"
    if op in MASK_OPS:
        return "mask"
    if op in KERNEL_OPS and "median_ms" in r and "provider" in r:
        return "kernel"
    return "other"


def newest(runs: list[Run], kind: str, gpu: bool | None) -> Run | None:
    """The newest run with rows of `kind` (on a GPU, on the CPU, or either for None),
    preferring full runs to quick ones, with the default threading only."""
    have = [r for r in runs if (gpu is None or r.gpu == gpu) and r.of(kind) and r.default_threading]
    full = [r for r in have if not r.quick]
    return (full or have or [None])[0]


# -------------------------------------------------------------------------- formatting
def num(v: float, digits: int = 3) -> str:
    """`digits` significant digits, plain notation."""
    if v == 0:
        return "0"
    s = f"{v:#.{digits}g}"
    if "e" in s:  # large values: all integer digits, no exponent
        s = f"{v:.0f}"
    return s.rstrip(".")


def spread(r: dict, scale: float = 1.0) -> str:
    """'median (p20–p80)' of a row's timing, times `scale`."""
    med = num(r["median_ms"] * scale)
    if isinstance(r.get("p20_ms"), (int, float)) and isinstance(r.get("p80_ms"), (int, float)):
        return f"{med} ({num(r['p20_ms'] * scale)}–{num(r['p80_ms'] * scale)})"
    return med


def speedup_cell(r: dict, ref: dict | None) -> str:
    """'1.8x (1.6–2.0)', or 'no difference (0.90–1.3)' when the spreads or the row's
    noise floor cannot tell the two apart; the reference row itself reads '1 (baseline)'
    (sparsekern.reporting.ratio_text writes every cell).

    A row that carries its own comparison (sparsekern.bench.common.compare: `speedup`,
    `speedup_p20`/`speedup_p80` of the per-round paired ratios, `verdict`) is shown as the
    benchmark judged it; otherwise the ratio of medians, the range the two p20-p80 spreads
    allow, and "no difference" when that range contains 1 or the difference is within the
    row's noise floor (`noise_floor` / `noise_floor_rel`: relative, `noise_floor_ms`)."""
    if ref is r or r.get("variant") == r.get("baseline", object()):
        return ratio_text(1.0, "baseline")
    if "verdict" in r and all(isinstance(r.get(k), (int, float)) for k in ("speedup_p20", "speedup_p80")):
        return ratio_text(r.get("speedup", r.get("speedup_vs_dense")), r["verdict"], r["speedup_p20"],
                          r["speedup_p80"])
    if ref is None:
        x = r.get("speedup_vs_dense")
        return f"{ratio_text(x)} (no spread: reference row not found)" if isinstance(x, (int, float)) else ""
    x = ref["median_ms"] / r["median_ms"]
    lo = hi = None
    if all(isinstance(d.get(k), (int, float)) and d.get(k) > 0 for d in (r, ref) for k in ("p20_ms", "p80_ms")):
        lo, hi = ref["p20_ms"] / r["p80_ms"], ref["p80_ms"] / r["p20_ms"]
    inside = lo is not None and lo <= 1 <= hi
    for key in ("noise_floor_rel", "noise_floor"):
        floor_rel = r.get(key)
        if isinstance(floor_rel, (int, float)) and abs(x - 1) <= floor_rel:
            inside = True
    floor_ms = r.get("noise_floor_ms")
    if isinstance(floor_ms, (int, float)) and abs(ref["median_ms"] - r["median_ms"]) <= floor_ms:
        inside = True
    return ratio_text(x, "no difference" if inside else None, lo, hi)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pattern_text(r: dict) -> str:
    p, d = r.get("pattern"), r.get("density")
    if p == "dense" and r.get("cell_pattern"):  # dense timed again inside a pattern's loop
        p, d = r["cell_pattern"], r.get("cell_density")
    if not p:
        return ""
    if isinstance(d, (int, float)) and d < 1 and p != "dense":
        return f"{p}, {d:.0%} kept"
    return str(p)


def op_of(r: dict) -> str:
    """The sparsekern op a kernel row ran. The suite writes op 'linear' and the pattern: the
    op is the one the pattern's format declares (sparsekern.kinds, formats' OP); 'linear'
    for dense or a pattern no kind reads."""
    if r.get("op") != "linear":
        return str(r.get("op"))
    from sparsekern import kinds

    try:
        fmt = kinds.parse(str(r.get("pattern", ""))).entry.format
    except (TypeError, ValueError):
        return "linear"
    return getattr(fmt, "OP", "") or "linear"


LABELS = {"shape": "weight (out x in)", "model_shape": "case", "dtype": "dtype"}


def common_fields(rows: list[dict], keys: list[str]) -> tuple[list[str], str]:
    """The keys whose value differs between rows, and a caption naming those that do not."""
    varying, same = [], []
    for k in keys:
        vals = {json.dumps(r.get(k), sort_keys=True) for r in rows}
        if len(vals) > 1:
            varying.append(k)
        elif rows and rows[0].get(k) is not None:
            same.append(f"{LABELS.get(k, k)} {rows[0][k]}")
    return varying, ("All rows: " + ", ".join(same) + ".") if same else ""


# ------------------------------------------------------------------------------ kinds
def _dense_ref(rows: list[dict], i: int) -> dict | None:
    """The dense row timed with rows[i]: same shape, batch and dtype, nearest before it
    (dense is timed first beside each pattern), else the one its speed-up points to."""
    r = rows[i]
    key = (r.get("shape"), r.get("batch"), r.get("dtype"))
    cands = [(j, d) for j, d in enumerate(rows) if row_kind(d) == "kernel" and d.get("provider") in DENSE_PROVIDERS
             and (d.get("shape"), d.get("batch"), d.get("dtype")) == key]
    if not cands:
        return None
    x = r.get("speedup_vs_dense")
    if isinstance(x, (int, float)) and x > 0:
        want = x * r["median_ms"]
        best = min(cands, key=lambda c: abs(c[1]["median_ms"] - want))[1]
        if abs(best["median_ms"] - want) <= 1e-6 * max(1.0, want):
            return best
    before = [d for j, d in cands if j < i]
    return before[-1] if before else cands[0][1]


def render_kernels(run: Run) -> str:
    rows = run.rows
    idx = [i for i, r in enumerate(rows) if row_kind(r) == "kernel"]
    pairs, used = [], set()
    for i in idx:
        r = rows[i]
        if r.get("provider") in DENSE_PROVIDERS:
            continue
        ref = _dense_ref(rows, i)
        if ref is not None:
            used.add(id(ref))
        pairs.append((r, ref))
    for i in idx:  # dense rows nobody was compared with still get their line
        if rows[i].get("provider") in DENSE_PROVIDERS and id(rows[i]) not in used:
            pairs.append((rows[i], rows[i]))
    ks = ["shape", "model_shape", "dtype"]
    varying, caption = common_fields([r for r, _ in pairs], ks)
    conv = all(op_of(r) in ("conv2d", "nm_conv2d") for r, _ in pairs)
    labels = {**LABELS, "shape": "convolution (in->out, kernel/stride @ input)"} if conv else LABELS
    dense = "cuBLAS" if any(ref is not None and ref.get("provider") == "cublas" for _, ref in pairs) else "dense"
    header = [labels.get(k, k) for k in varying] + ["pattern", "batch", "provider", "ms, median (p20–p80)",
                                                    f"{dense} ms, same run", f"x {dense}"]
    floor = any(isinstance(r.get("noise_floor"), (int, float)) for r, _ in pairs)
    if floor:
        header.append("noise floor")
    eager = any("eager_us" in r for r, _ in pairs)  # GPU: graph-replay time above, per-call time here
    if eager:
        header.append("eager ms (with launch)")
    out = []
    for r, ref in pairs:
        prov = r.get("provider", "")
        if prov == "sparsekern":
            prov = f"sparsekern `{op_of(r)}`"
        elif prov in ("cuda", "triton", "cusparselt", "cutlass"):
            prov = f"sparsekern `{op_of(r)}` ({prov})"
        out.append([str(r.get(k, "")) for k in varying] +
                   [pattern_text(r), str(r.get("batch", "")), prov, spread(r),
                    spread(ref) if ref is not None else "", speedup_cell(r, ref)] +
                   ([f"{r['noise_floor']:.1%}" if isinstance(r.get("noise_floor"), (int, float)) else ""]
                    if floor else []) +
                   ([num(r["eager_us"] / 1e3) if isinstance(r.get("eager_us"), (int, float)) else ""] if eager else []))
    return f"{caption}\n\n{table(header, out)}".strip()


# A model variant whose name starts with one of these is a peer: what a user would run
# instead of sparsekern ("dense channels-last", "dense bf16", "torch int8 dynamic"), timed in
# the same loop; new peers show up in every table without a change here.
PEER_PREFIXES = ("dense", "torch")


def variant_role(r: dict) -> str:
    """A model row's role: 'baseline' (what x dense divides by), 'repeat' (the baseline timed
    again, for the noise floor), 'peer' (named PEER_PREFIXES, or a row with a `peer` field:
    sparsekern.bench.peers) or 'sparse' (a sparsekern variant)."""
    v = str(r.get("variant", ""))
    if v == r.get("baseline", "dense"):
        return "baseline"
    if v.endswith("(again)"):
        return "repeat"
    return "peer" if r.get("peer") or v.startswith(PEER_PREFIXES) else "sparse"


def render_models(run: Run) -> str:
    rows = run.of("model")
    dense = {(r.get("model"), r.get("metric"), r.get("batch")): r for r in rows
             if r.get("variant") == r.get("baseline", "dense")}
    extra = [("noise floor", "noise_floor", lambda v: f"{v:.1%}"),
             ("noise floor", "noise_floor_rel", lambda v: f"{v:.1%}"),
             ("sparse layers", "sparse_layers", lambda v: str(v)),
             ("params MiB", "param_bytes", lambda v: num(v / 2**20)),
             # kept beside the params after the run: derived kernel indexes, dense copies
             ("held MiB", "held_bytes", lambda v: num(v / 2**20)),
             ("how the sparse layers ran", "paths", lambda v: str(v))]
    extra = [e for e in extra if any(r.get(e[1]) is not None for r in rows)]
    header = ["model", "variant", "metric", "batch", "ms per call, median (p20–p80)", "value", "x dense"] + \
             [e[0] for e in extra]
    out = []
    for r in rows:
        ref = dense.get((r.get("model"), r.get("metric"), r.get("batch")))
        val = r.get("value")
        val_s = num(val) if isinstance(val, (int, float)) else ""
        if val_s and all(isinstance(r.get(k), (int, float)) for k in ("value_p20", "value_p80")):
            val_s += f" ({num(r['value_p20'])}–{num(r['value_p80'])})"
        out.append([str(r.get("model", "")), str(r.get("variant", "")), str(r.get("metric", "")),
                    str(r.get("batch", "")), spread(r) if "median_ms" in r else "", val_s,
                    speedup_cell(r, ref) if "median_ms" in r and (ref is None or "median_ms" in ref) else ""] +
                   [fmt(r[k]) if r.get(k) is not None else "" for _, k, fmt in extra])
    descs = {r["model"]: r["model_desc"] for r in rows if r.get("model_desc")}
    notes = "\n".join(f"- {m}: {d}" for m, d in descs.items())
    return table(header, out) + (f"\n\nModels:\n\n{notes}" if notes else "")


def render_overhead(run: Run) -> str:
    rows = run.of("overhead")
    ops_seen = list(dict.fromkeys(r["op"] for r in rows))
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if not p.startswith("ops overhead")]
    header = ["op (backend)"] + [f"{p}, µs" for p in provs] + ["ops − kernel, µs", "noise floor, µs", "verdict"]
    out = []
    for op in ops_seen:
        mine = {r["provider"]: r for r in rows if r["op"] == op}
        over = next((r for p, r in mine.items() if p.startswith("ops overhead")), None)
        backend = next(iter(mine.values())).get("backend", "")
        cells = [f"`{op}` ({backend})"] + [spread(mine[p], 1e3) if p in mine else "" for p in provs]
        if over is not None:
            floor = over.get("noise_floor_ms")
            within = isinstance(floor, (int, float)) and abs(over["median_ms"]) <= floor
            cells += [spread(over, 1e3), num(floor * 1e3) if isinstance(floor, (int, float)) else "",
                      "no difference: within the noise floor" if within else "overhead above the noise floor"]
        else:
            cells += ["", "", ""]
        out.append(cells)
    shape = rows[0].get("shape") if rows else None
    cap = (f"All rows: weight {shape[0]}x{shape[1]} (out x in), batch {rows[0].get('batch')}, "
           f"{rows[0].get('dtype')}. ") if isinstance(shape, list) and len(shape) == 2 else ""
    return f"{cap.rstrip()}\n\n{table(header, out)}".strip()


def render_quality(run: Run) -> str:
    """Per model and metric, methods against patterns; rows without a pattern (an allocation
    comparison: allocation, target, achieved sparsity) as a plain table of their fields."""
    rows = run.of("quality")
    parts = []
    plain = [r for r in rows if "pattern" not in r]
    rows = [r for r in rows if "pattern" in r]
    for model, metric in dict.fromkeys((r["model"], r["metric"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["metric"] == metric]
        fmt = (lambda v: f"{v:.1f}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
        dense = [r for r in mine if r["method"] == "dense"]
        patterns = list(dict.fromkeys(r["pattern"] for r in mine if r["method"] != "dense"))
        methods = list(dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"))
        cell = {(r["method"], r["pattern"]): r["value"] for r in mine}
        title = f"**{model}**, {metric.replace('_', ' ')}"
        if dense:
            title += f" (dense {fmt(dense[0]['value'])})"
        parts.append(title + "\n\n" + table(["method"] + patterns, [
            [m] + [fmt(cell[(m, p)]) if (m, p) in cell else "" for p in patterns] for m in methods]))
    if plain:
        parts.append(rows_table(plain))
    return "\n\n".join(parts)


def render_masks(run: Run) -> str:
    rows = run.of("mask")
    out = []
    for r in rows:
        ref = next((d for d in rows if d["op"] == r["op"] and d.get("provider") == "torch.eager"), None)
        note = f" ({r['note']})" if r.get("note") else ""
        out.append([f"`{r['op']}`", str(r.get("provider", "")) + note, str(r.get("shape", "")), spread(r),
                    speedup_cell(r, ref) if ref is not None else ""])
    return table(["op", "provider", "shape", "ms, median (p20–p80)", "x torch.eager"], out)


def render_masked(run: Run) -> str:
    rows = run.of("masked")
    out = []
    for r in rows:
        ref = next((d for d in rows if d["op"] == r["op"] and d.get("provider") == "dispatched"), None)
        out.append([f"`{r['op']}`", str(r.get("provider", "")), str(r.get("shape", "")), str(r.get("batch", "")),
                    spread(r), speedup_cell(r, ref) if ref is not None else ""])
    return table(["op", "provider", "shape", "rows", "ms, median (p20–p80)", "x dispatched"], out)


def render_e2e(run: Run) -> str:
    rows = run.of("e2e")
    out = [[str(r.get("op", "")), str(r.get("provider", "")), str(r.get("shape", "")), str(r.get("dtype", "")),
            num(r["prefill_tok_per_s"]) if "prefill_tok_per_s" in r else "",
            num(r["decode_tok_per_s"]) if "decode_tok_per_s" in r else ""] for r in rows]
    return ("Medians of a few calls, no spread recorded.\n\n" +
            table(["model", "variant", "shape", "dtype", "prefill tokens/s", "decode tokens/s"], out))


def render_other(run: Run, kind: str) -> str:
    return rows_table(run.of(kind))


def rows_table(rows: list[dict], meta: bool = False) -> str:
    """Rows of any shape as a plain table of their fields (the run's metadata left out unless
    `meta`); a long per-layer dict or list reads as its number of entries (the JSON has them)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if meta or k not in META_KEYS]

    def cell(v):
        if isinstance(v, float):
            return num(v)
        if isinstance(v, (dict, list)) and len(json.dumps(v)) > 120:
            return f"{len(v)} entries (in the JSON)"
        return "" if v is None else str(v)
    return table(keys, [[cell(r.get(k)) for k in keys] for r in rows])


def render_errors(run: Run) -> str:
    rows = run.of("error")
    if not rows:
        return ""
    lines = []
    for r in rows:
        what = " ".join(str(r[k]) for k in ("model", "variant", "op", "provider", "pattern", "shape", "batch")
                        if r.get(k) not in (None, "", "-"))
        lines.append(f"- {what}: {r['error']}")
    return "Did not run:\n\n" + "\n".join(lines)


NOISE_NOTE = ("x dense = dense median / this median, both from the same run. In brackets: for runs timed "
              "interleaved with dense twice, the p20–p80 of the per-round ratios; for older runs, the range the "
              "two p20–p80 spreads allow. The row reads \"no difference\" when that range contains 1 or the "
              "ratio is within the run's noise floor (the two dense timings' difference).")

RENDER = [("kernel", "Kernels", render_kernels), ("model", "Models", render_models),
          ("overhead", "Per-call overhead", render_overhead), ("mask", "Mask generation", render_masks),
          ("masked", "Masked training", render_masked), ("e2e", "End to end", render_e2e),
          ("quality", "One-shot pruning quality", render_quality)]


def render_run(run: Run, kind: str | None = None, heading: str = "") -> str:
    """One run: the caption, then each kind of row it holds (or only `kind`)."""
    parts = [run.caption()]
    kinds = [k for k in RENDER if kind in (None, k[0]) and run.of(k[0])]
    for k, title, fn in kinds:
        if kind is None:
            parts.append(f"{heading}{title}")
        parts.append(fn(run))
    if kind is None:
        for other in ("other", "note"):
            if run.of(other):
                parts.append(f"{heading}Other rows" if other == "other" else f"{heading}Notes")
                if run.flat:  # records of different shapes: a table per shape
                    shapes = dict.fromkeys(tuple(r) for r in run.of(other))
                    parts += [rows_table([r for r in run.of(other) if tuple(r) == s], meta=True) for s in shapes]
                else:
                    parts.append(render_other(run, other))
    errs = render_errors(run)
    if errs and (kind is None or any(_error_kind(r) == kind for r in run.of("error"))):
        parts.append(errs)
    return "\n\n".join(p for p in parts if p)


def _error_kind(r: dict) -> str:
    return row_kind({k: v for k, v in r.items() if k != "error"} | {"median_ms": 0.0})


# ------------------------------------------------------------------------------ tables
def t_cpu_kernels(runs):
    """bench_cpu_linear.py's run (cpu-linear-* folders), else the newest CPU run with kernel rows."""
    named = [r for r in runs if re.match(r"bench/results/cpu-linear-", r.path)]
    run = newest(named, "kernel", False) or newest(runs, "kernel", False)
    if run is None:
        return "No CPU kernel results yet."
    return f"{render_run(run, 'kernel')}\n\n{NOISE_NOTE}"


def t_cpu_kernels_avx2(runs):
    """bench_cpu_linear.py pinned to AVX2 (cpu-avx2-linear-* folders): the kernels' and MKL's
    AVX2 code paths, as on AVX2-only CPUs."""
    run = newest([r for r in runs if re.match(r"bench/results/cpu-avx2-linear-", r.path)], "kernel", False)
    if run is None:
        return "No AVX2 kernel results yet."
    return f"{render_run(run, 'kernel')}\n\n{NOISE_NOTE}"


def t_cpu_conv(runs):
    """bench_cpu_conv.py's run (cpu-conv-* folders): ResNet-50's convolutions."""
    run = newest([r for r in runs if re.match(r"bench/results/cpu-conv-", r.path)], "kernel", False)
    if run is None:
        return "No CPU convolution results yet."
    return f"{render_run(run, 'kernel')}\n\n{NOISE_NOTE}"


def t_cpu_models(runs):
    run = newest(runs, "model", False)
    if run is None:
        return "No model-level CPU results yet."
    return f"{render_run(run, 'model')}\n\n{NOISE_NOTE.replace('x dense', 'x dense (time per call)')}"


# Issue 14's CPU goals: (what, setting, target x dense, source, row filter). Sources: "models"
# (newest full model-level CPU run), "linear" (newest cpu-linear-* run), "gemm-avx2" (newest
# goal_b128_mkl_avx2.json: MKL and the kernels restricted to AVX2, the configuration).
CPU_GOALS = [
    ("Llama decode, batch 1", "2:4", 1.7, "models", dict(model="llama", metric="decode_tokens_per_s", variant="2:4")),
    ("Llama decode, batch 1", "unstructured 70%", 2.2, "models",
     dict(model="llama", metric="decode_tokens_per_s", variant="unstructured 70%")),
    ("Llama decode, batch 1", "unstructured 90%", 4.0, "models",
     dict(model="llama", metric="decode_tokens_per_s", variant="unstructured 90%")),
    ("Llama prefill 128", "2:4", 1.2, "models", dict(model="llama", metric="prefill_tokens_per_s", variant="2:4")),
    ("Llama prefill 128", "unstructured 70%", 0.97, "models",
     dict(model="llama", metric="prefill_tokens_per_s", variant="unstructured 70%")),
    ("Llama prefill 128", "unstructured 90%", 1.5, "models",
     dict(model="llama", metric="prefill_tokens_per_s", variant="unstructured 90%")),
    ("ViT-Base, batch 4", "2:4", 1.2, "models", dict(model="vit_base_patch16_224", variant="2:4")),
    ("ResNet-50, batch 4", "2:4", 1.2, "models", dict(model="resnet50", variant="2:4")),
    # The same rows against the dense model laid out channels-last (a peer a CPU user can pick;
    # sparsify() lays out a swapped model's dense convolutions so): how much of the goal's
    # figure is the layout, not the sparsity.
    ("ResNet-50, batch 4, against dense channels-last", "2:4", 1.2, "models",
     dict(model="resnet50", variant="2:4", against="dense channels-last")),
    ("kernel 4096x4096, batch 128, AVX2", "2:4", 1.3, "gemm-avx2", dict(provider="cpp.nm24_gemm", batch=128)),
    ("kernel 4096x4096, batch 128", "unstructured 70%", 1.0, "linear",
     dict(provider="sparsekern", pattern="unstructured", density=0.3, batch=128)),
    ("kernel 4096x4096, batch 1", "unstructured 90%", 4.0, "linear",
     dict(provider="sparsekern", pattern="unstructured", density=0.1, batch=1)),
    ("kernel 4096x4096, batch 1, against torch CSR", "unstructured 90%", 2.0, "linear",
     dict(provider="sparsekern", pattern="unstructured", density=0.1, batch=1, against="torch.csr")),
    ("kernel 4096x4096, batch 1", "unstructured 70%", 2.0, "linear",
     dict(provider="sparsekern", pattern="unstructured", density=0.3, batch=1)),
]


def _over_peer(r: dict, p: dict) -> tuple[float, float, float]:
    """Row r's speed-up over peer p of the same run: the ratio of their speed-ups over dense,
    and r's p20 and p80 over p's median."""
    s = p["speedup"]
    return r["speedup"] / s, r.get("speedup_p20", r["speedup"]) / s, r.get("speedup_p80", r["speedup"]) / s


def _goal_sources(runs) -> dict:
    model = newest(runs, "model", False)
    linear = next((r for r in runs if re.match(r"bench/results/cpu-linear-", r.path)), None)
    gemm = next((r for r in runs if os.path.basename(r.path) == "goal_b128_mkl_avx2.json"), None)
    return {"models": model, "linear": linear, "gemm-avx2": gemm}


def t_cpu_goals(runs):
    src = _goal_sources(runs)
    out = ["| goal | pattern | target | measured x dense (p20–p80) | verdict | run |", "|---|---|---|---|---|---|"]
    for what, pattern, target, source, flt in CPU_GOALS:
        run = src[source]
        flt = dict(flt)
        against = flt.pop("against", None)
        rows = [] if run is None else [r for r in run.rows if "speedup" in r and all(r.get(k) == v for k, v in flt.items())]
        if not rows:
            out.append(f"| {what} | {pattern} | ≥ {target:g}x | not measured | — | — |")
            continue
        r = rows[0]
        s, lo, hi = r["speedup"], r.get("speedup_p20", r["speedup"]), r.get("speedup_p80", r["speedup"])
        where = f"`{os.path.dirname(run.path)}`"
        if against:
            # the peer: a kernel run's provider, or a model run's variant, in the same cell
            peer = [p for p in run.rows if against in (p.get("provider"), p.get("variant")) and "speedup" in p and all(
                p.get(k) == r.get(k) for k in ("pattern", "density", "batch", "shape", "model", "metric"))]
            if not peer:
                out.append(f"| {what} | {pattern} | ≥ {target:g}x | not measured | — | {where} |")
                continue
            s, lo, hi = _over_peer(r, peer[0])
        verdict = "met" if s >= target else ("not met (no difference from dense)"
                                            if r.get("verdict") == "no difference" and not against else "not met")
        # Three digits: at the tables' two a 1.96x that misses a 2x target would read "2.0x, not met".
        out.append(f"| {what} | {pattern} | ≥ {target:g}x | {ratio_text(s, None, lo, hi, digits=3)} | {verdict} "
                   f"| {where} |")
    # Never slower: every sparse model row of the model run, against 0.97x.
    run = src["models"]
    if run is not None:
        model_rows = [r for r in run.of("model") if "speedup" in r and variant_role(r) == "sparse"]
        below = [r for r in model_rows if r["speedup"] < 0.97 and r.get("verdict") != "no difference"]
        worst = min(model_rows, key=lambda r: r["speedup"]) if model_rows else None
        if worst is not None:
            text = (f"lowest {ratio_text(worst['speedup'])} ({worst['model']} {worst['variant']} {worst['metric']})"
                    + (f"; {len(below)} of {len(model_rows)} rows below 0.97x beyond the noise" if below else
                       f"; no row below 0.97x beyond the noise ({len(model_rows)} rows)"))
            out.append(f"| never slower: every model row | all | ≥ 0.97x | {text} | {'not met' if below else 'met'} "
                       f"| `{os.path.dirname(run.path)}` |")
    return ("\n".join(out) + "\n\nMeasured x dense is the ratio of medians from the run named in the last column "
            "(interleaved with dense, p20–p80 of the per-round ratios); against torch CSR or dense channels-last it is "
            "the ratio of the two rows' speed-ups in the same cell. Where a goal is not met, the section after this table says "
            "what limits it.")


def t_cpu_limits(runs):
    """Where each model variant's time goes and its rates against the run's roofs (the
    profile fields the models suite stores from sparsekern.bench.profile)."""
    run = newest(runs, "model", False)
    rows = [] if run is None else [r for r in run.of("model") if r.get("share_other") is not None]
    if not rows:
        return "No model-level CPU run with profiles yet."
    env = run.env
    copy_gbs, peak, gemm = env.get("copy_gbs"), env.get("fma_peak_gflops"), env.get("gemm_gflops")

    def pct(v, roof):
        return f" ({v / roof:.0%})" if v is not None and roof else ""

    out = []
    for r in rows:
        gbs, gfs = r.get("weight_gb_per_s"), r.get("layer_gflop_per_s")
        out.append([str(r["model"]), str(r["metric"]), str(r["variant"]), num(r["median_ms"]),
                    *(f"{r['share_' + c]:.0%}" for c in ("sparse", "gemm", "attention", "other")),
                    num(r["weight_bytes"] / 2**20), f"{num(gbs)}{pct(gbs, copy_gbs)}" if gbs is not None else "",
                    num(2 * r["kept_macs"] / 1e9),
                    f"{num(gfs)}{pct(gfs, peak)}" if gfs is not None else ""])
    roofs = (f"copy bandwidth {num(copy_gbs)} GB/s (bytes read + written), FMA peak "
             f"{num(peak) if peak else 'not measured'} GFLOP/s ({env.get('fma_lanes')} fp32 lanes), dense torch GEMM "
             f"(torch.mm 2048^3) {num(gemm)} GFLOP/s, {env.get('roof_threads', env.get('threads'))} threads"
             if copy_gbs and gemm else "roofs not measured")
    return (table(["model", "workload", "variant", "ms per call", "in sparse ops", "in dense GEMM/conv",
                   "in attention", "other", "weight MiB read per call", "weight GB/s (of copy)",
                   "layer GFLOP per call (kept)", "layer GFLOP/s (of FMA peak)"], out) +
            f"\n\nFrom `{os.path.dirname(run.path)}` ({run.caption()}). Roofs measured at the start of that run: "
            f"{roofs}. Shares: one call under torch.profiler, the outermost operator of each kind (sparse: "
            "sparsekern's operators, decompress included; dense GEMM/conv: aten linear, mm, addmm, convolution; "
            "attention: scaled-dot-product attention, bmm, softmax; other: the rest of the wall time: norms, "
            "activations, copies, Python and the profiler's own overhead). Weight MiB: what the layers' stored "
            "weights hold, read once per layer call (formats' bytes; derived indexes such as pre-packed panels "
            "not counted); GB/s over the whole call's median. Layer GFLOP: 2 x the kept multiply-adds of every "
            "Linear and convolution (attention's products not counted); GFLOP/s over the time in the sparse and "
            "dense GEMM/conv shares of the median.")


# Issue 28's compression goals, each against a peer timed in the same run: (workload,
# sparsekern variant, peer variant, target, model-row filter). The models suite times them.
COMPRESSION_MODEL_GOALS = [
    ("Llama decode, batch 1", "2:4 int8", "torch int8 dynamic", 1.5, dict(model="llama", metric="decode_tokens_per_s")),
    ("Llama decode, batch 1", "unstructured 70% int8", "torch int8 dynamic", 2.0,
     dict(model="llama", metric="decode_tokens_per_s")),
    ("Llama decode, batch 1", "2:4 int4 g128", "torch int8 dynamic", 2.2, dict(model="llama", metric="decode_tokens_per_s")),
    ("Llama prefill 128", "2:4 int8", "torch int8 dynamic", 1.2, dict(model="llama", metric="prefill_tokens_per_s")),
    ("Llama prefill 128, bf16 model", "2:4 (bf16 model)", "dense bf16", 1.3,
     dict(model="llama", metric="prefill_tokens_per_s")),
    ("ViT-B/16, batch 4, bf16 model", "2:4 (bf16 model)", "dense bf16", 1.3, dict(model="vit_base_patch16_224")),
    ("ResNet-50, batch 4, bf16 model", "2:4 (bf16 model)", "dense bf16 channels-last", 1.2, dict(model="resnet50")),
    ("ViT-B/16, batch 4", "2:4 int8", "torch int8 dynamic", 1.2, dict(model="vit_base_patch16_224")),
]
COMPRESSION_BYTES_TARGET = 0.9  # every Llama decode row's weight bytes per second over torch int8 dynamic's


def _newest_with(runs, pred, quick_ok: bool = False):
    """The newest full CPU run at the default threading with a row that pred accepts, and
    those rows (one-core-busy rows never count: the goals are quiet). quick_ok: a --quick run
    counts too (the demo's MiniLM is the real model at every size; --quick calibrates on fewer
    sentences)."""
    for run in runs:
        if run.gpu or (run.quick and not quick_ok) or not run.default_threading:
            continue
        rows = [r for r in run.rows if r.get("load", "quiet") == "quiet" and pred(r)]
        if rows:
            return run, rows
    return None, []


def _rates_text(r: dict, env: dict) -> str:
    """A model row's weight bytes per second and layer multiply-add rate against its run's roofs."""
    parts = []
    gbs, gfs = r.get("weight_gb_per_s"), r.get("layer_gflop_per_s")
    if gbs is not None:
        copy = env.get("copy_gbs")
        parts.append(f"weights {num(gbs)} GB/s" + (f" ({gbs / copy:.0%} of copy)" if copy else ""))
    if gfs is not None:
        peak = env.get("fma_peak_gflops")
        parts.append(f"layers {num(gfs)} GFLOP/s" + (f" ({gfs / peak:.0%} of the fp32 FMA peak)" if peak else ""))
    return "; ".join(parts)


def t_compression_goals(runs):
    """Issue 28's goals: each against the newest committed run that measures it (generated)."""
    out = ["| workload | sparsekern | against | goal | measured (p20–p80) | verdict | rates of the sparsekern row | run |",
           "|---|---|---|---|---|---|---|---|"]

    def line(what, variant, peer, goal, measured, met, rates, run):
        where = f"`{os.path.dirname(run.path)}`" if run is not None else "—"
        out.append(f"| {what} | {variant} | {peer} | {goal} | {measured} | "
                   f"{'—' if met is None else ('met' if met else 'not met')} | {rates} | {where} |")

    for what, variant, peer, target, flt in COMPRESSION_MODEL_GOALS:
        def is_cell(r, name, flt=flt):
            return row_kind(r) == "model" and r.get("variant") == name and "speedup" in r and all(
                r.get(k) == v for k, v in flt.items())
        run, rows = _newest_with(runs, lambda r: is_cell(r, variant))
        peers = [p for p in (run.rows if run else []) if is_cell(p, peer) and p.get("load", "quiet") == "quiet"
                 and p.get("metric") == rows[0].get("metric")] if rows else []
        if not rows or not peers:
            line(what, variant, peer, f"≥ {target:g}x", "not measured", None, "", run)
            continue
        r, p = rows[0], peers[0]
        s, lo, hi = _over_peer(r, p)
        rates = _rates_text(r, run.env)
        if str(r.get("metric", "")).startswith("decode") and r.get("weight_bytes") and p.get("weight_bytes"):
            # Memory-bound: the ratio of weight bytes read is the speed-up at the peer's bytes per second.
            share = r["weight_bytes"] / p["weight_bytes"]
            rates += (f"; reads {share:.2f} of the peer's weight bytes, so {ratio_text(1 / share, digits=3)} at "
                      "the peer's bytes per second")
        if r.get("share_sparse") is not None and r["share_sparse"] < 1:
            # Amdahl: what the rest of the model (attention, norms, dense layers, Python) allows.
            rates += (f"; {r['share_sparse']:.0%} of its time in sparse layers, so "
                      f"{ratio_text(s / (1 - r['share_sparse']), digits=3)} the peer if they took none")
        line(what, variant, peer, f"≥ {target:g}x", ratio_text(s, None, lo, hi, digits=3), s >= target, rates, run)

    # Weight bytes per second of every sparsekern row of the Llama decode, over the peer's.
    run, rows = _newest_with(runs, lambda r: row_kind(r) == "model" and r.get("model") == "llama" and r.get(
        "metric") == "decode_tokens_per_s" and r.get("weight_gb_per_s") is not None)
    peer = [r for r in rows if r.get("variant") == "torch int8 dynamic"]
    mine = [r for r in rows if variant_role(r) == "sparse"]
    if peer and mine:
        ref = peer[0]["weight_gb_per_s"]
        worst = min(mine, key=lambda r: r["weight_gb_per_s"])
        best = max(mine, key=lambda r: r["weight_gb_per_s"])
        below = [r for r in mine if r["weight_gb_per_s"] / ref < COMPRESSION_BYTES_TARGET]
        copy = run.env.get("copy_gbs")
        line("Llama decode, batch 1: weight bytes per second", f"every row ({len(mine)})", "torch int8 dynamic",
             f"≥ {COMPRESSION_BYTES_TARGET:g}x", f"{worst['weight_gb_per_s'] / ref:.2f}x ({worst['variant']}) to "
             f"{best['weight_gb_per_s'] / ref:.2f}x ({best['variant']}); {len(below)} of {len(mine)} rows below",
             not below,
             f"torch int8 dynamic {num(ref)} GB/s" + (f" ({ref / copy:.0%} of copy {num(copy)} GB/s)" if copy else ""),
             run)
    else:
        line("Llama decode, batch 1: weight bytes per second", "every row", "torch int8 dynamic",
             f"≥ {COMPRESSION_BYTES_TARGET:g}x", "not measured", None, "", None)

    # The real MiniLM at 16 sentences (the demo's rows: `method` names the variant).
    def minilm(r, method):
        return r.get("model") == "all-MiniLM-L6-v2" and r.get("method") == method and r.get(
            "workload") == "16 sentences" and "speedup" in r
    run, rows = _newest_with(runs, lambda r: minilm(r, "2:4 + int8 joint sparsegpt"), quick_ok=True)
    peers = [p for p in (run.rows if run else []) if minilm(p, "torch int8 dynamic")]
    if rows and peers:
        r, p = rows[0], peers[0]
        s, lo, hi = _over_peer(r, p)
        line("real MiniLM, 16 sentences", "2:4 + int8, joint SparseGPT", "torch int8 dynamic", "≥ 1.3x",
             ratio_text(s, None, lo, hi, digits=3), s >= 1.3, "", run)
    else:
        line("real MiniLM, 16 sentences", "2:4 + int8, joint SparseGPT", "torch int8 dynamic", "≥ 1.3x",
             "not measured", None, "", None)

    # Quality and stored bytes: the quality suite's compression run (held-out cosine to dense).
    def quality(method):
        return lambda r: r.get("op") == "quality" and r.get("method") == method and r.get("pattern") == "2:4"
    run, joint8 = _newest_with(runs, quality("sparsegpt+int8 joint"))
    fp32 = [r for r in (run.rows if run else []) if quality("sparsegpt (modules)")(r)]
    if joint8 and fp32:
        loss = fp32[0]["value"] - joint8[0]["value"]
        line("real MiniLM, quality (held-out cosine)", "2:4 + int8, joint SparseGPT", "2:4 fp32, same calibration",
             "loses ≤ 0.01", f"{'loses' if loss > 0 else 'gains'} {abs(loss):.4f} ({joint8[0]['value']:.4f} against "
             f"{fp32[0]['value']:.4f})",
             loss <= 0.01, "", run)
    run, joint4 = _newest_with(runs, quality("sparsegpt+int4 g128 joint"))
    if joint4:
        line("real MiniLM, quality (held-out cosine)", "2:4 + int4 (group 128), joint SparseGPT", "—", "≥ 0.82",
             f"{joint4[0]['value']:.4f}", joint4[0]["value"] >= 0.82, "", run)
    for method, name, target in (("sparsegpt+int8 joint", "2:4 + int8", 0.17),
                                 ("sparsegpt+int4 g128 joint", "2:4 + int4 (group 128)", 0.10)):
        run, rows = _newest_with(runs, lambda r, m=method: quality(m)(r) and r.get("stored_over_fp32") is not None)
        if rows:
            v = rows[0]["stored_over_fp32"]
            line("stored bytes of the pruned layers (what a checkpoint holds)", name, "the same layers in fp32",
                 f"≤ {target:g}x", f"{v:.3f}x", v <= target, "", run)

    # Resident memory of ViT-B/16 after batches 1, 4 and 64 (the memory suite, a fresh process each):
    # sparsified in the serving process, and loaded there from a checkpoint another process saved.
    for variant, label, target in (("2:4", "2:4", 0.65), ("2:4 int8", "2:4 int8", 0.35),
                                   ("2:4 loaded", "2:4, loaded from its checkpoint", 0.65),
                                   ("2:4 int8 loaded", "2:4 int8, loaded from its checkpoint", 0.35)):
        run, rows = _newest_with(runs, lambda r, v=variant: r.get("op") == "memory" and r.get("variant") == v and r.get(
            "resident_over_dense") is not None)
        if rows:
            r = rows[0]
            spread = ""
            if len(r.get("resident_mb_each") or ()) > 1:
                spread = (f"; median of {len(r['resident_mb_each'])} processes, "
                          f"{num(min(r['resident_mb_each']))}–{num(max(r['resident_mb_each']))} MB")
            steady = (f"; after three more batches of 64, {r['steady_over_dense']:.3f}x ({num(r['steady_mb'])} MB)"
                      if r.get("steady_over_dense") is not None else "")
            line("resident memory, ViT-B/16 after batches 1, 4, 64", label, "dense fp32", f"≤ {target:g}x",
                 f"{r['resident_over_dense']:.3f}x ({num(r['resident_mb'])} MB{spread}){steady}",
                 r["resident_over_dense"] <= target and r.get("steady_over_dense", 0) <= target, "", run)
        else:
            line("resident memory, ViT-B/16 after batches 1, 4, 64", label, "dense fp32", f"≤ {target:g}x",
                 "not measured", None, "", None)
    return ("\n".join(out) + "\n\nEach goal against the newest committed CPU run that measures it (a full run at "
            "libgomp's default wait policy; quiet rows), so the rows may come from different runs: the last column "
            "names each. Speed goals are the ratio of the two rows' speed-ups over dense fp32 in the same run (timed "
            "interleaved); the range is the sparsekern row's p20–p80 over the peer's median. Rates: weight bytes "
            "the row's layers read per second, and 2 x their kept multiply-adds per second in the sparse and dense "
            "layer shares of the time, against the run's measured copy bandwidth and fp32 FMA peak (int8 dot "
            "products do four multiply-adds per lane, so an int8 row can pass the fp32 peak). Quality: mean cosine "
            "of the sentence embeddings to the dense model's on held-out text. Stored bytes: the pruned layers' "
            "values, indices and scales over their fp32 weights. Resident memory: the process's resident set above "
            "its baseline after batches 1, 4 and 64, over dense fp32's (`python -m sparsekern bench --suite memory`), "
            "and the most it held after three more batches of 64 (glibc keeps freed heap pages, so one pass can read "
            "low); with several processes per variant, the medians over them (each over dense fp32's median); met "
            "when both are within the goal. \"Loaded from its checkpoint\": the serving process builds the model on "
            "the meta device and `sparsekern.load`s the state dict that another process saved after sparsify.")


def t_cpu_overhead(runs):
    run = newest(runs, "overhead", False)
    if run is None:
        return "No overhead results yet (`python -m sparsekern.bench.overhead --out FILE`)."
    return (f"{render_run(run, 'overhead')}\n\nEach cell: median (p20–p80) per call, all providers timed "
            "interleaved. ops − kernel is what the Python door adds; the noise floor is the median "
            "difference between two identical runs of the kernel in the same loop (kernel, kernel again).")


def t_quality(runs):
    run = newest(runs, "quality", None)
    if run is None:
        return "No quality results yet."
    return (f"{render_run(run, 'quality')}\n\nOne evaluation per cell, no spread measured: a difference of "
            "a few test samples (digits) is not a ranking.")


def t_gpu(runs):
    gpu_runs = [r for r in runs if r.gpu]
    if not gpu_runs:
        return ("No GPU results yet: no results file under `bench/results/` comes from a CUDA device. "
                "`bench/gpu_check.sh OUT_DIR` is the prepared run.")
    run = gpu_runs[0]
    return (f"{render_run(run, heading='#### ')}\n\n{NOISE_NOTE} On the GPU, dense is cuBLAS on the same pruned "
            "weight stored dense (x cuBLAS).")


def run_anchors(runs) -> dict[str, str]:
    """The id of each run's section in docs/RESULTS.md: its folder's name, with the file's
    name after it where a folder holds several results files."""
    folders = [os.path.dirname(r.path) for r in runs]
    out = {}
    for r, folder in zip(runs, folders):
        name = os.path.basename(folder)
        if folders.count(folder) > 1:
            name += "-" + os.path.splitext(os.path.basename(r.path))[0]
        out[r.path] = re.sub(r"[^a-z0-9_-]", "-", name.lower())
    return out


def run_link(run: Run, runs) -> str:
    """A markdown link, from the README, to a run's section of docs/RESULTS.md."""
    anchor = run_anchors(runs)[run.path]
    return f"[{os.path.basename(os.path.dirname(run.path))}](docs/RESULTS.md#{anchor})"


def t_all_results(runs):
    if not runs:
        return "No results files yet."
    ids = run_anchors(runs)
    return "\n\n".join(f'<a id="{ids[r.path]}"></a>\n\n### `{os.path.dirname(r.path)}`\n\n'
                       f"{render_run(r, heading='#### ')}" for r in runs)


def t_summary(runs):
    """The README's one table: per hardware and model (the newest full model-level run of that
    model on each device) and workload, the best sparsekern variant beside every peer the run
    timed (variants named PEER_PREFIXES), each as x dense, the fastest marked, with a link to
    the run. Quiet rows only (a --busy run also times each model with one core busy)."""
    newest: dict = {}
    for run in runs:  # newest first
        if run.quick or not run.default_threading or not run.of("model"):
            continue
        for model in dict.fromkeys(r.get("model") for r in run.of("model")):
            newest.setdefault((run.gpu, run.env.get("device_name") or run.env.get("cpu"), model), run)
    out = []
    models: dict[str, str] = {}
    for (gpu, name, model), run in newest.items():
        th = run.env.get("threads")
        hw = name if gpu else f"{name}, {th} thread{'' if th == 1 else 's'}"
        rows = [r for r in run.of("model") if isinstance(r.get("speedup", r.get("speedup_vs_dense")), (int, float))
                and r.get("model") == model and r.get("load", "quiet") == "quiet"]
        for key in dict.fromkeys((r.get("model"), r.get("metric"), r.get("batch")) for r in rows):
            mine = [r for r in rows if (r.get("model"), r.get("metric"), r.get("batch")) == key]
            sparse = [r for r in mine if variant_role(r) == "sparse"]
            peers = [r for r in mine if variant_role(r) == "peer"]
            if not sparse:
                continue
            best = max(sparse, key=_speedup)
            group = [(best, f"sparsekern {best['variant']}" + (f" (best of {len(sparse)})" if len(sparse) > 1 else ""))]
            group += [(p, f"peer: {p['variant']}") for p in sorted(peers, key=_speedup, reverse=True)]
            fastest = max((r for r, _ in group), key=_speedup)
            for r, label in group:
                out.append([hw, str(key[0]), f"{key[1]}, batch {key[2]}", label, _summary_cell(r),
                            "yes" if r is fastest else "", run_link(run, runs)])
            if best.get("model_desc"):
                models.setdefault(str(key[0]), best["model_desc"])
    if not out:
        return "No model-level results yet."
    gpu_note = ("" if any(gpu for gpu, _, _ in newest) else
                " The GPU runs so far time kernels, not models: [GPU](docs/RESULTS.md#gpu)." if any(r.gpu for r in runs)
                else " No GPU run yet: the CUDA, Triton and 2:4 tensor-core kernels are built, not yet run on a GPU.")
    header = ["hardware", "model", "workload", "variant", "x dense (p20–p80)", "fastest here", "full run"]
    return (table(header, out) +
            "\n\nx dense: the model's dense fp32 time (variant `dense`) over the variant's, timed interleaved in the "
            "same run, with the p20–p80 of the per-round ratios; \"no difference\" where the run cannot tell it from "
            "dense. Each group shows the fastest of sparsekern's variants (the others, the slower ones included, "
            "are in the full run) and every peer the run timed (other ways to run the model: variants named "
            "dense… or torch…); \"fastest here\" is the highest median ratio of the "
            "group, so compare the ranges." + gpu_note +
            ("\n\nModels: " + "; ".join(f"{m}: {d}" for m, d in models.items()) + "." if models else ""))


def t_quality_summary(runs):
    """The README's second table: quality of a real model (cosine to dense on held-out text)
    after sparsekern's one-shot pruning, one-shot + recovery, and an optimize plan, each beside
    the peers the same run measured (rows with a `peer` field, or kind "peer"); per sparsekern
    row, the peers of its run that score higher. Sources: the newest full quality run with a
    recovery row (its one-shot and recovery rows, each method and pattern at its longest budget;
    docs/RESULTS.md keeps every row) and the newest run with a "plan" row."""
    groups = []  # (run, [(row, label, value, is_peer)])
    rec = next((r for r in runs if not r.quick and any("recovery" in str(x.get("method", "")) for x in r.of("quality"))),
               None)
    if rec is not None:
        rows = [x for x in rec.of("quality") if isinstance(x.get("value"), (int, float))]
        # merged runs that calibrated SparseGPT on different numbers of sentences name theirs
        several_cal = len({x.get("calibration") for x in rows if not x.get("peer")}) > 1
        mine = [(x, f"sparsekern {x['method']}, {x.get('pattern', '')}" +
                 (f", calibration {x['calibration']}" if several_cal and x.get("calibration") else "") +
                 (f", {x['steps']} steps" if x.get("steps") else ""),
                 x["value"], False) for x in rows if not x.get("peer") and x.get("method") != "dense"]
        mine = [m for i, m in enumerate(mine) if (m[1], m[2]) not in {(o[1], o[2]) for o in mine[:i]}]  # merged runs
        # of a method, pattern and calibration trained for several budgets (merged runs), the longest budget only
        longest = {}

        def budget_key(row):
            return row["method"], row.get("pattern"), row.get("calibration") if several_cal else None

        for m in mine:
            longest[budget_key(m[0])] = max(longest.get(budget_key(m[0]), 0), m[0].get("steps") or 0)
        mine = [m for m in mine if (m[0].get("steps") or 0) == longest[budget_key(m[0])]]
        peers = [(x, f"peer: {x['peer']}", x["value"], True) for x in rows if x.get("peer")]
        groups.append((rec, mine + peers))
    opt = next((r for r in runs if not r.quick and any(x.get("kind") == "plan" for x in r.rows)), None)
    if opt is not None:
        rows = sorted((x for x in opt.rows if x.get("kind") in ("plan", "peer") and isinstance(x.get("score"), (int, float))),
                      key=lambda x: x["kind"] == "peer")  # sparsekern's plan first, then the peers, as above
        groups.append((opt, [(x, f"sparsekern optimize {x['variant']}" if x["kind"] == "plan" else
                              f"peer: {x['variant']}", x["score"], x["kind"] == "peer") for x in rows]))
    if not groups:
        return "No quality results with recovery or an optimize plan yet."
    out = []
    for run, group in groups:
        for row, label, value, is_peer in group:
            above = [f"{lab[len('peer: '):]} ({value_p:.4f})" for _, lab, value_p, p in group if p and value_p > value]
            out.append([str(row.get("model") or _run_model(run)), label, f"{value:.4f}",
                        "" if is_peer else (", ".join(above) or "none"), _held_out(row, run), run_link(run, runs)])
    header = ["model", "variant", "cosine to dense", "peers of the same run scoring higher", "held-out text",
              "full run"]
    return (table(header, out) +
            "\n\nCosine to dense: mean cosine of the sentence embeddings to the dense fp32 model's on held-out "
            "sentences no step saw (calibration, training and the plan's search used other text); one "
            "evaluation per row, no spread. Compare rows of the same run only: the runs hold out different "
            "sentences. Speed, recovery budget and what each goal asked for: the linked runs.")


def _run_model(run) -> str:
    """The model a run measured, where its rows do not name it (the optimize report)."""
    return str(run.env.get("model") or next((x["model"] for x in run.rows if x.get("model")), "") or
               "not in the JSON (the run's README names it)")


def _held_out(row: dict, run) -> str:
    n = row.get("eval") or run.env.get("held_out_sentences")
    return f"{n} sentences" if n else ""


def _speedup(r: dict) -> float:
    return r.get("speedup", r.get("speedup_vs_dense"))


def _summary_cell(r: dict) -> str:
    if all(isinstance(r.get(k), (int, float)) for k in ("speedup_p20", "speedup_p80")):
        return ratio_text(_speedup(r), r.get("verdict"), r["speedup_p20"], r["speedup_p80"], digits=3)
    return ratio_text(_speedup(r), r.get("verdict"), digits=3)


def t_ops(runs):
    sys.path.insert(0, ROOT)
    from sparsekern import ops
    from sparsekern.patterns import NM_GROUP_SIZES

    blocks = _triton_blocks()
    fam = {"nm24_pack_panels": "2:4 (pre-packs the weight for the CPU GEMM kernel)",
           "nm": f"N:M, M in {{{', '.join(map(str, NM_GROUP_SIZES))}}}", "bitmask": "unstructured (bitmask)",
           "block": "block (BSR)", "masked": "dense weight + bitmask (training)",
           "group_score": "scoring", "act_norm_accumulate": "scoring (wanda)",
           "hessian_accumulate": "SparseGPT Hessian"}

    def what(name):
        for k, v in fam.items():
            if name.startswith(k):
                return v
        return ""

    ran = _ran_on_gpu(runs)

    def gpu(name, built, providers):
        """A GPU backend's cell: '—' when not built, else whether a committed GPU run ran it."""
        if not built:
            return "—"
        return "yes, ran on a GPU" if any((name, p) in ran for p in providers) else "built, not yet run on a GPU"
    out = []
    for name, s in ops.OPS.items():
        tri = gpu(name, bool(s.triton), ("triton",))
        if s.triton and s.triton_limit:
            tri += (f" (square blocks {', '.join(map(str, blocks))})" if blocks else
                    " (with limits: `ops.explain_backend`)")
        out.append([f"`{name}`", what(name), "yes" if s.cpp else "— (reference GEMM)", gpu(name, s.cuda, ("cuda",)),
                    tri, gpu(name, s.semi_structured, ("cusparselt", "cutlass"))])
    dtypes = ", ".join(str(d).split(".")[-1] for d in ops.KERNEL_DTYPES)
    return (table(["op", "for", "CPU (C++)", "CUDA C++", "Triton", "2:4 tensor-core GEMMs (cuSPARSELt, CUTLASS)"],
                  out) +
            f"\n\nGenerated from `sparsekern.ops.OPS` and the committed GPU runs: \"built, not yet run on a GPU\" "
            "is a GPU path that compiles (CUDA C++), is tested under Triton's CPU interpreter (Triton) or is called "
            "through torch (the 2:4 GEMMs), but that no committed run has run on a GPU. "
            f"Compiled backends take {dtypes}; other dtypes (float64 included) and anything no backend can run "
            "here go to the pure-torch reference (`sparsekern/reference.py`). The 2:4 GEMMs serve bf16/fp16 "
            "`nm_linear` at large batch on CUDA.")


def _ran_on_gpu(runs) -> set[tuple[str, str]]:
    """(op, provider) of every row a committed GPU run holds without an error."""
    return {(op_of(r), str(r.get("provider"))) for run in runs if run.gpu for r in run.rows
            if "error" not in r and r.get("provider")}


def _triton_blocks() -> tuple:
    """SUPPORTED_BLOCKS of the Triton block kernel, read from the source (no Triton import,
    so the table is the same with or without Triton installed)."""
    path = os.path.join(ROOT, "sparsekern", "triton", "block_linear.py")
    try:
        tree = ast.parse(open(path).read())
    except OSError:
        return ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED_BLOCKS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


TABLES = {
    "cpu-kernels": t_cpu_kernels,      # bench_cpu_linear.py (newest cpu-linear-* run)
    "cpu-kernels-avx2": t_cpu_kernels_avx2,  # bench_cpu_linear.py pinned to AVX2 (cpu-avx2-linear-*)
    "cpu-conv": t_cpu_conv,            # bench_cpu_conv.py (newest cpu-conv-* run)
    "cpu-models": t_cpu_models,        # model-level rows (python -m sparsekern bench --suite models)
    "cpu-goals": t_cpu_goals,          # issue 14's CPU goals against the newest runs
    "cpu-limits": t_cpu_limits,        # the models run's profiles against its roofs
    "compression-goals": t_compression_goals,  # issue 28's goals, each against its newest run
    "cpu-overhead": t_cpu_overhead,    # python -m sparsekern.bench.overhead --out
    "quality": t_quality,              # one-shot pruning quality
    "gpu": t_gpu,                      # the newest GPU run, everything in it
    "all-results": t_all_results,      # every results file, every row (docs/RESULTS.md)
    "summary": t_summary,              # the README's table: best model speed-ups beside the peers
    "quality-summary": t_quality_summary,  # the README's second: real-model quality beside the peers
    "ops": t_ops,                      # the dispatch table, ops.OPS
}


# ------------------------------------------------------------------------------- files
def target_files(root: str = ROOT) -> list[str]:
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return [f for f in files if os.path.exists(f)]


def rewrite(text: str, runs: list[Run], cache: dict) -> str:
    def sub(m):
        name = m.group(1)
        if name not in TABLES:
            raise SystemExit(f"make_tables: unknown table '{name}' (known: {', '.join(TABLES)})")
        if name not in cache:
            cache[name] = TABLES[name](runs).strip()
        return f"<!-- table:{name} -->\n{cache[name]}\n<!-- /table -->"
    opens = len(re.findall(r"<!-- table:[a-z0-9-]+ -->", text))
    if opens != len(MARKER.findall(text)):
        raise SystemExit("make_tables: a '<!-- table:NAME -->' marker has no '<!-- /table -->'")
    return MARKER.sub(sub, text)


# Pages whose figures are not measurements, with the reason; every other page may show a
# speed-up or a time only inside a generated table (or a code block).
NOT_MEASURED = {
    "docs/GPU_KERNELS.md": "design note: predictions from bytes, bandwidth and the resource report, labelled as "
                           "such ('nothing in this note has run on a GPU'); compare with the gpu table when it exists",
}
# Hand-typed measurements outside the generated tables: speed-ups and times in prose.
HAND_TYPED = re.compile(r"\b\d+(?:\.\d+)?x\b(?! ?\d)|\b\d+(?:\.\d+)? ?(?:ms|µs|us|GB/s|TFLOP/s|tok(?:ens)?/s)\b")


def hand_typed(text: str) -> list[str]:
    """Measured-looking numbers outside the markers and outside code blocks."""
    text = MARKER.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return HAND_TYPED.findall(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file differs")
    p.add_argument("--list", action="store_true", help="each results file: date, device, kinds of rows")
    p.add_argument("--root", default=ROOT, help="the tree whose README.md, docs/ and bench/results/ are used "
                                                "(default: this repository)")
    a = p.parse_args(argv)
    runs = load_runs(os.path.join(a.root, "bench", "results"), a.root)
    if UNTRACKED:
        print(f"make_tables: not in git, left out: {', '.join(UNTRACKED)} (git add them to show them)",
              file=sys.stderr)
    if a.list:
        for r in runs:
            kinds = sorted({row_kind(x) for x in r.rows})
            print(f"{r.path}: {r.date[:10]} {'gpu' if r.gpu else 'cpu'}{' quick' if r.quick else ''}, "
                  f"{len(r.rows)} rows ({', '.join(kinds)})")
        return 0
    cache: dict = {}
    differ = []
    for path in target_files(a.root):
        old = open(path).read()
        new = rewrite(old, runs, cache)
        rel = os.path.relpath(path, a.root)
        bad = [] if rel.replace(os.sep, "/") in NOT_MEASURED else hand_typed(new)
        if bad:
            print(f"{rel}: measured-looking numbers outside the generated tables: {bad}", file=sys.stderr)
            differ.append(rel)
        if new != old:
            if a.check:
                differ.append(rel)
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                           f"a/{rel}", f"b/{rel} (from bench/results)", n=1))
            else:
                with open(path, "w") as f:
                    f.write(new)
                print(f"wrote {rel}")
    if differ:
        print(f"make_tables: {', '.join(sorted(set(differ)))} disagree with bench/results "
              "(run python bench/make_tables.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
