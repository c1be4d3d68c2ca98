"""CPU sparse linear kernels against dense torch and torch's CSR/BSR matmul, in one run.

    python bench/bench_cpu_linear.py               # K=N=4096, fp32, batch 1 and 8
    python bench/bench_cpu_linear.py --quick       # K=N=2048, fewer repetitions
    python bench/bench_cpu_linear.py --out bench/out/cpu_linear.json
    SPARSEKERN_CPU_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/bench_cpu_linear.py ...
                                                   # the AVX2 configuration on an AVX-512 CPU

Weights are rotated (several copies, more bytes than the last-level cache) so every call
reads its weight from memory, as in a real model. Each provider's output is checked
against the fp64 reference before it is timed (fp32: 1e-5 relative; bf16/fp16: 2x torch's
own error). Per pattern and batch, all providers and dense twice are timed interleaved
(round-robin); "x dense" is dense time over the provider's time from the same loop
(higher is better), "no difference" when inside the noise floor (the two dense runs'
difference, at least 2%). The cases are sparsekern.bench.cases', shared with the suite
(`python -m sparsekern bench`).
"""
from __future__ import annotations

import argparse

import torch

from sparsekern import _extension
from sparsekern.bench import cases
from sparsekern.bench.common import environment, pick_threads, write_json
from sparsekern.reporting import markdown_table, ratio_text

PATTERNS = [("2:4", 0.5), ("4:8", 0.5), ("unstructured", 0.5), ("unstructured", 0.3), ("unstructured", 0.1),
            ("block32", 0.1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096, help="K = N (default 4096)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rotate-mib", type=int, default=512, help="dense bytes of the rotated weights (MiB)")
    p.add_argument("--quick", action="store_true", help="K=N=2048, 5 reps, 256 MiB rotation")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--threads", default="auto", help="intra-op threads, or auto (1 on a machine busier than its CPUs)")
    a = p.parse_args(argv)
    if a.quick:
        a.features, a.reps, a.rotate_mib = 2048, 5, 256
    _, why = pick_threads(a.threads)
    env = environment("cpu")
    env["threads_choice"] = why
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['cpu']}, "
          f"{env['threads']} threads ({why}), load average {env['machine']['loadavg']}; {a.dtype}, "
          f"K=N={a.features}, weights rotated over {a.rotate_mib} MiB; SPARSEKERN_CPU_ISA="
          f"{env['SPARSEKERN_CPU_ISA']}, MKL_ENABLE_INSTRUCTIONS={env['MKL_ENABLE_INSTRUCTIONS']}")
    if not _extension.LOADED:
        print(f"warning: compiled kernels not loaded ({_extension.LOAD_ERROR}); timing the references")
    rows = cases.linear_sweep("cpu", getattr(torch, a.dtype), {"square": (a.features, a.features)},
                              [int(b) for b in a.batches.split(",")], PATTERNS, a.reps, a.rotate_mib, env)
    ok = [r for r in rows if "median_ms" in r]
    table_rows = sorted(ok, key=lambda r: r["batch"])  # per batch: each pattern's loop, dense twice first
    cols = [("provider", "provider", ""), ("pattern", "pattern", ""), ("density", "density", ".0%"),
            ("batch", "batch", "d"), ("median ms", "median_ms", ".3f"), ("p20", "p20_ms", ".3f"),
            ("p80", "p80_ms", ".3f"), ("GB/s", "gb_per_s", ".1f"),
            ("x dense", lambda r: ratio_text(r["speedup"], r["verdict"]), ""),
            ("noise floor", lambda r: f"{r['noise_floor']:.1%}", "")]
    print(markdown_table(table_rows, cols))
    for r in rows:
        if "error" in r:
            print(f"did not run: {r['provider']} {r['pattern']}: {r['error']}")
    if a.out:
        write_json(a.out, env, rows)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
