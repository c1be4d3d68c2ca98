"""nm_linear_q: N:M weights with int8 / int4 values read packed (C++ kernels of every
instruction set, the reference) against fp64 on the dequantized weight; the 2:4 int8
dot-product GEMM (csrc/cpu/nm_gemm_int8.h, x quantized per row; int8 values, and int4 values
with their group scales) against fp64 of its own quantized math, and its error against torch's
dynamic int8 linear's."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close, needs_extension
from linear_cases import DTYPES, SHAPES, lowp_torch_linear, outputs_by_switch, ref64
from sparsekern import _extension, dispatch_rules, ops, reference
from sparsekern.formats import NMWeight
from sparsekern.ops import dispatch


@pytest.fixture(autouse=True)
def products_under_test(monkeypatch, request):
    """This file checks the exact algorithm (fp32 activations, weights dequantized in
    registers) to fp32's tolerance, so it asks for it: the decode default on AVX512_VNNI CPUs
    is the int8-activation algorithm (dispatch_rules.Q_INT8_ACT_DEFAULT), whose own references
    and tolerances are in tests/test_decode_q.py. The int8 dot-product GEMM's tests (named
    test_int8_dot_* / test_int4_dot_*) ask for int8 activations, which that GEMM multiplies.
    Child processes inherit the setting."""
    dot = request.node.name.startswith(("test_int8_dot", "test_int4_dot"))
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8" if dot else "exact")

NM = [(2, 4), (1, 4), (4, 8)]
PRECISIONS = [("int8", 0), ("int4", 32), ("int4", 128)]


def _weight(o, k, n, m, precision, group, dtype=torch.float32):
    return NMWeight.from_dense(torch.randn(o, k), n, m, quantize=precision, group_size=group).to(dtype=dtype)


def exact_dense(W) -> torch.Tensor:
    """The fp64 dense weight the stored values stand for: q * s exactly (W.to_dense() rounds
    it to the compute dtype; the kernels multiply in fp32)."""
    values, indices, scales, n, m, k, bits, group = W.kernel_args()
    w = reference.nm_q_values(values, scales, k // m * n, bits, group, torch.float64)
    return reference.nm_decompress(w, indices, n, m, k)


def int8_dot_runs(x, W) -> bool:
    """Whether the dispatch table sends this call to the 2:4 int8 dot-product GEMM."""
    d, key = dispatch.decide("nm_linear_q", (x, W))
    return d.backend == "cpp" and key.cpu_algo == dispatch_rules.Q_ALGO_INT8_DOT


def expected64(x, W, bias):
    """fp64 of what the chosen kernel computes: x quantized per row first where the int8
    dot-product GEMM runs, else x times the exact dequantized weight."""
    if int8_dot_runs(x, W):
        return reference.nm_linear_q_dot(x.double(), *W.kernel_args(), None if bias is None else bias.double())
    return ref64(x, exact_dense(W), bias)


@pytest.mark.parametrize("device,backend", pairs("nm_linear_q"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES)
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_nm_linear_q_matches_fp64(device, backend, dtype, lead, k, o, n, m, precision, group, poison):
    if k % m:
        k = k // m * m + m
    W = _weight(o, k, n, m, precision, group, dtype).to(device)
    assert W.OP == "nm_linear_q" and W.quantized
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    with running(backend, "nm_linear_q", x, W):
        y = ops.nm_linear_q(x, W, bias)
    dense = exact_dense(W)
    with ops.use_backend(backend):
        want = expected64(x, W, bias)
    assert_linear_close(y, want, dtype, lowp_torch_linear(x, dense.to(dtype), bias),
                        f"nm_linear_q {n}:{m} {precision}/{group} {device} {dtype} x{tuple(x.shape)}")


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_nm24_fast_paths_and_tails(batch, precision, group, poison):
    # K = 32c + 8 / + 12 / + 4: the vector kernels' tail pieces; 4 and 36: a single partial
    # piece (36 at 1:4 below: an odd number of kept values, the last int4 byte half used).
    for k in (1024, 1032, 1036, 4, 36):
        W = _weight(19, k, 2, 4, precision, group)
        x = torch.randn(batch, k)
        with running("cpp", "nm_linear_q", x, W):
            y = ops.nm_linear_q(x, W)
            want = expected64(x, W, None)
        assert_linear_close(y, want, torch.float32, what=f"2:4 {precision} B={batch} K={k}")
    W = _weight(7, 36, 1, 4, precision, group)  # kept = 9 per row
    x = torch.randn(batch, 36)
    assert_linear_close(ops.nm_linear_q(x, W), ref64(x, exact_dense(W), None), torch.float32, what="1:4 odd kept")


def test_sparse_linear_routes_by_the_formats_op():
    w = torch.randn(24, 64)
    x = torch.randn(3, 64)
    fp, q8, q4 = (NMWeight.from_dense(w, 2, 4), NMWeight.from_dense(w, 2, 4, quantize="int8"),
                  NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32))
    assert (fp.OP, q8.OP, q4.OP, NMWeight.OP) == ("nm_linear", "nm_linear_q", "nm_linear_q", "nm_linear")
    assert q8.kernel_args()[2] is q8.scales and q8.kernel_args()[6:] == (8, 0)
    assert q4.kernel_args()[6:] == (4, 32) and q4.kernel_args()[0].dtype == torch.uint8
    for W in (q8, q4):
        # the packed values go to the kernel: no float copy of them is made per call
        assert ops.explain_backend(W.OP, x, W)[0] == "cpp"
        y = ops.sparse_linear(x, W)
        torch.testing.assert_close(y.double(), x.double() @ W.to_dense().double().T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.nm_linear(x, W), y)  # nm_linear forwards a quantized weight


def test_gemm_panels_are_never_built_for_quantized_values():
    W = NMWeight.from_dense(torch.randn(32, 64), 2, 4, quantize="int8")
    with pytest.raises(ValueError, match="gemm_panels: a float 2:4 layout"):
        W.gemm_panels()
    ops.sparse_linear(torch.randn(40, 64), W)  # the large-batch path
    assert W.derived_nbytes == 0


def test_reference_backend_gives_the_same_answer():
    W = _weight(24, 64, 2, 4, "int4", 32)
    x = torch.randn(5, 64)
    y = ops.nm_linear_q(x, W)
    with ops.use_backend("reference"):
        yr = ops.nm_linear_q(x, W)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_reference_dequantizes_as_the_precision_registry():
    W = _weight(6, 64, 2, 4, "int4", 32)
    ours = reference.nm_q_values(W.values, W.scales, 32, 4, 32, torch.float32)
    torch.testing.assert_close(ours, W.value_precision.dequantize(W.values, W.scales, 32, torch.float32, 32))


@pytest.mark.parametrize("precision,group", PRECISIONS)
@pytest.mark.parametrize("rows", [1, 20])
def test_gradients_for_x_and_bias(precision, group, rows):
    W = _weight(12, 64, 2, 4, precision, group)
    x = torch.randn(rows, 64, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    g = torch.randn(rows, 12)
    (ops.nm_linear_q(x, W, b) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    (torch.nn.functional.linear(x64, exact_dense(W), b64) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_rows_never_see_their_neighbours_scales(batch, precision, group):
    # Every other row's scales are inf: rows computed four at a time, or values read 16 at a
    # time, must not mix them into the finite rows.
    W = _weight(40, 96, 2, 4, precision, group)
    scales = W.scales.clone()
    scales[1::2] = float("inf")
    x = torch.randn(batch, 96)
    y = torch.ops.sparsekern.nm_linear_q(x, W.values, W.indices, scales, *W.kernel_args()[3:], None)
    even = torch.arange(0, 40, 2)
    assert torch.isfinite(y[:, even]).all()
    assert_linear_close(y[:, even], ref64(x, exact_dense(W), None)[:, even], torch.float32, what=f"B={batch}")


def test_nm_conv2d_takes_a_quantized_weight():
    W = NMWeight.from_dense(torch.randn(8, 2 * 2 * 16), 2, 4, quantize="int8")
    x = torch.randn(2, 16, 5, 5)
    y = ops.nm_conv2d(x, W, 2)
    dense = W.to_dense().reshape(8, 2, 2, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, dense), rtol=1e-4, atol=1e-4)


# --------------------------------------------------- the 2:4 int8 dot-product GEMM
needs_vnni = pytest.mark.skipif(not _extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"),
                                reason="the int8 dot-product GEMM needs AVX512_VNNI (and the extension)")
INT8_DOT = dispatch_rules.Q_ALGO_INT8_DOT


def _int8_dot(x, W, bias=None):
    """The CPU op with the int8 GEMM's algorithm, called directly."""
    return torch.ops.sparsekern.nm_linear_q_cpu(x, *W.kernel_args(), bias, INT8_DOT)


@needs_vnni
@pytest.mark.parametrize("rows", [17, 33, 129])
@pytest.mark.parametrize("k,o", [(2048, 67), (1036, 31), (772, 97), (36, 5), (4, 33)])
def test_int8_dot_matches_fp64_of_its_quantized_math(rows, k, o, poison):
    # K = 1036, 772, 36, 4: a last group pair with one group (K / 4 odd) and a partial block of
    # 16 group pairs; O = 67, 31, 97, 5, 33: partial 16-row blocks and 32-row panels.
    W = _weight(o, k, 2, 4, "int8", 0)
    x = torch.randn(rows, k) * torch.rand(rows, 1) * 10  # rows of different scales
    bias = torch.randn(o)
    with running("cpp", "nm_linear_q", x, W):
        assert int8_dot_runs(x, W)
        assert "int8 dot-product GEMM" in ops.explain_backend("nm_linear_q", x, W)[1]
        y = ops.nm_linear_q(x, W, bias)
    values, indices, scales, n, m, _, _, _ = W.kernel_args()
    want = reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k, bias.double())
    # int32 sums are exact: what is left is fp32 rounding of the scales and the result
    assert_linear_close(y, want, torch.float32, what=f"int8 GEMM B={rows} K={k} O={o}")


def _assert_dot_error_within_torch_int8(W, k: int, o: int) -> None:
    """The int8 dot-product GEMM's error against fp64 on the exact dequantized weight W: above
    the fp32 noise, at most 2x torch's own dynamic int8 linear (per-tensor activations) on the
    same weight, and at most half a step of each row's activation scale per |weight|."""
    x = torch.randn(40, k) + torch.randn(1, k)  # a shared offset: per-tensor scales lose more
    dense = exact_dense(W)
    ref = ref64(x, dense, None)
    y = _int8_dot(x, W)
    lin = torch.nn.Linear(k, o, bias=False)
    lin.weight.data = dense.float()
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else old
    try:
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        theirs = qlin(x)
    finally:
        torch.backends.quantized.engine = old
    rel = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert 1e-5 < rel(y) <= 2 * rel(theirs), (rel(y), rel(theirs))
    q, xs = reference.quantize_rows_int8(x)
    bound = (0.5 * xs.double() * dense.abs().sum(1)[None, :]).expand_as(ref)
    assert ((y.double() - ref).abs() <= bound * 1.001 + 1e-4).all()


@needs_vnni
@pytest.mark.parametrize("k,o", [(2048, 257), (768, 96)])
def test_int8_dot_error_is_within_torch_dynamic_int8s(k, o):
    """Against fp64 on the exact dequantized weight, the activation rounding costs no more
    than torch's own dynamic int8 linear (per-tensor activations) on the same weight."""
    _assert_dot_error_within_torch_int8(_weight(o, k, 2, 4, "int8", 0), k, o)


def _assert_zero_and_lone_value_rows(W) -> None:
    """The int8 dot-product GEMM on rows of x that are zero (the bias alone), hold one value
    (q = -127 at its column) or are tiny but non-zero (scale and q well defined), with a bias."""
    k = W.in_features
    x = torch.zeros(20, k)
    x[3, 5] = -7.0  # one value: q = -127 at its column, the row scale 7 / 127
    x[4] = 1e-30    # tiny but non-zero: scale and q well defined
    bias = torch.randn(40)
    y = _int8_dot(x, W, bias)
    torch.testing.assert_close(y[[0, 1, 2] + list(range(5, 20))], bias.expand(18, 40), rtol=0, atol=0)
    dense = exact_dense(W)
    torch.testing.assert_close(y[3].double(), -7.0 * dense[:, 5] + bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[4].double(), 1e-30 * dense.sum(1) + bias.double(), rtol=1e-5, atol=1e-5)


@needs_vnni
def test_int8_dot_rows_of_zeros_and_lone_values():
    _assert_zero_and_lone_value_rows(_weight(40, 64, 2, 4, "int8", 0))


@needs_vnni
@pytest.mark.parametrize("precision,group", [("int8", 0), ("int4", 32)])
def test_int8_dot_rows_holding_nan_or_inf_give_nan(precision, group):
    """A NaN or an inf anywhere in a row of x makes that row's outputs NaN, as the exact path
    does (a NaN must not vanish in the row's max|x|); the other rows stay exact."""
    W = _weight(40, 96, 2, 4, precision, group)
    x = torch.randn(20, 96)
    x[0, 5] = float("nan")   # NaN early in the row, finite values after it
    x[1, 95] = float("inf")  # in the last partial piece of 16
    x[2, 40] = float("nan")
    x[2, 0] = 100.0          # NaN after the row's largest value
    x[3, 17] = -float("inf")
    y = _int8_dot(x, W)
    assert torch.isnan(y[:4]).all()
    want = reference.nm_linear_q_dot(x[4:].double(), *W.kernel_args())
    assert_linear_close(y[4:], want, torch.float32, what="finite rows")


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_dot_low_precision_x_and_3d_input(dtype):
    W = _weight(48, 256, 2, 4, "int8", 0, dtype)
    x = torch.randn(3, 7, 256, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    with running("cpp", "nm_linear_q", x, W):
        assert int8_dot_runs(x, W)
        y = ops.nm_linear_q(x, W, bias)
    values, indices, scales, n, m, k, _, _ = W.kernel_args()
    want = reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k, bias.double())
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    assert_linear_close(y, want, dtype, lowp_torch_linear(x, exact_dense(W).to(dtype), bias), f"{dtype} 3-D")


@needs_vnni
def test_int8_dot_gradient_passes_the_rounding_straight_through():
    W = _weight(24, 64, 2, 4, "int8", 0)
    x = torch.randn(20, 64, requires_grad=True)
    g = torch.randn(20, 24)
    (ops.nm_linear_q(x, W) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ exact_dense(W), rtol=1e-5, atol=1e-5)


def test_int8_dot_rule():
    rule = dispatch_rules.nm_q_cpu_algo
    vnni = bool(_extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))
    decode = dispatch_rules.q_cpu_algo(16)  # up to 16 rows: the decode rule (int8 activations here)
    assert rule(2, 4, 8, 16) == rule(2, 4, 8, None) == rule(2, 4, 4, 16) == rule(2, 4, 4, None) == decode != INT8_DOT
    tiles = dispatch_rules.Q_ALGO_EXACT_TILES  # above 16 rows with x in fp32: the dequantized tiles
    for bits in (8, 4):
        assert rule(2, 4, bits, 17) == (INT8_DOT if vnni else tiles)
    expand = dispatch_rules.Q_ALGO_INT8_EXPAND if vnni else tiles
    for n, m, bits in ((1, 4, 8), (4, 8, 8), (1, 4, 4), (4, 8, 4)):  # other patterns: not this GEMM
        assert rule(n, m, bits, 1000) == (expand if bits == 8 else tiles)
    os.environ["SPARSEKERN_Q_ACT"] = "exact"  # exact products asked for: never the int8 GEMM
    try:
        assert rule(2, 4, 8, 17) == rule(2, 4, 4, 1000) == tiles
    finally:
        os.environ["SPARSEKERN_Q_ACT"] = "int8"
    W = _weight(8, 64, 2, 4, "int8", 0)
    x = torch.randn(20, 64)
    os.environ["SPARSEKERN_NM_Q_GEMM"] = "tile"
    try:
        assert rule(2, 4, 8, 17) == rule(2, 4, 4, 17) == tiles
    finally:
        del os.environ["SPARSEKERN_NM_Q_GEMM"]
    ops.clear_decisions()
    for W in (W, _weight(8, 64, 2, 4, "int4", 64)):
        assert int8_dot_runs(x, W) == vnni
        assert not int8_dot_runs(x[:16], W)


@needs_extension
def test_int8_dot_refuses_what_it_cannot_run():
    op = torch.ops.sparsekern.nm_linear_q_cpu
    x = torch.randn(20, 64)
    q14 = _weight(8, 64, 1, 4, "int8", 0)
    q14_4 = _weight(8, 64, 1, 4, "int4", 32)
    q8 = _weight(8, 64, 2, 4, "int8", 0)
    q4 = _weight(8, 64, 2, 4, "int4", 32)
    with pytest.raises(ValueError, match="nm_linear_q: algo 2 .* runs 2:4 weights with int8 or int4 values"):
        op(x, *q14.kernel_args(), None, INT8_DOT)
    with pytest.raises(ValueError, match="nm_linear_q: algo 2 .* runs 2:4 weights with int8 or int4 values"):
        op(x, *q14_4.kernel_args(), None, INT8_DOT)
    with pytest.raises(ValueError, match="nm_linear_q: group_size must be 32, 64 or 128"):
        op(x, q4.values, q4.indices, q4.scales, 2, 4, 64, 4, 48, None, INT8_DOT)
    with pytest.raises(ValueError, match="nm_linear_q: scales must have shape"):
        op(x, q4.values, q4.indices, q4.scales[:, :0], 2, 4, 64, 4, 32, None, INT8_DOT)
    with pytest.raises(ValueError, match="nm_linear_q: values must be uint8 of shape"):
        op(x, q4.values[:, :3], q4.indices, q4.scales, 2, 4, 64, 4, 32, None, INT8_DOT)
    with pytest.raises(ValueError, match="nm_linear_q: algo must be 0 .* or 4 .*, got 7"):
        op(x, *q8.kernel_args(), None, 7)
    with pytest.raises(ValueError, match=r"nm_linear_q: x.shape\[-1\] \(60\)"):
        op(torch.randn(20, 60), *q8.kernel_args(), None, INT8_DOT)


# ------------------------------------ the same GEMM on int4 values (group scales)
@needs_vnni
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [17, 40, 129])
@pytest.mark.parametrize("k,o", [(2048, 67), (1036, 31), (772, 97), (36, 5), (4, 33), (392, 16)])
def test_int4_dot_matches_fp64_of_its_quantized_math(group, rows, k, o, poison):
    # kept = K / 2: 1024 (whole groups), 518 / 386 / 18 / 2 / 196 (a shorter last group at every
    # group size; 1036 and 772 also a last group pair holding one 2:4 group), K = 4: one group
    # pair; O = 67, 31, 97, 5, 33: partial 16-row blocks and 32-row panels; O = 16: one block;
    # rows 17, 40, 129: partial passes of the core's 10 batch rows.
    W = _weight(o, k, 2, 4, "int4", group)
    x = torch.randn(rows, k) * torch.rand(rows, 1) * 10  # rows of different scales
    bias = torch.randn(o)
    with running("cpp", "nm_linear_q", x, W):
        assert int8_dot_runs(x, W)
        assert "int8 dot-product GEMM" in ops.explain_backend("nm_linear_q", x, W)[1]
        y = ops.nm_linear_q(x, W, bias)
    values, indices, scales, n, m, _, _, _ = W.kernel_args()
    want = reference.nm_linear_q_int4_dot(x.double(), values, indices, scales, n, m, k, group, bias.double())
    # int32 sums per group are exact: what is left is fp32 rounding of the scales and sums
    assert_linear_close(y, want, torch.float32, what=f"int4 GEMM g{group} B={rows} K={k} O={o}")


@needs_vnni
def test_int4_dot_scales_are_per_group_and_row():
    """Each group's scale reaches only its own group's products: with every scale 1 except
    one (row, group), the result moves by exactly that group's products."""
    W = _weight(40, 512, 2, 4, "int4", 32)  # kept 256: 8 groups per row
    x = torch.randn(20, 512)
    values, indices, _, n, m, k, bits, group = W.kernel_args()
    ones = torch.ones_like(W.scales)
    base = torch.ops.sparsekern.nm_linear_q_cpu(x, values, indices, ones, n, m, k, bits, group, None, INT8_DOT)
    for r, g in ((0, 0), (17, 5), (39, 7)):
        sc = ones.clone()
        sc[r, g] = 3.0
        y = torch.ops.sparsekern.nm_linear_q_cpu(x, values, indices, sc, n, m, k, bits, group, None, INT8_DOT)
        want = reference.nm_linear_q_int4_dot(x.double(), values, indices, sc, n, m, k, group)
        assert_linear_close(y, want, torch.float32, what=f"scale at row {r} group {g}")
        others = torch.ones(40, dtype=torch.bool)
        others[r] = False
        torch.testing.assert_close(y[:, others], base[:, others], rtol=0, atol=0)
        assert not torch.equal(y[:, r], base[:, r])


@needs_vnni
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("k,o", [(2048, 257), (768, 96)])
def test_int4_dot_error_is_within_torch_dynamic_int8s(group, k, o):
    """Against fp64 on the exact dequantized int4 weight, the activation rounding costs no more
    than torch's own dynamic int8 linear (per-tensor activations, the weight re-quantized per
    row to int8) on the same weight; and no more than half a step of each row's scale."""
    _assert_dot_error_within_torch_int8(_weight(o, k, 2, 4, "int4", group), k, o)


@needs_vnni
def test_int4_dot_rows_of_zeros_lone_values_and_inf_scales():
    W = _weight(40, 320, 2, 4, "int4", 64)  # kept 160: groups of 64, 64 and 32
    _assert_zero_and_lone_value_rows(W)
    # every other row's scales inf: the 16-row vectors must not mix them into the finite rows
    scales = W.scales.clone()
    scales[1::2] = float("inf")
    xr = torch.randn(20, 320)
    values, indices, _, n, m, k, bits, group = W.kernel_args()
    yi = torch.ops.sparsekern.nm_linear_q_cpu(xr, values, indices, scales, n, m, k, bits, group, None, INT8_DOT)
    even = torch.arange(0, 40, 2)
    want = reference.nm_linear_q_int4_dot(xr.double(), values, indices, W.scales, n, m, k, group)
    assert torch.isfinite(yi[:, even]).all()
    assert_linear_close(yi[:, even], want[:, even], torch.float32, what="finite rows beside inf scales")


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_dot_low_precision_x_and_3d_input(dtype):
    W = _weight(48, 256, 2, 4, "int4", 32, dtype)
    x = torch.randn(3, 7, 256, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    with running("cpp", "nm_linear_q", x, W):
        assert int8_dot_runs(x, W)
        y = ops.nm_linear_q(x, W, bias)
    want = reference.nm_linear_q_dot(x.double(), *W.kernel_args(), bias.double())
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    assert_linear_close(y, want, dtype, lowp_torch_linear(x, exact_dense(W).to(dtype), bias), f"{dtype} 3-D")


@needs_vnni
def test_int4_dot_gradient_passes_the_rounding_straight_through():
    W = _weight(24, 64, 2, 4, "int4", 32)
    x = torch.randn(20, 64, requires_grad=True)
    g = torch.randn(20, 24)
    with running("cpp", "nm_linear_q", x, W):
        assert int8_dot_runs(x, W)
        (ops.nm_linear_q(x, W) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ exact_dense(W), rtol=1e-5, atol=1e-5)


def test_int4_dot_reference_is_the_int8_one_on_int4_values():
    """The two references agree where both apply: int4 values with one scale per row (every
    group of a row given the row's scale) are int8 values with that row scale."""
    W = _weight(12, 256, 2, 4, "int4", 32)
    values, indices, scales, n, m, k, bits, group = W.kernel_args()
    row_scale = torch.rand(12) + 0.5
    q = reference.nm_q_values(values, torch.ones_like(scales), k // 2, 4, group, torch.float64).to(torch.int8)
    x = torch.randn(5, 256, dtype=torch.float64)
    y4 = reference.nm_linear_q_int4_dot(x, values, indices, row_scale[:, None].expand_as(scales), n, m, k, group)
    y8 = reference.nm_linear_q_int8_dot(x, q, indices, row_scale, n, m, k)
    torch.testing.assert_close(y4, y8, rtol=1e-12, atol=1e-12)
    exact = reference.nm_linear_q(x, values, indices, row_scale[:, None].expand_as(scales), n, m, k, bits, group)
    assert not torch.allclose(y4, exact, rtol=1e-6, atol=1e-6)  # x's rounding shows


@needs_vnni
@pytest.mark.parametrize("precision,group", [("int8", 0), ("int4", 64)])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [7, 333, 641, 1000])
def test_int8_dot_batch_ranges_give_the_same_bits(precision, group, threads, rows, poison):
    """The GEMM's batch rows split into one range per thread (work_ranges.h, WorkRanges; a
    large batch), or kept in one: every output row written once, by exact int32 sums, so the
    splits agree to the bit. rows 641 and 1000 split as dispatched (ranges_for: 320+ rows each),
    333 and 7 do not; 3 threads: more threads than 2-range batches, and 333 + 7 split three ways
    under "threads" (7 rows: one range of 10, the others empty)."""
    W = _weight(97, 392, 2, 4, precision, group)
    x = torch.randn(rows, 392) * torch.rand(rows, 1) * 10
    bias = torch.randn(97)
    out = outputs_by_switch("SPARSEKERN_INT8_RANGES", ("one", "threads", None), threads, lambda: _int8_dot(x, W, bias))
    values, indices, scales, n, m, k, _, _ = W.kernel_args()
    want = (reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k, bias.double())
            if precision == "int8" else
            reference.nm_linear_q_int4_dot(x.double(), values, indices, scales, n, m, k, group, bias.double()))
    assert_linear_close(out["one"], want, torch.float32, what=f"{precision} GEMM, one range, B={rows}")
    assert torch.equal(out["threads"], out["one"]) and torch.equal(out[None], out["one"])


# ------------------------------------------------------------------------ bad input
def test_bad_inputs():
    W = _weight(8, 16, 2, 4, "int8", 0)
    fp = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    with pytest.raises(TypeError, match="nm_linear_q: weight must be a NMWeight with quantized values"):
        ops.nm_linear_q(torch.randn(2, 16), fp)
    with pytest.raises(TypeError, match="nm_linear_q: weight must be a sparsekern.formats.NMWeight"):
        ops.nm_linear_q(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"nm_linear_q: x.shape\[-1\] \(12\) must equal in_features \(16\)"):
        ops.nm_linear_q(torch.randn(2, 12), W)
    with pytest.raises(TypeError, match="nm_linear_q: x dtype"):
        ops.nm_linear_q(torch.randn(2, 16, dtype=torch.float16), W)
    with pytest.raises(TypeError, match="nm_linear_q: x must be a floating"):
        ops.nm_linear_q(torch.ones(2, 16, dtype=torch.int64), W)
    with pytest.raises(TypeError, match="nm_linear_q: x must be a torch.Tensor"):
        ops.nm_linear_q([1.0] * 16, W)
    with pytest.raises(ValueError, match="nm_linear_q: bias must have shape"):
        ops.nm_linear_q(torch.randn(2, 16), W, torch.randn(7))
    with pytest.raises(TypeError, match="nm_linear_q: bias dtype"):
        ops.nm_linear_q(torch.randn(2, 16), W, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="nm_linear_q: x is on meta"):
        ops.nm_linear_q(torch.randn(2, 16, device="meta"), W)
    bad = dataclasses.replace(W, scales=-W.scales)  # a new object: not validated yet
    with pytest.raises(ValueError, match="nm_linear_q: weight is not a valid NMWeight.*scales"):
        ops.nm_linear_q(torch.randn(2, 16), bad)


@needs_extension
def test_compiled_op_checks_arguments_itself():
    """The C++ entry point refuses every bad argument with a message naming it."""
    q8 = _weight(8, 64, 2, 4, "int8", 0)
    q4 = _weight(8, 64, 2, 4, "int4", 32)
    op = torch.ops.sparsekern.nm_linear_q
    x = torch.randn(2, 64)
    cases = [
        ((x, q8.values, q8.indices, q8.scales, 2, 4, 64, 5, 0, None), ValueError, "bits must be 8"),
        ((x, q8.values, q8.indices, q8.scales, 2, 4, 64, 8, 32, None), ValueError, "group_size must be 0"),
        ((x, q4.values, q4.indices, q4.scales, 2, 4, 64, 4, 48, None), ValueError, "group_size must be 32, 64 or 128"),
        ((x, q8.values.float(), q8.indices, q8.scales, 2, 4, 64, 8, 0, None), TypeError, "values must be Char"),
        ((x, q4.values.to(torch.int8), q4.indices, q4.scales, 2, 4, 64, 4, 32, None), TypeError, "values must be Byte"),
        ((x, q8.values[:, :5], q8.indices, q8.scales, 2, 4, 64, 8, 0, None), ValueError, "values must be int8 of shape"),
        ((x, q4.values[:, :3], q4.indices, q4.scales, 2, 4, 64, 4, 32, None), ValueError, "values must be uint8 of shape"),
        ((x, q8.values, q8.indices, q8.scales[:3], 2, 4, 64, 8, 0, None), ValueError, "scales must have shape"),
        ((x, q4.values, q4.indices, q4.scales[:, :0], 2, 4, 64, 4, 32, None), ValueError, "scales must have shape"),
        ((x, q8.values, q8.indices, q8.scales.double(), 2, 4, 64, 8, 0, None), TypeError, "scales must be Float"),
        ((x, q8.values, q8.indices[:, :1], q8.scales, 2, 4, 64, 8, 0, None), ValueError, "indices must have shape"),
        ((x, q8.values, q8.indices.int(), q8.scales, 2, 4, 64, 8, 0, None), TypeError, "indices must be Byte"),
        ((x, q8.values, q8.indices, q8.scales, 4, 4, 64, 8, 0, None), ValueError, "n must satisfy"),
        ((torch.randn(2, 60), q8.values, q8.indices, q8.scales, 2, 4, 64, 8, 0, None), ValueError, r"x.shape\[-1\] \(60\)"),
        ((torch.randn(2, 62), q8.values, q8.indices, q8.scales, 2, 4, 62, 8, 0, None), ValueError, "in_features \\(62\\) must be"),
        ((x.long(), q8.values, q8.indices, q8.scales, 2, 4, 64, 8, 0, None), TypeError, "x must be float32"),
        ((x, q8.values, q8.indices, q8.scales, 2, 4, 64, 8, 0, torch.randn(3)), ValueError, "bias must have shape"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match="nm_linear_q: " + msg):
            op(*args)


# ------------------------------------------------------------- every ISA build
CHILD = textwrap.dedent("""
    import sys, torch, sparsekern
    from sparsekern import dispatch_rules, ops, reference
    from sparsekern.ops import dispatch
    from sparsekern.formats import NMWeight
    def exact_dense(W):
        values, indices, scales, n, m, k, bits, group = W.kernel_args()
        w = reference.nm_q_values(values, scales, k // m * n, bits, group, torch.float64)
        return reference.nm_decompress(w, indices, n, m, k)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(0)
    bad = []
    for o, k in ((13, 1036), (9, 64), (5, 36)):
        for n, m in ((2, 4), (1, 4), (4, 8)):
            if k % m:
                continue
            for q, g in (("int8", 0), ("int4", 32), ("int4", 128)):
                for dtype in (torch.float32, torch.bfloat16):
                    W = NMWeight.from_dense(torch.randn(o, k), n, m, quantize=q, group_size=g).to(dtype=dtype)
                    for b in (1, 2, 4, 5, 16, 17):
                        x = torch.randn(b, k, dtype=dtype)
                        dense = exact_dense(W)
                        ref = x.double() @ dense.T
                        d, key = dispatch.decide("nm_linear_q", (x, W))
                        if d.backend == "cpp" and key.cpu_algo == dispatch_rules.Q_ALGO_INT8_DOT:
                            ref = reference.nm_linear_q_dot(x.double(), *W.kernel_args())
                        y = ops.nm_linear_q(x, W)
                        lowp = torch.nn.functional.linear(x, dense.to(dtype))
                        rel = lambda t: ((t.double() - ref).norm() / ref.norm()).item()
                        tol = 1e-5 if dtype == torch.float32 else 2 * rel(lowp) + 1e-6
                        if not rel(y) <= tol:
                            bad.append((o, k, n, m, q, g, str(dtype), b, rel(y)))
    print(bad)
    sys.exit(1 if bad else 0)
""")


@needs_extension
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_isa_build(isa):
    from sparsekern import _extension

    if isa == "avx512" and not _extension.BUILD_INFO.get("cpu_avx512_runtime"):
        pytest.skip("this CPU has no AVX-512")
    if isa == "avx2" and not _extension.BUILD_INFO.get("cpu_avx2_runtime"):
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "SPARSEKERN_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"SPARSEKERN_CPU_ISA={isa}: {r.stdout[-2000:]} {r.stderr[-2000:]}"


def test_benchmark_providers_pass_their_check():
    from sparsekern.bench import cases

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    for pattern, density, names in (("2:4", 0.5, {"sparsekern.int8", "sparsekern.int4"}),
                                    ("unstructured", 0.3, {"sparsekern.int8"})):
        provs = cases.providers("cpu", pattern, quantized=True)
        assert names <= set(provs) and not names & set(cases.providers("cpu", pattern))
        for name in names:
            for rows in (3, 40):  # 40: 2:4 int8 checked against its int8 GEMM's own math where it runs
                x = torch.randn(rows, 96, generator=gen)
                assert cases.check(provs[name](w, density, gen), x, name) < 1e-5
