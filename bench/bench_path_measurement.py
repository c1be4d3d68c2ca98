"""Whether a sparse module's per-bucket path measurement (sparsekern.nn.measure_paths) predicts
what runs faster inside the model: all-MiniLM-L6-v2 pruned 2:4 (magnitude), one held-out
sentence (the demo's "1 sentence" workload), on this CPU.

For each distinct layer shape of the encoder it records:
- in the model: each layer forced onto each path (sparse, its dense copy, decompressed per
  call), the model run whole with a forward hook pair on every sparse layer, rounds
  interleaved between the three forcings and the dense model; the median per call;
- alone: measure_paths on that layer's input, with each cold start: "evict" (the layer's
  weight tensors evicted from the caches, sparsekern.cpu_evict_from_cache, the default now)
  and "flush" (a buffer twice the last-level cache written first, the default before), each
  repeated `--trials` times, at the policy's 5 rounds and with the adaptive rounds.

It then says, per shape, which path each method picks against the fastest in the model.

    python bench/bench_path_measurement.py --out bench/results/NAME
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sparsekern  # noqa: E402
from sparsekern import dispatch_rules, prune  # noqa: E402
from sparsekern import nn as sknn  # noqa: E402
from sparsekern.bench.quality import english_sentences, load_minilm  # noqa: E402

PATHS = ("sparse", "dense_copy", "decompress")


def _force(model, path):
    for mod in model.modules():
        if isinstance(mod, sknn.SparseLinear):
            for b in dispatch_rules.BATCH_BUCKETS:
                mod.bucket_choices[b] = sknn.PathChoice(path, "forced by bench_path_measurement", {})
            mod._forget_calls()


def _shape(mod):
    return f"{mod.out_features}x{mod.in_features}"


def in_model_times(variants, one, rounds):
    """Median ms per call of each sparse layer shape, per variant, the model run whole."""
    acc = {k: collections.defaultdict(list) for k in variants}
    whole = {k: [] for k in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            st, per, calls = {}, collections.defaultdict(float), collections.Counter()
            hooks = []
            for mod in model.modules():
                if isinstance(mod, (sknn.SparseLinear, torch.nn.Linear)) and mod.in_features in (384, 1536):
                    hooks.append(mod.register_forward_pre_hook(
                        lambda m, i: st.__setitem__(id(m), time.perf_counter())))
                    hooks.append(mod.register_forward_hook(
                        lambda m, i, o: (per.__setitem__(_shape(m), per[_shape(m)] + time.perf_counter() - st[id(m)]),
                                         calls.update([_shape(m)]))[0]))
            with torch.no_grad():
                t = time.perf_counter()
                model(**one)
                whole[name].append((time.perf_counter() - t) * 1e3)
            for h in hooks:
                h.remove()
            for shape, s in per.items():
                acc[name][shape].append(s * 1e3 / calls[shape])
    return ({k: {s: statistics.median(v) for s, v in d.items()} for k, d in acc.items()},
            {k: statistics.median(v) for k, v in whole.items()})


def alone_times(layer, x, cold_start, reps, adaptive, trials):
    f = layer.weight_format()
    runners = {p: (lambda p=p: layer._linear_path(p, x, f)) for p in PATHS}
    out = []
    saved = dispatch_rules.PATH_MAX_REPS
    if not adaptive:
        dispatch_rules.PATH_MAX_REPS = reps
    try:
        for _ in range(trials):
            evict = (lambda: layer._weight_tensors(f)) if cold_start == "evict" else None
            out.append(sknn.measure_paths(runners, f.device, reps, True, evict=evict))
            sknn._FLUSH.clear()
    finally:
        dispatch_rules.PATH_MAX_REPS = saved
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=30, help="in-model rounds per variant (interleaved)")
    ap.add_argument("--trials", type=int, default=5, help="isolated measurements per method and shape")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_minilm()
    model.eval()
    sents = english_sentences()
    perm = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
    one = tok([sents[perm[32]]], padding=True, truncation=True, max_length=64, return_tensors="pt")
    rows = int(one["input_ids"].numel())
    layers = [n for n, _ in prune.prunable_layers(model) if not n.startswith("pooler")]
    sparse, _ = sparsekern.sparsify(copy.deepcopy(model), "2:4", include=layers, show_progress=False,
                                    policy=sknn.Policy("auto", cache=False))
    sparse.eval()
    variants = {"dense model": model}
    for p in PATHS:
        m = copy.deepcopy(sparse)
        _force(m, p)
        variants[f"all {p}"] = m
    with torch.no_grad():
        for m in variants.values():
            m(**one)
    per_layer, whole = in_model_times(variants, one, a.rounds)

    # the input each shape sees in the model
    inputs = {}
    def keep_input(m, i):
        inputs.setdefault(_shape(m), (m, i[0].detach().clone()))  # returns None: the input unchanged

    hooks = [mod.register_forward_pre_hook(keep_input)
             for mod in variants["all sparse"].modules() if isinstance(mod, sknn.SparseLinear)]
    with torch.no_grad():
        variants["all sparse"](**one)
    for h in hooks:
        h.remove()
    alone = {}
    with torch.no_grad():
        for shape, (layer, x) in sorted(inputs.items()):
            alone[shape] = {f"{cold} {'adaptive' if adaptive else '5 rounds'}":
                            alone_times(layer, x, cold, 5, adaptive, a.trials)
                            for cold in ("evict", "flush") for adaptive in (False, True)}
    result = {"model": "all-MiniLM-L6-v2, 2:4 magnitude on the encoder's 36 linears", "rows": rows,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "in_model_ms_per_call": per_layer, "model_ms": whole, "alone_ms": alone}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"rows {rows}, {torch.get_num_threads()} threads; whole model ms (median): "
             + ", ".join(f"{k} {v:.2f}" for k, v in whole.items()), "",
             "| layer | path | in the model, ms/call | alone, evict, 5 rounds (min-max of trials) | "
             "alone, flush, 5 rounds | alone, evict, adaptive |", "|---|---|---|---|---|---|"]
    for shape in sorted(alone):
        for p in PATHS:
            def span(key):
                v = [t[p] for t in alone[shape][key]]
                return f"{min(v):.3f}-{max(v):.3f}"
            lines.append(f"| {shape} | {p} | {per_layer[f'all {p}'][shape]:.3f} | {span('evict 5 rounds')} | "
                         f"{span('flush 5 rounds')} | {span('evict adaptive')} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
