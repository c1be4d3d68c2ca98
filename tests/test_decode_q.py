"""The int8-activation decode algorithm of nm_linear_q / bitmask_linear_q on the CPU
(dispatch_rules.Q_ALGO_INT8_ACT, csrc/cpu/rows_q.h kQAlgoInt8Act): 1 to 16 rows of x, each
quantized to int8 (symmetric, one scale per row), then integer dot products with the stored
int8 / int4 weights.

Two references, both in fp64:
  - the algorithm emulated in torch: the same fp32 quantization of x (127 / max|x| times x,
    rounded half to even), then q_x @ W^T exactly, times the row scale. Only the kernel's
    final fp32 steps differ from it, so the tolerance is fp32's (relative to the sum of
    |products|), plus the rounding of the output dtype. A wrong lane, index or scale is far
    outside it.
  - the exact product x @ W^T: the difference is the activation rounding, at most half a step
    (max|x| / 254) per element, so |y - exact| <= max|x| / 254 * sum|W row| (the bound is
    checked, and is what justifies the first tolerance's reference).
Every case asserts the compiled CPU-only op ran with the int8 algorithm (explain_backend and
the profiler), and outputs are poisoned. The instruction sets other than this CPU's best
(AVX2, portable) run in child processes, as tests/test_cpu_isa.py does."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import needs_extension
from sparsekern import _extension, dispatch_rules, ops, precisions, reference
from sparsekern.formats import BitmaskWeight, NMWeight

pytestmark = needs_extension

INT8_ACT = dispatch_rules.Q_ALGO_INT8_ACT
PRECISIONS = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
# 2:4 K: one partial 128-column step, whole steps plus 4 / 36 / 124 columns, one whole step
NM_K = [4, 36, 128, 260, 1060, 2044]
BM_K = [1, 67, 200, 1061]  # bitmask K: one column, partial 64-column words
OUT = [7, 37, 131]  # primes: the 4-row steps' remainders
DTYPE_TOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture
def int8_activations(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    yield


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, K] -> (q [B, K] fp64 integers in [-127, 127], scale [B] fp64): the kernel's fp32 steps."""
    x = x.float()
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[:, None]).clamp(-127, 127)
    scale = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))
    return q.double(), scale.double()


def nm_dense64(W) -> torch.Tensor:
    values, indices, scales, n, m, k, bits, group = W.kernel_args()
    return reference.nm_decompress(reference.nm_q_values(values, scales, k // m * n, bits, group, torch.float64),
                                   indices, n, m, k)


def bitmask_dense64(W) -> torch.Tensor:
    values, bitmask, offsets, scales, k = W.kernel_args()
    return reference.bitmask_decompress(reference.bitmask_q_values(values, bitmask, scales, k, torch.float64),
                                        bitmask, offsets, k)


def check_int8_act(y, x, dense, bias, what):
    """y (the kernel's) against the emulated algorithm (tight) and the exact product (bound)."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1]).double()
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype}"
    assert torch.isfinite(y2).all(), f"{what}: non-finite output (an unwritten element?)"
    q, sx = quantize_rows(x2)
    b = bias.double() if bias is not None else torch.zeros(dense.shape[0], dtype=torch.float64)
    emul = sx[:, None] * (q @ dense.t()) + b
    mag = sx[:, None] * (q.abs() @ dense.abs().t()) + b.abs()
    tol = 1e-5 * mag + DTYPE_TOL[x.dtype] * emul.abs() + 1e-30
    bad = (y2 - emul).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs off the emulated int8-activation result, worst "
                           f"{((y2 - emul).abs() / tol).max().item():.3g}x the tolerance")
    exact = x2.double() @ dense.t() + b
    bound = (x2.float().abs().amax(dim=1).double() / 254)[:, None] * dense.abs().sum(dim=1)[None, :]
    bound = bound * (1 + 1e-6) + tol
    assert ((y2 - exact).abs() <= bound).all(), f"{what}: beyond the activation-rounding bound"


def assert_int8_act_runs(op, x, W):
    chosen, why = ops.explain_backend(op, x, W)
    assert chosen == "cpp" and "int8 activations" in why, f"{op}: {chosen} ({why})"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.sparse_linear(x, W)
    ran = {e.name for e in prof.events()}
    assert f"sparsekern::{op}_cpu" in ran, f"{op}: the CPU-only op did not run ({sorted(ran)})"


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("precision,group", PRECISIONS)
def test_nm24_int8_activations(batch, precision, group, poison, int8_activations):
    for k in NM_K:
        for o in OUT:
            W = NMWeight.from_dense(torch.randn(o, k), 2, 4, quantize=precision, group_size=group)
            x = torch.randn(batch, k)
            bias = torch.randn(o) if o == 37 else None
            if k == NM_K[0] and o == OUT[0]:
                assert_int8_act_runs("nm_linear_q", x, W)
            y = ops.nm_linear_q(x, W, bias)
            check_int8_act(y, x, nm_dense64(W), bias, f"2:4 {precision}/{group} B={batch} K={k} O={o}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision,group", [("int8", 0), ("int4", 128)])
def test_nm24_int8_activations_low_precision_x(dtype, precision, group, poison, int8_activations):
    W = NMWeight.from_dense(torch.randn(131, 1060), 2, 4, quantize=precision, group_size=group).to(dtype=dtype)
    for lead in [(1,), (2, 3), (16,)]:  # 3-D x: 6 rows
        x = torch.randn(*lead, 1060).to(dtype)
        bias = torch.randn(131).to(dtype)
        assert_int8_act_runs("nm_linear_q", x, W)
        y = ops.nm_linear_q(x, W, bias)
        assert y.shape == (*lead, 131)
        check_int8_act(y, x, nm_dense64(W), bias.double(), f"2:4 {precision} {dtype} x{lead}")


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8)])
@pytest.mark.parametrize("precision,group", [("int8", 0), ("int4", 32)])
def test_other_nm_patterns_take_the_portable_loop(n, m, precision, group, poison, int8_activations):
    for batch in (1, 5):
        W = NMWeight.from_dense(torch.randn(37, 264), n, m, quantize=precision, group_size=group)
        x = torch.randn(batch, 264)
        assert_int8_act_runs("nm_linear_q", x, W)
        check_int8_act(ops.nm_linear_q(x, W), x, nm_dense64(W), None, f"{n}:{m} {precision} B={batch}")


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 9, 16])
@pytest.mark.parametrize("density", [0.03, 0.3, 0.95])
def test_bitmask_int8_activations(batch, density, poison, int8_activations):
    for k in BM_K:
        for o in OUT:
            w = torch.randn(o, k)
            W = BitmaskWeight.from_dense(w, torch.rand(o, k) < density, quantize="int8")
            x = torch.randn(batch, k)
            bias = torch.randn(o) if o == 7 else None
            if k == BM_K[1] and o == OUT[0]:
                assert_int8_act_runs("bitmask_linear_q", x, W)
            y = ops.bitmask_linear_q(x, W, bias)
            check_int8_act(y, x, bitmask_dense64(W), bias, f"bitmask {density} B={batch} K={k} O={o}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitmask_int8_activations_low_precision_x(dtype, poison, int8_activations):
    W = BitmaskWeight.from_dense(torch.randn(131, 1061), torch.rand(131, 1061) < 0.3, quantize="int8").to(dtype=dtype)
    x = torch.randn(3, 1061).to(dtype)
    assert_int8_act_runs("bitmask_linear_q", x, W)
    check_int8_act(ops.bitmask_linear_q(x, W), x, bitmask_dense64(W), None, f"bitmask {dtype}")


def test_rows_with_zeros_and_non_finite_values(poison, int8_activations):
    W = NMWeight.from_dense(torch.randn(37, 260), 2, 4, quantize="int8")
    B = BitmaskWeight.from_dense(torch.randn(37, 260), torch.rand(37, 260) < 0.3, quantize="int8")
    x = torch.randn(3, 260)
    x[0] = 0.0            # a zero row: scale 0, output exactly the bias
    x[2, 17] = float("inf")  # as the exact path: not a finite number out
    bias = torch.randn(37)
    for y in (ops.nm_linear_q(x, W, bias), ops.bitmask_linear_q(x, B, bias)):
        assert torch.equal(y[0], bias)
        assert torch.isfinite(y[1]).all()
        assert torch.isnan(y[2]).all()


@pytest.mark.parametrize("o,k", [(37, 1), (37, 63), (37, 64), (37, 65), (37, 257), (37, 1061), (5, 600_000)])
def test_bitmask_batch_one_is_the_exact_integer_sum(o, k, poison, int8_activations):
    """One row of x: the kernel's integer sum of q_x * q_w is exact (the AVX-512 path takes the
    weight sum once per row from the contiguous values, rows_q_avx512.cpp bitmask_act_b1_row),
    and the output is fp32((sum * row scale) * x scale) to the bit, as the portable loop's.
    Rows with no kept value (the first, the middle, the last: its values start at the end of
    values), rows with every column kept; K of one column, partial and whole 64-column words,
    and, with 600000 columns, past one flush of the int32 lanes (8192 words)."""
    mask = torch.rand(o, k) < 0.3
    mask[[0, o // 2, o - 1]] = False
    mask[[1, o - 2]] = True
    W = BitmaskWeight.from_dense(torch.randn(o, k), mask, quantize="int8")
    x = torch.randn(1, k)
    assert_int8_act_runs("bitmask_linear_q", x, W)
    y = ops.bitmask_linear_q(x, W)
    values, bitmask, offsets, scales, _ = W.kernel_args()
    q_w = reference.bitmask_decompress(values.double(), bitmask, offsets, k)  # integers, fp64
    q_x, sx = quantize_rows(x)
    total = q_x @ q_w.t()  # exact: |sum| < 2^53
    want = ((total * scales.double()[None, :]) * sx[:, None]).float()
    assert torch.equal(y[:, [0, o // 2, o - 1]], torch.zeros(1, 3)), "a row with no kept value is not 0"
    assert torch.equal(y, want), f"K={k}: {int((y != want).sum())} outputs differ, worst {(y - want).abs().max()}"


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("k", [128, 256, 384, 388, 640])
def test_nm24_int4_batch_one_step_pairs(group, k, poison, int8_activations):
    """One row of x, 2:4 int4 (rows_q_avx512.cpp nm24_q4_act_b1_row: two 128-column steps per
    iteration, a group per step or per pair): odd and even step counts, with and without the
    partial last step, and an all-zero weight row."""
    w = torch.randn(67, k)
    w[3] = 0.0
    W = NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=group)
    x = torch.randn(1, k)
    assert_int8_act_runs("nm_linear_q", x, W)
    y = ops.nm_linear_q(x, W)
    check_int8_act(y, x, nm_dense64(W), None, f"2:4 int4/{group} B=1 K={k}")
    assert torch.equal(y[0, 3], torch.tensor(0.0))


def test_the_choice_lives_in_dispatch_rules(monkeypatch):
    W = NMWeight.from_dense(torch.randn(16, 64), 2, 4, quantize="int8")
    x1, x17 = torch.randn(1, 64), torch.randn(17, 64)
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "exact")
    assert dispatch_rules.q_cpu_algo(1) == dispatch_rules.Q_ALGO_EXACT
    assert "int8 activations" not in ops.explain_backend("nm_linear_q", x1, W)[1]
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    assert dispatch_rules.q_cpu_algo(16) == INT8_ACT
    # above the decode rows the dequantized tiles run, with x in fp32 (2:4 int8 weights take the
    # int8 dot-product GEMM there unless SPARSEKERN_NM_Q_GEMM=tile: test_nm_linear_q.py)
    monkeypatch.setenv("SPARSEKERN_NM_Q_GEMM", "tile")
    assert dispatch_rules.q_cpu_algo(17) == dispatch_rules.Q_ALGO_EXACT_TILES
    why = ops.explain_backend("nm_linear_q", x17, W)[1]
    assert "int8 activations" not in why and "dequantized tiles" in why
    # the tiles multiply x rounded as the int8 kernels round it (ops.rounds_activations)
    xr = precisions.round_activation_rows(x17)
    torch.testing.assert_close(ops.nm_linear_q(x17, W), xr @ W.to_dense().t(), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(ops.nm_linear_q(x17, W), x17 @ W.to_dense().t(), rtol=1e-5, atol=1e-4)
    # the exact algorithm stays exact
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "exact")
    torch.testing.assert_close(ops.nm_linear_q(x1, W), (x1.double() @ nm_dense64(W).t()).float(), rtol=1e-5,
                               atol=1e-5)


def test_the_default_is_int8_activations_where_vnni_runs_them(monkeypatch):
    """Unset SPARSEKERN_Q_ACT: decode rows take int8 activations on an AVX512_VNNI CPU (the
    vpdpbusd kernels), the exact products elsewhere; above the decode rows never."""
    monkeypatch.delenv("SPARSEKERN_Q_ACT", raising=False)
    monkeypatch.delenv("SPARSEKERN_NM_Q_GEMM", raising=False)
    vnni = bool(_extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))
    want = INT8_ACT if (vnni and dispatch_rules.Q_INT8_ACT_DEFAULT) else dispatch_rules.Q_ALGO_EXACT
    for rows in (None, 1, dispatch_rules.Q_DECODE_MAX_ROWS):
        assert dispatch_rules.q_cpu_algo(rows) == want
    assert dispatch_rules.q_cpu_algo(dispatch_rules.Q_DECODE_MAX_ROWS + 1) != INT8_ACT
    B = BitmaskWeight.from_dense(torch.randn(16, 64), torch.rand(16, 64) < 0.3, quantize="int8")
    x1 = torch.randn(1, 64)
    assert ("int8 activations" in ops.explain_backend("bitmask_linear_q", x1, B)[1]) == (want == INT8_ACT)


def test_round_activation_rows_is_the_kernels_quantization():
    """precisions.round_activation_rows (what the float paths multiply) is q * scale of the
    kernels' quantization, row by row; zero rows stay zero; the gradient passes through."""
    x = torch.randn(5, 67, dtype=torch.float64).float() * torch.tensor([1.0, 1e-3, 50.0, 0.0, 1.0])[:, None]
    q, scale = quantize_rows(x)
    got = precisions.round_activation_rows(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), q * scale[:, None], rtol=1e-6, atol=0)
    assert bool((got[3] == 0).all()) and not torch.equal(got, x)
    xb = x.to(torch.bfloat16)
    assert precisions.round_activation_rows(xb).dtype == torch.bfloat16
    xg = x.clone().requires_grad_()
    precisions.round_activation_rows(xg).mul(torch.arange(67.0)).sum().backward()
    torch.testing.assert_close(xg.grad, torch.arange(67.0).expand(5, 67))


def test_a_bad_q_act_setting_is_refused(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int4")
    with pytest.raises(ValueError, match="SPARSEKERN_Q_ACT"):
        dispatch_rules.q_activations_int8(torch.device("cpu"))
    assert not dispatch_rules.q_activations_int8(torch.device("meta"))  # only CPUs round: not read there


def test_bad_algo_is_refused():
    W = NMWeight.from_dense(torch.randn(16, 64), 2, 4, quantize="int8")
    B = BitmaskWeight.from_dense(torch.randn(16, 64), torch.rand(16, 64) < 0.3, quantize="int8")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="nm_linear_q: algo"):
        torch.ops.sparsekern.nm_linear_q_cpu(x, *W.kernel_args(), None, 7)
    with pytest.raises(ValueError, match="bitmask_linear_q: algo"):
        torch.ops.sparsekern.bitmask_linear_q_cpu(x, *B.kernel_args(), None, -1)


def test_gradient_to_x_is_the_exact_products(int8_activations):
    W = NMWeight.from_dense(torch.randn(37, 260), 2, 4, quantize="int4", group_size=64)
    x = torch.randn(2, 260, requires_grad=True)
    ops.nm_linear_q(x, W).sum().backward()
    torch.testing.assert_close(x.grad.double(), nm_dense64(W).sum(dim=0).expand(2, -1), rtol=1e-5, atol=1e-5)


CHILD = textwrap.dedent(
    """
    import json, sys, torch, sparsekern
    sys.path.insert(0, sys.argv[3])
    import test_decode_q as t
    from sparsekern import ops
    from sparsekern.formats import BitmaskWeight, NMWeight
    isa = sys.argv[1]
    info = sparsekern._extension.BUILD_INFO
    want = {"avx2": (True, False), "generic": (False, False)}[isa]
    got = (bool(info["cpu_avx2_runtime"]), bool(info.get("cpu_avx512_runtime")))
    assert got == want, f"SPARSEKERN_CPU_ISA={isa}: build info says (avx2, avx512) = {got}"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(int(sys.argv[2]))
    checked = 0
    for batch in (1, 3, 16):
        for k in (36, 260):
            for prec, group in t.PRECISIONS:
                W = NMWeight.from_dense(torch.randn(37, k), 2, 4, quantize=prec, group_size=group)
                x = torch.randn(batch, k)
                t.assert_int8_act_runs("nm_linear_q", x, W)
                t.check_int8_act(ops.nm_linear_q(x, W), x, t.nm_dense64(W), None, f"{isa} 2:4 {prec}/{group}")
                checked += 1
            W = BitmaskWeight.from_dense(torch.randn(37, k + 3), torch.rand(37, k + 3) < 0.3, quantize="int8")
            x = torch.randn(batch, k + 3)
            t.assert_int8_act_runs("bitmask_linear_q", x, W)
            t.check_int8_act(ops.bitmask_linear_q(x, W), x, t.bitmask_dense64(W), None, f"{isa} bitmask")
            checked += 1
    print(json.dumps({"checked": checked}))
    """
)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_instruction_sets(isa):
    env = dict(os.environ, SPARSEKERN_CPU_ISA=isa, SPARSEKERN_Q_ACT="int8")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", CHILD, isa, "7", here], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checked"] == 30
