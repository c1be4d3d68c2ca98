"""GPU sparse linear kernels against cuBLAS dense and torch's semi-structured 2:4, in one run.

    python bench/bench_gpu_linear.py --out OUT/gpu_linear.json

bf16 by default, weights of real model shapes, batch 1 to 32 (the memory-bound decode
regime), weights rotated so they come from device memory, CUDA events, median with
20th/80th percentiles, achieved GB/s against the card's measured copy bandwidth (measured
at the start of the run). Every provider is checked against the fp64 reference first.
"""
from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from sparsekern import ops
from sparsekern.bench import cases
from sparsekern.bench.common import environment, quantiles, write_json
from sparsekern.formats import BitmaskWeight, NMWeight
from sparsekern.reporting import markdown_table

F = torch.nn.functional
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]


def forced(backend: str, x, w):
    """ops.sparse_linear on one backend ("cuda" or "triton"); raises when it cannot run here."""
    with ops.use_backend(backend):
        return ops.sparse_linear(x, w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,32")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rotate-mib", type=int, default=1024)
    p.add_argument("--shapes", default="all", help="'all' or 'small' (first two shapes)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_linear: no CUDA GPU")
    dtype = getattr(torch, a.dtype)
    env = environment("cuda")
    env["copy_gbs"] = cases.copy_bandwidth_gbs("cuda")
    print(f"{env['gpu']}, torch {env['torch']}, commit {env['commit']}; copy bandwidth {env['copy_gbs']:.0f} GB/s")
    batches = [int(b) for b in a.batches.split(",")]
    shapes = SHAPES if a.shapes == "all" else SHAPES[:2]
    rows = []
    bar = tqdm(total=len(shapes) * len(batches), desc="gpu linear", mininterval=1.0)
    for si, (N, K) in enumerate(shapes):
        copies = max(2, math.ceil(a.rotate_mib * 2**20 / (N * K * 2)))
        gen = torch.Generator(device="cuda").manual_seed(si)
        dense = [torch.randn(N, K, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
        providers = {"torch.dense": ("dense", 1.0, [(w, w) for w in dense])}
        nm = [NMWeight.from_dense(w, 2, 4) for w in dense]
        providers["nm_linear"] = ("2:4", 0.5, [(W, W.to_dense()) for W in nm])
        for d in (0.3, 0.1):
            bm = [BitmaskWeight.from_dense(w, torch.rand(w.shape, device="cuda", generator=gen) < d) for w in dense]
            providers[f"bitmask_linear@{d}"] = ("unstructured", d, [(W, W.to_dense()) for W in bm])
            providers[f"triton.bitmask_linear@{d}"] = ("unstructured", d, [(W, W.to_dense()) for W in bm])
        providers["triton.nm_linear"] = ("2:4", 0.5, providers["nm_linear"][2])
        if N % 64 == 0 and K % 64 == 0:  # block_linear has no CUDA C++ kernel: Triton only
            blk = [cases.sparse_format(w, "block64", 0.1, gen) for w in dense]
            providers["triton.block_linear"] = ("block64", 0.1, [(W, W.to_dense()) for W in blk])
        try:
            from torch.sparse import to_sparse_semi_structured

            semi = [to_sparse_semi_structured(W.to_dense()) for W in nm]
            providers["torch.semi_structured"] = ("2:4", 0.5, list(zip(semi, [W.to_dense() for W in nm])))
        except Exception as e:  # noqa: BLE001 - the peer may not run on this card/torch
            print(f"torch.semi_structured unavailable: {type(e).__name__}: {e}")
        for B in batches:
            x = torch.randn(B, K, device="cuda", dtype=dtype, generator=gen)
            dense_ms = None
            for name, (pattern, density, items) in providers.items():
                if name == "torch.dense":
                    fn = lambda w, x=x: F.linear(x, w)  # noqa: E731
                elif name == "torch.semi_structured":
                    fn = lambda w, x=x: F.linear(x, w)  # noqa: E731
                else:  # the CUDA C++ kernel, or the Triton one, forced (an error if it cannot run)
                    backend = "triton" if name.startswith("triton.") else "cuda"
                    fn = lambda w, x=x, backend=backend: forced(backend, x, w)  # noqa: E731
                w0, ref_w = items[0]
                try:
                    y = fn(w0)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {N}x{K} B={B}: does not run ({type(e).__name__}: {e})")
                    continue
                ref = x.double() @ ref_w.double().t()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    raise SystemExit(f"{name} {N}x{K} B={B}: relative error {err:.2e}; not timing")
                q = quantiles(cases.time_calls([lambda w=w: fn(w) for w, _ in items], "cuda", 50))
                nbytes = (w0.nbytes if hasattr(w0, "nbytes") and not isinstance(w0, torch.Tensor)
                          else ref_w.numel() * ref_w.element_size() * (0.5625 if name == "torch.semi_structured" else 1))
                if name == "torch.dense":
                    dense_ms = q["median_ms"]
                gbs = nbytes / (q["median_ms"] * 1e-3) / 1e9
                rows.append({"op": "linear", "provider": name.split("@")[0], "pattern": pattern, "density": density,
                             "dtype": a.dtype, "shape": [N, K], "batch": B, "device": env["gpu"], **q,
                             "weight_bytes": int(nbytes), "gb_per_s": gbs, "pct_copy_bw": 100 * gbs / env["copy_gbs"],
                             "speedup_vs_dense": (dense_ms / q["median_ms"]) if dense_ms else None, "rel_err": err})
            bar.update()
        del dense, nm, providers
        torch.cuda.empty_cache()
    bar.close()
    cols = [("provider", "provider", ""), ("pattern", "pattern", ""), ("density", "density", ".0%"),
            ("shape", "shape", ""), ("batch", "batch", "d"), ("median ms", "median_ms", ".4f"),
            ("p20", "p20_ms", ".4f"), ("p80", "p80_ms", ".4f"), ("GB/s", "gb_per_s", ".0f"),
            ("% copy", "pct_copy_bw", ".0f"), ("x dense", "speedup_vs_dense", ".2f")]
    for r in rows:
        r["shape"] = f"{r['shape'][0]}x{r['shape'][1]}" if isinstance(r["shape"], list) else r["shape"]
    print(markdown_table(rows, cols))
    if a.out:
        write_json(a.out, env, rows)
    return rows


if __name__ == "__main__":
    main()
