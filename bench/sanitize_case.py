"""Every CUDA and Triton kernel once on small, awkward shapes, each output checked, for
compute-sanitizer memcheck (bench/gpu_check.sh runs it with PYTORCH_NO_CUDA_MEMORY_CACHING=1,
so a read past an allocation is past the end of real device memory, not inside a cached
block).

    compute-sanitizer --tool memcheck python bench/sanitize_case.py
    python bench/sanitize_case.py --dry-run    # CPU stand-in: the same calls on CPU backends

Kernels reached (forced with ops.use_backend, so a silent fallback cannot hide one):
  CUDA   nm24_mma (batch tiles 8/16/32, K tail, row tail, split-K + finalize), nm_fma (m = 4/8/16,
         fp32/bf16/fp16, batch 1/4/8), nm_decompress + cuBLAS (batch > 64), bitmask_warp (batch
         1/4/8, K tail), bitmask_decompress + cuBLAS (batch > 32), apply_bitmask (vector and
         scalar paths) for masked_linear forward and input gradient
  2:4    cuSPARSELt and CUTLASS GEMMs (library kernels), when this torch has them
  Triton nm_linear (2:4 fast path and generic), bitmask_linear, block_linear, masked_linear
         forward / grad_input / grad_weight (masking kernel), the fused masked kernels,
         group_score, act_norm_accumulate, nm_score_compress
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

F = torch.nn.functional


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-cuda", action="store_true", help="the CUDA C++ kernels were not built: Triton only")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("sanitize_case: no CUDA GPU (use --dry-run for the CPU stand-in)")
    from sparsekern import ops, reference
    from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
    from sparsekern.patterns import pack_bitmask
    from sparsekern.triton import load as load_triton

    dev = "cpu" if a.dry_run else "cuda"
    native = "cpp" if a.dry_run else ("triton" if a.no_cuda else "cuda")
    torch.manual_seed(0)
    count = 0

    def close(y, ref, what, tol=2e-2):
        nonlocal count
        y, ref = y.double(), ref.double()
        err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert torch.isfinite(y).all() and err < tol, f"{what}: relative error {err:.2e}"
        count += 1

    def lin(op, W, x, b, backend):
        with ops.use_backend(backend):
            ran, _ = ops.explain_backend(op, x, W)
            assert ran == backend, f"{op}: asked for {backend}, dispatch says {ran}"
            y = getattr(ops, op)(x, W, b)
        close(y, F.linear(x.double(), W.to_dense().double(), None if b is None else b.double()), f"{backend} {op}")

    # the dry run (CPU, Triton interpreter) walks the same code on fewer cases
    dtypes = (torch.bfloat16,) if a.dry_run else (torch.bfloat16, torch.float16, torch.float32)
    batches = (1, 9, 70) if a.dry_run else (1, 3, 9, 17, 33, 70)
    for dtype in dtypes:
        for out, k in ((37, 320), (70, 200)):
            w = torch.randn(out, k, device=dev, dtype=dtype)
            b = torch.randn(out, device=dev, dtype=dtype)
            fmts = [NMWeight.from_dense(w, 2, 4), NMWeight.from_dense(w, 1, 4)]
            if k % 8 == 0:
                fmts.append(NMWeight.from_dense(w, 4, 8))
            if k % 16 == 0:
                fmts.append(NMWeight.from_dense(w, 5, 16))
            bm = BitmaskWeight.from_dense(w, torch.rand(out, k, device=dev) < 0.3)
            for B in batches:
                x = torch.randn(B, k, device=dev, dtype=dtype)
                for W in fmts:
                    lin("nm_linear", W, x, b, native)
                lin("bitmask_linear", bm, x, b if B % 2 else None, native)
                if dtype != torch.float32 and B <= 17:
                    for W in fmts[:2]:
                        lin("nm_linear", W, x, b, "triton")
                    lin("bitmask_linear", bm, x, None, "triton")
            with ops.use_backend(native):
                close(ops.nm_decompress(*fmts[0].kernel_args()), reference.nm_decompress(*fmts[0].kernel_args()),
                      "nm_decompress", 1e-6)
                close(ops.bitmask_decompress(*bm.kernel_args()), reference.bitmask_decompress(*bm.kernel_args()),
                      "bitmask_decompress", 1e-6)

    # 2:4 GEMMs (library kernels); shapes they accept
    if not a.dry_run:
        W = NMWeight.from_dense(torch.randn(64, 128, device=dev, dtype=torch.bfloat16), 2, 4)
        x = torch.randn(70, 128, device=dev, dtype=torch.bfloat16)
        for backend in ("cusparselt", "cutlass"):
            try:
                with ops.use_backend(backend):
                    ops.explain_backend("nm_linear", x, W)
            except RuntimeError as e:
                print(f"sanitize_case: {backend} skipped: {e}")
                continue
            lin("nm_linear", W, x, None, backend)

    # masked training: forward, input and weight gradients (vector and scalar masking paths)
    mt = load_triton("masked_linear")
    for dtype in (torch.bfloat16, torch.float32):
        for out, k in ((37, 200), (24, 201)):
            w = torch.randn(out, k, device=dev, dtype=dtype)
            mask = torch.rand(out, k, device=dev) < 0.5
            bits = pack_bitmask(mask)
            x = torch.randn(5, k, device=dev, dtype=dtype)
            g = torch.randn(5, out, device=dev, dtype=dtype)
            wm = (w * mask).double()
            for backend in (native, "triton"):
                with ops.use_backend(backend):
                    close(ops.masked_linear(x, w, bits), x.double() @ wm.t(), f"{backend} masked_linear")
                    close(ops.masked_linear_grad_input(g, w, bits), g.double() @ wm, f"{backend} grad_input")
            with ops.use_backend("triton"):
                close(ops.masked_linear_grad_weight(g, x, bits), (g.double().t() @ x.double()) * mask, "grad_weight")
            close(mt.fused_forward(x, w, bits), x.double() @ wm.t(), "fused forward")
            close(mt.fused_grad_input(g, w, bits), g.double() @ wm, "fused grad_input")
            close(mt.fused_grad_weight(g, x, bits), (g.double().t() @ x.double()) * mask, "fused grad_weight")

    # Triton: block_linear and the scoring kernels
    w = torch.randn(64, 96, device=dev)
    blk = BlockWeight.from_dense(w, (16, 16), torch.rand(64, 96, device=dev) < 0.05)
    lin("block_linear", blk, torch.randn(3, 96, device=dev), None, "triton")
    g = torch.randn_like(w)
    an = torch.rand(96, device=dev)
    with ops.use_backend("triton"):
        close(ops.group_score(w, 4, 8, 2, grad=g, act_norm=an), reference.group_score(w, g, an, 4, 8, 2), "group_score")
        s = torch.zeros(96, device=dev)
        xs = torch.randn(33, 96, device=dev)
        ops.act_norm_accumulate(s, xs)
        close(s, xs.double().square().sum(0), "act_norm_accumulate", 1e-5)
        v, ix = ops.nm_score_compress(w, 2, 4, grad=g, act_norm=an)
        rv, rix = reference.nm_score_compress(w, g, an, 2, 4)
        assert torch.equal(v, rv) and torch.equal(ix, rix), "nm_score_compress"
        count += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_case: ok ({count} checked outputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
