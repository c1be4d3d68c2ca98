"""Edge-shape smoke test of every GPU path against fp64 (bench/gpu_check.sh, step "smoke").

    python bench/gpu_smoke.py            # on a GPU: every case, one PASS/FAIL line each
    python bench/gpu_smoke.py --dry-run  # CPU stand-in: the same cases, tiny, on the CPU backends

Cases: batch 70000 (large-batch paths: cuSPARSELt/CUTLASS, decompress + cuBLAS, Triton);
K = 513 and 1100 (tails: bitmask, the generic N:M kernel where K % 64 != 0); m = 8 and 16;
quantized values (nm_linear_q int8 and int4 groups, bitmask_linear_q int8; Triton);
non-contiguous x (a strided view); M*N > 2^31 output elements and M*K > 2^31 input elements
(int64 offsets, checked on sampled rows); torch.compile with the batch changing 1 -> 5 -> 17
(C++/CUDA op and Triton op, dynamic shapes, no recompile storm); opcheck on the Triton ops
(aot-dispatch and compile: not seen working on the CPU interpreter, see CONVENTIONS.md).
Each case names the backend that ran (ops.explain_backend; a forced backend that did not run
fails). --budget-s skips what would not finish in time (the two cold torch.compile cases need
~15 s each) so the summary line always comes before the step's timeout. Exit status 1 if any
case fails.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

F = torch.nn.functional


def rel(y, ref):
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Runner:
    def __init__(self, device, dry, budget_s=0.0):
        self.device, self.dry, self.results = device, dry, []
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start) if self.budget_s else float("inf")

    def case(self, name, fn, needs_s=0.0):
        """Runs one case; skipped (a SKIP line, not a failure) when less than needs_s of the
        --budget-s time is left, so the summary line comes before the step's timeout."""
        if self.left() < needs_s:
            self.results.append((name, "SKIP"))
            print(f"SKIP {name}: {max(self.left(), 0):.0f} s of --budget-s left, needs ~{needs_s:.0f} s", flush=True)
            return
        t0 = time.perf_counter()
        try:
            note = fn()
            status = "PASS"
        except Exception as e:  # noqa: BLE001 - every case runs; failures are listed
            status, note = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=3)
        dt = time.perf_counter() - t0
        self.results.append((name, status))
        print(f"{status} {name} ({dt:.1f} s){': ' + note if note else ''}", flush=True)
        if self.device == "cuda":
            torch.cuda.empty_cache()


def check(y, ref, dtype, what):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = rel(y, ref)
    if not err < tol:
        raise AssertionError(f"{what}: relative error {err:.2e} >= {tol:.0e}")
    return err


def linear_case(op, W, x, dtype, backend=None, public=None):
    """y through ops (forced backend if given) against fp64; returns a note with the backend."""
    from sparsekern import ops

    with ops.use_backend(backend):
        ran, _ = ops.explain_backend(op, x, W)
        if backend is not None and ran != backend:
            raise AssertionError(f"{op}: asked for {backend}, dispatch says {ran}")
        y = getattr(ops, public or op)(x, W)
    ref = F.linear(x.double(), W.to_dense().double())
    return f"{ran} rel {check(y, ref, dtype, op):.1e}"


def sampled_rows_case(op, W, x, dtype, backend=None, rows=(0, 1, -1)):
    """For outputs too large for an fp64 reference: compare a few full rows."""
    from sparsekern import ops

    with ops.use_backend(backend):
        ran, _ = ops.explain_backend(op, x, W)
        y = getattr(ops, op)(x, W)
    idx = torch.tensor([r % x.shape[0] for r in rows] + torch.randint(0, x.shape[0], (5,)).tolist(),
                       device=x.device)
    ref = x[idx].double() @ W.to_dense().double().t()
    err = check(y[idx], ref, dtype, op)
    del y
    return f"{ran} rel {err:.1e} on {len(idx)} sampled rows"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU stand-in with tiny shapes")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile cases")
    p.add_argument("--no-cuda", action="store_true", help="the CUDA C++ kernels were not built: Triton and the "
                   "library paths only")
    p.add_argument("--budget-s", type=float, default=0, help="skip cases that would not finish within this many "
                   "seconds of the start (0: no limit); the cold torch.compile cases need ~15 s each")
    a = p.parse_args(argv)
    if a.dry_run:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA GPU (use --dry-run for the CPU stand-in)")
    from sparsekern import ops
    from sparsekern.formats import BitmaskWeight, NMWeight

    dev = "cpu" if a.dry_run else "cuda"
    dry = a.dry_run
    bf16 = torch.bfloat16
    r = Runner(dev, dry, a.budget_s)
    torch.manual_seed(0)
    native = "cpp" if dry else ("triton" if a.no_cuda else "cuda")
    # the dry run: the CPU kernels only ("auto" is the same kernel there)
    backends = [native] if dry else list(dict.fromkeys([None, native, "triton"]))

    def rnd(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, dtype=dtype)

    # -------- batch 70000 (large-batch dispatch, the GEMM path of the CUDA op, Triton)
    B = 700 if dry else 70000
    W24 = NMWeight.from_dense(rnd(256, 512), 2, 4)
    Wbm = BitmaskWeight.from_dense(rnd(256, 512), torch.rand(256, 512, device=dev) < 0.3)
    xb = rnd(B, 512)
    for be in backends:
        r.case(f"nm_linear 2:4 batch {B} backend {be or 'auto'}", lambda be=be: linear_case("nm_linear", W24, xb, bf16, be))
        r.case(f"bitmask_linear 30% batch {B} backend {be or 'auto'}",
               lambda be=be: linear_case("bitmask_linear", Wbm, xb, bf16, be))
    if not dry:
        for be in ("cusparselt", "cutlass"):
            r.case(f"nm_linear 2:4 batch {B} backend {be}", lambda be=be: linear_case("nm_linear", W24, xb, bf16, be))
    del xb

    # -------- K tails and m = 8, 16
    for k in (513, 1100):
        Wk = BitmaskWeight.from_dense(rnd(96, k), torch.rand(96, k, device=dev) < 0.4)
        for bsz in (1, 5, 33):
            x = rnd(bsz, k)
            for be in backends:
                r.case(f"bitmask_linear K={k} batch {bsz} backend {be or 'auto'}",
                       lambda be=be, x=x, Wk=Wk: linear_case("bitmask_linear", Wk, x, bf16, be))
    for (n, m, k, dtype) in ((2, 4, 1100, bf16), (4, 8, 1104, bf16), (5, 16, 1104, torch.float16),
                             (3, 8, 1104, torch.float32), (2, 4, 1024, torch.float32)):
        Wn = NMWeight.from_dense(rnd(80, k, dtype=dtype), n, m)
        for bsz in (1, 7, 40):
            x = rnd(bsz, k, dtype=dtype)
            for be in backends:
                r.case(f"nm_linear {n}:{m} {str(dtype)[6:]} K={k} batch {bsz} backend {be or 'auto'}",
                       lambda be=be, x=x, Wn=Wn, dtype=dtype: linear_case("nm_linear", Wn, x, dtype, be))

    # -------- quantized values (Triton nm_linear_q / bitmask_linear_q; the CPU kernels in the dry run)
    qbackends = ["cpp"] if dry else [None, "triton"]
    for (kind, n, m, k, prec, group) in (("nm", 2, 4, 1100, "int8", 0), ("nm", 2, 4, 1024, "int4", 128),
                                         ("nm", 4, 8, 1104, "int4", 32), ("bm", 0, 0, 1100, "int8", 0)):
        if kind == "nm":
            Wq = NMWeight.from_dense(torch.randn(96, k, device=dev), n, m, quantize=prec, group_size=group).to(dtype=bf16)
        else:
            Wq = BitmaskWeight.from_dense(torch.randn(96, k, device=dev), torch.rand(96, k, device=dev) < 0.3,
                                          quantize=prec).to(dtype=bf16)
        for bsz in ((1, 33) if dry else (1, 33, 700)):
            x = rnd(bsz, k)
            for be in qbackends:
                label = f"{n}:{m}" if kind == "nm" else "30%"
                r.case(f"{Wq.OP} {label} {prec}{'/' + str(group) if group else ''} K={k} batch {bsz} "
                       f"backend {be or 'auto'}",
                       lambda be=be, x=x, Wq=Wq: linear_case(Wq.OP, Wq, x, bf16, be, public="sparse_linear"))

    # -------- non-contiguous x
    base = rnd(9, 2 * 512)
    xs = base[:, ::2]  # stride 2
    xt = rnd(512, 6).t()  # transposed
    for be in backends:
        r.case(f"nm_linear strided x backend {be or 'auto'}", lambda be=be: linear_case("nm_linear", W24, xs, bf16, be))
        r.case(f"bitmask_linear transposed x backend {be or 'auto'}",
               lambda be=be: linear_case("bitmask_linear", Wbm, xt, bf16, be))

    # -------- M*N > 2^31 (output) and M*K > 2^31 (input): int64 offsets
    if not dry:
        big_n = NMWeight.from_dense(rnd(32768, 64), 2, 4)  # y [70000, 32768]: 2.29e9 elements
        x = rnd(70000, 64)
        for be in backends:
            r.case(f"nm_linear M*N > 2^31 backend {be or 'auto'}",
                   lambda be=be: sampled_rows_case("nm_linear", big_n, x, bf16, be))
        del big_n, x
        big_k = NMWeight.from_dense(rnd(64, 32768), 2, 4)  # x [70000, 32768]: 2.29e9 elements
        x = rnd(70000, 32768)
        for be in backends:
            r.case(f"nm_linear M*K > 2^31 backend {be or 'auto'}",
                   lambda be=be: sampled_rows_case("nm_linear", big_k, x, bf16, be))
        bmk = BitmaskWeight.from_dense(rnd(64, 32768), torch.rand(64, 32768, device=dev) < 0.3)
        for be in backends[1:]:
            r.case(f"bitmask_linear M*K > 2^31 backend {be}",
                   lambda be=be: sampled_rows_case("bitmask_linear", bmk, x, bf16, be))
        del big_k, bmk, x

    # -------- torch.compile, batch 1 -> 5 -> 17; opcheck on the Triton ops
    if not a.skip_compile and not dry:
        for be in backends[1:]:
            def compiled(be=be):
                torch._dynamo.reset()
                f = torch.compile(lambda t: ops.nm_linear(t, W24), fullgraph=True, dynamic=None)
                notes = []
                with ops.use_backend(be):
                    for bsz in (1, 5, 17):
                        x = rnd(bsz, 512)
                        y = f(x)
                        notes.append(f"B={bsz} rel {check(y, F.linear(x.double(), W24.to_dense().double()), bf16, 'compile'):.1e}")
                return f"{be}: " + ", ".join(notes)
            r.case(f"torch.compile nm_linear batch 1->5->17 backend {be}", compiled, needs_s=15)

        def triton_opcheck():
            x = rnd(4, 512)
            with ops.use_backend("triton"):
                ops.nm_linear(x, W24)
                ops.bitmask_linear(x, Wbm)
            torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear.default,
                                  (x, W24.values, W24.indices, 2, 4, 512, None))
            torch.library.opcheck(torch.ops.sparsekern_triton.bitmask_linear.default,
                                  (x, Wbm.values, Wbm.bitmask, Wbm.offsets, 512, None))
            return "schema, fake, aot-dispatch"
        r.case("opcheck Triton nm_linear and bitmask_linear", triton_opcheck, needs_s=15)

    failed = [n for n, s in r.results if s == "FAIL"]
    skipped = [n for n, s in r.results if s == "SKIP"]
    print(f"gpu_smoke: {len(r.results) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped for time ({time.perf_counter() - r.start:.0f} s)"
          + (": " + "; ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
