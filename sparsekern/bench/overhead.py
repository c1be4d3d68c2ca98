"""Per-call overhead of the one door (sparsekern.ops) and of a sparse module, on shapes so
small that the kernel's own work is a few microseconds.

For each sparse linear op, timed interleaved (round-robin, `rounds` rounds of `calls` calls
each; median and p20/p80 of the per-call time):

  ops           ops.<op>(x, W): checks, the cached dispatch decision, the kernel
  kernel        the compiled op alone, called below autograd (what ops ends up running)
  kernel again  the same call a second time in the loop: the noise floor
  module        SparseLinear(Policy("sparse")) forward, no grad (after its first call: the
                cached call per input shape, nn._SparseMixin._keep_call)
  module auto   SparseLinear with the default Policy("auto"): the path it chose per bucket
                (a small layer may keep a dense copy, dispatch_rules.DENSE_COPY_MAX_BYTES)
  nn.Linear     torch's dense module on the same shape (the module a sparse one replaces)
  F.linear      torch's dense linear on the same shape (for scale)

The overhead rows are ops minus kernel and module minus kernel (median): what the Python
door and the module cost per call beyond the compiled op.

    python -m sparsekern.bench.overhead [--device cpu|cuda] [--rounds 15] [--calls 2000] [--threads N]
                                        [--clock wall|thread] [--out FILE.json]

prints the table and, with --out, writes {"environment": ..., "rows": [...]} (common.write_json).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .. import ops
from ..formats import BitmaskWeight, BlockWeight, NMWeight
from ..nn import Policy, SparseLinear
from .common import environment, quantiles, write_json

IN, OUT = 256, 64


def _weights(device):
    w = torch.randn(OUT, IN, device=device)
    return {"nm_linear": NMWeight.from_dense(w, 2, 4),
            "bitmask_linear": BitmaskWeight.from_dense(w, torch.rand(OUT, IN, device=device) < 0.3),
            "block_linear": BlockWeight.from_dense(w, (16, 16), torch.rand(OUT, IN, device=device) < 0.02)}


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _per_call(fn, calls: int, sync, clock=time.perf_counter) -> float:
    sync()
    t = clock()
    for _ in range(calls):
        fn()
    sync()
    return (clock() - t) / calls


def measure(device: str = "cpu", rounds: int = 15, calls: int = 2000, clock: str = "wall") -> list[dict]:
    """Rows of per-call times (see the module docstring); one row per (op, provider)."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        calls = min(calls, 500)
    x = torch.randn(1, IN, device=dev)
    rows = []
    for op, W in _weights(dev).items():
        backend, _ = ops.explain_backend(op, x, W)
        raw = getattr(getattr(torch.ops, "sparsekern"), op).default
        args = (x, *W.kernel_args(), None)

        def kernel():
            with torch._C._AutoDispatchBelowAutograd():
                return raw(*args)

        dense = W.to_dense()
        module = SparseLinear.from_format(W, policy=Policy("sparse")).eval()
        auto = SparseLinear.from_format(W, policy=Policy("auto", cache=False)).eval()
        linear = torch.nn.Linear(IN, OUT, bias=False, device=dev).eval()
        linear.weight.data.copy_(dense)
        fns = {"ops": lambda: getattr(ops, op)(x, W), "kernel": kernel, "kernel again": kernel,
               "module": lambda: module(x), "module auto": lambda: auto(x), "nn.Linear": lambda: linear(x),
               "F.linear": lambda: torch.nn.functional.linear(x, dense)}
        samples = {p: [] for p in fns}
        with torch.no_grad():
            for fn in fns.values():
                _per_call(fn, 50, sync)
            for _ in range(rounds):
                for p, fn in fns.items():
                    samples[p].append(_per_call(fn, calls, sync, CLOCKS[clock]))
        common = {"suite": "overhead", "op": op, "pattern": W.pattern, "device": device, "dtype": "float32",
                  "shape": [OUT, IN], "batch": 1, "backend": backend, "clock": clock}
        for p, ts in samples.items():
            extra = {"path": auto.bucket_choices[1].path} if p == "module auto" else {}
            rows.append({**common, "provider": p, **extra, **quantiles(ts)})
        over = [a - b for a, b in zip(samples["ops"], samples["kernel"])]
        floor = [abs(a - b) for a, b in zip(samples["kernel"], samples["kernel again"])]
        rows.append({**common, "provider": "ops overhead (ops - kernel)", **quantiles(over),
                     "noise_floor_ms": statistics.median(floor) * 1e3})
        over = [a - b for a, b in zip(samples["module"], samples["kernel"])]
        rows.append({**common, "provider": "module overhead (module - kernel)", **quantiles(over),
                     "noise_floor_ms": statistics.median(floor) * 1e3})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per op, every provider's median and p20-p80 in microseconds."""
    lines = ["| op | provider | median µs | p20–p80 µs |", "|---|---|---|---|"]
    for r in rows:
        extra = f" (noise floor {r['noise_floor_ms'] * 1e3:.2f})" if "noise_floor_ms" in r else \
            f" (path {r['path']})" if "path" in r else ""
        lines.append(f"| {r['op']} ({r['backend']}) | {r['provider']} | {r['median_ms'] * 1e3:.2f}{extra} | "
                     f"{r['p20_ms'] * 1e3:.2f}–{r['p80_ms'] * 1e3:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m sparsekern.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (samples per row)")
    p.add_argument("--calls", type=int, default=2000, help="calls per sample (at most 500 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 keeps a busy machine's thread wake-ups out of "
                        "microsecond timings")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall: perf_counter; thread: this thread's CPU time (time.thread_time), which leaves "
                        "out the time another process holds the core on a shared machine (CPU only)")
    p.add_argument("--out", default=None, help="JSON file for the rows (folders made as needed)")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("overhead: --device cuda but no CUDA GPU")
    env = environment(a.device)
    if a.clock == "thread" and a.device == "cuda":
        raise SystemExit("overhead: --clock thread measures host CPU time only; use --clock wall on CUDA")
    rows = measure(a.device, a.rounds, a.calls, a.clock)
    for r in rows:
        r["device"] = env["device_name"]
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['device_name']}, "
          f"{env['threads']} threads")
    print(table(rows))
    if a.out:
        write_json(a.out, env, rows)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
