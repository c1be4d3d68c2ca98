"""2:4 nm_linear at large batches (the compute-bound regime) on the CPU: F.linear (dense,
MKL) against the two C++ paths of nm_linear above 16 rows, timed interleaved in one process.

    python bench/bench_cpu_gemm.py                                  # every shape and batch
    python bench/bench_cpu_gemm.py --shapes 4096x4096 --batches 128 --rounds 15
    python bench/bench_cpu_gemm.py --out bench/results/cpu-gemm-YYYYMMDD/gemm.json

Providers (each checked against the fp64 reference before it is timed):
  torch.dense       F.linear on the pruned weight stored dense (fp32)
  torch.dense.again the same call again: the noise floor of the run
  cpp.tile_gemm     nm_linear with SPARSEKERN_NM_GEMM=tile: weight tiles of about 16 MiB
                    decompressed and multiplied by at::mm (the path before issue 14)
  cpp.nm24_gemm     nm_linear with SPARSEKERN_NM_GEMM=direct: the 2:4 weight-stationary
                    kernel (AVX2: csrc/cpu/nm_gemm_impl.h; on AVX-512 CPUs its 16-lane
                    variant in csrc/cpu/sparse_rows_avx512.cpp), packing the weight per call
                    (ops.CPU_GEMM_PANELS off)
  cpp.nm24_gemm_panels  the same with the weight pre-packed (NMWeight.gemm_panels, the
                    default; read by both kernels, AVX2 and AVX-512)
At batch <= 16 nm_linear runs its direct row kernels whatever SPARSEKERN_NM_GEMM says, so
those rows time that kernel under both cpp names.

Weights: when one compressed weight is under --rotate-mib, several copies are rotated (the
same count for every provider) so the weights stream from memory as in a model. To time
MKL's AVX2 code path (the AVX2-only target machines), run with MKL_ENABLE_INSTRUCTIONS=AVX2
in the environment; SPARSEKERN_CPU_ISA=avx2 pins the kernels' ISA (both are recorded).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

import torch
import torch.nn.functional as F

from sparsekern import ops
from sparsekern.bench.common import compare, environment, interleaved, ratio_text, write_progress
from sparsekern.formats import NMWeight

SHAPES = ["4096x4096", "4096x11008", "11008x4096"]  # out x in
BATCHES = [16, 32, 64, 128, 256, 1024]


def _with_mode(mode, fn, panels=False):
    """fn under SPARSEKERN_NM_GEMM=mode, with or without the pre-packed weight
    (ops.CPU_GEMM_PANELS), restoring both."""
    def call():
        os.environ["SPARSEKERN_NM_GEMM"] = mode
        saved, ops.CPU_GEMM_PANELS = ops.CPU_GEMM_PANELS, panels
        try:
            return fn()
        finally:
            del os.environ["SPARSEKERN_NM_GEMM"]
            ops.CPU_GEMM_PANELS = saved
    return call


def run_case(o, k, batch, rounds, rotate_mib, env):
    torch.manual_seed(0)
    nm_bytes = o * k // 2 * 4 + o * k // 8
    copies = max(1, math.ceil(rotate_mib * 2**20 / nm_bytes))
    Ws = [NMWeight.from_dense(torch.randn(o, k), 2, 4) for _ in range(copies)]
    Ds = [W.to_dense() for W in Ws]
    x = torch.randn(batch, k)
    ref = F.linear(x.double(), Ds[0].double())
    calls = {
        "torch.dense": [lambda D=D: F.linear(x, D) for D in Ds],
        "torch.dense.again": [lambda D=D: F.linear(x, D) for D in Ds],
        "cpp.tile_gemm": [_with_mode("tile", lambda W=W: ops.nm_linear(x, W)) for W in Ws],
        "cpp.nm24_gemm": [_with_mode("direct", lambda W=W: ops.nm_linear(x, W)) for W in Ws],
        "cpp.nm24_gemm_panels": [_with_mode("direct", lambda W=W: ops.nm_linear(x, W), panels=True) for W in Ws],
    }
    if "gemm_panels" in ops.explain_backend("nm_linear", x, Ws[0])[1]:
        for W in Ws:  # built once per weight, as a model's layers keep them: not timed
            W.gemm_panels()
    for name, fns in calls.items():  # correctness first (the first weight's call)
        y = fns[0]() if name.startswith("cpp.") else F.linear(x, Ds[0])
        if name.startswith("cpp."):
            assert ops.explain_backend("nm_linear", x, Ws[0])[0] == "cpp"
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name} {o}x{k} B={batch}: relative error {err:.2e}"
    samples = interleaved(calls, rounds)
    res = compare(samples, "torch.dense", "torch.dense.again")
    flop = 2.0 * batch * o * k  # dense multiply-adds x 2; the 2:4 kernels do half
    rows = []
    for name, r in res.items():
        rows.append({"op": "nm_linear" if name.startswith("cpp.") else "linear", "provider": name,
                     "pattern": "2:4" if name.startswith("cpp.") else "dense", "density": 0.5, "dtype": "float32",
                     "shape": f"{o}x{k}", "out_features": o, "in_features": k, "batch": batch, "device": "cpu",
                     "weight_copies": copies, **r,
                     "dense_equiv_gflop_per_s": flop / (r["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_dense": r["speedup"], "commit": env["commit"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="out x in, comma-separated")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--rounds", type=int, default=9, help="rounds per case (fewer at batch >= 1024)")
    p.add_argument("--rotate-mib", type=int, default=64, help="compressed bytes rotated at least (MiB)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    env = environment("cpu")
    print(f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads, load {env['machine']['loadavg']}, "
          f"MKL_ENABLE_INSTRUCTIONS={env['MKL_ENABLE_INSTRUCTIONS']}")
    rows = []
    print(f"{'shape':>11} {'batch':>5} {'provider':>17} {'median ms':>10} {'p20':>9} {'p80':>9} "
          f"{'x dense':>7} {'ratio p20-p80':>14} {'noise':>6} verdict")
    for shape in a.shapes.split(","):
        o, k = map(int, shape.split("x"))
        for b in map(int, a.batches.split(",")):
            rounds = a.rounds if b < 1024 else max(3, a.rounds // 3)
            for r in run_case(o, k, b, rounds, a.rotate_mib, env):
                rows.append(r)
                print(f"{shape:>11} {b:>5} {r['provider']:>17} {r['median_ms']:>10.2f} {r['p20_ms']:>9.2f} "
                      f"{r['p80_ms']:>9.2f} {ratio_text(r)}", flush=True)
            write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
