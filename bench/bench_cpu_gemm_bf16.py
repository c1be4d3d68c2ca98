"""2:4 nm_linear on bf16 weights and bf16 activations (the bf16 dot-product GEMM,
csrc/cpu/nm_gemm_bf16.cpp) against torch's dense bf16 F.linear on the same pruned weight,
timed interleaved in one process, at the shapes of issue 28's bf16 goals.

    python bench/bench_cpu_gemm_bf16.py                          # every case, 2 threads
    python bench/bench_cpu_gemm_bf16.py --cases llama --rounds 21 --threads 1
    python bench/bench_cpu_gemm_bf16.py --out bench/results/cpu-gemm-bf16-YYYYMMDD/gemm_bf16.json

Cases (rows x out x in):
  llama   Llama-style prefill, 128 tokens, hidden 2048, intermediate 5632: q/k/v/o
          (2048x2048), gate/up (5632x2048), down (2048x5632)
  vit     ViT-B/16, batch 4 (788 rows): qkv (2304x768), proj (768x768), fc1 (3072x768),
          fc2 (768x3072)
  resnet  ResNet-50, batch 4: the 1x1 convolutions as the GEMMs SparseConv2d runs on a
          channels-last input (rows = 4 x H x W, its patches are the input itself), and the
          3x3 ones of layers 2-4 as the GEMMs it runs on their patch matrices

Providers (each checked against the fp64 reference with the bf16 rule before it is timed:
error at most 2x torch's own bf16 F.linear error):
  torch.dense_bf16        F.linear(x, W) in bf16, W the pruned weight stored dense (oneDNN)
  torch.dense_bf16.again  the same call again: the run's noise floor
  cpp.nm24_bf16_dot       ops.nm_linear on the bf16 NMWeight: the vdpbf16ps kernel
  cpp.nm24_bf16_dot.omp   the same with its threads on torch's OpenMP team instead of the
                          chunk pool (SPARSEKERN_NM_BF16_THREADS=omp; only with more than one thread)
  cpp.nm24_bf16_fma       the same under SPARSEKERN_NM_BF16=fma: the fp32 multiply-add kernel
                          on the converted values (the path before the bf16 kernel)
  cpp.nm24_bf16_dot.one_range / .per_thread (with --ranges)
                          the bf16 kernel with its lanes in one range, or one per thread
                          (SPARSEKERN_NM_BF16_RANGES; as dispatched: nm_gemm_bf16.h ranges_for)
  cpp.nm24_bf16_dot.shared / .private (with --chunks)
                          the bf16 kernel in shared passes or thread-private chunks
                          (SPARSEKERN_NM_BF16_CHUNKS; as dispatched: nm_gemm_bf16.h private_chunks_for)
With --consumer every call is followed by layer_norm(y + residual) in bf16, what a transformer
block does next with the output, timed with it: which thread wrote which output rows decides
whether that op finds them in its own core's cache.

Each row gives the dense-equivalent GFLOP/s (2 x rows x out x in over the median), the kept
GFLOP/s the 2:4 kernels actually execute (half of it), and both as a share of the run's fp32
FMA probe (torch.ops.sparsekern.cpu_fma_probe, all threads): the probe counts fp32 FMA flops,
a vdpbf16ps instruction does two multiply-adds per fp32 lane, so the bf16 roof is above it.
--clock thread times with the calling thread's CPU time (time.thread_time) instead of the
wall clock: on a machine shared with other work, a single-threaded run then leaves out the
time it waited for a core (it needs --threads 1: torch's one intra-op thread is the caller).
Weights are rotated (several copies, the same count for every provider) when one is under
--rotate-mib, so they stream from memory as in a model.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from sparsekern import ops
from sparsekern.bench.common import compare, environment, interleaved, ratio_text, rel_err, tolerance, write_progress
from sparsekern.formats import NMWeight

CASES = {
    "llama": [("llama.qkvo", 128, 2048, 2048), ("llama.gate_up", 128, 5632, 2048), ("llama.down", 128, 2048, 5632)],
    "vit": [("vit.qkv", 788, 2304, 768), ("vit.proj", 788, 768, 768), ("vit.fc1", 788, 3072, 768),
            ("vit.fc2", 788, 768, 3072)],
    # (name, rows, out, in): ResNet-50's bottleneck 1x1 convolutions at batch 4, stride 1
    "resnet": [("resnet.l1.reduce", 4 * 56 * 56, 64, 256), ("resnet.l1.expand", 4 * 56 * 56, 256, 64),
               ("resnet.l2.reduce", 4 * 28 * 28, 128, 512), ("resnet.l2.expand", 4 * 28 * 28, 512, 128),
               ("resnet.l3.reduce", 4 * 14 * 14, 256, 1024), ("resnet.l3.expand", 4 * 14 * 14, 1024, 256),
               ("resnet.l4.reduce", 4 * 7 * 7, 512, 2048), ("resnet.l4.expand", 4 * 7 * 7, 2048, 512),
               ("resnet.l2.3x3", 4 * 28 * 28, 128, 9 * 128), ("resnet.l3.3x3", 4 * 14 * 14, 256, 9 * 256),
               ("resnet.l4.3x3", 4 * 7 * 7, 512, 9 * 512)],
}


def _with_env(name, value, fn):
    def call():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return call


def fma_peak_gflops(tries: int = 5, clock=None) -> float | None:
    """The best of `tries` runs of the extension's fp32 FMA probe over all threads (GFLOP/s),
    timed by the probe itself (the wall clock), or by `clock` around the call when given (the
    thread clock: one thread, which runs the probe inline)."""
    if not hasattr(torch.ops.sparsekern, "cpu_fma_probe"):
        return None
    best = 0.0
    for _ in range(tries):
        t = clock() if clock else 0.0
        seconds, flops, _lanes = torch.ops.sparsekern.cpu_fma_probe(20_000_000)
        if clock:
            seconds = clock() - t
        best = max(best, flops / seconds / 1e9)
    return best


def run_case(name, rows, o, k, rounds, rotate_mib, with_fma, peak, env, clock=time.perf_counter, ranges=False,
             consumer=False, chunks=False):
    torch.manual_seed(0)
    dt = torch.bfloat16
    nm_bytes = o * k // 2 * 2 + o * k // 8
    copies = max(1, math.ceil(rotate_mib * 2**20 / nm_bytes))
    Ws = [NMWeight.from_dense(torch.randn(o, k, dtype=dt), 2, 4) for _ in range(copies)]
    Ds = [W.to_dense() for W in Ws]
    x = torch.randn(rows, k, dtype=dt)
    calls = {
        "torch.dense_bf16": [lambda D=D: F.linear(x, D) for D in Ds],
        "torch.dense_bf16.again": [lambda D=D: F.linear(x, D) for D in Ds],
        "cpp.nm24_bf16_dot": [_with_env("SPARSEKERN_NM_BF16", "dot", lambda W=W: ops.nm_linear(x, W)) for W in Ws],
    }
    if torch.get_num_threads() > 1:
        calls["cpp.nm24_bf16_dot.omp"] = [
            _with_env("SPARSEKERN_NM_BF16_THREADS", "omp", _with_env("SPARSEKERN_NM_BF16", "dot", lambda W=W: ops.nm_linear(x, W)))
            for W in Ws]
    if ranges:
        for split, suffix in (("one", "one_range"), ("threads", "per_thread")):
            calls[f"cpp.nm24_bf16_dot.{suffix}"] = [
                _with_env("SPARSEKERN_NM_BF16_RANGES", split, _with_env("SPARSEKERN_NM_BF16", "dot", lambda W=W: ops.nm_linear(x, W)))
                for W in Ws]
    if chunks:
        for mode in ("shared", "private"):
            calls[f"cpp.nm24_bf16_dot.{mode}"] = [
                _with_env("SPARSEKERN_NM_BF16_CHUNKS", mode, _with_env("SPARSEKERN_NM_BF16", "dot", lambda W=W: ops.nm_linear(x, W)))
                for W in Ws]
    if with_fma:
        calls["cpp.nm24_bf16_fma"] = [_with_env("SPARSEKERN_NM_BF16", "fma", lambda W=W: ops.nm_linear(x, W))
                                      for W in Ws]
    # correctness first, on the first weight: the bf16 rule against fp64
    ref = F.linear(x.double(), Ds[0].double())
    torch_err = rel_err(F.linear(x, Ds[0]), ref)
    for pname, fns in calls.items():
        if pname.startswith("cpp."):
            assert ops.explain_backend("nm_linear", x, Ws[0])[0] == "cpp", pname
        err = rel_err(fns[0](), ref)
        assert err <= tolerance(dt, torch_err), f"{pname} {name}: error {err:.2e} against torch's {torch_err:.2e}"
    if consumer:
        residual = torch.randn(rows, o, dtype=dt)

        def then_norm(fn):
            return lambda: F.layer_norm(fn() + residual, (o,))
        calls = {pname: [then_norm(f) for f in fns] for pname, fns in calls.items()}
    samples = interleaved(calls, rounds, clock=clock)
    res = compare(samples, "torch.dense_bf16", "torch.dense_bf16.again")
    flop = 2.0 * rows * o * k
    out = []
    for pname, r in res.items():
        sparse = pname.startswith("cpp.")
        dense_equiv = flop / (r["median_ms"] * 1e-3) / 1e9
        executed = dense_equiv / 2 if sparse else dense_equiv  # the 2:4 kernels multiply the kept half only
        out.append({"op": "nm_linear" if sparse else "linear", "provider": pname, "case": name,
                    "pattern": "2:4" if sparse else "dense", "density": 0.5, "dtype": "bfloat16",
                    "shape": f"{o}x{k}", "out_features": o, "in_features": k, "batch": rows, "device": "cpu",
                    "weight_copies": copies, "timed_with": "layer_norm(y + residual)" if consumer else "the op alone", **r,
                    "dense_equiv_gflop_per_s": dense_equiv, "executed_gflop_per_s": executed,
                    "executed_share_of_fma_peak": executed / peak if peak else None,
                    "fma_peak_gflops": peak, "speedup_vs_dense_bf16": r["speedup"], "commit": env["commit"]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="llama,vit", help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rotate-mib", type=int, default=64, help="compressed bytes rotated at least (MiB)")
    p.add_argument("--no-fma", action="store_true", help="leave out the fp32-FMA kernel row")
    p.add_argument("--ranges", action="store_true", help="also time the bf16 kernel with one lane range and one per thread")
    p.add_argument("--chunks", action="store_true",
                   help="also time the bf16 kernel in shared passes and in thread-private chunks")
    p.add_argument("--consumer", action="store_true",
                   help="time each call with layer_norm(y + residual) after it (the output's next reader)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall: time.perf_counter; thread: the caller's CPU time (with --threads 1 only)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.clock == "thread" and a.threads != 1:
        p.error("--clock thread measures the calling thread only: it needs --threads 1")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    torch.set_num_threads(a.threads)
    env = environment("cpu")
    env["clock"] = a.clock
    probe_clock = clock if a.clock == "thread" else None
    peak = fma_peak_gflops(clock=probe_clock)
    env["fma_peak_gflops_start"] = peak
    print(f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads, load {env['machine']['loadavg']}, "
          f"fp32 FMA probe {peak:.0f} GFLOP/s" if peak else "no FMA probe")
    print(f"{'case':>17} {'rows':>5} {'shape':>10} {'provider':>22} {'median ms':>10} {'p20':>8} {'p80':>8} "
          f"{'GF/s eq':>8} {'exec/pk':>7} {'x dense':>7} {'ratio p20-p80':>14} {'noise':>6} verdict")
    rows = []
    for group in a.cases.split(","):
        for name, b, o, k in CASES[group]:
            for r in run_case(name, b, o, k, a.rounds, a.rotate_mib, not a.no_fma, peak, env, clock,
                              ranges=a.ranges, consumer=a.consumer, chunks=a.chunks):
                rows.append(r)
                share = r["executed_share_of_fma_peak"]
                print(f"{name:>17} {b:>5} {r['shape']:>10} {r['provider']:>22} {r['median_ms']:>10.3f} "
                      f"{r['p20_ms']:>8.3f} {r['p80_ms']:>8.3f} {r['dense_equiv_gflop_per_s']:>8.0f} "
                      f"{'' if share is None else f'{share:.0%}':>7} {ratio_text(r)}", flush=True)
            write_progress(a.out, env, rows)
    env["fma_peak_gflops_end"] = fma_peak_gflops(clock=probe_clock)
    write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
