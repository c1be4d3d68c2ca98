"""block_linear_q: block (BSR) weights with int8 values (one scale per output row) read as
stored by the CPU kernels, against fp64: the row kernel up to 16 rows and the dequantized
tiles above (algorithm 4) (exact products, this file's first half, under conftest.exact_products), and the
rounding of x on every path where int8 activations are the default (the second half). The int8
GEMM over the expanded values (algorithm 3) is tested with the other formats' in
tests/test_int8_expand.py."""
import pytest
import torch

from backends import running
from conftest import assert_linear_close, needs_extension
from linear_cases import lowp_torch_linear
from sparsekern import dispatch_rules, ops, precisions, reference
from sparsekern.formats import BlockWeight
from sparsekern.ops import dispatch

pytestmark = needs_extension
EXACT = dispatch_rules.Q_ALGO_EXACT


def _weight(o, k, block, density, dtype=torch.float32):
    bh, bw = block
    keep = (torch.rand(o // bh, k // bw) < density).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return BlockWeight.from_dense(torch.randn(o, k), block, keep, quantize="int8").to(dtype=dtype)


def exact_dense(W) -> torch.Tensor:
    """fp64 dense weight of q * s exactly (W.to_dense() rounds to the compute dtype)."""
    crow, col, values, scales, k = W.kernel_args()
    return reference.block_decompress(crow, col, reference.block_q_values(crow, values, scales, torch.float64), k)


def _run(x, W, bias=None):
    """sparse_linear on the CPU, asserting the C++ op ran with the algorithm that was asked."""
    with running("cpp", "block_linear_q", x, W):
        d, key = dispatch.decide("block_linear_q", (x, W))
        return ops.sparse_linear(x, W, bias), key.cpu_algo


@pytest.mark.usefixtures("exact_products")
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("o,k,block,density", [(64, 96, (16, 32), 0.3), (48, 80, (8, 16), 0.05),
                                               (30, 60, (3, 5), 0.9), (16, 32, (16, 32), 0.0)])
def test_matches_fp64_of_the_stored_values(rows, o, k, block, density, poison):
    # odd blocks (3 x 5), a weight with no kept block, 16 rows (the row kernel's widest), 17 (tiles)
    W = _weight(o, k, block, density)
    x = torch.randn(rows, k)
    bias = torch.randn(o)
    y, algo = _run(x, W, bias)
    assert algo == (EXACT if rows <= dispatch_rules.Q_DECODE_MAX_ROWS else dispatch_rules.Q_ALGO_EXACT_TILES)
    assert_linear_close(y, x.double() @ exact_dense(W).T + bias.double(), torch.float32,
                        what=f"block int8 {block} B={rows}")


@pytest.mark.usefixtures("exact_products")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_and_3d_input(dtype):
    W = _weight(64, 128, (16, 32), 0.4, dtype)
    x = torch.randn(2, 3, 128, dtype=dtype)
    bias = torch.randn(64, dtype=dtype)
    y, _ = _run(x, W, bias)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    want = x.double() @ exact_dense(W).T + bias.double()
    assert_linear_close(y, want, dtype, lowp_torch_linear(x, exact_dense(W).to(dtype), bias), f"{dtype} 3-D")


@pytest.mark.usefixtures("exact_products")
def test_gradient_to_x_and_bias():
    W = _weight(32, 64, (8, 16), 0.5)
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    g = torch.randn(5, 32)
    (ops.sparse_linear(x, W, bias) * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), g.double() @ exact_dense(W), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum(0))


def test_x_is_rounded_on_every_path_where_int8_activations_are_the_default(monkeypatch):
    """With int8 activations asked for, the row kernel, the tiles and the int8 GEMM all give
    the product of x rounded per row (precisions.round_activation_rows)."""
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    W = _weight(64, 96, (16, 32), 0.3)
    assert ops.rounds_activations(W, torch.device("cpu"))
    for rows in (1, 16, 17, 300):
        x = torch.randn(rows, 96)
        y, _ = _run(x, W)
        want = precisions.round_activation_rows(x).double() @ exact_dense(W).T
        assert_linear_close(y, want, torch.float32, what=f"rounded x B={rows}")
    monkeypatch.setenv("SPARSEKERN_NM_Q_GEMM", "tile")  # the tiles above 16 rows: x rounded first too
    x = torch.randn(20, 96)
    y, algo = _run(x, W)
    assert algo == dispatch_rules.Q_ALGO_EXACT_TILES
    assert_linear_close(y, precisions.round_activation_rows(x).double() @ exact_dense(W).T, torch.float32,
                        what="tiles")


def test_the_format_declares_the_op_and_hands_over_the_stored_bytes():
    W = _weight(32, 64, (8, 16), 0.5)
    assert W.OP == "block_linear_q" and BlockWeight.op_name(True) == "block_linear_q"
    assert W.dequantized().OP == "block_linear"
    crow, col, values, scales, k = W.kernel_args()
    assert values.dtype == torch.int8 and values is W.values and scales is W.scales and k == 64


def test_bad_arguments_name_what_is_wrong():
    W = _weight(32, 64, (8, 16), 0.5)
    crow, col, values, scales, k = W.kernel_args()
    op = torch.ops.sparsekern.block_linear_q_cpu
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="algo"):
        op(x, crow, col, values, scales, k, None, dispatch_rules.Q_ALGO_INT8_ACT)
    with pytest.raises(TypeError, match="values must be Char"):
        op(x, crow, col, values.float(), scales, k, None, EXACT)
    with pytest.raises(ValueError, match="scales must have shape"):
        op(x, crow, col, values, scales[:-1], k, None, EXACT)
    with pytest.raises(ValueError, match="col_indices must lie in"):
        op(x, crow, col + 100, values, scales, k, None, EXACT)
    with pytest.raises(ValueError, match="crow_indices must start at 0"):
        op(x, crow + 1, col, values, scales, k, None, EXACT)
    with pytest.raises(TypeError, match="quantized values"):
        ops.block_linear_q(x, W.dequantized())
