"""GPU decode and large-batch benchmark: sparse linear kernels against cuBLAS, cuSPARSELt and
CUTLASS, plus masked training and a Llama-style decoder end to end (bench/gpu_check.sh runs it).

    python bench/bench_gpu_linear.py --out OUT/bench.json --tuning-out OUT/tuning.json
    python bench/bench_gpu_linear.py --dry-run          # CPU stand-in: arguments, plan, one tiny case

Suites (--suite, comma-separated):
  linear  weights 4096x4096, 4096x11008, 11008x4096, 8192x8192, 28672x8192 (out x in), batch
          1, 4, 16, 32, 128, 2048, bf16. Providers: cublas (F.linear on the dense weight), cuda
          (our CUDA kernels, forced), triton (forced), cusparselt and cutlass (2:4 GEMMs, forced),
          for 2:4; cusparselt_int8 (op nm_linear_q: 2:4 int8 values, x quantized per row, int8
          GEMM; first shape, batch 128 and up); cuda and triton for unstructured at 30% density. Peers a GPU user runs instead
          (torch only, rows marked "peer", each guarded: one that cannot run is a row saying why):
          torch's semi-structured 2:4 (to_sparse_semi_structured + F.linear), fp8 e4m3 through
          torch._scaled_mm (row-wise scales, x quantized in the call), int8 through torch._int_mm
          (row-wise, x quantized in the call; M > 16 only), int4 weight-only through
          torch._weight_int4pack_mm (tinygemm, groups of 128), and cuSPARSE CSR (torch.sparse,
          unstructured rows). Every provider is checked against fp64 first (quantized peers
          against their own dequantized weight; above 64 rows on 64 sampled rows).
  masked  masked fine-tuning: forward, input and weight gradients through the dispatched path
          (cuBLAS + masking kernel) against the fused Triton kernels, at 4096x4096, 2048 rows.
  e2e     a Llama-style decoder (dim 4096, SwiGLU 11008, 4 layers) dense against 2:4-sparsified:
          prefill (1 x 512 tokens) and decode (batch 1, 32 tokens), tokens per second. Eager
          decode is host-bound (~1 ms of Python and launches per token against ~0.65 ms of
          weights), so decode also reports GPU time: the sum of the kernels' device time under
          torch.profiler ("decode_gpu_tok_per_s"), the figure that compares the weights' paths.
  ncu     no timing: the two CUDA decode kernels (2:4 and 30% bitmask, 4096x4096, batch 1),
          three calls each, for Nsight Compute to profile (bench/gpu_check.sh's optional step).

Timing: weights rotated over more than 3x the GPU's L2 (so they stream from HBM); a call's
time is CUDA events around CUDA-graph replays of the rotated calls (kernel time, no launch
gaps: the headline "us"); the same calls issued eagerly give the per-call time with host
dispatch and launch ("eager_us"); the difference is reported as launch overhead. Medians
with 20th/80th percentiles; GB/s of the weight's bytes against the read bandwidth measured
at the start of the run (a 1 GiB sum: a read-only stream, as a decode kernel is; "%read").
The copy bandwidth (bytes read + written) is recorded in the environment too.

Output: rows (JSON) rewritten after every shape, so a run cut short keeps what it measured;
--tuning-out writes the medians per (op, batch bucket, shape) in sparsekern.tuning's format
(SPARSEKERN_TUNING=that file makes dispatch use them; peers are not backends and are left
out). --budget-s stops starting new shapes when the time is used. Files are written in place
of a temporary next to them; bench/gpu_check.sh removes a temporary a kill leaves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from unittest import mock

import torch

F = torch.nn.functional
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (28672, 8192)]
BATCHES = [1, 4, 16, 32, 128, 2048]
NM_PROVIDERS = ["cublas", "cuda", "triton", "cusparselt", "cutlass"]
BITMASK_PROVIDERS = ["cuda", "triton"]
NM_PEERS = ["torch_semi_2:4", "fp8_scaled_mm", "int8_int_mm", "int4_tinygemm"]
BITMASK_PEERS = ["cusparse_csr"]
BACKENDS = ("cuda", "triton", "cusparselt", "cutlass")  # what --tuning-out records
SAMPLED_ROWS = 64  # above this batch the fp64 check compares this many sampled rows
BITMASK_DENSITY = 0.3
INT8_MIN_BATCH = 128  # the 2:4 int8 row (cuSPARSELt) is timed from this batch up
SUITES = ("linear", "masked", "e2e", "ncu")
# Seconds each suite is planned to take on one H100 (the dry run checks the sum against
# bench/gpu_check.sh's budget for the step).
PLANNED_S = {"linear": 62, "masked": 8, "e2e": 25, "ncu": 5}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="linear,masked,e2e", help=f"comma-separated, of {SUITES}")
    p.add_argument("--shapes", default="all", help="'all', 'small' (first two) or OUTxIN,OUTxIN")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=7, help="graph replays (samples) per case")
    p.add_argument("--l2-multiple", type=float, default=3.0, help="rotate weights over this many L2 sizes")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting new shapes after this long (0: no limit)")
    p.add_argument("--out", default=None, help="rows as JSON (rewritten after each shape)")
    p.add_argument("--tuning-out", default=None, help="medians in sparsekern.tuning's format")
    p.add_argument("--dry-run", action="store_true", help="CPU stand-in: parse, plan, run one tiny case")
    a = p.parse_args(argv)
    a.suites = [s.strip() for s in a.suite.split(",") if s.strip()]
    bad = [s for s in a.suites if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {bad}; choose from {SUITES}")
    if a.shapes == "all":
        a.shape_list = SHAPES
    elif a.shapes == "small":
        a.shape_list = SHAPES[:2]
    else:
        try:
            a.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes: {a.shapes!r} is not 'all', 'small' or OUTxIN,OUTxIN")
    try:
        a.batch_list = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches: {a.batches!r} is not a comma-separated list of ints")
    return a


# ------------------------------------------------------------------------ timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_graph_us(calls, device: str, reps: int, min_calls: int = 24) -> dict:
    """Per-call microseconds: CUDA-graph replays of the rotated calls (kernel time), and the
    same calls issued eagerly (host dispatch + launch included). CPU: wall clock for both."""
    for c in calls:
        c()
    _sync(device)
    per_graph = max(len(calls), min_calls)
    seq = [calls[i % len(calls)] for i in range(per_graph)]
    if device != "cuda":
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for c in seq:
                c()
            t.append((time.perf_counter() - t0) / per_graph * 1e6)
        return {"graph": t, "eager": t, "graph_error": "cpu: wall clock"}
    out = {"graph_error": None}
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in seq:
                c()
        g.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            s, e = ev(), ev()
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1e3 / per_graph)
        out["graph"] = samples
        del g
    except Exception as exc:  # noqa: BLE001 - a provider that cannot be captured is timed eagerly only
        out["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        s, e = ev(), ev()
        s.record()
        for c in seq:
            c()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / per_graph)
    out["eager"] = samples
    out.setdefault("graph", samples)
    return out


def quant(samples) -> dict:
    qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median": statistics.median(samples), "p20": qs[1], "p80": qs[7]}


def l2_bytes(device) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    return 32 << 20


def rel_err(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------ providers
def forced(backend, fn):
    from sparsekern import ops

    def call(*args):
        with ops.use_backend(backend):
            return fn(*args)
    return call


def int8_activations(fn):
    """fn with SPARSEKERN_Q_ACT=int8 while it runs (read per call by the dispatch), so a GPU
    quantizes x per row and runs nm_linear_q's int8 GEMM."""
    def call(*args):
        with mock.patch.dict(os.environ, {"SPARSEKERN_Q_ACT": "int8"}):
            return fn(*args)
    return call


def sample_rows(B: int, device) -> torch.Tensor | None:
    """Rows the fp64 check compares: all up to SAMPLED_ROWS, else SAMPLED_ROWS spread over the
    batch (first and last included). A full fp64 check at 28672x8192 and batch 2048 is ~1 TFLOP
    on the H100's fp64 units (30-40 s per op); 64 rows are ~15 GFLOP."""
    if B <= SAMPLED_ROWS:
        return None
    return torch.linspace(0, B - 1, SAMPLED_ROWS, device=device).round().long().unique()


def _rowwise(t: torch.Tensor, qmax: float, dtype: torch.dtype):
    """Symmetric per-row quantization: (q [rows, K] in dtype, scale [rows, 1] fp32)."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / qmax
    q = t.float() / scale
    if not dtype.is_floating_point:
        q = q.round().clamp(-qmax, qmax)
    return q.to(dtype), scale


class Peer:
    """A dense or library peer for one weight copy: call(x) -> y, ref(x64) -> fp64 y (against the
    peer's own rounding of weight and, where it quantizes x in the call, of x), nbytes."""

    def __init__(self, call, ref, nbytes):
        self.call, self.ref, self.nbytes = call, ref, int(nbytes)


def build_peer(name: str, w: torch.Tensor) -> Peer:
    """w: the pruned weight [N, K], stored dense (bf16/fp16). Raises when the peer cannot run."""
    N, K = w.shape
    if name == "torch_semi_2:4":
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w)
        w64 = w.double()
        return Peer(lambda x: F.linear(x, ws), lambda x64: x64 @ w64.t(), N * K // 2 * w.element_size() + N * K // 8)
    if name == "fp8_scaled_mm":
        if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
            raise RuntimeError("this torch has no float8_e4m3fn / _scaled_mm")
        f8 = torch.float8_e4m3fn
        wq, sw = _rowwise(w, 448.0, f8)
        wt, sb = wq.t(), sw.t().contiguous()  # [K, N] column-major; scale [1, N]
        w64 = wq.double() * sw.double()

        def call(x):
            xq, sx = _rowwise(x, 448.0, f8)
            return torch._scaled_mm(xq, wt, scale_a=sx, scale_b=sb, out_dtype=x.dtype)

        def ref(x64):
            xq, sx = _rowwise(x64, 448.0, f8)
            return (xq.double() * sx.double()) @ w64.t()
        return Peer(call, ref, N * K + 4 * N)
    if name == "int8_int_mm":
        wq, sw = _rowwise(w, 127.0, torch.int8)
        wt, sb = wq.t(), sw.t().contiguous()
        w64 = wq.double() * sw.double()

        def call(x):
            xq, sx = _rowwise(x, 127.0, torch.int8)
            return (torch._int_mm(xq, wt).float() * sx * sb).to(x.dtype)

        def ref(x64):
            xq, sx = _rowwise(x64, 127.0, torch.int8)
            return (xq.double() * sx.double()) @ w64.t()
        return Peer(call, ref, N * K + 4 * N)
    if name == "int4_tinygemm":
        gs = 128
        if w.dtype != torch.bfloat16 or K % gs:
            raise RuntimeError(f"tinygemm needs bfloat16 and K % {gs} == 0")
        wg = w.float().reshape(N, K // gs, gs)
        mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = (mx - mn).clamp_min(1e-6) / 15
        q = ((wg - mn) / scale).round().clamp(0, 15).to(torch.int32)
        zero = mn + 8 * scale
        sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/gs, N, 2]
        s_, z_ = sz[..., 0].t().unsqueeze(-1).double(), sz[..., 1].t().unsqueeze(-1).double()
        w64 = ((q.double() - 8) * s_ + z_).reshape(N, K)
        q = q.reshape(N, K)
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        return Peer(lambda x: torch._weight_int4pack_mm(x, packed, gs, sz), lambda x64: x64 @ w64.t(),
                    N * K // 2 + sz.numel() * 2)
    if name == "cusparse_csr":
        c = w.to_sparse_csr()
        wc = torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), c.shape)
        w64 = w.double()
        nnz = c.values().numel()
        return Peer(lambda x: (wc @ x.t()).t(), lambda x64: x64 @ w64.t(), nnz * (w.element_size() + 4) + 4 * (N + 1))
    raise ValueError(f"unknown peer {name!r}")


def linear_shape(N, K, batches, dtype, device, a, env, rows, dry):
    from sparsekern import ops, semi_structured
    from sparsekern.formats import BitmaskWeight, NMWeight

    gen = torch.Generator(device=device).manual_seed(N * 31 + K)
    dense_bytes = N * K * torch.finfo(dtype).bits // 8
    copies = 1 if dry else max(2, math.ceil(a.l2_multiple * l2_bytes(device) / (dense_bytes * 0.5)))
    nm, bm = [], []
    for _ in range(copies):
        w = torch.randn(N, K, device=device, dtype=dtype, generator=gen)
        nm.append(NMWeight.from_dense(w, 2, 4))
        bm.append(BitmaskWeight.from_dense(w, torch.rand(N, K, device=device, generator=gen) < BITMASK_DENSITY))
        semi_structured.prepare(nm[-1])
        del w
    pruned = [W.to_dense() for W in nm]  # cuBLAS multiplies the same 2:4 weight, stored dense
    cpu_backend = {"cuda": "cpp"}
    # entries: (op, pattern, density, provider, weights, fn(w, x), nbytes, ref64(x64) or None, peer)
    plan = []
    w64 = {"nm_linear": nm[0].to_dense().double(), "bitmask_linear": bm[0].to_dense().double()}
    for p in NM_PROVIDERS:
        if p == "cublas":
            plan.append(("nm_linear", "2:4", 0.5, p, pruned, lambda w, x: F.linear(x, w), dense_bytes, None, False))
        else:
            be = cpu_backend.get(p, p) if device == "cpu" else p
            plan.append(("nm_linear", "2:4", 0.5, p, nm, forced(be, lambda w, x: ops.nm_linear(x, w)), nm[0].nbytes,
                         None, False))
    for p in BITMASK_PROVIDERS:
        be = cpu_backend.get(p, p) if device == "cpu" else p
        plan.append(("bitmask_linear", "unstructured", BITMASK_DENSITY, p, bm,
                     forced(be, lambda w, x: ops.bitmask_linear(x, w)), bm[0].nbytes, None, False))
    # 2:4 int8 values, x quantized per row, cuSPARSELt's int8 GEMM (SPARSEKERN_Q_ACT=int8): a
    # compute-bound path, timed at the large batches of the run's first shape only (the bench
    # step's budget); the int8_int_mm peer is its dense counterpart. Checked against fp64 of its own
    # dequantized weight (x's rounding is within the 2e-2 gate).
    if (N, K) == tuple(a.shape_list[0]):
        nm_q = [NMWeight.from_dense(W.to_dense(), 2, 4, quantize="int8").to(dtype=dtype) for W in nm]
        w64["nm_linear_q"] = nm_q[0].dequantized().to_dense().double()
        be = "cusparselt" if device == "cuda" else "cpp"
        plan.append(("nm_linear_q", "2:4 int8", 0.5, "cusparselt_int8", nm_q,
                     forced(be, int8_activations(lambda w, x: ops.nm_linear_q(x, w))), nm_q[0].nbytes, None, False))
    peer_errors = {}
    for op, pattern, density, names, srcs in (("nm_linear", "2:4", 0.5, NM_PEERS, pruned),
                                             ("bitmask_linear", "unstructured", BITMASK_DENSITY, BITMASK_PEERS,
                                              [W.to_dense() for W in bm] if BITMASK_PEERS else [])):
        for name in names:
            try:
                peers = [build_peer(name, w) for w in srcs]
            except Exception as exc:  # noqa: BLE001 - a peer this torch/GPU lacks is a row saying why
                peer_errors[(op, name)] = f"{type(exc).__name__}: {exc}"[:300]
                plan.append((op, pattern, density, name, None, None, 0, None, True))
                continue
            plan.append((op, pattern, density, name, peers, lambda pr, x: pr.call(x), peers[0].nbytes,
                         peers[0].ref, True))
    for B in batches:
        x = torch.randn(B, K, device=device, dtype=dtype, generator=gen)
        idx = sample_rows(B, device)
        xs64 = (x if idx is None else x[idx]).double()
        cublas_us = None
        refs = {}
        for op, pattern, density, provider, ws, fn, nbytes, ref64, peer in plan:
            if provider == "triton" and op == "bitmask_linear" and B > 32:
                continue  # the Triton bitmask kernel is a decode kernel: not timed at large batch
            if provider == "cusparselt_int8" and B < a.int8_min_batch:
                continue
            row = {"suite": "linear", "op": op, "provider": provider, "pattern": pattern, "density": density,
                   "dtype": str(dtype).split(".")[-1], "shape": f"{N}x{K}", "batch": B, "device": env["device_name"]}
            if peer:
                row["peer"] = True
            if ws is None:
                rows.append({**row, "error": peer_errors[(op, provider)]})
                continue
            try:
                y = fn(ws[0], x)
                if ref64 is not None:
                    ref = ref64(xs64)
                else:
                    if op not in refs:
                        refs[op] = xs64 @ w64[op].t()
                    ref = refs[op]
                err = rel_err(y if idx is None else y[idx], ref)
                del y, ref
            except Exception as exc:  # noqa: BLE001 - reported as a row, not fatal
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            if not err < 2e-2:
                rows.append({**row, "error": f"relative error {err:.2e} against fp64: not timed"})
                continue
            try:
                t = time_graph_us([lambda w=w: fn(w, x) for w in ws], device, a.reps, a.min_calls)
            except Exception as exc:  # noqa: BLE001
                rows.append({**row, "error": f"timing: {type(exc).__name__}: {exc}"[:300]})
                continue
            g, e = quant(t["graph"]), quant(t["eager"])
            if provider == "cublas":
                cublas_us = g["median"]
            row.update({"us": g["median"], "p20_us": g["p20"], "p80_us": g["p80"], "eager_us": e["median"],
                        "launch_overhead_us": max(0.0, e["median"] - g["median"]), "graph_error": t["graph_error"],
                        "weight_bytes": int(nbytes), "gb_per_s": nbytes / (g["median"] * 1e-6) / 1e9,
                        "rel_err": err, "checked_rows": B if idx is None else int(idx.numel()), "copies": len(ws)})
            row["pct_read_bw"] = 100 * row["gb_per_s"] / env["read_gbs"] if env.get("read_gbs") else None
            row["x_cublas"] = (cublas_us / g["median"]) if cublas_us else None
            rows.append(row)
        del x, refs, xs64
    del pruned, nm, bm, plan, w64
    if device == "cuda":
        torch.cuda.empty_cache()


def read_bandwidth_gbs(device: str) -> float:
    """Read-only stream roof: bytes of a 1 GiB fp32 buffer summed per second (median of 5)."""
    a = torch.randn((1 << 30) // 4, device=device)
    out = torch.empty((), device=device)
    t = time_graph_us([lambda: torch.sum(a, out=out)], device, 5, min_calls=4)
    del a
    return (1 << 30) / (statistics.median(t["eager"]) * 1e-6) / 1e9


def suite_masked(dtype, device, a, env, rows, dry):
    from sparsekern import ops
    from sparsekern.patterns import pack_bitmask
    from sparsekern.triton import load as load_triton

    mt = load_triton("masked_linear")
    N, K, M = (64, 128, 32) if dry else (4096, 4096, 2048)
    gen = torch.Generator(device=device).manual_seed(7)
    w = torch.randn(N, K, device=device, dtype=dtype, generator=gen)
    mask = torch.rand(N, K, device=device, generator=gen) < 0.5
    bits = pack_bitmask(mask)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
    g = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    wm = (w * mask).double()
    cases = {
        "forward": (lambda: ops.masked_linear(x, w, bits), lambda: mt.fused_forward(x, w, bits),
                    x.double() @ wm.t()),
        "grad_input": (lambda: ops.masked_linear_grad_input(g, w, bits), lambda: mt.fused_grad_input(g, w, bits),
                       g.double() @ wm),
        "grad_weight": (lambda: ops.masked_linear_grad_weight(g, x, bits), lambda: mt.fused_grad_weight(g, x, bits),
                        (g.double().t() @ x.double()) * mask),
    }
    for name, (dispatched, fused, ref) in cases.items():
        for provider, fn in (("dispatched", dispatched), ("triton_fused", fused)):
            row = {"suite": "masked", "op": f"masked_linear.{name}", "provider": provider,
                   "dtype": str(dtype).split(".")[-1], "shape": f"{N}x{K}", "batch": M, "device": env["device_name"]}
            try:
                err = rel_err(fn(), ref)
                if not err < 2e-2:
                    raise RuntimeError(f"relative error {err:.2e}")
                t = time_graph_us([fn], device, a.reps, a.min_calls)
            except Exception as exc:  # noqa: BLE001
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            q = quant(t["graph"])
            flops = 2 * M * N * K
            rows.append({**row, "us": q["median"], "p20_us": q["p20"], "p80_us": q["p80"],
                         "eager_us": quant(t["eager"])["median"], "tflop_per_s": flops / (q["median"] * 1e-6) / 1e12,
                         "rel_err": err, "graph_error": t["graph_error"]})


def suite_ncu(dtype, device, a, env, rows, dry):
    from sparsekern import ops
    from sparsekern.formats import BitmaskWeight, NMWeight

    N = K = 128 if dry else 4096
    w = torch.randn(N, K, device=device, dtype=dtype)
    x = torch.randn(1, K, device=device, dtype=dtype)
    backend = "cpp" if dry else "cuda"
    for W in (NMWeight.from_dense(w, 2, 4), BitmaskWeight.from_dense(w, torch.rand(N, K, device=device) < 0.3)):
        with ops.use_backend(backend):
            for _ in range(3):
                ops.sparse_linear(x, W)
    _sync(device)
    rows.append({"suite": "ncu", "op": "decode kernels", "provider": backend, "shape": f"{N}x{K}", "batch": 1,
                 "note": "profiled by ncu (its report is in bench.log)"})


def suite_e2e(dtype, device, a, env, rows, dry):
    from sparsekern import models
    from sparsekern.nn import Policy
    from sparsekern.sparsify import sparsify

    cfg = dict(vocab=256, dim=64, layers=1, heads=4, hidden=128) if dry else \
        dict(vocab=32000, dim=4096, layers=4, heads=32, hidden=11008)
    prompt, new = (8, 2) if dry else (512, 32)
    torch.manual_seed(0)
    dense = models.LlamaStyle(**cfg).to(device=device, dtype=dtype).eval()
    sparse = models.LlamaStyle(**cfg).to(device=device, dtype=dtype).eval()
    sparse.load_state_dict(dense.state_dict())
    sparsify(sparse, "2:4", min_features=64, policy=Policy("sparse"), show_progress=False,
             exclude=["lm_head"])
    ids = torch.randint(0, cfg["vocab"], (1, prompt), device=device)
    ev = (lambda: torch.cuda.Event(enable_timing=True)) if device == "cuda" else None

    def timed(fn, reps):
        fn()
        _sync(device)
        out = []
        for _ in range(reps):
            if ev:
                s, e = ev(), ev()
                s.record()
                fn()
                e.record()
                e.synchronize()
                out.append(s.elapsed_time(e) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def gpu_seconds(fn):
        """Sum of the kernels' device time while fn runs (torch.profiler), or None."""
        if device != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        total = 0.0
        for ev_ in prof.key_averages():
            total += getattr(ev_, "self_device_time_total", None) or getattr(ev_, "self_cuda_time_total", 0) or 0
        return total * 1e-6 if total > 0 else None

    with torch.no_grad():
        for name, m in (("dense", dense), ("2:4", sparse)):
            pre = timed(lambda m=m: m(ids), 3)
            dec = timed(lambda m=m: m.generate(ids[:, :16], new), 2)
            try:
                dec_gpu = gpu_seconds(lambda m=m: m.generate(ids[:, :16], new))
            except Exception as exc:  # noqa: BLE001 - the wall-clock figures stand without it
                dec_gpu, gpu_note = None, f"profiler: {type(exc).__name__}: {exc}"[:200]
            else:
                gpu_note = None
            rows.append({"suite": "e2e", "op": "llama_decoder", "provider": name, "dtype": str(dtype).split(".")[-1],
                         "shape": f"dim{cfg['dim']}-hidden{cfg['hidden']}-layers{cfg['layers']}",
                         "device": env["device_name"], "prefill_tokens": prompt, "prefill_ms": pre * 1e3,
                         "prefill_tok_per_s": prompt / pre, "decode_tokens": new, "decode_ms": dec * 1e3,
                         "decode_tok_per_s": new / dec,
                         "decode_gpu_ms": None if dec_gpu is None else dec_gpu * 1e3,
                         "decode_gpu_tok_per_s": None if not dec_gpu else new / dec_gpu,
                         "note": gpu_note or "decode wall time is host-bound in eager mode; decode_gpu_* is kernel "
                                             "time (torch.profiler), the prefill of 16 tokens included"})


# ------------------------------------------------------------------------ output
def tuning_rows(rows) -> list[dict]:
    """Medians (graph replay, ms) per (op, batch bucket, shape) for sparsekern.tuning."""
    from sparsekern.ops import batch_bucket

    out = {}
    for r in rows:
        if r.get("suite") != "linear" or "us" not in r or r["provider"] not in BACKENDS:
            continue
        N, K = (int(v) for v in r["shape"].split("x"))
        key = (r["op"], r["device"], r["dtype"], batch_bucket(r["batch"]), (N, K))
        med = out.setdefault(key, {})
        med[r["provider"]] = min(med.get(r["provider"], float("inf")), r["us"] * 1e-3)
    return [{"op": k[0], "device": k[1], "dtype": k[2], "bucket": k[3], "shape": list(k[4]), "median_ms": v}
            for k, v in out.items()]


def write(a, env, rows):
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
        os.replace(a.out + ".tmp", a.out)
    if a.tuning_out:
        with open(a.tuning_out + ".tmp", "w") as f:
            json.dump({"format": "sparsekern-tuning-1", "rows": tuning_rows(rows)}, f, indent=1)
        os.replace(a.tuning_out + ".tmp", a.tuning_out)


def table(rows) -> str:
    lines = [f"{'suite':6} {'op':26} {'provider':12} {'shape':12} {'batch':>5} {'us':>9} {'eager':>8} "
             f"{'GB/s':>6} {'%read':>5} {'x cublas':>8}  note"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['suite']:6} {r['op']:26} {r['provider']:12} {r.get('shape', ''):12} "
                         f"{r.get('batch', ''):>5}  {'peer ' if r.get('peer') else ''}error: {r['error'][:90]}")
        elif r["suite"] == "ncu":
            lines.append(f"ncu    {r['op']:26} {r['provider']:12} {r['shape']:12} {r['batch']:>5}  {r['note']}")
        elif r["suite"] == "e2e":
            gpu = r.get("decode_gpu_tok_per_s")
            lines.append(f"e2e    {r['op']:26} {r['provider']:12} prefill {r['prefill_tok_per_s']:.0f} tok/s "
                         f"({r['prefill_ms']:.1f} ms), decode {r['decode_tok_per_s']:.1f} tok/s wall, "
                         + (f"{gpu:.1f} tok/s GPU time" if gpu else "GPU time: -"))
        else:
            def f(k, fmt):
                return format(r[k], fmt) if r.get(k) is not None else "-"
            lines.append(f"{r['suite']:6} {r['op']:26} {r['provider']:12} {r['shape']:12} {r['batch']:>5} "
                         f"{f('us', '9.2f')} {f('eager_us', '8.1f')} {f('gb_per_s', '6.0f')} "
                         f"{f('pct_read_bw', '5.0f')} {f('x_cublas', '8.2f')}  "
                         f"{'peer ' if r.get('peer') else ''}"
                         f"{'' if not r.get('graph_error') else 'eager only: ' + r['graph_error'][:40]}")
    return "\n".join(lines)


def main(argv=None):
    a = parse(argv)
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        planned = sum(PLANNED_S[s] for s in a.suites)
        nprov = len(NM_PROVIDERS) + len(BITMASK_PROVIDERS) + len(NM_PEERS) + len(BITMASK_PEERS)
        cases = len(a.shape_list) * len(a.batch_list) * nprov + sum(B >= INT8_MIN_BATCH for B in a.batch_list)
        print(f"bench_gpu_linear --dry-run: suites {a.suites}, {len(a.shape_list)} shapes x {len(a.batch_list)} "
              f"batches x {nprov} providers and peers, and the 2:4 int8 row = {cases} linear cases; planned {planned} s on one H100")
        print(json.dumps({"planned_s": planned, "linear_cases": cases}))
        a.shape_list, a.batch_list, a.reps = [(64, 128)], [1, 4, 70], 1  # 70: the sampled-rows check
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu_linear: no CUDA GPU (use --dry-run for the CPU stand-in)")
    a.int8_min_batch = 70 if a.dry_run else INT8_MIN_BATCH
    a.min_calls = 1 if a.dry_run else 24
    from sparsekern.bench.common import environment

    dtype = getattr(torch, a.dtype)
    env = environment(device)
    if device == "cuda":
        from sparsekern.bench.cases import copy_bandwidth_gbs

        env["copy_gbs"] = copy_bandwidth_gbs("cuda")
        env["read_gbs"] = read_bandwidth_gbs("cuda")
        env["l2_bytes"] = l2_bytes(device)
        print(f"{env['gpu']}, torch {env['torch']}, triton {env.get('triton')}, commit {env['commit']}; copy "
              f"{env['copy_gbs']:.0f} GB/s (read + write), read {env['read_gbs']:.0f} GB/s, "
              f"L2 {env['l2_bytes'] >> 20} MiB", flush=True)
    rows: list[dict] = []
    start = time.perf_counter()
    if "linear" in a.suites:
        for N, K in a.shape_list:
            if a.budget_s and time.perf_counter() - start > a.budget_s:
                rows.append({"suite": "linear", "op": "-", "provider": "-", "shape": f"{N}x{K}",
                             "error": f"skipped: --budget-s {a.budget_s:.0f} s used"})
                continue
            t0 = time.perf_counter()
            linear_shape(N, K, a.batch_list, dtype, device, a, env, rows, a.dry_run)
            print(f"linear {N}x{K}: {time.perf_counter() - t0:.1f} s", flush=True)
            write(a, env, rows)
    for name, fn in (("masked", suite_masked), ("e2e", suite_e2e), ("ncu", suite_ncu)):
        if name in a.suites:
            t0 = time.perf_counter()
            try:
                fn(dtype, device, a, env, rows, a.dry_run)
            except Exception as exc:  # noqa: BLE001 - one suite failing leaves the others' rows
                rows.append({"suite": name, "op": name, "provider": "-", "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
            write(a, env, rows)
    print(table(rows))
    errors = [r for r in rows if "error" in r and not r["error"].startswith("skipped")]
    if a.dry_run:
        timed = [r for r in rows if "us" in r or "prefill_ms" in r]
        print(f"dry run: {len(timed)} rows timed, {len(errors)} errors")
        return 1 if not rows else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
