"""bitmask_linear: compiled kernels (CPU, CUDA) and reference against fp64."""
import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close
from linear_cases import DTYPES, SHAPES, lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.formats import BitmaskWeight


@pytest.mark.parametrize("device,backend", pairs("bitmask_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES + [((4,), 1100, 9), ((9,), 513, 5)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bitmask_linear_matches_fp64(device, backend, dtype, lead, k, o, density, with_bias, poison):
    w = torch.randn(o, k, device=device, dtype=dtype)
    W = BitmaskWeight.from_dense(w, torch.rand(o, k, device=device) < density)
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype) if with_bias else None
    with running(backend, "bitmask_linear", x, W):
        y = ops.bitmask_linear(x, W, bias)
    dense = W.to_dense()
    ref = ref64(x, dense, bias)
    what = f"bitmask_linear {density} {device} {dtype} x{tuple(x.shape)} w{tuple(w.shape)}"
    if density == 0.0 and not with_bias:
        assert torch.equal(y, torch.zeros_like(y)), what
        return
    assert_linear_close(y, ref, dtype, lowp_torch_linear(x, dense, bias), what)


def test_gradients_for_x():
    w = torch.randn(12, 70)
    W = BitmaskWeight.from_dense(w, torch.rand(12, 70) < 0.4)
    x = torch.randn(3, 70, requires_grad=True)
    ops.bitmask_linear(x, W).sum().backward()
    torch.testing.assert_close(x.grad, W.to_dense().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    W = BitmaskWeight.from_dense(torch.randn(8, 100), torch.rand(8, 100) < 0.5)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        ops.bitmask_linear(torch.randn(2, 64), W)
    with pytest.raises(TypeError, match="x dtype"):
        ops.bitmask_linear(torch.randn(2, 100, dtype=torch.bfloat16), W)
    with pytest.raises(TypeError, match="BitmaskWeight"):
        ops.bitmask_linear(torch.randn(2, 100), W.to_dense())
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bitmask_linear(torch.randn(2, 100), W, torch.randn(100))
