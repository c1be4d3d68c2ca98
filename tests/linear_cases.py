"""Shapes and helpers shared by the sparse-linear op tests."""
import os

import torch

import sparsekern.reference as reference
from conftest import assert_linear_close
from sparsekern import ops

# (leading shape of x, in_features, out_features): batch 1, odd batches, the direct
# kernels' batch limits (4, 8, 16) and beyond (GEMM path), K not a multiple of 64,
# 3-D inputs, an empty batch.
SHAPES = [
    ((1,), 64, 32),
    ((3,), 200, 67),
    ((5,), 96, 40),
    ((8,), 128, 33),
    ((16,), 72, 16),
    ((17,), 48, 64),
    ((2, 3), 80, 24),
    ((1, 1, 1), 16, 8),
    ((0,), 32, 16),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def lowp_torch_linear(x, dense_w, bias):
    """torch's own linear on the same low-precision tensors (the error yardstick)."""
    return torch.nn.functional.linear(x, dense_w, bias)


def assert_even_rows_ignore_odd_neighbours(y, x, dense_w, dtype, what=""):
    """For weights whose odd rows' values were replaced by inf/NaN: the even rows of y must be
    finite and match fp64 on the clean weight (dense_w), as a kernel that reads a row's
    values several at a time past its end must keep the neighbour's lanes at zero."""
    even = torch.arange(0, dense_w.shape[0], 2)
    assert torch.isfinite(y[:, even]).all(), f"{what}: a row read its neighbour's values"
    assert_linear_close(y[:, even], ref64(x, dense_w, None)[:, even], dtype,
                        lowp_torch_linear(x, dense_w, None)[:, even], what)


def ref64(x, dense_w, bias):
    return torch.nn.functional.linear(x.double(), dense_w.double(), None if bias is None else bias.double())


def random_nm_mask(shape, n, m):
    return reference.nm_mask(torch.rand(shape), n, m)


def assert_linear_grads_match_fp64(op_fn, W, x, bias, what=""):
    """Gradients of op_fn(x, W, bias) to x, the kept values and bias equal those of the
    same computation on the fp64 dense weight (W.to_dense() is a scatter of the values,
    so torch's autograd gives the reference value gradient)."""
    g = torch.randn(*x.shape[:-1], W.shape[0], dtype=torch.float64, device=x.device)
    x1 = x.detach().clone().requires_grad_()
    b1 = bias.detach().clone().requires_grad_()
    W.values.requires_grad_(True)
    try:
        (op_fn(x1, W, b1).double() * g).sum().backward()
        gv = W.values.grad
        W.values.grad = None
        values64 = W.values.detach().double().requires_grad_()
        W64 = type(W).from_tensors({**W.tensors(), "values": values64}, validate=False)
        x64, b64 = (t.detach().double().requires_grad_() for t in (x, bias))
        with ops.use_backend(None):  # the fp64 oracle, whatever backend the caller forced
            (torch.nn.functional.linear(x64, W64.to_dense(), b64) * g).sum().backward()
    finally:
        W.values.requires_grad_(False)
    for ours, ref, name in ((x1.grad, x64.grad, "x"), (gv, values64.grad, "values"), (b1.grad, b64.grad, "bias")):
        assert ours is not None, f"{what}: no gradient reached {name}"
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4, msg=f"{what}: gradient of {name}")


def outputs_by_switch(variable: str, settings, threads: int, call) -> dict:
    """{setting: call()} with the environment variable `variable` set to each setting (None:
    unset), on `threads` intra-op threads; the variable and the thread count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for setting in settings:
            if setting is not None:
                os.environ[variable] = setting
            try:
                out[setting] = call()
            finally:
                os.environ.pop(variable, None)
    finally:
        torch.set_num_threads(old)
    return out
