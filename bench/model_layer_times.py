"""Where a model's time goes, layer kind by layer kind: the dense bf16 model against the 2:4
bf16 model (sparsify as the models suite does it), each forward timed whole (interleaved,
no hooks) and, in other rounds, with a forward hook pair on every leaf module (and on each
sparse module) that adds the wall time of each layer kind; then each sparse layer alone on
the input it saw in the model, and its dense original on its own input (fastest of 7 calls,
warm, interleaved layer by layer). A sparse layer slower in the model than alone is slowed
by what runs around it (issue 28's model-level gap: libgomp's idle worker spinning beside
the chunk pool, csrc/cpu/chunk_pool.cpp).

    python bench/model_layer_times.py --model vit --out bench/results/NAME/vit_auto.json
    SPARSEKERN_POOL=pool python bench/model_layer_times.py --model vit   # the threads of before

Models: vit (timm vit_base_patch16_224, batch 4), llama (the suite's HF Llama, prefill of 128
tokens), resnet (torchvision resnet50, batch 4; the dense model channels-last, as its peer).
The environment variables that choose threads (SPARSEKERN_*, OMP_*) are stored in the JSON.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sparsekern import models, sparsify  # noqa: E402
from sparsekern.nn import SparseConv2d, SparseLinear  # noqa: E402

SPARSE = (SparseLinear, SparseConv2d)


def build(which: str):
    if which == "vit":
        base = models.timm_vit("vit_base_patch16_224")
    elif which == "resnet":
        base = models.tv_resnet(50)
    else:
        base = models.hf_llama(**models.LLAMA_FULL)
    dense = copy.deepcopy(base).to(torch.bfloat16).eval()
    if which == "resnet":
        dense = dense.to(memory_format=torch.channels_last)
    sp, _ = sparsify(copy.deepcopy(base).to(torch.bfloat16), method="l1", show_progress=False,
                     **({"exclude": ["lm_head"]} if which == "llama" else {}))
    return dense, sp.eval()


def workload(which: str, m: nn.Module) -> models.Workload:
    if which == "llama":
        return next(w for w in models.llama_workloads(m) if w.metric.startswith("prefill"))
    return models.image_workload(m, 4, 224)


def kind(which: str, name: str, mod: nn.Module) -> str:
    """A layer kind that is the same in the dense and the sparse model (Linear and
    SparseLinear both "linear"); a layer sparsify left dense says so."""
    base = {SparseLinear: "linear", nn.Linear: "linear", SparseConv2d: "conv", nn.Conv2d: "conv"}.get(type(mod))
    if base is None:
        return type(mod).__name__
    if base == "conv":
        base = f"conv {mod.kernel_size[0]}x{mod.kernel_size[1]}"
    elif which in ("vit", "llama"):
        base = f"linear {name.split('.')[-1]}"
    return base if name in SPARSE_NAMES else f"{base} (dense in both)"


SPARSE_NAMES: set = set()


def timed_modules(m: nn.Module):
    return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, SPARSE) or not list(mod.children())]


def attach(m, acc):
    hooks = []
    for name, mod in timed_modules(m):
        def pre(mod, inp):
            mod._t0 = time.perf_counter()

        def post(mod, inp, out, name=name):
            acc[name] += time.perf_counter() - mod._t0
        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return hooks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["vit", "llama", "resnet"], default="vit")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dense, sp = build(a.model)
    SPARSE_NAMES.update(n for n, mod in sp.named_modules() if isinstance(mod, SPARSE))
    wl = {"dense": workload(a.model, dense), "sparse": workload(a.model, sp)}
    for _ in range(2):  # first calls: the sparse layers measure their paths
        for w in wl.values():
            w.run()
    whole = {t: [] for t in wl}
    per = {t: collections.defaultdict(list) for t in wl}
    for r in range(2 * a.rounds):
        for tag, m in (("dense", dense), ("sparse", sp)):
            acc = collections.defaultdict(float)
            hooks = attach(m, acc) if r % 2 else []
            t = time.perf_counter()
            wl[tag].run()
            el = time.perf_counter() - t
            for h in hooks:
                h.remove()
            if not hooks:
                whole[tag].append(el * 1e3)
                continue
            by = collections.defaultdict(float)
            for n, v in acc.items():
                by[kind(a.model, n, m.get_submodule(n))] += v
            by["whole forward, hooked"] = el
            for k, v in by.items():
                per[tag][k].append(v * 1e3)
    # each sparse layer alone on its own in-model input, and its dense original on its own
    inputs = {"dense": {}, "sparse": {}}
    for tag, m in (("dense", dense), ("sparse", sp)):
        def keep(mod, inp, out, n, tag=tag):
            inputs[tag].setdefault(n, inp[0].clone())
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: keep(mod, inp, out, n))
                 for n in SPARSE_NAMES]
        wl[tag].run()
        for h in hooks:
            h.remove()
    alone = collections.defaultdict(lambda: {"dense": 0.0, "sparse": 0.0})
    with torch.no_grad():
        for n in sorted(SPARSE_NAMES):
            ts = {"dense": [], "sparse": []}
            for _ in range(7):
                for tag, m in (("dense", dense), ("sparse", sp)):
                    mod, x = m.get_submodule(n), inputs[tag][n]
                    t = time.perf_counter()
                    mod(x)
                    ts[tag].append(time.perf_counter() - t)
            k = kind(a.model, n, sp.get_submodule(n))
            for tag in ts:
                alone[k][tag] += min(ts[tag]) * 1e3
    med = {t: statistics.median(v) for t, v in whole.items()}
    rows = []
    for k in sorted(set(per["dense"]) | set(per["sparse"])):
        d = statistics.median(per["dense"][k]) if per["dense"][k] else 0.0
        s = statistics.median(per["sparse"][k]) if per["sparse"][k] else 0.0
        if max(d, s) < 0.5:
            continue
        rows.append({"kind": k, "dense_ms": d, "sparse_ms_in_model": s,
                     "dense_ms_alone": alone[k]["dense"] if k in alone else None,
                     "sparse_ms_alone": alone[k]["sparse"] if k in alone else None})
    env = {k: v for k, v in os.environ.items() if k.startswith(("SPARSEKERN_", "OMP_", "GOMP_"))}
    result = {"model": a.model, "threads": torch.get_num_threads(), "env": env, "rounds": a.rounds,
              "load_average": os.getloadavg(), "whole_ms": med, "dense_over_sparse": med["dense"] / med["sparse"],
              "rows": rows, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{a.model}, {torch.get_num_threads()} threads, env {env or '{}'}, load {os.getloadavg()[0]:.2f}: "
          f"whole forward dense bf16 {med['dense']:.1f} ms, 2:4 bf16 {med['sparse']:.1f} ms, "
          f"2:4 speed-up {med['dense'] / med['sparse']:.2f}x")
    print(f"{'layer kind':28s} {'dense ms':>9s} {'2:4 in model':>13s} {'dense alone':>12s} {'2:4 alone':>10s}")
    for r in rows:
        f = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{r['kind']:28s} {r['dense_ms']:9.1f} {r['sparse_ms_in_model']:13.1f} "
              f"{f(r['dense_ms_alone']):>12s} {f(r['sparse_ms_alone']):>10s}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
