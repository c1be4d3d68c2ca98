"""nm_linear's 2:4 GEMM (algo 1, from 17 rows) on bf16 weights and bf16 activations with bf16
dot products (vdpbf16ps, csrc/cpu/nm_gemm_bf16.cpp), against fp64 with the bf16 rule (our
error at most 2x torch's own bf16 F.linear error).

The kernel runs where the CPU has AVX512_BF16 (and the AVX-512 kernels are allowed:
SPARSEKERN_CPU_ISA=avx2|generic turn it off). SPARSEKERN_NM_BF16=fma (read per call) runs
the fp32 multiply-add kernel on the converted values instead, as before the bf16 kernel.
Which one ran is seen in the result: vdpbf16ps counts denormal inputs as zero, the fp32
kernel does not (test_the_bf16_dot_product_kernel_ran). The switch is read by
dispatch_rules.nm_cpu_algo, which then passes algorithm 3 (NM_ALGO_GEMM_FP32)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_linear_close, needs_extension
from linear_cases import lowp_torch_linear, outputs_by_switch, ref64
from sparsekern import _extension, ops
from sparsekern.formats import NMWeight

pytestmark = needs_extension


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The extension's own answer where its build info has it (csrc/sparsekern.cpp), else the
# same test from here: the AVX-512 kernels run and the CPU reports avx512_bf16.
HAS_BF16_DOT = _extension.BUILD_INFO.get(
    "cpu_avx512_bf16_runtime",
    bool(_extension.BUILD_INFO.get("cpu_avx512_runtime")) and "avx512_bf16" in _cpu_flags())
needs_bf16_dot = pytest.mark.skipif(not HAS_BF16_DOT, reason="this CPU has no AVX512_BF16 (or the AVX-512 kernels "
                                    "are capped by SPARSEKERN_CPU_ISA): the bf16 dot-product kernel cannot run")


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    monkeypatch.delenv("SPARSEKERN_NM_BF16", raising=False)


def _nm_linear(x, W, bias, fma=False):
    old = os.environ.get("SPARSEKERN_NM_BF16")
    os.environ["SPARSEKERN_NM_BF16"] = "fma" if fma else "dot"
    try:
        return ops.nm_linear(x, W, bias)
    finally:
        if old is None:
            del os.environ["SPARSEKERN_NM_BF16"]
        else:
            os.environ["SPARSEKERN_NM_BF16"] = old


# (out, in): K / 4 odd (a last group alone in its index byte, a K tile of 5 groups),
# K not a multiple of the 64-column K tile, out not a multiple of the 3-row block or panel.
SHAPES = [(37, 148), (130, 520), (64, 1100), (200, 2052), (1, 4)]
ROWS = [17, 33, 64, 130, 300]


@needs_bf16_dot
@pytest.mark.parametrize("o,k", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_dot_matches_fp64(o, k, rows, with_bias, direct, poison):
    dtype = torch.bfloat16
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), 2, 4)
    # 3-D x for odd row counts: flattened inside the op
    x = torch.randn(rows, k, dtype=dtype) if rows % 2 == 0 else torch.randn(rows, 1, k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype) if with_bias else None
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    y = _nm_linear(x, W, bias)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense, bias),
                        f"bf16 dot {o}x{k} rows={rows} bias={with_bias}")


def _kernel_that_ran(o, k, rows):
    """"dot" or "fma": which kernel nm_linear takes for a bf16 weight [o, k] and x [rows, k],
    seen in a result: every kept weight 1 and every x 2^-130 (a bf16 denormal), which
    vdpbf16ps counts as zero and the fp32 kernel sums to a nonzero number."""
    W = NMWeight.from_dense(torch.ones(o, k, dtype=torch.bfloat16), 2, 4)
    y = ops.nm_linear(torch.full((rows, k), 2.0 ** -130, dtype=torch.bfloat16), W)
    if (y == 0).all():
        return "dot"
    assert (y.float() > 0).all(), "neither kernel's result"
    return "fma"


# Odd shapes (issue 28): rows of one partial 16-lane vector past whole 64-lane tiles (17, 33,
# 129), K that ends inside a 64-column K tile (100: 25 groups, the last alone in its index
# byte; 1100; 4100: 64 whole K tiles and one group), prime out (7, 211, 1009: a short last
# 3-row block, a short last panel).
ODD_SHAPES = [(7, 100), (211, 1100), (1009, 68), (13, 4100)]


@needs_bf16_dot
@pytest.mark.parametrize("o,k", ODD_SHAPES)
@pytest.mark.parametrize("rows", [17, 33, 129])
def test_bf16_dot_odd_shapes_match_fp64(o, k, rows, direct, poison):
    dtype = torch.bfloat16
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), 2, 4)
    x = torch.randn(rows, k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype)
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    assert _kernel_that_ran(o, k, rows) == "dot", "the bf16 dot-product kernel did not run at this shape"
    y = ops.nm_linear(x, W, bias)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense, bias),
                        f"bf16 dot {o}x{k} rows={rows}")


@needs_bf16_dot
@pytest.mark.parametrize("rows", [17, 1100, 2100])
def test_bf16_dot_over_several_passes_and_panels(rows, direct, poison):
    # More than 1024 rows run in passes (the pair tiles are built per pass); 1001 outputs are
    # several panels per thread with a short last one.
    W = NMWeight.from_dense(torch.randn(1001, 36, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(rows, 36, dtype=torch.bfloat16)
    y = _nm_linear(x, W, None)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, None), torch.bfloat16, lowp_torch_linear(x, dense, None), f"rows={rows}")


def _same_bits_by_switch(variable, settings, rows, out, threads):
    """The bf16 kernel's output for a 2:4 [out, 136] weight and `rows` rows under each setting
    of the switch `variable` (outputs_by_switch): the first matches the reference, the others
    equal it bit for bit."""
    W = NMWeight.from_dense(torch.randn(out, 136, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(rows, 136, dtype=torch.bfloat16)
    bias = torch.randn(out, dtype=torch.bfloat16)
    got = outputs_by_switch(variable, settings, threads, lambda: _nm_linear(x, W, bias))
    dense = W.to_dense()
    first = got[settings[0]]
    assert_linear_close(first, ref64(x, dense, bias), torch.bfloat16, lowp_torch_linear(x, dense, bias),
                        f"{variable}={settings[0]}, rows={rows}")
    for setting in settings[1:]:
        assert torch.equal(got[setting], first), f"{variable}={setting}, rows={rows}"


@needs_bf16_dot
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [17, 600, 788, 1100])
def test_bf16_dot_lane_ranges_give_the_same_bits(rows, threads, direct, poison):
    """The lanes split into one range per thread (nm_gemm_bf16.h, ranges_for: 600 and 788 rows
    on 2 threads, and 1100's first pass of 1024) or kept in one: each output is the same sum in
    the same order, written once, so every split gives the same bits. On 3 threads ranges_for
    keeps one range (three ranges would decode more often), "threads" forces three."""
    _same_bits_by_switch("SPARSEKERN_NM_BF16_RANGES", ("one", "threads", None), rows, 301, threads)


@needs_bf16_dot
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,out", [(17, 301), (383, 64), (788, 301), (1100, 130), (600, 1100)])
def test_bf16_dot_private_chunks_give_the_same_bits(rows, out, threads, direct, poison):
    """Thread-private chunks (nm_gemm_bf16.h private_chunks_for: at most 1024 outputs and two
    chunks of about 128 lanes per thread; 383 rows split into 16-lane units unevenly, 788 and
    1100 rows end in a partial tile) and the shared passes run each output's sum in the same
    order, written once, so they give the same bits; "private" forces chunks where the rule
    would not (17 rows: one chunk; 1100 outputs)."""
    _same_bits_by_switch("SPARSEKERN_NM_BF16_CHUNKS", ("private", "shared", None), rows, out, threads)


@needs_bf16_dot
def test_bf16_dot_agrees_with_the_fp32_fma_kernel(direct):
    W = NMWeight.from_dense(torch.randn(301, 1028, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(130, 1028, dtype=torch.bfloat16)
    bias = torch.randn(301, dtype=torch.bfloat16)
    y_dot, y_fma = _nm_linear(x, W, bias), _nm_linear(x, W, bias, fma=True)
    # Both sum the same fp32-exact products in fp32, in other orders: at most a bf16 rounding apart.
    torch.testing.assert_close(y_dot.float(), y_fma.float(), rtol=1e-2, atol=1e-2)


def _denormal_case():
    # Every kept weight 1, every x 2^-130 (a bf16 denormal): the fp32 kernel sums 32 kept
    # products to 2^-125 (a normal number, exact in bf16); vdpbf16ps counts each denormal x
    # as zero and returns 0.
    k, o = 64, 5
    W = NMWeight.from_dense(torch.ones(o, k, dtype=torch.bfloat16), 2, 4)
    x = torch.full((20, k), 2.0 ** -130, dtype=torch.bfloat16)
    assert x[0, 0].item() == 2.0 ** -130
    return x, W, 2.0 ** -125


@needs_bf16_dot
def test_the_bf16_dot_product_kernel_ran(direct):
    x, W, fp32_sum = _denormal_case()
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    assert (_nm_linear(x, W, None) == 0).all(), "the bf16 dot-product kernel did not run"
    assert (_nm_linear(x, W, None, fma=True).float() == fp32_sum).all(), "SPARSEKERN_NM_BF16=fma did not take the fp32 kernel"
    from sparsekern import dispatch_rules as rules

    os.environ["SPARSEKERN_NM_BF16"] = "fma"
    try:
        assert ops.OPS["nm_linear"].key(x, W)[1].cpu_algo == rules.NM_ALGO_GEMM_FP32
        assert rules.NM_ALGO_NAMES[rules.NM_ALGO_GEMM_FP32] in ops.explain_backend("nm_linear", x, W)[1]
    finally:
        del os.environ["SPARSEKERN_NM_BF16"]
    assert ops.OPS["nm_linear"].key(x, W)[1].cpu_algo == rules.NM_ALGO_GEMM
    # the C++ op runs what it is given: algorithm 3 is the fp32 kernel, 1 the bf16 one
    direct3 = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, W.in_features, None, 3, None)
    direct1 = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, W.in_features, None, 1, None)
    assert (direct3.float() == fp32_sum).all() and (direct1 == 0).all()


def test_capped_cpus_take_the_fp32_kernel():
    # SPARSEKERN_CPU_ISA=avx2 (read once per process: a child) turns the AVX-512 kernels off,
    # and with them the bf16 dot products: the denormal sum comes back.
    code = (
        "import os, torch, sparsekern; from sparsekern import ops; from sparsekern.formats import NMWeight\n"
        "os.environ['SPARSEKERN_NM_GEMM'] = 'direct'\n"
        "W = NMWeight.from_dense(torch.ones(5, 64, dtype=torch.bfloat16), 2, 4)\n"
        "x = torch.full((20, 64), 2.0 ** -130, dtype=torch.bfloat16)\n"
        "assert sparsekern._extension.BUILD_INFO['cpu_avx512_runtime'] is False\n"
        "y = ops.nm_linear(x, W); assert (y.float() == 2.0 ** -125).all(), y\n"
    )
    env = dict(os.environ, SPARSEKERN_CPU_ISA="avx2")
    env.pop("SPARSEKERN_NM_BF16", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@needs_bf16_dot
def test_bf16_dot_nan_and_inf_stay_in_their_columns(direct):
    # Each row keeps columns 1 and 2 of every group: the pair (x1, x2) is read, never x0 or x3.
    k = 4 * 37
    mask = torch.zeros(7, k, dtype=torch.bool)
    mask[:, 1::4] = True
    mask[:, 2::4] = True
    W = NMWeight.from_dense(torch.randn(7, k, dtype=torch.bfloat16), 2, 4, mask=mask)
    x = torch.randn(40, k, dtype=torch.bfloat16)
    x[:, 0] = float("inf")
    x[:, k - 1] = float("nan")
    x[5, 1] = float("nan")
    y = _nm_linear(x, W, None)
    assert torch.isnan(y[5]).all()
    rest = torch.cat([y[:5], y[6:]])
    assert torch.isfinite(rest).all()
    xc = torch.nan_to_num(x, nan=0.0, posinf=0.0)
    ref = ref64(xc, W.to_dense(), None)
    low = lowp_torch_linear(xc, W.to_dense(), None)
    assert_linear_close(rest, torch.cat([ref[:5], ref[6:]]), torch.bfloat16, torch.cat([low[:5], low[6:]]),
                        "inf/NaN in unkept columns")


@needs_bf16_dot
@pytest.mark.parametrize("byte", [0x00, 0xFF, 0x1B, 0xE4])
def test_indices_that_do_not_increase_stay_inside_x(byte):
    # No validated NMWeight holds such indices; the raw CPU op must still read inside the
    # tiles (a wrong pair, never a crash): every nibble maps to one of the six pairs.
    o, k = 10, 132
    values = torch.randn(o, k // 2, dtype=torch.bfloat16)
    indices = torch.full((o, (k // 2 * 2 + 7) // 8), byte, dtype=torch.uint8)
    x = torch.randn(40, k, dtype=torch.bfloat16)
    y = torch.ops.sparsekern.nm_linear_cpu(x, values, indices, 2, 4, k, None, 1)
    assert y.shape == (40, o) and torch.isfinite(y).all()


@needs_bf16_dot
def test_bf16_dot_keeps_other_dtypes_and_panels_on_their_kernels(direct):
    # fp32 and fp16 weights, and a bf16 call given fp32 panels, keep the fp32 kernel: the
    # denormal case returns the fp32 sum there.
    x, W, fp32_sum = _denormal_case()
    panels = torch.ops.sparsekern.nm24_pack_panels(W.values, W.indices, W.in_features)
    y = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, W.in_features, None, 1, panels)
    assert (y.float() == fp32_sum).all()
    for dtype in (torch.float32, torch.float16):
        Wd = NMWeight.from_dense(torch.ones(5, 64, dtype=dtype), 2, 4)
        xd = x.to(dtype) if dtype == torch.float32 else torch.full((20, 64), 2.0 ** -20, dtype=dtype)
        want = fp32_sum if dtype == torch.float32 else 32 * 2.0 ** -20
        assert (ops.nm_linear(xd, Wd).float() == want).all(), dtype


# The kernel writes the bf16 output itself (bias added in fp32, then rounded to nearest even,
# as torch's conversion of an fp32 result does). Integer inputs make every fp32 sum exact,
# so the only rounding is that last one and the result must equal fp64's, rounded by torch,
# bit for bit. Shapes: out not a multiple of 8 (the transposed tails), rows not a multiple of
# 8 or 16, K not a multiple of 64.
@needs_bf16_dot
@pytest.mark.parametrize("o,k,rows", [(13, 68, 19), (40, 200, 70), (211, 1100, 129)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_dot_output_is_torchs_rounding_of_the_exact_sum(o, k, rows, with_bias, direct, poison):
    g = torch.Generator().manual_seed(o * k + rows)
    dense = torch.randint(-15, 16, (o, k), generator=g).to(torch.bfloat16)
    W = NMWeight.from_dense(dense, 2, 4)
    x = torch.randint(-15, 16, (rows, k), generator=g).to(torch.bfloat16)
    # a bias of odd integers past bf16's 8 significant bits: the sums round, ties included
    bias = (torch.randint(-2000, 2000, (o,), generator=g) * 2 + 1).float() if with_bias else None
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    assert _kernel_that_ran(o, k, rows) == "dot"
    # a bf16 bias is what nm_linear takes; its exact fp32 value is added in the kernel
    b16 = bias.to(torch.bfloat16) if with_bias else None
    y = _nm_linear(x, W, b16)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, o)
    exact = x.double() @ W.to_dense().double().t()
    if with_bias:
        exact = exact + b16.double()
    assert exact.abs().max() < 2**24  # every partial sum exact in fp32
    assert torch.equal(y, exact.float().to(torch.bfloat16))


@needs_bf16_dot
def test_bf16_dot_nan_bias_stays_in_its_output(direct):
    W = NMWeight.from_dense(torch.randn(21, 64, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(33, 64, dtype=torch.bfloat16)
    bias = torch.randn(21, dtype=torch.bfloat16)
    bias[4] = float("nan")
    bias[19] = float("inf")
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    assert _kernel_that_ran(21, 64, 33) == "dot"
    y = _nm_linear(x, W, bias)
    assert torch.isnan(y[:, 4]).all() and (y[:, 19] == float("inf")).all()
    keep = [c for c in range(21) if c not in (4, 19)]
    assert torch.isfinite(y[:, keep]).all()


@needs_bf16_dot
@pytest.mark.parametrize("rows", [17, 200, 1100])
def test_bf16_dot_same_result_on_the_chunk_pool_and_torchs_threads(rows, direct, monkeypatch):
    # Two threads, on the chunk pool (the default) and on OpenMP (SPARSEKERN_NM_BF16_THREADS=
    # omp): each output panel is summed in the same order whichever thread takes it.
    W = NMWeight.from_dense(torch.randn(1001, 260, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(rows, 260, dtype=torch.bfloat16)
    bias = torch.randn(1001, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y_pool = _nm_linear(x, W, bias)
        monkeypatch.setenv("SPARSEKERN_NM_BF16_THREADS", "omp")
        y_omp = _nm_linear(x, W, bias)
    finally:
        torch.set_num_threads(threads)
    assert _kernel_that_ran(1001, 260, rows) == "dot"
    assert torch.equal(y_omp, y_pool)
    dense = W.to_dense()
    assert_linear_close(y_omp, ref64(x, dense, bias), torch.bfloat16, lowp_torch_linear(x, dense, bias), f"rows={rows}")


@needs_bf16_dot
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_bf16_convolution_runs_the_bf16_dot_kernel(kernel, stride, padding, channels_last, direct, poison):
    # A bf16 nm_conv2d of 2:4 from 17 output pixels: its patch matrix through the bf16 GEMM
    # (before: x and the output converted to fp32 around the fp32 kernel). Seen as in
    # _kernel_that_ran: denormal x sums to zero in vdpbf16ps only. The result is channels-last.
    c, o = 16, 24
    x = torch.full((2, c, 9, 7), 2.0 ** -130, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ones = NMWeight.from_dense(torch.ones(o, kernel * kernel * c, dtype=torch.bfloat16), 2, 4)
    y = ops.nm_conv2d(x, ones, kernel, None, stride, padding, 1)
    assert ops.explain_backend("nm_conv2d", x, ones, kernel, None, stride, padding, 1)[0] == "cpp"
    assert (y == 0).all() and y.dtype == torch.bfloat16
    # and the values: random weight, bias, against fp64
    w = torch.randn(o, c, kernel, kernel, dtype=torch.bfloat16)
    f = NMWeight.from_dense(w.permute(0, 2, 3, 1).reshape(o, -1), 2, 4)
    dense4 = f.to_dense().reshape(o, kernel, kernel, c).permute(0, 3, 1, 2)
    xr = torch.randn(2, c, 9, 7, dtype=torch.bfloat16)
    if channels_last:
        xr = xr.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(o, dtype=torch.bfloat16)
    y = ops.nm_conv2d(xr, f, kernel, bias, stride, padding, 1)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape[2] * y.shape[3] * 2 >= 17
    ref = torch.nn.functional.conv2d(xr.double(), dense4.double(), bias.double(), stride, padding)
    lowp = torch.nn.functional.conv2d(xr, dense4, bias, stride, padding)
    assert_linear_close(y, ref, torch.bfloat16, lowp, f"bf16 conv k{kernel} s{stride} p{padding}")
