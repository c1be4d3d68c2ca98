"""A language model's lm_head at decode (batch 1, 32000 x 2048), quiet and with one core busy
(issue 31): which kernels keep their speed when another process holds a core.

Timed interleaved (round-robin), median ms per call: fp32 F.linear (what the dense and fp32
sparse variants of the models suite run for their unpruned lm_head), torch's dynamic int8
Linear (what sparsify(quantize_dense=True) makes of it in the int8/int4 variants, as
torch.ao.quantization.quantize_dynamic does), and sparsekern's 2:4 int8 op on the same
weight (its kept call, as a SparseLinear runs it). Phases: quiet, one core busy (the models
suite's load, sparsekern.bench.run.one_core_busy), quiet again. Each is checked against the
fp64 product of its own weight first.

    python bench/bench_cpu_busy_lm_head.py [--rounds 15] [--threads 2] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsekern import ops
from sparsekern.bench.common import int8_dynamic
from sparsekern.bench.run import one_core_busy
from sparsekern.formats import NMWeight

VOCAB, HIDDEN = 32000, 2048


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN) * 0.02
    lin = torch.nn.Sequential(torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(w)
    q = int8_dynamic(lin)
    nm = NMWeight.from_dense(w, 2, 4).quantize("int8")
    x = torch.randn(1, HIDDEN)
    call = ops.sparse_linear_call(x, nm, None).no_grad
    fns = {"fp32 F.linear": lambda: torch.nn.functional.linear(x, w),
           "torch int8 dynamic": lambda: q(x),
           "sparsekern 2:4 int8": lambda: call(x, None)}
    refs = {"fp32 F.linear": w.double(), "torch int8 dynamic": q[0].weight().dequantize().double(),
            "sparsekern 2:4 int8": nm.to_dense().double()}
    with torch.no_grad():
        for name, f in fns.items():  # int8 activations round x: a loose bound, a wrong kernel misses it by far
            y, ref = f().double(), x.double() @ refs[name].t()
            err = float((y - ref).norm() / ref.norm())
            assert err < 2e-2, f"{name}: relative error {err:.2e} against its own weight"

    def phase() -> dict:
        ts = {k: [] for k in fns}
        with torch.no_grad():
            for f in fns.values():
                f()
            for _ in range(a.rounds):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    ts[k].append((time.perf_counter() - t) * 1e3)
        return {k: statistics.median(v) for k, v in ts.items()}

    quiet = phase()
    with one_core_busy():  # the models suite's --busy load
        busy = phase()
    quiet2 = phase()
    out = {"shape": f"{VOCAB}x{HIDDEN}, batch 1", "threads": a.threads, "rounds": a.rounds,
           "median_ms": {"quiet": quiet, "busy": busy, "quiet again": quiet2},
           "busy_slowdown": {k: busy[k] / min(quiet[k], quiet2[k]) for k in fns}}
    for k in fns:
        print(f"{k:22s} quiet {quiet[k]:.2f} / {quiet2[k]:.2f} ms, one core busy {busy[k]:.2f} ms: "
              f"{out['busy_slowdown'][k]:.2f}x slower")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
