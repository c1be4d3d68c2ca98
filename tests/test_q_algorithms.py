"""Every algorithm of the quantized CPU-only ops (nm_linear_q_cpu, bitmask_linear_q_cpu,
block_linear_q_cpu; dispatch_rules.Q_ALGO_*, csrc/cpu/rows_q.h kQAlgo*) runs at any rows of x:
the kernels run the algorithm they are given and never choose again by the rows (the decode
row kernels in batch tiles of 16 rows, the exact tiles at one row as at 300). Which algorithm
a batch gets is dispatch_rules' choice alone (q_cpu_algo, nm_q_cpu_algo, block_q_cpu_algo),
checked here against the key, explain_backend and the profiler.

References in fp64: the exact algorithms (0 decode rows, 4 tiles) against the stored values
dequantized exactly; the integer ones (1 int8 activations, 2 the 2:4 int8 GEMM, 3 the expanded
int8 weight) against x quantized per row as the kernels do (reference.quantize_rows_int8) times
the same values, exact sums (every integer algorithm sums exactly, so fp32's tolerance)."""
import pytest
import torch

from conftest import assert_linear_close, needs_extension
from sparsekern import _extension, dispatch_rules, ops, reference
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
from sparsekern.ops import dispatch

pytestmark = needs_extension

VNNI = bool(_extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))
EXACT, INT8_ACT, INT8_DOT, INT8_EXPAND, EXACT_TILES = (
    dispatch_rules.Q_ALGO_EXACT, dispatch_rules.Q_ALGO_INT8_ACT, dispatch_rules.Q_ALGO_INT8_DOT,
    dispatch_rules.Q_ALGO_INT8_EXPAND, dispatch_rules.Q_ALGO_EXACT_TILES)
ROWS = (1, 16, 17, 40)  # one row, the decode kernels' widest tile, one past it, two tiles and a part

# (name, weight maker): odd output counts, K not a multiple of the kernels' 32/64/512 steps.
WEIGHTS = {
    "2:4 int8": lambda: NMWeight.from_dense(torch.randn(37, 200), 2, 4, quantize="int8"),
    "2:4 int4 g32": lambda: NMWeight.from_dense(torch.randn(37, 200), 2, 4, quantize="int4", group_size=32),
    "4:8 int8": lambda: NMWeight.from_dense(torch.randn(29, 104), 4, 8, quantize="int8"),
    "1:4 int4 g64": lambda: NMWeight.from_dense(torch.randn(29, 200), 1, 4, quantize="int4", group_size=64),
    "bitmask int8 30%": lambda: BitmaskWeight.from_dense(torch.randn(37, 200), torch.rand(37, 200) < 0.3,
                                                         quantize="int8"),
    "block int8 3x5": lambda: BlockWeight.from_dense(
        torch.randn(30, 60), (3, 5), (torch.rand(10, 12) < 0.4).repeat_interleave(3, 0).repeat_interleave(5, 1),
        quantize="int8"),
}


def _bits(W) -> int:
    return W.kernel_args()[6] if isinstance(W, NMWeight) else 8


def _algorithms(W) -> list[int]:
    """The algorithms the op of W has (every one this CPU can run)."""
    if isinstance(W, BlockWeight):
        return [EXACT, INT8_EXPAND, EXACT_TILES]
    algos = [EXACT, INT8_ACT, EXACT_TILES]
    if _bits(W) == 8:
        algos.append(INT8_EXPAND)
    if isinstance(W, NMWeight) and (W.n, W.m) == (2, 4) and VNNI:
        algos.append(INT8_DOT)
    return algos


def _dense64(W) -> torch.Tensor:
    """W's stored values dequantized exactly (fp64)."""
    if isinstance(W, NMWeight):
        values, indices, scales, n, m, k, bits, group = W.kernel_args()
        kept = k // m * n
        return reference.nm_decompress(reference.nm_q_values(values, scales, kept, bits, group, torch.float64),
                                       indices, n, m, k)
    if isinstance(W, BitmaskWeight):
        values, bitmask, offsets, scales, k = W.kernel_args()
        return reference.bitmask_decompress(reference.bitmask_q_values(values, bitmask, scales, k, torch.float64),
                                            bitmask, offsets, k)
    crow, col, values, scales, k = W.kernel_args()
    return reference.block_decompress(crow, col, reference.block_q_values(crow, values, scales, torch.float64), k)


def _expected(x, W, bias, algo) -> torch.Tensor:
    xd = x.double()
    if algo not in dispatch_rules.Q_ALGOS_FLOAT_X:  # the integer algorithms quantize x per row first
        q, scale = reference.quantize_rows_int8(x)
        xd = q.double() * scale.double()
    return xd @ _dense64(W).T + bias.double()


def _cpu_op(W):
    return getattr(torch.ops.sparsekern, f"{W.OP}_cpu")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_every_algorithm_runs_at_any_rows(name, rows, poison):
    W = WEIGHTS[name]()
    x = torch.randn(rows, W.shape[1])
    bias = torch.randn(W.shape[0])
    for algo in _algorithms(W):
        y = _cpu_op(W)(x, *W.kernel_args(), bias, algo)
        assert_linear_close(y, _expected(x, W, bias, algo), torch.float32,
                            what=f"{name} algo {algo} ({dispatch_rules.Q_ALGO_NAMES[algo]}) B={rows}")


@pytest.mark.parametrize("rows", [17, 40])
def test_the_decode_rows_above_16_are_their_16_row_tiles(rows):
    """Above 16 rows the decode algorithms run their row kernels on 16-row tiles of x: each
    tile's output is bit for bit what the same rows alone give."""
    W = WEIGHTS["bitmask int8 30%"]()
    x = torch.randn(rows, W.shape[1])
    for algo in (EXACT, INT8_ACT):
        y = _cpu_op(W)(x, *W.kernel_args(), None, algo)
        for b0 in range(0, rows, 16):
            alone = _cpu_op(W)(x[b0:b0 + 16].clone(), *W.kernel_args(), None, algo)
            assert torch.equal(y[b0:b0 + 16], alone), f"algo {algo}, tile at row {b0}"


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_an_unknown_algorithm_is_refused_by_name(name):
    W = WEIGHTS[name]()
    x = torch.randn(3, W.shape[1])
    known = set(_algorithms(W)) | {INT8_DOT}
    for algo in (-1, max(dispatch_rules.Q_ALGO_NAMES) + 1, 99) + tuple(set(dispatch_rules.Q_ALGO_NAMES) - known):
        with pytest.raises(ValueError, match=rf"{W.OP}: algo (must be .*, got {algo}$|{algo} \()"):
            _cpu_op(W)(x, *W.kernel_args(), None, algo)


@pytest.mark.parametrize("q_act", ["exact", "int8"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_the_dispatch_passes_the_rule_and_the_op_runs_it(name, rows, q_act, monkeypatch):
    """The key holds dispatch_rules' algorithm for the batch bucket; explain_backend names it
    (but the exact decode rows, the shared schema's); the CPU op that ran, bit for bit, is that
    algorithm (the x the op multiplies rounded first where the algorithm multiplies floats and
    int8 activations are asked for)."""
    monkeypatch.setenv("SPARSEKERN_Q_ACT", q_act)
    monkeypatch.delenv("SPARSEKERN_NM_Q_GEMM", raising=False)
    ops.clear_decisions()
    W = WEIGHTS[name]()
    x = torch.randn(rows, W.shape[1])
    first = dispatch_rules.bucket_min_rows(dispatch_rules.batch_bucket(rows))
    if isinstance(W, NMWeight):
        want = dispatch_rules.nm_q_cpu_algo(W.n, W.m, _bits(W), first)
    elif isinstance(W, BlockWeight):
        want = dispatch_rules.block_q_cpu_algo(first)
    else:
        want = dispatch_rules.q_cpu_algo(first, 8)
    decode = rows <= dispatch_rules.Q_DECODE_MAX_ROWS
    assert (want in (EXACT, INT8_ACT)) == decode, f"{name} B={rows}: algorithm {want}"
    if q_act == "exact":
        assert want == (EXACT if decode else EXACT_TILES)
    d, key = dispatch.decide(W.OP, (x, W))
    assert d.backend == "cpp" and key.cpu_algo == want
    why = ops.explain_backend(W.OP, x, W)[1]
    assert want == EXACT or dispatch_rules.Q_ALGO_NAMES[want] in why, why
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = ops.sparse_linear(x, W)
    ran = {e.name for e in prof.events()}
    assert f"sparsekern::{W.OP}{'' if want == EXACT else '_cpu'}" in ran, sorted(ran)
    xin = x
    if want in dispatch_rules.Q_ALGOS_FLOAT_X and ops.rounds_activations(W, x.device):
        from sparsekern import precisions

        xin = precisions.round_activation_rows(x)
    assert torch.equal(y, _cpu_op(W)(xin, *W.kernel_args(), None, want))


def test_the_rules_decide_by_rows_the_kernels_do_not(monkeypatch):
    """The 16-row split lives in dispatch_rules: up to Q_DECODE_MAX_ROWS the decode algorithms,
    above it a GEMM (the int8 ones, or the exact tiles), whatever the switches."""
    monkeypatch.delenv("SPARSEKERN_NM_Q_GEMM", raising=False)
    top = dispatch_rules.Q_DECODE_MAX_ROWS
    for q_act in ("exact", "int8"):
        monkeypatch.setenv("SPARSEKERN_Q_ACT", q_act)
        for bits in (8, 4):
            for rows in (None, 1, top):
                assert dispatch_rules.q_cpu_algo(rows, bits) == (INT8_ACT if q_act == "int8" else EXACT)
                assert dispatch_rules.block_q_cpu_algo(rows) == EXACT
            for rows in (top + 1, 1000):
                assert dispatch_rules.q_cpu_algo(rows, bits) in (INT8_EXPAND, EXACT_TILES)
                assert dispatch_rules.nm_q_cpu_algo(2, 4, bits, rows) in (INT8_DOT, EXACT_TILES)
                assert dispatch_rules.block_q_cpu_algo(rows) in (INT8_EXPAND, EXACT_TILES)
    monkeypatch.setenv("SPARSEKERN_NM_Q_GEMM", "tile")
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    assert dispatch_rules.q_cpu_algo(top + 1) == dispatch_rules.nm_q_cpu_algo(2, 4, 8, top + 1) == \
        dispatch_rules.block_q_cpu_algo(top + 1) == EXACT_TILES


@pytest.mark.skipif(not VNNI, reason="the 2:4 int8 dot-product GEMM needs AVX512_VNNI")
@pytest.mark.parametrize("name", ["2:4 int8", "2:4 int4 g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_dot_gemm_adds_the_bias_in_its_last_fma(name, dtype):
    """The bias is added inside the GEMM (one FMA with the scales, no separate pass): with a bias
    the output is the bias-free output plus the bias to within an fp32 rounding, for odd output
    counts (the last 16-row block masked) and a bias in the input's dtype."""
    W = WEIGHTS[name]()
    x = torch.randn(40, W.shape[1]).to(dtype)
    bias = torch.randn(W.shape[0]).to(dtype)
    op = _cpu_op(W)
    with_bias = op(x, *W.kernel_args(), bias, INT8_DOT).float()
    without = op(x, *W.kernel_args(), None, INT8_DOT).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(with_bias, without + bias.float(), rtol=tol, atol=tol)
    expected = _expected(x.float(), W, bias.float(), INT8_DOT)
    if dtype == torch.float32:
        assert_linear_close(with_bias, expected, dtype, what=f"{name} algo {INT8_DOT} with bias")
    else:  # the output rounded to bf16 once (8 bits of mantissa)
        assert float((with_bias.double() - expected).norm() / expected.norm()) < 4e-3
