"""CPU sparse linear kernels against dense torch and torch's CSR matmul, in one run.

    python bench/bench_cpu_linear.py               # K=N=4096, fp32, batch 1 and 8
    python bench/bench_cpu_linear.py --quick       # smaller, for the quick start
    python bench/bench_cpu_linear.py --out bench/out/cpu_linear.json

Weights are rotated (several copies, more bytes than the last-level cache) so every call
reads its weight from memory, as in a real model. Each provider's output is checked
against the fp64 reference before it is timed. Ratios are dense time over sparse time
from the same run (higher is better).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import ops, reference  # noqa: E402
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight  # noqa: E402

F = torch.nn.functional


def random_mask(shape, density, gen):
    return torch.rand(shape, generator=gen) < density


def make_cases(out_f, in_f, dtype, gen):
    """(provider, pattern, density, builder(weight) -> (callable(x), nbytes, dense_ref_weight))."""

    def dense(w):
        return (lambda x: F.linear(x, w)), w.numel() * w.element_size(), w

    def nm(n, m):
        def build(w):
            W = NMWeight.from_dense(w, n, m)
            return (lambda x: ops.nm_linear(x, W)), W.nbytes, W.to_dense()
        return build

    def bitmask(density):
        def build(w):
            W = BitmaskWeight.from_dense(w, random_mask(w.shape, density, gen))
            return (lambda x: ops.bitmask_linear(x, W)), W.nbytes, W.to_dense()
        return build

    def csr(density):
        def build(w):
            wd = w * random_mask(w.shape, density, gen)
            S = wd.to_sparse_csr()
            nbytes = sum(t.numel() * t.element_size() for t in (S.values(), S.col_indices(), S.crow_indices()))
            return (lambda x: torch.sparse.mm(S, x.t()).t()), nbytes, wd
        return build

    def block(b, density):
        def build(w):
            keep = torch.rand(w.shape[0] // b, w.shape[1] // b, generator=gen) < density
            mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
            W = BlockWeight.from_dense(w, (b, b), mask)
            return (lambda x: ops.block_linear(x, W)), W.nbytes, W.to_dense()
        return build

    cases = [("torch.dense", "dense", 1.0, dense), ("nm_linear", "2:4", 0.5, nm(2, 4)),
             ("nm_linear", "4:8", 0.5, nm(4, 8))]
    for d in (0.5, 0.3, 0.1):
        cases.append(("bitmask_linear", "unstructured", d, bitmask(d)))
    cases.append(("torch.csr", "unstructured", 0.1, csr(0.1)))
    cases.append(("block_linear", "block32", 0.1, block(32, 0.1)))
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=4096, help="K = N (default 4096)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rotate-mib", type=int, default=512, help="dense bytes of the rotated weights (MiB)")
    p.add_argument("--quick", action="store_true", help="K=N=2048, 5 reps, 256 MiB rotation")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    if a.quick:
        a.features, a.reps, a.rotate_mib = 2048, 5, 256
    dtype = getattr(torch, a.dtype)
    K = N = a.features
    batches = [int(b) for b in a.batches.split(",")]
    copies = max(2, math.ceil(a.rotate_mib * 2**20 / (K * N * torch.finfo(dtype).bits / 8)))
    gen = torch.Generator().manual_seed(0)
    env = benchlib.environment("cpu")
    print(f"sparsekern {env['sparsekern']} ({env['commit']}), torch {env['torch']}, {env['cpu']}, "
          f"{env['threads']} threads; {a.dtype}, K=N={K}, {copies} rotated weights per provider")
    if not sparsekern._extension.LOADED:
        print(f"warning: compiled kernels not loaded ({sparsekern._extension.LOAD_ERROR}); timing the references")

    cases = make_cases(N, K, dtype, gen)
    weights = [torch.randn(N, K, generator=gen).to(dtype) for _ in range(copies)]
    built = {}
    for i, (prov, pat, dens, build) in enumerate(cases):
        benchlib.progress(i + 1, len(cases), f"building {prov} {pat} {dens:.0%}")
        built[(prov, pat, dens)] = [build(w) for w in weights]

    rows = []
    for B in batches:
        xs = torch.randn(B, K, generator=gen).to(dtype)
        # Correctness first: each provider against the fp64 reference on its first copy.
        for key, items in built.items():
            fn, _, wref = items[0]
            y = fn(xs).double()
            yref = xs.double() @ wref.double().t()
            err = ((y - yref).norm() / yref.norm()).item()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if not err < tol:
                raise SystemExit(f"{key} batch {B}: relative error {err:.2e} exceeds {tol:.0e}; not timing it")
        fns = {key: [(lambda f=fn: f(xs)) for fn, _, _ in items] for key, items in built.items()}
        samples = benchlib.time_rotating_cpu(fns, a.reps)
        dense_ms = benchlib.quantiles(samples[("torch.dense", "dense", 1.0)])["median_ms"]
        for key, items in built.items():
            prov, pat, dens = key
            q = benchlib.quantiles(samples[key])
            nbytes = items[0][1]
            rows.append({"op": "linear", "provider": prov, "pattern": pat, "density": dens, "dtype": a.dtype,
                         "shape": [N, K], "batch": B, "device": "cpu", **q,
                         "speedup_vs_dense": dense_ms / q["median_ms"],
                         "weight_bytes": nbytes, "gb_per_s": nbytes / (q["median_ms"] * 1e-3) / 1e9,
                         "bytes_vs_dense": nbytes / (N * K * torch.finfo(dtype).bits / 8)})
    cols = [("provider", "provider", ""), ("pattern", "pattern", ""), ("density", "density", ".0%"),
            ("batch", "batch", "d"), ("median ms", "median_ms", ".3f"), ("p20", "p20_ms", ".3f"),
            ("p80", "p80_ms", ".3f"), ("GB/s", "gb_per_s", ".1f"), ("bytes/dense", "bytes_vs_dense", ".3f"),
            ("x dense", "speedup_vs_dense", ".2f")]
    print(benchlib.table(rows, cols))
    if a.out:
        benchlib.write_json(a.out, env, rows)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
