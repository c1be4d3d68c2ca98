"""nm_linear: compiled kernels (CPU, CUDA) and reference against fp64."""
import pytest
import torch

from backends import pairs, running
from conftest import DEVICES, assert_linear_close
from linear_cases import DTYPES, SHAPES, assert_even_rows_ignore_odd_neighbours, lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.formats import NMWeight

NM = [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16)]


@pytest.mark.parametrize("device,backend", pairs("nm_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES)
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("with_bias", [True, False])
def test_nm_linear_matches_fp64(device, backend, dtype, lead, k, o, n, m, with_bias, poison):
    if k % m:
        k = k // m * m + m
    w = torch.randn(o, k, device=device, dtype=dtype)
    W = NMWeight.from_dense(w, n, m)
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype) if with_bias else None
    with running(backend, "nm_linear", x, W):
        y = ops.nm_linear(x, W, bias)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense, bias),
                        f"nm_linear {n}:{m} {device} {dtype} x{tuple(x.shape)} w{tuple(w.shape)}")


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 8, 16, 64])
def test_nm24_fast_paths_and_tails(batch):
    # K = 16*c + 8 and + 4 exercise the 2:4 vector path's scalar tail.
    for k in (1024, 1032, 1036, 4):
        w = torch.randn(19, k)
        W = NMWeight.from_dense(w, 2, 4)
        x = torch.randn(batch, k)
        with running("cpp", "nm_linear", x, W):
            y = ops.nm_linear(x, W)
        assert_linear_close(y, ref64(x, W.to_dense(), None), torch.float32, what=f"2:4 B={batch} K={k}")


def test_non_contiguous_inputs_are_handled():
    w = torch.randn(16, 64)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(64, 10).t()  # [10, 64], not contiguous
    assert not x.is_contiguous()
    assert_linear_close(ops.nm_linear(x, W), ref64(x, W.to_dense(), None), torch.float32)


def test_nan_in_x_propagates_to_rows_that_use_it():
    w = torch.randn(4, 8)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(2, 8)
    kept_col = int(W.mask()[0].nonzero()[0])
    x[1, kept_col] = float("nan")
    y = ops.nm_linear(x, W)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1, 0])


def test_reference_backend_gives_the_same_answer():
    w = torch.randn(24, 64)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(5, 64)
    y = ops.nm_linear(x, W)
    with ops.use_backend("reference"):
        yr = ops.nm_linear(x, W)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_gradients_for_x_and_bias():
    w = torch.randn(12, 32, dtype=torch.float64)
    W = NMWeight.from_dense(w.float(), 2, 4)
    x = torch.randn(3, 32, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    ops.nm_linear(x, W, b).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, W.to_dense(), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ bad input
def test_bad_inputs():
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(12\) must equal in_features \(16\)"):
        ops.nm_linear(torch.randn(2, 12), W)
    with pytest.raises(TypeError, match="x dtype"):
        ops.nm_linear(torch.randn(2, 16, dtype=torch.float16), W)
    with pytest.raises(TypeError, match="x must be a floating"):
        ops.nm_linear(torch.ones(2, 16, dtype=torch.int64), W)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.nm_linear(torch.randn(2, 16), W, torch.randn(7))
    with pytest.raises(TypeError, match="bias dtype"):
        ops.nm_linear(torch.randn(2, 16), W, torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="NMWeight"):
        ops.nm_linear(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.nm_linear([1.0] * 16, W)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_device_mismatch():
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    with pytest.raises(ValueError, match="x is on"):
        ops.nm_linear(torch.randn(2, 16, device="cuda"), W)


def test_device_mismatch_meta():
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    with pytest.raises(ValueError, match="x is on meta"):
        ops.nm_linear(torch.randn(2, 16, device="meta"), W)


def test_compiled_op_checks_arguments_itself():
    """The C++ entry points refuse bad arguments with a message naming them too."""
    import sparsekern

    if not sparsekern._extension.LOADED:
        pytest.skip("extension not loaded")
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    op = torch.ops.sparsekern.nm_linear
    with pytest.raises(ValueError, match="n must satisfy"):
        op(torch.randn(2, 16), W.values, W.indices, 4, 4, 16, None)
    with pytest.raises(ValueError, match="indices must have shape"):
        op(torch.randn(2, 16), W.values, W.indices[:, :1], 2, 4, 16, None)
    with pytest.raises(ValueError, match="in_features"):
        op(torch.randn(2, 18), W.values, W.indices, 2, 4, 18, None)
    with pytest.raises(TypeError, match="indices must be Byte"):
        op(torch.randn(2, 16), W.values, W.indices.int(), 2, 4, 16, None)


@pytest.mark.parametrize("device,backend", [p for p in pairs("nm_linear") if p.id == "cpu-cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8), (6, 16)])
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_rows_never_see_their_neighbours_values(device, backend, dtype, n, m, batch):
    # The AVX-512 kernels of m = 8 and 16 load a row's values 16 at a time and expand them
    # under the piece's mask, reading into the next rows: those lanes must stay zero. Every
    # other row's values are inf or NaN; the finite rows must match fp64 as usual.
    o, k = 40, 96
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), n, m)
    values = W.values.clone()
    values[1::2] = torch.where(torch.rand(values[1::2].shape) < 0.5, float("inf"), float("nan")).to(dtype)
    W2 = NMWeight.from_tensors({**W.tensors(), "values": values})
    x = torch.randn(batch, k, dtype=dtype)
    with running(backend, "nm_linear", x, W2):
        y = ops.nm_linear(x, W2)
    assert_even_rows_ignore_odd_neighbours(y, x, W.to_dense(), dtype, f"{n}:{m} batch {batch} {dtype}")
