"""2:4 + int8 and 2:4 + int4 nm_linear_q at prefill and vision batches (the compute-bound regime)
on the CPU against torch's dynamic int8 linear (the x86 engine, what a user runs instead), dense
fp32 and dense bf16, timed interleaved in one process, weights rotated beyond the L3 cache.

    python bench/bench_cpu_gemm_int8.py                                   # Llama prefill + ViT-B
    python bench/bench_cpu_gemm_int8.py --cases 128x2048x2048 --rounds 15 --threads 1
    python bench/bench_cpu_gemm_int8.py --out bench/results/cpu-gemm-int4-YYYYMMDD/gemm.json

Cases are rows x in x out. Providers (each checked first: sparsekern's against the fp64 of its
own quantized math, the others' error against fp64 on their weight recorded):
  torch.int8_dynamic        torch.ao.quantization.quantize_dynamic Linear, engine x86 (fbgemm:
                            per-tensor u8 activations, VNNI), on the 2:4 int8 weight's exact values
  torch.int8_dynamic.again  the same call again: the noise floor of the run
  sparsekern.int8_gemm      nm_linear_q on 2:4 int8 values as dispatched (the 2:4 int8
                            dot-product GEMM where the CPU has AVX512_VNNI: csrc/cpu/nm_gemm_int8.h)
  sparsekern.int4_g<G>_gemm nm_linear_q on 2:4 int4 values, group size G (--int4-groups), as
                            dispatched (the same GEMM, nibbles expanded in registers)
  sparsekern.int8_tiles / sparsekern.int4_g<G>_tiles (with --tiles)
                            nm_linear_q with SPARSEKERN_NM_Q_GEMM=tile: tiles dequantized to
                            fp32 into the BLAS GEMM (the path before)
  sparsekern.int8_gemm_one_range / sparsekern.int8_gemm_per_thread (with --ranges)
                            the same GEMM with its batch rows split as SPARSEKERN_INT8_RANGES=one
                            and =threads fix it (work_ranges.h, WorkRanges; as dispatched it
                            picks by the batch: ranges_for)
  torch.dense_fp32          F.linear on the dense fp32 weight (MKL)
  torch.dense_bf16          F.linear with bf16 x and the dense weight in bf16 (model.to(bfloat16))
Each provider rotates over enough weight copies to read at least --rotate-mib MiB per pass
(its own bytes: int4 copies are more numerous than fp32 ones), so no weight stays in the L3.
With --consumer every provider's call is followed by what a transformer block does next with
the output, layer_norm(y + residual) in the output's dtype, timed with it: which thread wrote
which output rows decides whether that op finds them in its own core's cache.
Rates: dense-equivalent GOP/s = 2 * rows * in * out / time (the 2:4 kernels do half the
multiply-adds), beside the fp32 multiply-add roof of cpu_fma_probe measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparsekern import ops, reference
from sparsekern.bench.common import compare, environment, interleaved, ratio_text, write_progress
from sparsekern.formats import NMWeight

# rows x in x out: Llama-style prefill (128 tokens, hidden 2048, intermediate 5632) and
# ViT-B/16 at batch 4 (4 x 197 tokens, hidden 768, qkv 2304, MLP 3072)
CASES = ["128x2048x2048", "128x2048x5632", "128x5632x2048", "788x768x2304", "788x768x3072", "788x3072x768"]


def _ranges(fn, split):
    def call():
        os.environ["SPARSEKERN_INT8_RANGES"] = split
        try:
            return fn()
        finally:
            del os.environ["SPARSEKERN_INT8_RANGES"]
    return call


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


def _copies(rotate_mib: int, nbytes: int) -> int:
    """Weight copies whose bytes reach rotate_mib MiB (at least one)."""
    return max(1, math.ceil(rotate_mib * 2**20 / nbytes))


def _nm_nbytes(W) -> int:
    return sum(t.numel() * t.element_size() for t in W.kernel_args()[:3])


def _quantized_dynamic(D):
    lin = torch.nn.Linear(D.shape[1], D.shape[0], bias=False)
    lin.weight.data = D.clone()
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def run_case(b, k, o, rounds, rotate_mib, int4_groups, tiles, env, clock=time.perf_counter, ranges=False,
             consumer=False):
    torch.manual_seed(0)
    x = torch.randn(b, k)
    xb = x.to(torch.bfloat16)
    W8 = NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize="int8")
    D = W8.dequantized().to_dense()
    n8 = _copies(rotate_mib, _nm_nbytes(W8))
    W8s = [W8] + [NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize="int8") for _ in range(n8 - 1)]
    # the dense peers rotate over the int8 copies' values (fewer copies: more bytes each)
    Ds = [D] + [W.dequantized().to_dense() for W in W8s[1:_copies(rotate_mib, o * k * 4)]]
    Bs = [W.dequantized().to_dense().to(torch.bfloat16) for W in W8s[:_copies(rotate_mib, o * k * 2)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "x86"
        Qs = [_quantized_dynamic(W.dequantized().to_dense()) for W in W8s[:_copies(rotate_mib, o * k)]]
    W4s = {}
    for g in int4_groups:
        first = NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize="int4", group_size=g)
        W4s[g] = [first] + [NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize="int4", group_size=g)
                            for _ in range(_copies(rotate_mib, _nm_nbytes(first)) - 1)]
    calls = {
        "torch.int8_dynamic": [lambda Q=Q: Q(x) for Q in Qs],
        "torch.int8_dynamic.again": [lambda Q=Q: Q(x) for Q in Qs],
        "sparsekern.int8_gemm": [lambda W=W: ops.nm_linear_q(x, W) for W in W8s],
    }
    for g, Ws in W4s.items():
        calls[f"sparsekern.int4_g{g}_gemm"] = [lambda W=W: ops.nm_linear_q(x, W) for W in Ws]
    if ranges:
        for split, name in (("one", "sparsekern.int8_gemm_one_range"), ("threads", "sparsekern.int8_gemm_per_thread")):
            calls[name] = [_ranges(lambda W=W: ops.nm_linear_q(x, W), split) for W in W8s]
    if tiles:
        calls["sparsekern.int8_tiles"] = [_tiles(lambda W=W: ops.nm_linear_q(x, W)) for W in W8s]
        for g, Ws in W4s.items():
            calls[f"sparsekern.int4_g{g}_tiles"] = [_tiles(lambda W=W: ops.nm_linear_q(x, W)) for W in Ws]
    calls["torch.dense_fp32"] = [lambda D=D: F.linear(x, D) for D in Ds]
    calls["torch.dense_bf16"] = [lambda B=B: F.linear(xb, B) for B in Bs]
    weight_of = {name: W8s[0] for name in calls if name.startswith("sparsekern.int8")}
    weight_of.update({name: W4s[int(name.split("_g")[1].split("_")[0])][0] for name in calls
                      if name.startswith("sparsekern.int4")})
    why = {name: (_tiles if name.endswith("_tiles") else lambda f: f)(
        lambda W=W: ops.explain_backend("nm_linear_q", x, W)[1])() for name, W in weight_of.items()}
    errors = {}
    for name, fns in calls.items():  # correctness first (the first weight's call)
        y = fns[0]()
        W = weight_of.get(name, W8s[0])
        exact = reference.nm_linear_q(x.double(), *W.kernel_args(), None)
        errors[name] = _rel(y, exact)
        if name in weight_of and "_gemm" in name and "int8 dot-product" in why[name]:
            own = reference.nm_linear_q_dot(x.double(), *W.kernel_args())
            assert _rel(y, own) < 1e-5, f"{name} {b}x{k}x{o}: {_rel(y, own):.2e} from its quantized math"
        elif name.startswith("sparsekern") or name == "torch.dense_fp32":
            assert errors[name] < 1e-5, f"{name} {b}x{k}x{o}: relative error {errors[name]:.2e}"
    if consumer:
        residual = {torch.float32: torch.randn(b, o)}
        residual[torch.bfloat16] = residual[torch.float32].to(torch.bfloat16)

        def then_norm(fn):
            def call():
                y = fn()
                return F.layer_norm(y + residual[y.dtype], (o,))
            return call
        calls = {name: [then_norm(f) for f in fns] for name, fns in calls.items()}
    samples = interleaved(calls, rounds, clock=clock)
    res = compare(samples, "torch.int8_dynamic", "torch.int8_dynamic.again")
    fp32 = res["torch.dense_fp32"]["median_ms"]
    flop = 2.0 * b * o * k
    rows = []
    for name, r in res.items():
        values = ("float32" if name == "torch.dense_fp32" else "bfloat16" if name == "torch.dense_bf16"
                  else "int4" if name.startswith("sparsekern.int4") else "int8")
        W = weight_of.get(name)
        rows.append({"op": "nm_linear_q" if W is not None else "linear", "provider": name,
                     "pattern": "2:4" if W is not None else "dense", "values": values,
                     "group_size": W.kernel_args()[7] if W is not None and values == "int4" else None,
                     "dtype": "bfloat16" if name == "torch.dense_bf16" else "float32",
                     "shape": f"{o}x{k}", "out_features": o, "in_features": k, "batch": b, "device": "cpu",
                     "weight_copies": len(calls[name]), "backend_reason": why.get(name, ""),
                     "rel_err_vs_fp64": errors[name], **r,
                     "timed_with": "layer_norm(y + residual)" if consumer else "the op alone",
                     "dense_equiv_gop_per_s": flop / (r["median_ms"] * 1e-3) / 1e9,
                     "speedup_vs_torch_int8_dynamic": r["speedup"],
                     "speedup_vs_dense_fp32": fp32 / r["median_ms"], "commit": env["commit"]})
    return rows, why


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="rows x in x out, comma-separated")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--rotate-mib", type=int, default=64,
                   help="weight bytes each provider rotates over at least (MiB; the L3 is 32 MiB here); 0: one copy")
    p.add_argument("--int4-groups", default="128", help="int4 group sizes, comma-separated (32, 64, 128)")
    p.add_argument("--tiles", action="store_true", help="also time the dequantized tiles (the path before)")
    p.add_argument("--ranges", action="store_true",
                   help="also time the int8 GEMM with one batch range and with one per thread")
    p.add_argument("--consumer", action="store_true",
                   help="time each call with layer_norm(y + residual) after it (the output's next reader)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--thread-clock", action="store_true",
                   help="time with the calling thread's CPU clock (time.thread_time; --threads 1 only): "
                        "on a shared machine it leaves out the time spent waiting for a core")
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
    groups = [int(g) for g in a.int4_groups.split(",") if g]
    if a.thread_clock and torch.get_num_threads() != 1:
        p.error("--thread-clock needs --threads 1 (other threads' work is not on the calling thread's clock)")
    env["rotate_mib"] = a.rotate_mib
    env["clock"] = "thread_time" if a.thread_clock else "perf_counter"
    print(f"{'case':>14} {'provider':>26} {'median ms':>10} {'p20':>8} {'p80':>8} {'GOP/s':>7} {'err':>8} "
          f"{'x fp32':>7} {'x int8dyn':>9} {'ratio p20-p80':>14} {'noise':>6} verdict")
    for case in tqdm(a.cases.split(","), desc="cases", disable=None):
        b, k, o = map(int, case.split("x"))
        case_rows, why = run_case(b, k, o, a.rounds, a.rotate_mib, groups, a.tiles, env,
                                  time.thread_time if a.thread_clock else time.perf_counter,
                                  ranges=a.ranges, consumer=a.consumer)
        for name, reason in why.items():
            print(f"  {name}: {reason}")
        for r in case_rows:
            rows.append(r)
            print(f"{case:>14} {r['provider']:>26} {r['median_ms']:>10.2f} {r['p20_ms']:>8.2f} {r['p80_ms']:>8.2f} "
                  f"{r['dense_equiv_gop_per_s']:>7.0f} {r['rel_err_vs_fp64']:>8.1e} "
                  f"{r['speedup_vs_dense_fp32']:>7.2f} {ratio_text(r)}", flush=True)
        write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
