"""Quantized sparse decode (batch 1) on the CPU against torch's int8 dynamic Linear and dense
fp32 / bf16, for the Llama-style layer shapes, in one process.

    python bench/bench_decode_q.py                       # 2 threads, 15 rounds
    python bench/bench_decode_q.py --quick               # 5 rounds, smaller rotation
    python bench/bench_decode_q.py --out bench/results/cpu-decode-q-20261206/decode_q.json

Shapes (out <- in): 2048 <- 2048 (attention projections), 5632 <- 2048 (gate, up), 2048 <-
5632 (down), 32000 <- 2048 (lm_head). Providers:
  torch int8 dynamic   torch.ao.quantization.quantize_dynamic of nn.Linear, engine x86
                       (timed twice: the second copy gives the noise floor)
  dense fp32 / bf16    nn.Linear in that dtype
  sparsekern           2:4 + int8, 70% unstructured (bitmask) + int8, 2:4 + int4 (group 128),
                       each with the exact algorithm (fp32 activations, weights dequantized in
                       registers) and the int8-activation one (dispatch_rules.Q_ALGO_INT8_ACT),
                       both through ops.sparse_linear with fp32 activations.
Each provider's weight is copied until its copies hold more than --rotate-mib (well past the
32 MiB L3), and one timed sample is one pass over the copies, so every call streams its
weight from memory. Each output is checked against fp64 of the provider's own weight first
(exact paths: 1e-5 relative; int8 activations: 2e-2, the rounding of x to 255 levels). All
providers of a shape are timed round-robin. "GB/s" is the provider's weight bytes (as held:
values, indexes, scales) over its median; "x copy" that over the measured copy bandwidth
(bytes read + written per second); "bytes/s x int8" that over torch int8 dynamic's.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import warnings

import torch
from torch import nn

from sparsekern import _extension, dispatch_rules, ops
from sparsekern.bench.cases import copy_bandwidth_gbs
from sparsekern.bench.common import compare, environment, interleaved, pick_threads, write_json
from sparsekern.formats import BitmaskWeight, NMWeight
from sparsekern.reporting import markdown_table

SHAPES = {"attn 2048<-2048": (2048, 2048), "gate/up 5632<-2048": (5632, 2048), "down 2048<-5632": (2048, 5632),
          "lm_head 32000<-2048": (32000, 2048)}
# per decoder layer (q, k, v, o; gate, up; down) and the lm_head once: the model's weight mix
LAYER_COUNTS = {"attn 2048<-2048": 4, "gate/up 5632<-2048": 2, "down 2048<-5632": 1}
BASELINE, AGAIN = "torch int8 dynamic", "torch int8 dynamic (again)"


@contextlib.contextmanager
def q_act(choice: str):
    old = os.environ.get("SPARSEKERN_Q_ACT")
    os.environ["SPARSEKERN_Q_ACT"] = choice
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSEKERN_Q_ACT", None)
        else:
            os.environ["SPARSEKERN_Q_ACT"] = old


def torch_int8_dynamic(w: torch.Tensor) -> nn.Module:
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]


def providers(w: torch.Tensor):
    """name -> (make a copy: () -> (callable x -> y, weight bytes, fp64 dense weight, the sparsekern
    format or None), SPARSEKERN_Q_ACT or None, relative tolerance against fp64)."""
    o, k = w.shape

    def dyn():
        m = torch_int8_dynamic(w)
        wq = m.weight()
        return m, o * k, wq.dequantize().double(), None

    def dense(dtype):
        def make():
            wd = w.to(dtype).clone()
            return (lambda x: torch.nn.functional.linear(x.to(dtype), wd)), wd.numel() * wd.element_size(), \
                wd.double(), None
        return make

    def sk(build):
        def make():
            W = build()
            return (lambda x: ops.sparse_linear(x, W)), W.nbytes, W.dequantized().to_dense().double(), W
        return make

    nm8 = lambda: NMWeight.from_dense(w, 2, 4, quantize="int8")  # noqa: E731
    nm4 = lambda: NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=128)  # noqa: E731
    mask = torch.rand(o, k, generator=torch.Generator().manual_seed(1)) >= 0.7
    bm8 = lambda: BitmaskWeight.from_dense(w, mask, quantize="int8")  # noqa: E731
    out = {BASELINE: (dyn, None, 2e-2), AGAIN: (dyn, None, 2e-2),
           "dense fp32": (dense(torch.float32), None, 1e-5), "dense bf16": (dense(torch.bfloat16), None, 1e-2)}
    for name, build in (("2:4 int8", nm8), ("70% int8", bm8), ("2:4 int4 g128", nm4)):
        out[f"{name} exact"] = (sk(build), "exact", 1e-5)
        out[f"{name} int8-act"] = (sk(build), "int8", 2e-2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--rotate-mib", type=int, default=128, help="bytes of each provider's rotated copies (MiB)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    p.add_argument("--threads", default="2", help="intra-op threads (default 2, as issue 28's goals), or auto")
    p.add_argument("--clock", default="wall", choices=["wall", "thread"],
                   help="wall (perf_counter) or thread (CPU time of this thread; with --threads 1 on a shared "
                        "machine, leaves out the time others held the CPU)")
    p.add_argument("--quick", action="store_true", help="5 rounds, 64 MiB rotation")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    if a.clock == "thread" and a.threads != "1":
        p.error("--clock thread measures one thread: use it with --threads 1")
    if a.quick:
        a.rounds, a.rotate_mib = 5, 64
    _, why = pick_threads(a.threads if a.threads == "auto" else int(a.threads))
    env = environment("cpu")
    env["threads_choice"] = why
    env["clock"] = a.clock
    env["copy_gbs"] = copy_bw = copy_bandwidth_gbs("cpu") if a.clock == "wall" else copy_bandwidth_thread_gbs()
    env["q_act_vector_kernels"] = bool(_extension.BUILD_INFO.get("cpu_avx512_runtime"))
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['cpu']}, "
          f"{env['threads']} threads ({why}), load average {env['machine']['loadavg']}; copy bandwidth "
          f"{copy_bw:.1f} GB/s; weights rotated over {a.rotate_mib} MiB per provider")
    torch.manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        o, k = SHAPES[shape]
        w = torch.randn(o, k) / math.sqrt(k)
        x = torch.randn(1, k)
        calls = {}
        meta = {}
        for name, (make, algo, tol) in providers(w).items():
            ctx = q_act(algo) if algo else contextlib.nullcontext()
            fn, nbytes, dense, fmt = make()
            copies = max(2, math.ceil(a.rotate_mib * 2**20 / nbytes))
            fns = [fn] + [make()[0] for _ in range(copies - 1)]
            with ctx:
                y = fn(x).double()
                if fmt is not None:
                    meta[name] = ops.explain_backend(fmt.OP, x, fmt)[1]
                    want = "int8 activations" if algo == "int8" else "fp32"
                    assert ("int8 activations" in meta[name]) == (algo == "int8"), f"{name}: {meta[name]} ({want})"
            ref = x.double() @ dense.t()
            err = ((y - ref).norm() / ref.norm()).item()
            if err > tol:
                raise AssertionError(f"{shape} {name}: relative error {err:.2e} > {tol:.0e}")

            def timed(fns=fns, algo=algo):
                def run():
                    if algo:
                        with q_act(algo):
                            for f in fns:
                                f(x)
                    else:
                        for f in fns:
                            f(x)
                return run
            calls[name] = timed()
            meta.setdefault(name, "")
            rows.append({"shape": shape, "out": o, "in": k, "provider": name, "batch": 1, "weight_bytes": nbytes,
                         "copies": copies, "rel_err": err, "algorithm": algo or "", "dtype_x": "float32"})
        samples = interleaved(calls, a.rounds, clock=time.thread_time if a.clock == "thread" else time.perf_counter)
        n_copies = {r["provider"]: r["copies"] for r in rows if r["shape"] == shape}
        samples = {kk: [s / n_copies[kk] for s in v] for kk, v in samples.items()}
        res = compare(samples, BASELINE, AGAIN)
        base_gbs = None
        for r in rows:
            if r["shape"] != shape:
                continue
            c = res[r["provider"]]
            r.update({kk: c[kk] for kk in ("median_ms", "p20_ms", "p80_ms", "rounds", "speedup", "speedup_p20",
                                           "speedup_p80", "noise_floor", "verdict")})
            r["gb_per_s"] = r["weight_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            r["x_copy"] = r["gb_per_s"] / copy_bw
            r["explain"] = meta[r["provider"]]
            if r["provider"] == BASELINE:
                base_gbs = r["gb_per_s"]
        for r in rows:
            if r["shape"] == shape:
                r["bytes_per_s_x_int8"] = r["gb_per_s"] / base_gbs
        print(table([r for r in rows if r["shape"] == shape]))
        if a.out:
            env["loadavg_end"] = list(os.getloadavg())
            write_json(a.out, env, rows)
    model = model_rows(rows, copy_bw)
    if model:
        print("\nLlama-style decode step (4 layers + lm_head), the sum of the per-shape medians above:")
        print(markdown_table(model, [("provider", "provider", ""), ("ms", "median_ms", ".3f"),
                                     ("x torch int8", "speedup", ".2f"), ("GB/s", "gb_per_s", ".1f"),
                                     ("x copy", "x_copy", ".2f"), ("bytes/s x int8", "bytes_per_s_x_int8", ".2f")]))
    if a.out:
        env["loadavg_end"] = list(os.getloadavg())
        write_json(a.out, env, rows + model)
        print(f"wrote {a.out}")
    return rows


def copy_bandwidth_thread_gbs(mib: int = 256, reps: int = 7) -> float:
    """copy_bandwidth_gbs on the thread-CPU-time clock (one thread): bytes read + written per
    second of the fastest of `reps` copies."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        dst.copy_(src)
        best = min(best, time.thread_time() - t)
    return 2 * src.numel() * 4 / best / 1e9


def table(rows):
    return markdown_table(rows, [
        ("shape", "shape", ""), ("provider", "provider", ""), ("median ms", "median_ms", ".3f"),
        ("p20", "p20_ms", ".3f"), ("p80", "p80_ms", ".3f"), ("x torch int8", "speedup", ".2f"),
        ("p20-p80", lambda r: f"{r['speedup_p20']:.2f}-{r['speedup_p80']:.2f}", ""), ("verdict", "verdict", ""),
        ("GB/s", "gb_per_s", ".1f"), ("x copy", "x_copy", ".2f"), ("bytes/s x int8", "bytes_per_s_x_int8", ".2f"),
        ("noise", lambda r: f"{r['noise_floor']:.1%}", "")])


def model_rows(rows, copy_bw):
    """The decode step's time per provider as the sum over the model's layers of the measured
    per-shape medians (derived, not timed end to end): LAYER_COUNTS x 4 layers + the lm_head."""
    shapes = {r["shape"] for r in rows}
    if not set(SHAPES) <= shapes:
        return []
    out = []
    counts = {s: 4 * c for s, c in LAYER_COUNTS.items()}
    counts["lm_head 32000<-2048"] = 1
    for prov in dict.fromkeys(r["provider"] for r in rows):
        ms = sum(counts[r["shape"]] * r["median_ms"] for r in rows if r["provider"] == prov)
        nbytes = sum(counts[r["shape"]] * r["weight_bytes"] for r in rows if r["provider"] == prov)
        out.append({"shape": "decode step (derived)", "provider": prov, "median_ms": ms, "weight_bytes": nbytes,
                    "gb_per_s": nbytes / (ms * 1e-3) / 1e9})
    base = next(r for r in out if r["provider"] == BASELINE)
    for r in out:
        r["speedup"] = base["median_ms"] / r["median_ms"]
        r["x_copy"] = r["gb_per_s"] / copy_bw
        r["bytes_per_s_x_int8"] = r["gb_per_s"] / base["gb_per_s"]
    return out


if __name__ == "__main__":
    main()
