"""Every CUDA and Triton kernel once on small, awkward shapes, each output checked, for
compute-sanitizer memcheck (bench/gpu_check.sh runs it with PYTORCH_NO_CUDA_MEMORY_CACHING=1,
so a read past an allocation is past the end of real device memory, not inside a cached
block).

    compute-sanitizer --tool memcheck python bench/sanitize_case.py [--budget-s S]
    python bench/sanitize_case.py --dry-run    # CPU stand-in: the same calls on CPU backends

One line per case as it runs ("sanitize_case: [i/n] name: ok ... s"), so a step cut short by
its timeout still shows how far it got and which case was running; --budget-s stops starting
cases after that many seconds (the rest are listed as skipped) so the summary line is printed
before the step's timeout. Exit status 1 if a case failed.

Cost control (memcheck instruments every kernel; Triton compiles cold kernels): one dtype per
kernel family (memcheck looks for addresses, and a family's dtypes share the index arithmetic
apart from the element size, which the chosen dtypes cover: bf16 for the tensor-core, bitmask
and Triton kernels, fp32 for the CUDA-core N:M kernel and masked training), and the shapes of
tests/test_gpu_kernels.py and tests/test_triton.py, so the Triton kernels come from the cache
the tests step filled.

Kernels reached (forced with ops.use_backend, so a silent fallback cannot hide one), in order:
  CUDA   nm24_mma (batch tiles 8/16/32 and two z tiles, K tail, row tail, split-K + finalize,
         K = 64), nm_fma (m = 4/8/16, batch tiles 1/4/8, K % 64 != 0), nm_decompress + cuBLAS
         (batch > 64), bitmask_warp (batch tiles 1/4/8, K tail, bias or none),
         bitmask_decompress + cuBLAS (batch > 32), the decompress ops, apply_bitmask (vector and
         scalar paths) for masked_linear forward and input gradient
  2:4    cuSPARSELt and CUTLASS GEMMs (library kernels), when this torch has them; cuSPARSELt's
         int8 GEMM (nm_linear_q, SPARSEKERN_Q_ACT=int8) with the two Triton passes around it
  Triton nm_linear_q and bitmask_linear_q (int8, int4 groups), nm_linear (2:4 fast path and
         generic), bitmask_linear, block_linear, masked_linear forward / grad_input /
         grad_weight (masking kernel), the fused masked kernels, group_score,
         act_norm_accumulate, nm_score_compress
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from unittest import mock

import torch

F = torch.nn.functional


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-cuda", action="store_true", help="the CUDA C++ kernels were not built: Triton only")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting cases after this long (0: no limit)")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("sanitize_case: no CUDA GPU (use --dry-run for the CPU stand-in)")
    from sparsekern import ops, reference
    from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
    from sparsekern.patterns import pack_bitmask
    from sparsekern.triton import load as load_triton

    start = time.perf_counter()
    dev = "cpu" if a.dry_run else "cuda"
    native = "cpp" if a.dry_run else ("triton" if a.no_cuda else "cuda")
    bf16, f32 = torch.bfloat16, torch.float32
    torch.manual_seed(0)
    cases = []  # (name, fn): fn returns the number of outputs it checked
    count = 0

    def close(y, ref, what, tol=2e-2):
        y, ref = y.double(), ref.double()
        err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert torch.isfinite(y).all() and err < tol, f"{what}: relative error {err:.2e}"
        return 1

    def lin(op, W, x, b, backend, public=None):
        with ops.use_backend(backend):
            ran, _ = ops.explain_backend(op, x, W)
            assert ran == backend, f"{op}: asked for {backend}, dispatch says {ran}"
            y = (getattr(ops, public) if public else getattr(ops, op))(x, W, b)
        return close(y, F.linear(x.double(), W.to_dense().double(), None if b is None else b.double()),
                     f"{backend} {op}")

    def rnd(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, dtype=dtype)

    def add(name, fn):
        cases.append((name, fn))

    # ------------------------------------------------------------ CUDA C++ kernels first
    # nm24_mma (bf16): (37, 320) = one row tile with a row tail, K = 256 + a 64-column tail, two
    # K splits (finalize); batch 1 / 9 / 17 / 33 = tiles 8 / 16 / 32 / two z tiles; 65: GEMM path.
    w24 = NMWeight.from_dense(rnd(37, 320), 2, 4)
    b37 = rnd(37)
    batches = (1, 9, 70) if a.dry_run else (1, 9, 17, 33, 65)
    for B in batches:
        add(f"{native} nm_linear 2:4 bf16 37x320 batch {B}",
            lambda B=B: lin("nm_linear", w24, rnd(B, 320), b37 if B % 2 else None, native))
    w64 = NMWeight.from_dense(rnd(16, 64), 2, 4)
    add(f"{native} nm_linear 2:4 bf16 16x64 batch 5", lambda: lin("nm_linear", w64, rnd(5, 64), None, native))
    # nm_fma (fp32: the 4-byte element path): m = 4/8/16, K % 64 != 0 (200), batch tiles 1/4/8, GEMM
    fma = [(NMWeight.from_dense(rnd(37, 320, dtype=f32), 2, 4), 320), (NMWeight.from_dense(rnd(37, 320, dtype=f32), 4, 8),
                                                                   320),
           (NMWeight.from_dense(rnd(37, 320, dtype=f32), 5, 16), 320), (NMWeight.from_dense(rnd(70, 200, dtype=f32), 1, 4),
                                                                    200)]
    for i, (W, k) in enumerate(fma):
        for B in ((1, 70) if a.dry_run else ((1, 3, 9, 70) if i == 0 else (3, 9))):
            add(f"{native} nm_linear {W.n}:{W.m} fp32 {W.shape[0]}x{k} batch {B}",
                lambda W=W, k=k, B=B: lin("nm_linear", W, rnd(B, k, dtype=f32), None, native))
    # bitmask_warp (bf16): K tail (320 = 5 words), batch tiles 1/4/8, bias or none; 33: GEMM path
    bm = BitmaskWeight.from_dense(rnd(37, 320), torch.rand(37, 320, device=dev) < 0.3)
    bm2 = BitmaskWeight.from_dense(rnd(70, 200), torch.rand(70, 200, device=dev) < 0.3)
    for W in (bm, bm2):
        for B in ((1, 9, 70) if a.dry_run else (1, 3, 9, 33)):
            add(f"{native} bitmask_linear 30% bf16 {W.shape[0]}x{W.shape[1]} batch {B}",
                lambda W=W, B=B: lin("bitmask_linear", W, rnd(B, W.shape[1]), rnd(W.shape[0]) if B % 2 else None,
                                     native))

    def decompress():
        with ops.use_backend(native):
            n = close(ops.nm_decompress(*w24.kernel_args()), reference.nm_decompress(*w24.kernel_args()),
                      "nm_decompress", 1e-6)
            return n + close(ops.bitmask_decompress(*bm.kernel_args()), reference.bitmask_decompress(*bm.kernel_args()),
                             "bitmask_decompress", 1e-6)
    add(f"{native} nm_decompress, bitmask_decompress", decompress)

    # 2:4 GEMMs (library kernels); shapes they accept
    if not a.dry_run:
        Wl = NMWeight.from_dense(rnd(64, 128), 2, 4)
        for backend in ("cusparselt", "cutlass"):
            def lib(backend=backend):
                x = rnd(70, 128)
                try:
                    with ops.use_backend(backend):
                        ops.explain_backend("nm_linear", x, Wl)
                except RuntimeError as e:
                    print(f"sanitize_case: {backend} skipped: {e}")
                    return 0
                return lin("nm_linear", Wl, x, None, backend)
            add(f"{backend} nm_linear 2:4 bf16 64x128 batch 70", lib)

        def cslt_int8():
            # nm_linear_q on cuSPARSELt's int8 GEMM, x quantized per row: the two Triton passes
            # around it (sparsekern/triton/quantize_rows.py) run inside; 70 rows: padding rows
            Wq = NMWeight.from_dense(torch.randn(64, 128, device=dev), 2, 4, quantize="int8").to(dtype=bf16)
            with mock.patch.dict(os.environ, {"SPARSEKERN_Q_ACT": "int8"}):
                with ops.use_backend("cusparselt"):
                    try:
                        ops.explain_backend("nm_linear_q", rnd(70, 128), Wq)
                    except RuntimeError as e:
                        print(f"sanitize_case: cusparselt int8 skipped: {e}")
                        return 0
                return lin("nm_linear_q", Wq, rnd(70, 128), rnd(64), "cusparselt", public="sparse_linear")
        add("cusparselt nm_linear_q 2:4 int8 (x int8, Triton passes) 64x128 batch 70", cslt_int8)

    # masked training (fp32): forward and input gradient on native and Triton, weight gradient
    # and the fused kernels on Triton; 200 columns: vector path, 201: scalar path
    mt = load_triton("masked_linear")
    for out, k in ((37, 200), (24, 201)):
        def masked(out=out, k=k):
            w = rnd(out, k, dtype=f32)
            mask = torch.rand(out, k, device=dev) < 0.5
            bits = pack_bitmask(mask)
            x, g = rnd(5, k, dtype=f32), rnd(5, out, dtype=f32)
            wm = (w * mask).double()
            n = 0
            for backend in (native, "triton"):
                with ops.use_backend(backend):
                    n += close(ops.masked_linear(x, w, bits), x.double() @ wm.t(), f"{backend} masked_linear")
                    n += close(ops.masked_linear_grad_input(g, w, bits), g.double() @ wm, f"{backend} grad_input")
            with ops.use_backend("triton"):
                n += close(ops.masked_linear_grad_weight(g, x, bits), (g.double().t() @ x.double()) * mask,
                           "grad_weight")
            n += close(mt.fused_forward(x, w, bits), x.double() @ wm.t(), "fused forward")
            n += close(mt.fused_grad_input(g, w, bits), g.double() @ wm, "fused grad_input")
            return n + close(mt.fused_grad_weight(g, x, bits), (g.double().t() @ x.double()) * mask, "fused grad_weight")
        add(f"{native}+triton masked_linear fp32 {out}x{k} batch 5", masked)

    # ------------------------------------------------------------ Triton (bf16, tests' shapes)
    def quantized(kind, n, m, k, precision, group, B):
        if kind == "nm":
            W = NMWeight.from_dense(torch.randn(37, k, device=dev), n, m, quantize=precision, group_size=group)
        else:
            W = BitmaskWeight.from_dense(torch.randn(33, k, device=dev), torch.rand(33, k, device=dev) < 0.3,
                                         quantize=precision)
        W = W.to(dtype=bf16)
        return lin(W.OP, W, rnd(B, k), None, "triton", public="sparse_linear")
    for B in (1, 17):
        add(f"triton nm_linear_q 2:4 int8 37x72 batch {B}", lambda B=B: quantized("nm", 2, 4, 72, "int8", 0, B))
        add(f"triton nm_linear_q 2:4 int4/32 37x200 batch {B}", lambda B=B: quantized("nm", 2, 4, 200, "int4", 32, B))
        add(f"triton bitmask_linear_q int8 33x100 batch {B}", lambda B=B: quantized("bm", 0, 0, 100, "int8", 0, B))
    for n, m, k in ((2, 4, 72), (4, 8, 200)):
        W = NMWeight.from_dense(rnd(37, k), n, m)
        for B in (1, 17):
            add(f"triton nm_linear {n}:{m} bf16 37x{k} batch {B}",
                lambda W=W, k=k, B=B: lin("nm_linear", W, rnd(B, k), b37, "triton"))
    Wt = BitmaskWeight.from_dense(rnd(33, 100), torch.rand(33, 100, device=dev) < 0.3)
    for B in (1, 17):
        add(f"triton bitmask_linear 30% bf16 33x100 batch {B}",
            lambda B=B: lin("bitmask_linear", Wt, rnd(B, 100), None, "triton"))

    def block():
        w = rnd(64, 96)
        keep = torch.rand(4, 6, device=dev) < 0.5
        keep[0, 0] = True
        blk = BlockWeight.from_dense(w, (16, 16), keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
        return lin("block_linear", blk, rnd(3, 96), None, "triton")
    add("triton block_linear 16x16 bf16 64x96 batch 3", block)

    def scoring():
        w = torch.randn(64, 96, device=dev)
        g = torch.randn_like(w)
        an = torch.rand(96, device=dev)
        with ops.use_backend("triton"):
            n = close(ops.group_score(w, 4, 8, 2, grad=g, act_norm=an), reference.group_score(w, g, an, 4, 8, 2),
                      "group_score")
            s = torch.zeros(96, device=dev)
            xs = torch.randn(33, 96, device=dev)
            ops.act_norm_accumulate(s, xs)
            n += close(s, xs.double().square().sum(0), "act_norm_accumulate", 1e-5)
            v, ix = ops.nm_score_compress(w, 2, 4, grad=g, act_norm=an)
            rv, rix = reference.nm_score_compress(w, g, an, 2, 4)
            assert torch.equal(v, rv) and torch.equal(ix, rix), "nm_score_compress"
        return n + 1
    add("triton group_score, act_norm_accumulate, nm_score_compress", scoring)

    # ------------------------------------------------------------ run, one line per case
    failed, skipped = [], []
    for i, (name, fn) in enumerate(cases, 1):
        if a.budget_s and time.perf_counter() - start > a.budget_s:
            skipped.append(name)
            print(f"sanitize_case: [{i}/{len(cases)}] {name}: SKIPPED (--budget-s {a.budget_s:.0f} s used)",
                  flush=True)
            continue
        t0 = time.perf_counter()
        try:
            n = fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            count += n
            print(f"sanitize_case: [{i}/{len(cases)}] {name}: ok ({n} outputs, {time.perf_counter() - t0:.1f} s)",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - every case runs; failures are listed
            failed.append(name)
            print(f"sanitize_case: [{i}/{len(cases)}] {name}: FAIL {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    if failed:
        print(f"sanitize_case: FAILED {len(failed)} of {len(cases)} cases: {'; '.join(failed)}")
        return 1
    more = f", {len(skipped)} cases skipped for time" if skipped else ""
    print(f"sanitize_case: ok ({count} checked outputs in {len(cases) - len(skipped)} cases{more}, "
          f"{time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
