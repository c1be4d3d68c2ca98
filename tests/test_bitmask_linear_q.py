"""bitmask_linear_q: unstructured weights with int8 values (one scale per output row) read
packed (C++ kernels of every instruction set, the reference) against fp64."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close, needs_extension
from linear_cases import DTYPES, SHAPES, lowp_torch_linear, ref64
from sparsekern import ops, reference
from sparsekern.formats import BitmaskWeight


# This file checks the exact algorithm to fp32's tolerance (conftest.exact_products).
pytestmark = pytest.mark.usefixtures("exact_products")


def _weight(o, k, density, dtype=torch.float32):
    W = BitmaskWeight.from_dense(torch.randn(o, k), torch.rand(o, k) < density, quantize="int8")
    return W.to(dtype=dtype)


def exact_dense(W) -> torch.Tensor:
    """fp64 dense weight of q * s exactly (W.to_dense() rounds to the compute dtype)."""
    values, bitmask, offsets, scales, k = W.kernel_args()
    return reference.bitmask_decompress(reference.bitmask_q_values(values, bitmask, scales, k, torch.float64),
                                        bitmask, offsets, k)


@pytest.mark.parametrize("device,backend", pairs("bitmask_linear_q"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_bitmask_linear_q_matches_fp64(device, backend, dtype, lead, k, o, density, poison):
    W = _weight(o, k, density, dtype).to(device)
    assert W.OP == "bitmask_linear_q"
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    with running(backend, "bitmask_linear_q", x, W):
        y = ops.bitmask_linear_q(x, W, bias)
    dense = exact_dense(W)
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense.to(dtype), bias),
                        f"bitmask_linear_q {density} {device} {dtype} x{tuple(x.shape)}")


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 16, 17])
def test_tails_and_empty_rows(batch, poison):
    for k, density in ((1000, 0.3), (1024, 0.02), (17, 0.5), (64, 0.0)):
        W = _weight(23, k, density)
        x = torch.randn(batch, k)
        with running("cpp", "bitmask_linear_q", x, W):
            y = ops.bitmask_linear_q(x, W)
        if density == 0.0:
            assert torch.equal(y, torch.zeros_like(y))
        else:
            assert_linear_close(y, ref64(x, exact_dense(W), None), torch.float32, what=f"B={batch} K={k}")


def test_sparse_linear_routes_by_the_formats_op():
    W = _weight(24, 64, 0.3)
    fp = BitmaskWeight.from_dense(torch.randn(24, 64))
    assert (W.OP, fp.OP, BitmaskWeight.OP) == ("bitmask_linear_q", "bitmask_linear", "bitmask_linear")
    assert W.kernel_args()[0].dtype == torch.int8 and W.kernel_args()[3] is W.scales
    x = torch.randn(3, 64)
    assert ops.explain_backend(W.OP, x, W)[0] == "cpp"
    y = ops.sparse_linear(x, W)
    torch.testing.assert_close(y.double(), x.double() @ exact_dense(W).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.bitmask_linear(x, W), y)  # bitmask_linear forwards a quantized weight


@pytest.mark.parametrize("rows", [1, 20])
def test_gradients_for_x_and_bias(rows):
    W = _weight(12, 64, 0.3)
    x = torch.randn(rows, 64, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    g = torch.randn(rows, 12)
    (ops.bitmask_linear_q(x, W, b) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    (torch.nn.functional.linear(x64, exact_dense(W), b64) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_rows_never_see_their_neighbours_scales(batch):
    W = _weight(40, 96, 0.4)
    scales = W.scales.clone()
    scales[1::2] = float("inf")
    x = torch.randn(batch, 96)
    values, bitmask, offsets, _, k = W.kernel_args()
    y = torch.ops.sparsekern.bitmask_linear_q(x, values, bitmask, offsets, scales, k, None)
    even = torch.arange(0, 40, 2)
    assert torch.isfinite(y[:, even]).all()
    assert_linear_close(y[:, even], ref64(x, exact_dense(W), None)[:, even], torch.float32, what=f"B={batch}")


def test_bad_inputs():
    W = _weight(8, 16, 0.5)
    fp = BitmaskWeight.from_dense(torch.randn(8, 16))
    with pytest.raises(TypeError, match="bitmask_linear_q: weight must be a BitmaskWeight with quantized values"):
        ops.bitmask_linear_q(torch.randn(2, 16), fp)
    with pytest.raises(TypeError, match="bitmask_linear_q: weight must be a sparsekern.formats.BitmaskWeight"):
        ops.bitmask_linear_q(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"bitmask_linear_q: x.shape\[-1\] \(12\)"):
        ops.bitmask_linear_q(torch.randn(2, 12), W)
    with pytest.raises(TypeError, match="bitmask_linear_q: x dtype"):
        ops.bitmask_linear_q(torch.randn(2, 16, dtype=torch.float16), W)
    with pytest.raises(ValueError, match="bitmask_linear_q: bias must have shape"):
        ops.bitmask_linear_q(torch.randn(2, 16), W, torch.randn(7))
    with pytest.raises(ValueError, match="bitmask_linear_q: weight is not a valid BitmaskWeight.*scales"):
        ops.bitmask_linear_q(torch.randn(2, 16), dataclasses.replace(W, scales=W.scales * 0))


@needs_extension
def test_compiled_op_checks_arguments_itself():
    W = _weight(8, 100, 0.5)
    v, bm, off, sc, k = W.kernel_args()
    op = torch.ops.sparsekern.bitmask_linear_q
    x = torch.randn(2, 100)
    cases = [
        ((x, v.float(), bm, off, sc, k, None), TypeError, "values must be Char"),
        ((x, v[None], bm, off, sc, k, None), ValueError, "values must be 1-D"),
        ((x, v, bm.int(), off, sc, k, None), TypeError, "bitmask must be Long"),
        ((x, v, bm[:, :1], off, sc, k, None), ValueError, "bitmask must have shape"),
        ((x, v, bm, off.long(), sc, k, None), TypeError, "offsets must be Int"),
        ((x, v, bm, off[:3], sc, k, None), ValueError, "offsets must have shape"),
        ((x, v, bm, off, sc.double(), k, None), TypeError, "scales must be Float"),
        ((x, v, bm, off, sc[:3], k, None), ValueError, "scales must have shape"),
        ((x.long(), v, bm, off, sc, k, None), TypeError, "x must be float32"),
        ((x, v, bm, off, sc, k, torch.randn(3)), ValueError, "bias must have shape"),
        ((x, v, bm | (1 << 40), off, sc, k, None), ValueError, "bitmask has bits set beyond in_features"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match="bitmask_linear_q: " + msg):
            op(*args)


CHILD = textwrap.dedent("""
    import sys, torch
    from sparsekern import ops, reference
    from sparsekern.formats import BitmaskWeight
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(0)
    bad = []
    for o, k in ((13, 1000), (9, 64), (5, 17)):
        for density in (0.03, 0.3, 0.95):
            for dtype in (torch.float32, torch.bfloat16):
                W = BitmaskWeight.from_dense(torch.randn(o, k), torch.rand(o, k) < density, quantize="int8").to(dtype=dtype)
                v, bm, off, sc, kk = W.kernel_args()
                dense = reference.bitmask_decompress(reference.bitmask_q_values(v, bm, sc, kk, torch.float64), bm, off, kk)
                for b in (1, 2, 4, 5, 16, 17):
                    x = torch.randn(b, k, dtype=dtype)
                    ref = x.double() @ dense.T
                    rel = lambda t: ((t.double() - ref).norm() / ref.norm()).item()
                    tol = 1e-5 if dtype == torch.float32 else 2 * rel(torch.nn.functional.linear(x, dense.to(dtype))) + 1e-6
                    y = ops.bitmask_linear_q(x, W)
                    if not rel(y) <= tol:
                        bad.append((o, k, density, str(dtype), b, rel(y)))
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
