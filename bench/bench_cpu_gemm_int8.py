"""2:4 + int8 nm_linear_q at prefill and vision batches (the compute-bound regime) on the CPU
against torch's dynamic int8 linear (the x86 engine, what a user runs instead) and dense fp32,
timed interleaved in one process.

    python bench/bench_cpu_gemm_int8.py                                   # Llama prefill + ViT-B
    python bench/bench_cpu_gemm_int8.py --cases 128x2048x2048 --rounds 15 --threads 1
    python bench/bench_cpu_gemm_int8.py --out bench/results/cpu-gemm-int8-YYYYMMDD/gemm_int8.json

Cases are rows x in x out. Providers (each checked first: sparsekern's against the fp64 of its
own quantized math, torch's error against fp64 on the same weight recorded):
  torch.int8_dynamic        torch.ao.quantization.quantize_dynamic Linear, engine x86 (fbgemm:
                            per-tensor u8 activations, VNNI), on the 2:4 weight's exact values
  torch.int8_dynamic.again  the same call again: the noise floor of the run
  sparsekern.int8_gemm      nm_linear_q as dispatched (2:4 int8 dot-product GEMM where
                            the CPU has AVX512_VNNI: csrc/cpu/nm_gemm_int8.h)
  sparsekern.int8_tiles     nm_linear_q with SPARSEKERN_NM_Q_GEMM=tile: int8 tiles dequantized to
                            fp32 into the BLAS GEMM (the path before)
  torch.dense_fp32          F.linear on the dense fp32 weight (MKL)
Rates: dense-equivalent GOP/s = 2 * rows * in * out / time (the 2:4 kernel does half the
multiply-adds), beside the fp32 multiply-add roof of cpu_fma_probe measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings

import torch
import torch.nn.functional as F

from sparsekern import ops, reference
from sparsekern.bench.common import compare, environment, interleaved, ratio_text, write_progress
from sparsekern.formats import NMWeight

# rows x in x out: Llama-style prefill (128 tokens, hidden 2048, intermediate 5632) and
# ViT-B/16 at batch 4 (4 x 197 tokens, hidden 768, qkv 2304, MLP 3072)
CASES = ["128x2048x2048", "128x2048x5632", "128x5632x2048", "788x768x2304", "788x768x3072", "788x3072x768"]


def _tiles(fn):
    def call():
        os.environ["SPARSEKERN_NM_Q_GEMM"] = "tile"
        try:
            return fn()
        finally:
            del os.environ["SPARSEKERN_NM_Q_GEMM"]
    return call


def _rel(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_case(b, k, o, rounds, rotate_mib, env):
    torch.manual_seed(0)
    copies = max(1, math.ceil(rotate_mib * 2**20 / (o * k // 2)))  # int8 values: the bytes both int8 paths read
    Ws = [NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize="int8") for _ in range(copies)]
    Ds = [W.dequantized().to_dense() for W in Ws]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        Qs = []
        for D in Ds:
            lin = torch.nn.Linear(k, o, bias=False)
            lin.weight.data = D.clone()
            Qs.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8))
    x = torch.randn(b, k)
    calls = {
        "torch.int8_dynamic": [lambda Q=Q: Q(x) for Q in Qs],
        "torch.int8_dynamic.again": [lambda Q=Q: Q(x) for Q in Qs],
        "sparsekern.int8_gemm": [lambda W=W: ops.nm_linear_q(x, W) for W in Ws],
        "sparsekern.int8_tiles": [_tiles(lambda W=W: ops.nm_linear_q(x, W)) for W in Ws],
        "torch.dense_fp32": [lambda D=D: F.linear(x, D) for D in Ds],
    }
    backend, why = ops.explain_backend("nm_linear_q", x, Ws[0])
    ref = F.linear(x.double(), Ds[0].double())
    values, indices, scales, n, m, _, _, _ = Ws[0].kernel_args()
    own = reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k)
    errors = {}
    for name, fns in calls.items():  # correctness first (the first weight's call)
        y = fns[0]()
        errors[name] = _rel(y, ref)
        if name == "sparsekern.int8_gemm" and "int8 dot-product" in why:
            assert _rel(y, own) < 1e-5, f"{name} {b}x{k}x{o}: {_rel(y, own):.2e} from its quantized math"
        elif name.startswith("sparsekern") or name == "torch.dense_fp32":
            assert errors[name] < 1e-5, f"{name} {b}x{k}x{o}: relative error {errors[name]:.2e}"
    samples = interleaved(calls, rounds)
    res = compare(samples, "torch.int8_dynamic", "torch.int8_dynamic.again")
    flop = 2.0 * b * o * k
    rows = []
    for name, r in res.items():
        rows.append({"op": "nm_linear_q" if name.startswith("sparsekern") else "linear", "provider": name,
                     "pattern": "2:4" if name.startswith("sparsekern") else "dense",
                     "values": "float32" if name == "torch.dense_fp32" else "int8", "dtype": "float32",
                     "shape": f"{o}x{k}", "out_features": o, "in_features": k, "batch": b, "device": "cpu",
                     "weight_copies": copies, "backend_reason": why if name == "sparsekern.int8_gemm" else "",
                     "rel_err_vs_fp64": errors[name], **r,
                     "dense_equiv_gop_per_s": flop / (r["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_torch_int8_dynamic": r["speedup"], "commit": env["commit"]})
    return rows, backend, why


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="rows x in x out, comma-separated")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--rotate-mib", type=int, default=0, help="int8 weight bytes rotated at least (MiB); 0: one copy")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment("cpu")
    seconds, flops, lanes = torch.ops.sparsekern.cpu_fma_probe(20_000_000)
    env["fp32_fma_probe_gflop_per_s"] = flops / seconds / 1e9
    print(f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads, load {env['machine']['loadavg']}, "
          f"fp32 FMA probe {env['fp32_fma_probe_gflop_per_s']:.0f} GFLOP/s ({lanes} lanes)")
    rows = []
    print(f"{'case':>14} {'provider':>24} {'median ms':>10} {'p20':>8} {'p80':>8} {'GOP/s':>7} {'err':>8} "
          f"{'x int8dyn':>9} {'ratio p20-p80':>14} {'noise':>6} verdict")
    for case in a.cases.split(","):
        b, k, o = map(int, case.split("x"))
        case_rows, backend, why = run_case(b, k, o, a.rounds, a.rotate_mib, env)
        print(f"  nm_linear_q: {backend} ({why})")
        for r in case_rows:
            rows.append(r)
            print(f"{case:>14} {r['provider']:>24} {r['median_ms']:>10.2f} {r['p20_ms']:>8.2f} {r['p80_ms']:>8.2f} "
                  f"{r['dense_equiv_gop_per_s']:>7.0f} {r['rel_err_vs_fp64']:>8.1e} {ratio_text(r)}", flush=True)
        write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
