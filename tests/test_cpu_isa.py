"""Every CPU instruction-set build of the N:M and bitmask kernels against fp64.

The C++ op picks its kernels once per process from the CPU and SPARSEKERN_CPU_ISA
("avx512", "avx2", "generic"), so each build runs in a child process here. The tests in
this process exercise only the best build this CPU has; these make sure the others stay
correct on the same machine (an AVX-512 host would otherwise never run the AVX2 kernels
that an AVX2-only CPU relies on). Shapes cover every tail: columns not a multiple of 32,
16 or 64, single rows, the batch sizes where each kernel family takes over (1-4 direct, 5-8,
9-16 in tiles, 17 and more through the large-batch paths: partial and full batch tiles of
the weight-stationary 2:4 kernels and more than one pass of 512 lanes) and densities from nearly
empty to nearly full rows."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import needs_extension

pytestmark = needs_extension

CHILD = textwrap.dedent(
    """
    import json, os, sys, torch, sparsekern
    from sparsekern import ops
    from sparsekern.formats import BitmaskWeight, NMWeight
    isa = sys.argv[1]
    info = sparsekern._extension.BUILD_INFO
    expect = {"avx512": (True, True), "avx2": (True, False), "generic": (False, False)}[isa]
    got = (bool(info["cpu_avx2_runtime"]), bool(info.get("cpu_avx512_runtime")))
    assert got == expect, f"SPARSEKERN_CPU_ISA={isa}: build info says (avx2, avx512) = {got}"
    # Every uninitialised allocation comes back NaN: an output element a kernel forgets
    # to write shows up.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    gen = torch.Generator().manual_seed(int(sys.argv[2]))
    grid = json.loads(sys.argv[3])
    failures, checked = [], 0
    for out_f, in_f in grid["shapes"]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = torch.randn(out_f, in_f, generator=gen).to(dtype)
            fmts = [(f"{n}:{m}", NMWeight.from_dense(w, n, m)) for n, m in grid["nm"] if in_f % m == 0]
            for density in grid["densities"]:
                mask = torch.rand(out_f, in_f, generator=gen) < density
                fmts.append((f"bitmask {density}", BitmaskWeight.from_dense(w, mask)))
            for batch in grid["batches"]:
                x = torch.randn(batch, in_f, generator=gen).to(dtype)
                for name, f in fmts:
                    dense = f.to_dense()
                    assert ops.explain_backend(f.OP, x, f)[0] == "cpp"
                    y = ops.sparse_linear(x, f)
                    ref = x.double() @ dense.double().t()
                    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    if dtype == torch.float32:
                        # Relative to the sums of |products| (fp32's error bound), not to the
                        # result: a 2-value row (in=4) can cancel to a tiny output.
                        err = ((y.double() - ref).norm() /
                               (x.double().abs() @ dense.double().abs().t()).norm().clamp_min(1e-30)).item()
                        limit = 1e-5
                    else:  # at most 2x the error of torch's own linear in this dtype
                        lowp = torch.nn.functional.linear(x, dense)
                        limit = 2 * ((lowp.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item() + 1e-6
                    checked += 1
                    if not (torch.isfinite(y).all() and err <= limit):
                        failures.append(f"{name} {dtype} out={out_f} in={in_f} batch={batch}: rel err {err:.3g} > {limit:.3g}")
    # nm_conv2d: taps gathered into the weight-stationary kernel's tiles (2:4 from 17 output
    # pixels; AVX-512 also in chunks once x's tiles outgrow the L2), the patch matrix
    # otherwise; zero padding, strides, dilation, odd sizes, each order forced both ways.
    from sparsekern.patterns import as_2d
    for (n_img, c, h, w_, o, k, stride, pad, dil) in grid["convs"]:
        for n, m in [(n, m) for n, m in ((2, 4), (4, 8)) if c % m == 0]:
            wt = torch.randn(o, c, k, k, generator=gen)
            f = NMWeight.from_dense(as_2d(wt), n, m)
            x = torch.randn(n_img, c, h, w_, generator=gen)
            ref = torch.nn.functional.conv2d(x.double(), f.to_dense().double().reshape(o, k, k, c).permute(0, 3, 1, 2),
                                             None, stride, pad, dil)
            for order in ("panels", "chunks"):
                os.environ["SPARSEKERN_WS_ORDER"] = order
                assert ops.explain_backend("nm_conv2d", x, f)[0] == "cpp"
                y = ops.nm_conv2d(x, f, k, None, stride, pad, dil)
                err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                checked += 1
                if not (y.shape == ref.shape and torch.isfinite(y).all() and err <= 1e-5):
                    failures.append(f"nm_conv2d {n}:{m} {order} x{tuple(x.shape)} w{tuple(wt.shape)} s{stride} "
                                    f"p{pad} d{dil}: rel err {err:.3g}")
            os.environ.pop("SPARSEKERN_WS_ORDER")
    # The raw ops trust index values (formats validate them). An index no format holds (4:8
    # has 4-bit fields) must still run without a crash: every kernel keeps it inside its
    # group, and nm_decompress refuses it.
    W = NMWeight.from_dense(torch.randn(33, 96, generator=gen), 4, 8)
    bad = torch.full_like(W.indices, 0xFF)
    for batch in (1, 3, 5, 16, 40):
        y = torch.ops.sparsekern.nm_linear(torch.randn(batch, 96, generator=gen), W.values, bad, 4, 8, 96, None)
        if tuple(y.shape) != (batch, 33):
            failures.append(f"raw nm_linear with out-of-range indices, batch {batch}: shape {tuple(y.shape)}")
    # Likewise the column index of bitmask_linear (ops builds it from a validated format):
    # columns outside the row, or negative as int16, must not read outside x.
    B = BitmaskWeight.from_dense(torch.randn(21, 100, generator=gen), torch.rand(21, 100, generator=gen) < 0.1)
    for cols in (torch.full_like(B.column_index(), -1), torch.full_like(B.column_index(), 32767)):
        for batch in (1, 2, 4, 8, 20):  # row-major kernels, then the lanes kernel (and a 4-row tail)
            y = torch.ops.sparsekern.bitmask_linear_cpu(torch.randn(batch, 100, generator=gen), B.values, B.bitmask,
                                                        B.offsets, 100, None, cols)
            if tuple(y.shape) != (batch, 21) or not torch.isfinite(y).all():
                failures.append(f"raw bitmask_linear with out-of-range columns, batch {batch}: {tuple(y.shape)}")
    # Kernels that load a row's values 8 or 16 at a time and expand them under the row's
    # mask also read the next rows' values: those lanes must stay zero. Every other row
    # holds inf and NaN; the other rows' outputs must stay finite.
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(40, 200, generator=gen).to(dtype)
        mask = torch.rand(40, 200, generator=gen) < 0.3
        fmts = [("bitmask", BitmaskWeight.from_dense(w, mask))]
        fmts += [(f"{n}:{m}", NMWeight.from_dense(w, n, m)) for n, m in ((2, 4), (4, 8), (2, 8))]
        for name, f in fmts:
            rows = torch.arange(40).repeat_interleave(f.mask().sum(1)) if name == "bitmask" else None
            values = f.values.clone()
            if rows is None:
                values[1::2] = float("nan")
            else:
                values[rows % 2 == 1] = float("inf")
            f2 = type(f).from_tensors({**f.tensors(), "values": values})
            for batch in (1, 3, 8, 40):
                y = ops.sparse_linear(torch.randn(batch, 200, generator=gen).to(dtype), f2)
                if not torch.isfinite(y[:, 0::2]).all():
                    failures.append(f"{name} {dtype} batch {batch}: a row read its neighbour's values")
    # No kernel reads x past its last column: x ends right before a page that cannot be read
    # (a read past it would kill this child), for column counts off every vector width.
    import ctypes, mmap
    page = mmap.PAGESIZE
    data_pages = (8 * 200 * 4 + page - 1) // page  # the largest x below
    region = mmap.mmap(-1, (data_pages + 1) * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    guard = ctypes.c_void_p(base + data_pages * page)
    assert ctypes.CDLL(None).mprotect(guard, ctypes.c_size_t(page), 0) == 0
    x_page = torch.frombuffer(region, dtype=torch.float32, count=data_pages * page // 4)
    for k_cols in (100, 104, 200):
        w = torch.randn(12, k_cols, generator=gen)
        fmts = [("bitmask", BitmaskWeight.from_dense(w, torch.rand(12, k_cols, generator=gen) < 0.4))]
        fmts += [(f"{n}:{m}", NMWeight.from_dense(w, n, m)) for n, m in ((2, 4), (4, 8), (2, 8)) if k_cols % m == 0]
        for batch in (1, 2, 3, 4, 5, 8):
            x_edge = x_page[x_page.numel() - batch * k_cols:].view(batch, k_cols)
            x_edge.copy_(torch.randn(batch, k_cols, generator=gen))
            for name, f in fmts:
                y = ops.sparse_linear(x_edge, f)
                ref = x_edge.double() @ f.to_dense().double().t()
                if not torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4):
                    failures.append(f"{name} K={k_cols} batch {batch} with x at a page edge: wrong result")
    try:
        torch.ops.sparsekern.nm_decompress(W.values, bad, 4, 8, 96)
        failures.append("raw nm_decompress accepted in-group indices >= m")
    except ValueError as e:
        if "indices" not in str(e):
            failures.append(f"raw nm_decompress: unclear error {e}")
    print(json.dumps({"checked": checked, "failures": failures[:20]}))
    """
)


GRID = {
    # (out, in): tails of every width (in not a multiple of 16, 32 or 64; m = 8 and 16 groups
    # that end half way through a 16-column piece), single rows, several K tiles
    # (4:8 at 1-4 rows works in 32-column pieces: 48, 56, 208 and 1000 end 16, 24, 16 and 8 past one)
    "shapes": [(1, 4), (5, 28), (33, 36), (7, 100), (19, 132), (8, 48), (6, 56), (5, 208), (64, 1000), (3, 2052)],
    # 2:4; even n with m = 8 and 16 (AVX-512 mask-table kernels); odd n (the AVX2 kernels)
    "nm": [(2, 4), (1, 4), (4, 8), (2, 8), (3, 8), (8, 16), (2, 16)],
    # bitmask: 0.02 takes the column-index kernels at 1-64 rows, 0.22 the one-row word
    # kernel (AVX-512), 0.97 the piece kernel; each also the large-batch paths
    "densities": [0.02, 0.22, 0.97],
    "batches": [1, 2, 3, 4, 5, 8, 9, 16, 17, 40, 130, 600],
    # nm_conv2d (images, channels, H, W, out, k, stride, padding, dilation): 12 output pixels
    # (the patch matrix), 3 x 9 x 7 pixels with 12 channels (a partial 8-channel group per
    # tap; 2:4 only), stride 2 with dilation 2, and 2 x 64 x 64 pixels (x tiles of 4.7 MB: chunks)
    "convs": [[1, 8, 5, 6, 5, 3, 1, 0, 1], [3, 12, 9, 7, 19, 3, 1, 1, 1], [2, 16, 15, 13, 7, 3, 2, 2, 2],
              [2, 16, 64, 64, 40, 3, 1, 1, 1]],
}


def _expected_checks() -> int:
    per_shape = [sum(k % m == 0 for _, m in GRID["nm"]) + len(GRID["densities"]) for _, k in GRID["shapes"]]
    convs = sum(c % m == 0 for _, c, *_ in GRID["convs"] for m in (4, 8))
    return sum(per_shape) * 3 * len(GRID["batches"]) + convs * 2


def _cpu_has_avx512() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vbmi2"))


def _cpu_has_avx2() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return all(f in flags for f in (" avx2", " fma", " f16c", " bmi2"))


def _child_env(isa: str) -> tuple[dict, int]:
    """The environment of a child pinned to `isa` (skips when this CPU lacks it) and a fresh seed."""
    if isa == "avx512" and not _cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 F/VL/BW/DQ/VBMI2")
    if isa == "avx2" and not _cpu_has_avx2():
        pytest.skip("this CPU has no AVX2/FMA/F16C/BMI2")
    env = dict(os.environ, SPARSEKERN_CPU_ISA=isa)
    env.pop("SPARSEKERN_NM_GEMM", None)
    return env, int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_cpu_build_matches_fp64(isa):
    env, seed = _child_env(isa)
    res = subprocess.run([sys.executable, "-c", CHILD, isa, str(seed), json.dumps(GRID)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["checked"] == _expected_checks(), report
    assert not report["failures"], f"SPARSEKERN_CPU_ISA={isa} (seed {seed}):\n" + "\n".join(report["failures"])


PANELS_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from sparsekern.formats import NMWeight
    from sparsekern.patterns import nm24_panels_bytes
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    O, K, B = 100, 1028, 130  # a partial row block and a last K tile of 4 columns
    W = NMWeight.from_dense(torch.randn(O, K, generator=gen), 2, 4)
    x = torch.randn(B, K, generator=gen)
    bias = torch.randn(O, generator=gen)
    size = nm24_panels_bytes(O, K)
    ref = x.double() @ W.to_dense().double().t() + bias.double()
    run = lambda panels: torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, K, bias, 1, panels)
    for order in ("panels", "chunks"):
        os.environ["SPARSEKERN_WS_ORDER"] = order  # read per call
        err = ((run(W.gemm_panels()).double() - ref).norm() / ref.norm()).item()
        assert err < 1e-6, f"{order}: relative error {err:.2e}"
        # Any bytes read inside the x tiles (offsets masked into their K tile): no crash.
        for _ in range(3):
            assert run(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)).shape == (B, O)
        # All-zero bytes (every value 0) give exactly the bias: the kernel read them.
        assert torch.equal(run(torch.zeros(size, dtype=torch.uint8)), bias.expand(B, O)), order
    print("ok")
    """)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_each_gemm_kernel_reads_the_pre_packed_weight_inside_x(isa):
    # Both 2:4 GEMM kernels read NMWeight.gemm_panels (the AVX2 one halves the offsets for its
    # 32-lane tiles); this machine runs only its best one in the main process.
    env, seed = _child_env(isa)
    res = subprocess.run([sys.executable, "-c", PANELS_CHILD, str(seed)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), f"seed {seed}: {res.stderr[-3000:]}"
