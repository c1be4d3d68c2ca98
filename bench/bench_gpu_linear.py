"""GPU decode and large-batch benchmark: sparse linear kernels against cuBLAS, cuSPARSELt and
CUTLASS, plus masked training and a Llama-style decoder end to end (bench/gpu_check.sh runs it).

    python bench/bench_gpu_linear.py --out OUT/bench.json --tuning-out OUT/tuning.json
    python bench/bench_gpu_linear.py --dry-run          # CPU stand-in: arguments, plan, one tiny case

Suites (--suite, comma-separated):
  linear  weights 4096x4096, 4096x11008, 11008x4096, 8192x8192, 28672x8192 (out x in), batch
          1, 4, 16, 32, 128, 2048, bf16. Providers: cublas (F.linear on the dense weight), cuda
          (our CUDA kernels, forced), triton (forced), cusparselt and cutlass (2:4 GEMMs, forced),
          for 2:4; cuda and triton for unstructured at 30% density. Every provider is checked
          against fp64 first.
  masked  masked fine-tuning: forward, input and weight gradients through the dispatched path
          (cuBLAS + masking kernel) against the fused Triton kernels, at 4096x4096, 2048 rows.
  e2e     a Llama-style decoder (dim 4096, SwiGLU 11008, 4 layers) dense against 2:4-sparsified:
          prefill (1 x 512 tokens) and decode (batch 1, 32 tokens), tokens per second.
  ncu     no timing: the two CUDA decode kernels (2:4 and 30% bitmask, 4096x4096, batch 1),
          three calls each, for Nsight Compute to profile (bench/gpu_check.sh's optional step).

Timing: weights rotated over more than 3x the GPU's L2 (so they stream from HBM); a call's
time is CUDA events around CUDA-graph replays of the rotated calls (kernel time, no launch
gaps: the headline "us"); the same calls issued eagerly give the per-call time with host
dispatch and launch ("eager_us"); the difference is reported as launch overhead. Medians
with 20th/80th percentiles; GB/s of the weight's bytes against the copy bandwidth measured
at the start of the run (bytes read + written).

Output: rows (JSON) rewritten after every shape, so a run cut short keeps what it measured;
--tuning-out writes the medians per (op, batch bucket, shape) in sparsekern.tuning's format
(SPARSEKERN_TUNING=that file makes dispatch use them). --budget-s stops starting new shapes
when the time is used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

F = torch.nn.functional
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (28672, 8192)]
BATCHES = [1, 4, 16, 32, 128, 2048]
NM_PROVIDERS = ["cublas", "cuda", "triton", "cusparselt", "cutlass"]
BITMASK_PROVIDERS = ["cuda", "triton"]
BITMASK_DENSITY = 0.3
SUITES = ("linear", "masked", "e2e", "ncu")
# Seconds each suite is planned to take on one H100 (the dry run checks the sum against
# bench/gpu_check.sh's budget for the step).
PLANNED_S = {"linear": 75, "masked": 8, "e2e": 25, "ncu": 5}


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
    plan = [("nm_linear", "2:4", 0.5, p, nm) for p in NM_PROVIDERS] + \
           [("bitmask_linear", "unstructured", BITMASK_DENSITY, p, bm) for p in BITMASK_PROVIDERS]
    for B in batches:
        x = torch.randn(B, K, device=device, dtype=dtype, generator=gen)
        cublas_us = None
        refs = {}
        for op, pattern, density, provider, weights in plan:
            if provider == "triton" and op == "bitmask_linear" and B > 32:
                continue  # the Triton bitmask kernel is a decode kernel: not timed at large batch
            row = {"suite": "linear", "op": op, "provider": provider, "pattern": pattern, "density": density,
                   "dtype": str(dtype).split(".")[-1], "shape": f"{N}x{K}", "batch": B, "device": env["device_name"]}
            if provider == "cublas":
                ws = pruned
                fn = lambda w, x=x: F.linear(x, w)  # noqa: E731
                nbytes = dense_bytes
            else:
                backend = cpu_backend.get(provider, provider) if device == "cpu" else provider
                ws = weights
                fn = forced(backend, lambda w, x=x, op=op: getattr(ops, op)(x, w))
                nbytes = weights[0].nbytes
            try:
                y = fn(ws[0])
            except Exception as exc:  # noqa: BLE001 - reported as a row, not fatal
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            if op not in refs:
                refs[op] = x.double() @ weights[0].to_dense().double().t()
            err = rel_err(y, refs[op])
            if not err < 2e-2:
                rows.append({**row, "error": f"relative error {err:.2e} against fp64: not timed"})
                continue
            t = time_graph_us([lambda w=w: fn(w) for w in ws], device, a.reps, a.min_calls)
            g, e = quant(t["graph"]), quant(t["eager"])
            if provider == "cublas":
                cublas_us = g["median"]
            row.update({"us": g["median"], "p20_us": g["p20"], "p80_us": g["p80"], "eager_us": e["median"],
                        "launch_overhead_us": max(0.0, e["median"] - g["median"]), "graph_error": t["graph_error"],
                        "weight_bytes": int(nbytes), "gb_per_s": nbytes / (g["median"] * 1e-6) / 1e9,
                        "rel_err": err, "copies": len(ws)})
            row["pct_copy_bw"] = 100 * row["gb_per_s"] / env["copy_gbs"] if env.get("copy_gbs") else None
            row["x_cublas"] = (cublas_us / g["median"]) if cublas_us else None
            rows.append(row)
        del x, refs
    del pruned, nm, bm
    if device == "cuda":
        torch.cuda.empty_cache()


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

    with torch.no_grad():
        for name, m in (("dense", dense), ("2:4", sparse)):
            pre = timed(lambda m=m: m(ids), 3)
            dec = timed(lambda m=m: m.generate(ids[:, :16], new), 2)
            rows.append({"suite": "e2e", "op": "llama_decoder", "provider": name, "dtype": str(dtype).split(".")[-1],
                         "shape": f"dim{cfg['dim']}-hidden{cfg['hidden']}-layers{cfg['layers']}",
                         "device": env["device_name"], "prefill_tokens": prompt, "prefill_ms": pre * 1e3,
                         "prefill_tok_per_s": prompt / pre, "decode_tokens": new, "decode_ms": dec * 1e3,
                         "decode_tok_per_s": new / dec})


# ------------------------------------------------------------------------ output
def tuning_rows(rows) -> list[dict]:
    """Medians (graph replay, ms) per (op, batch bucket, shape) for sparsekern.tuning."""
    from sparsekern.ops import batch_bucket

    out = {}
    for r in rows:
        if r.get("suite") != "linear" or "us" not in r or r["provider"] == "cublas":
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
             f"{'GB/s':>6} {'%copy':>5} {'x cublas':>8}  note"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['suite']:6} {r['op']:26} {r['provider']:12} {r.get('shape', ''):12} "
                         f"{r.get('batch', ''):>5}  error: {r['error'][:90]}")
        elif r["suite"] == "ncu":
            lines.append(f"ncu    {r['op']:26} {r['provider']:12} {r['shape']:12} {r['batch']:>5}  {r['note']}")
        elif r["suite"] == "e2e":
            lines.append(f"e2e    {r['op']:26} {r['provider']:12} prefill {r['prefill_tok_per_s']:.0f} tok/s "
                         f"({r['prefill_ms']:.1f} ms), decode {r['decode_tok_per_s']:.1f} tok/s")
        else:
            def f(k, fmt):
                return format(r[k], fmt) if r.get(k) is not None else "-"
            lines.append(f"{r['suite']:6} {r['op']:26} {r['provider']:12} {r['shape']:12} {r['batch']:>5} "
                         f"{f('us', '9.2f')} {f('eager_us', '8.1f')} {f('gb_per_s', '6.0f')} "
                         f"{f('pct_copy_bw', '5.0f')} {f('x_cublas', '8.2f')}  "
                         f"{'' if not r.get('graph_error') else 'eager only: ' + r['graph_error'][:40]}")
    return "\n".join(lines)


def main(argv=None):
    a = parse(argv)
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        planned = sum(PLANNED_S[s] for s in a.suites)
        cases = len(a.shape_list) * len(a.batch_list) * (len(NM_PROVIDERS) + len(BITMASK_PROVIDERS))
        print(f"bench_gpu_linear --dry-run: suites {a.suites}, {len(a.shape_list)} shapes x {len(a.batch_list)} "
              f"batches x {len(NM_PROVIDERS) + len(BITMASK_PROVIDERS)} providers = {cases} linear cases; "
              f"planned {planned} s on one H100")
        print(json.dumps({"planned_s": planned, "linear_cases": cases}))
        a.shape_list, a.batch_list, a.reps = [(64, 128)], [1, 4], 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu_linear: no CUDA GPU (use --dry-run for the CPU stand-in)")
    a.min_calls = 1 if a.dry_run else 24
    from sparsekern.bench.common import environment

    dtype = getattr(torch, a.dtype)
    env = environment(device)
    if device == "cuda":
        from sparsekern.bench.cases import copy_bandwidth_gbs

        env["copy_gbs"] = copy_bandwidth_gbs("cuda")
        env["l2_bytes"] = l2_bytes(device)
        print(f"{env['gpu']}, torch {env['torch']}, triton {env.get('triton')}, commit {env['commit']}; copy "
              f"{env['copy_gbs']:.0f} GB/s, L2 {env['l2_bytes'] >> 20} MiB", flush=True)
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
