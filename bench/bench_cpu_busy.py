"""The Llama-style decoder's linears at decode batch 1, quiet and with one core busy (issue 31).

The 28 linears of one decode step (hidden 2048, intermediate 5632, 4 layers: q, k, v, o,
gate, up, down; a SiLU after each, so torch's own parallel regions run between them) at batch
1: dense (F.linear) against sparsekern 2:4 (ops.nm_linear), 90% and 70% unstructured
(ops.bitmask_linear), 2:4 and 70% with int8 values and 2:4 with int4 values (group 128;
ops.sparse_linear, as the models suite's int8/int4 variants run them), and torch's dynamic
int8 Linear (the peer), timed interleaved (round-robin), median ms per step. Phases: quiet, one
core busy (the models suite's load, sparsekern.bench.run.one_core_busy: a process spinning on
the last core this process may use), quiet again, busy again. Prints each phase and, per variant, the mean
speed-up over dense quiet and busy and the share of the quiet speed-up kept under load;
--out FILE writes them as JSON.

    python bench/bench_cpu_busy.py [--rounds 20] [--out results.json]

SPARSEKERN_POOL_TAKEOVER=0 (read once per process) makes the decode row kernels wait for a
parked pool worker's chunk instead of taking it over: run the script with and without it to
compare the two.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparsekern import ops
from sparsekern.bench.common import int8_dynamic
from sparsekern.bench.run import one_core_busy
from sparsekern.formats import BitmaskWeight, NMWeight

H, I, LAYERS = 2048, 5632, 4
SHAPES = [(H, H)] * 4 + [(I, H), (I, H), (H, I)]  # q, k, v, o, gate, up, down (out, in)
# name: (format, density of the unstructured mask or None, value precision or None)
VARIANTS = {"2:4": ("nm", None, None), "90%": ("bitmask", 0.1, None), "70%": ("bitmask", 0.3, None),
            "2:4 int8": ("nm", None, "int8"), "70% int8": ("bitmask", 0.3, "int8"), "2:4 int4": ("nm", None, "int4")}
PEER = "torch int8 dynamic"


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    dense = [[torch.randn(o, i) * 0.02 for o, i in SHAPES] for _ in range(LAYERS)]

    def compress(kind, keep, precision, w):
        W = NMWeight.from_dense(w, 2, 4) if kind == "nm" else BitmaskWeight.from_dense(w, torch.rand_like(w) < keep)
        return W.quantize(precision, 128) if precision == "int4" else W.quantize(precision) if precision else W

    sparse = {v: [[compress(*VARIANTS[v], w) for w in layer] for layer in dense] for v in VARIANTS}
    peer = [[int8_dynamic(torch.nn.Sequential(_linear(w)))[0] for w in layer] for layer in dense]
    xs = {H: torch.randn(1, H), I: torch.randn(1, I)}
    with torch.no_grad():
        for v, layers in sparse.items():  # each against the fp64 product of its own weight first
            for w in layers[0]:
                x = xs[w.shape[1]]
                y, want = ops.sparse_linear(x, w).double(), x.double() @ w.to_dense().double().t()
                # int8 activations round x to 255 levels: a loose bound, a wrong kernel misses it by far
                assert float((y - want).norm() / want.norm()) < (2e-2 if VARIANTS[v][2] else 1e-5), v

    def step(weights, linear):
        @torch.no_grad()
        def run():
            for layer in weights:
                for w in layer:
                    F.silu(linear(xs[w.in_features if isinstance(w, torch.nn.Module) else w.shape[1]], w))
        return run

    runs = {"dense": step(dense, F.linear), **{v: step(sparse[v], ops.sparse_linear) for v in VARIANTS},
            PEER: step(peer, lambda x, q: q(x))}
    for r in runs.values():  # each run() is under no_grad
        r(), r()
    res = {}
    phases = ["quiet", "busy", "quiet2", "busy2"]
    with tqdm(total=len(phases) * a.rounds, desc="rounds") as bar:
        for phase in phases:
            with one_core_busy() if phase.startswith("busy") else contextlib.nullcontext():
                t = {k: [] for k in runs}
                for _ in range(a.rounds):
                    for k, r in runs.items():
                        t0 = time.perf_counter()
                        r()
                        t[k].append((time.perf_counter() - t0) * 1e3)
                    bar.update()
                res[phase] = {k: statistics.median(v) for k, v in t.items()}
    for phase, r in res.items():
        d = r["dense"]
        print(f"{phase:7s} dense {d:7.2f} ms  " +
              "  ".join(f"{k} {v:7.2f} ms {d / v:4.2f}x" for k, v in r.items() if k != "dense"))
    summary = {}
    for v in [*VARIANTS, PEER]:
        q = statistics.mean(res[p]["dense"] / res[p][v] for p in ("quiet", "quiet2"))
        b = statistics.mean(res[p]["dense"] / res[p][v] for p in ("busy", "busy2"))
        summary[v] = {"speedup_quiet": q, "speedup_busy": b, "kept": b / q}
        print(f"{v}: quiet {q:.2f}x, busy {b:.2f}x, kept {b / q:.0%}")
    out = {"median_ms_per_step": res, "summary": summary, "threads": torch.get_num_threads(),
           "loadavg": os.getloadavg(), "takeover": os.environ.get("SPARSEKERN_POOL_TAKEOVER", "1") != "0",
           "takeovers": int(torch.ops.sparsekern.cpu_pool_takeovers())}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
