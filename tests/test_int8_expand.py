"""The expanded-int8 algorithm of nm_linear_q / bitmask_linear_q / block_linear_q on the CPU
(dispatch_rules.Q_ALGO_INT8_EXPAND, csrc/cpu/rows_q.h kQAlgoInt8Expand): above the decode rows,
int8 values of any N:M pattern but 2:4 (which has its own int8 GEMM), of the bitmask and of
blocks are
expanded into a dense int8 weight for the call, x is quantized per row, and torch's int8 GEMM
(torch._int_mm) sums the products exactly.

Reference: fp64 of that math (reference.nm_linear_q_int8_dot, bitmask_linear_q_int8_dot, block_linear_q_int8_dot): x
quantized per row as the kernels do, exact sums, times both scales. int32 sums are exact, so
the tolerance is fp32's. Every case asserts the dispatch chose the algorithm, and outputs and
the expanded weight are poisoned (an unwritten byte of either shows)."""
import pytest
import torch

from backends import running
from conftest import assert_linear_close, needs_extension
from linear_cases import lowp_torch_linear
from sparsekern import _extension, dispatch_rules, ops
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
from sparsekern.ops import dispatch
from sparsekern.ops.table import CPU_OP_REFERENCES, OPS

pytestmark = needs_extension

EXPAND = dispatch_rules.Q_ALGO_INT8_EXPAND
VNNI = bool(_extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))
needs_vnni = pytest.mark.skipif(not VNNI, reason="the dispatch picks the expanded int8 weight on AVX512_VNNI CPUs")


@pytest.fixture(autouse=True)
def int8_products(monkeypatch):
    """The algorithm multiplies int8 activations: asked for on every CPU (the default only
    where AVX512_VNNI runs). Child processes inherit the setting."""
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    monkeypatch.delenv("SPARSEKERN_NM_Q_GEMM", raising=False)


def _bitmask(o, k, density, dtype=torch.float32):
    return BitmaskWeight.from_dense(torch.randn(o, k), torch.rand(o, k) < density, quantize="int8").to(dtype=dtype)


def _nm(o, k, n, m, dtype=torch.float32):
    return NMWeight.from_dense(torch.randn(o, k), n, m, quantize="int8").to(dtype=dtype)


def _block(o, k, block, density, dtype=torch.float32):
    bh, bw = block
    o, k = max(bh, o // bh * bh), max(bw, k // bw * bw)
    keep = (torch.rand(o // bh, k // bw) < density).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return BlockWeight.from_dense(torch.randn(o, k), block, keep, quantize="int8").to(dtype=dtype)


def _algo(x, W) -> int:
    d, key = dispatch.decide(W.OP, (x, W))
    assert d.backend == "cpp", d.reason
    return key.cpu_algo


def _expected(x, W, bias):
    """fp64 of the algorithm's math (the CPU op's reference for it)."""
    return CPU_OP_REFERENCES[OPS[W.OP].cpu_op](x.double(), *W.kernel_args(),
                                               None if bias is None else bias.double(), EXPAND)


def _direct(x, W, bias=None):
    """The CPU-only op with the algorithm, called directly (any CPU: torch._int_mm is portable)."""
    return getattr(torch.ops.sparsekern, OPS[W.OP].cpu_op)(x, *W.kernel_args(), bias, EXPAND)


WEIGHTS = {
    "bitmask 30%": lambda o, k: _bitmask(o, k, 0.3),
    "bitmask 3%": lambda o, k: _bitmask(o, k, 0.03),
    "bitmask 95%": lambda o, k: _bitmask(o, k, 0.95),
    "1:4": lambda o, k: _nm(o, k // 4 * 4 or 4, 1, 4),
    "4:8": lambda o, k: _nm(o, k // 8 * 8 or 8, 4, 8),
    "2:8": lambda o, k: _nm(o, k // 8 * 8 or 8, 2, 8),
    "block 1x1 40%": lambda o, k: _block(o, k, (1, 1), 0.4),
    "block 3x5 30%": lambda o, k: _block(o, k, (3, 5), 0.3),
}


@needs_vnni
@pytest.mark.parametrize("rows", [17, 40, 300])
@pytest.mark.parametrize("k,o", [(1, 5), (67, 37), (200, 1), (1061, 70)])
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_matches_fp64_of_its_quantized_math(kind, k, o, rows, poison):
    # K = 1, 67, 1061: partial 64-column words of the bitmask; O = 1 and primes
    W = WEIGHTS[kind](o, k)
    k, o = W.in_features, W.shape[0]
    x = torch.randn(rows, k) * torch.rand(rows, 1) * 10  # rows of different scales
    bias = torch.randn(o)
    with running("cpp", W.OP, x, W):
        assert _algo(x, W) == EXPAND
        assert "expanded" in ops.explain_backend(W.OP, x, W)[1]
        y = ops.sparse_linear(x, W, bias)
    assert_linear_close(y, _expected(x, W, bias), torch.float32, what=f"{kind} B={rows} K={k} O={o}")


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_the_op_called_directly_on_any_cpu(kind, poison):
    W = WEIGHTS[kind](33, 130)
    x = torch.randn(20, W.in_features)  # (a block weight's shape is rounded to its blocks)
    assert_linear_close(_direct(x, W), _expected(x, W, None), torch.float32, what=kind)


@pytest.mark.parametrize("kind", ["bitmask 30%", "4:8", "block 3x5 30%"])
def test_rows_of_zeros_nan_and_inf(kind):
    """Zero rows give the bias alone; a NaN or an inf anywhere in a row makes that row NaN, as
    the exact path does; the other rows stay exact."""
    W = WEIGHTS[kind](24, 96)
    o, k = W.shape
    x = torch.randn(20, k)
    x[0, 5] = float("nan")
    x[1, k - 1] = float("inf")
    x[2, 40], x[2, 0] = float("nan"), 100.0
    x[3] = 0.0
    bias = torch.randn(o)
    y = _direct(x, W, bias)
    assert torch.isnan(y[:3]).all()
    torch.testing.assert_close(y[3], bias, rtol=0, atol=0)
    assert_linear_close(y[4:], _expected(x[4:], W, bias), torch.float32, what="finite rows")


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_and_3d_input(dtype):
    W = _bitmask(48, 256, 0.3, dtype)
    x = torch.randn(3, 7, 256, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    with running("cpp", W.OP, x, W):
        assert _algo(x, W) == EXPAND
        y = ops.sparse_linear(x, W, bias)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    assert_linear_close(y, _expected(x, W, bias), dtype, lowp_torch_linear(x, W.to_dense(), bias), f"{dtype} 3-D")


def test_gradient_passes_the_rounding_straight_through():
    W = _bitmask(24, 64, 0.4)
    x = torch.randn(20, 64, requires_grad=True)
    g = torch.randn(20, 24)
    (_direct(x, W) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ W.to_dense().double(), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_what_is_wrong():
    x = torch.randn(20, 64)
    q4 = NMWeight.from_dense(torch.randn(8, 64), 4, 8, quantize="int4", group_size=32)
    with pytest.raises(ValueError, match="bits"):
        torch.ops.sparsekern.nm_linear_q_cpu(x, *q4.kernel_args(), None, EXPAND)
    B = _bitmask(8, 64, 0.3)
    for algo in (dispatch_rules.Q_ALGO_INT8_DOT, max(dispatch_rules.Q_ALGO_NAMES) + 1):
        with pytest.raises(ValueError, match="algo"):
            torch.ops.sparsekern.bitmask_linear_q_cpu(x, *B.kernel_args(), None, algo)


@pytest.mark.parametrize("name", ["offsets", "bitmask"])
def test_tampered_in_place_never_reads_outside(name):
    """The expansion bounds every read of the values by their count: offsets and mask words
    edited in place (after validation) give some numbers, never a crash."""
    B = _bitmask(64, 1000, 0.3)
    x = torch.randn(20, 1000)
    t = getattr(B, name)
    for fill in (torch.iinfo(t.dtype).max, torch.iinfo(t.dtype).min, -1):
        t.fill_(fill)
        try:
            y = _direct(x, B)
        except (ValueError, RuntimeError):
            continue  # the op's own checks (the mask's bits past in_features) refused it
        assert y.shape == (20, 64)


def test_the_rule(monkeypatch):
    rule, nm_rule = dispatch_rules.q_cpu_algo, dispatch_rules.nm_q_cpu_algo
    above = dispatch_rules.Q_DECODE_MAX_ROWS + 1
    tiles = dispatch_rules.Q_ALGO_EXACT_TILES  # x in fp32, the dequantized tiles into BLAS
    want = EXPAND if VNNI else tiles
    assert rule(above) == rule(1000, 8) == nm_rule(4, 8, 8, above) == nm_rule(1, 4, 8, 1000) == want
    assert rule(above, 4) == nm_rule(4, 8, 4, above) == tiles  # int4: the tiles
    assert rule(dispatch_rules.Q_DECODE_MAX_ROWS) == dispatch_rules.Q_ALGO_INT8_ACT
    if VNNI:
        assert nm_rule(2, 4, 8, above) == dispatch_rules.Q_ALGO_INT8_DOT  # 2:4's own GEMM first
    monkeypatch.setenv("SPARSEKERN_NM_Q_GEMM", "tile")
    assert rule(above) == nm_rule(4, 8, 8, above) == tiles
    monkeypatch.delenv("SPARSEKERN_NM_Q_GEMM")
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "exact")
    assert rule(above) == nm_rule(4, 8, 8, above) == tiles
    assert rule(dispatch_rules.Q_DECODE_MAX_ROWS) == rule(None) == dispatch_rules.Q_ALGO_EXACT  # the decode rows
