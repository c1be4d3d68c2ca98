"""masked_linear (dense weight + bitmask, training op): forward and gradients."""
import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close
from linear_cases import DTYPES, SHAPES, lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.patterns import pack_bitmask


@pytest.mark.parametrize("device,backend", pairs("masked_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES)
def test_masked_linear_matches_fp64(device, backend, dtype, lead, k, o, poison):
    w = torch.randn(o, k, device=device, dtype=dtype)
    mask = torch.rand(o, k, device=device) < 0.5
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    with running(backend, "masked_linear", x):
        y = ops.masked_linear(x, w, pack_bitmask(mask), bias)
    wm = w * mask
    assert_linear_close(y, ref64(x, wm, bias), dtype, lowp_torch_linear(x, wm, bias),
                        f"masked_linear {device} {dtype} x{tuple(x.shape)}")


@pytest.mark.parametrize("device,backend", pairs("masked_linear"))
@pytest.mark.parametrize("lead", [(1,), (6,), (2, 3)])
def test_gradients_match_autograd_on_dense_masked_reference(device, backend, lead):
    o, k = 20, 70
    w = torch.randn(o, k, device=device, requires_grad=True)
    b = torch.randn(o, device=device, requires_grad=True)
    x = torch.randn(*lead, k, device=device, requires_grad=True)
    mask = torch.rand(o, k, device=device) < 0.5
    g = torch.randn(*lead, o, device=device)
    with running(backend, "masked_linear", x), running(backend, "masked_linear_grad_input", g):
        (ops.masked_linear(x, w, pack_bitmask(mask), b) * g).sum().backward()
    w64, b64, x64 = (t.detach().double().requires_grad_() for t in (w, b, x))
    (torch.nn.functional.linear(x64, w64 * mask, b64) * g.double()).sum().backward()
    for ours, ref, name in ((x.grad, x64.grad, "x"), (w.grad, w64.grad, "weight"), (b.grad, b64.grad, "bias")):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    assert (w.grad[~mask] == 0).all(), "gradient of pruned weights must be zero"


def test_gradcheck_fp64_reference_path():
    w = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    bm = pack_bitmask(torch.rand(5, 9) < 0.5)
    assert torch.autograd.gradcheck(lambda x, w: ops.masked_linear(x, w, bm), (x, w))


@pytest.mark.parametrize("device,backend", pairs("masked_linear_grad_input"))
def test_grad_input_op(device, backend):
    w = torch.randn(16, 40, device=device)
    mask = torch.rand(16, 40, device=device) < 0.3
    g = torch.randn(3, 16, device=device)
    with running(backend, "masked_linear_grad_input", g):
        gx = ops.masked_linear_grad_input(g, w, pack_bitmask(mask))
    torch.testing.assert_close(gx.double(), g.double() @ (w * mask).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", pairs("masked_linear_grad_weight"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES)
def test_grad_weight_op_matches_fp64(device, backend, dtype, lead, k, o, poison):
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    g = torch.randn(*lead, o, device=device, dtype=dtype)
    mask = torch.rand(o, k, device=device) < 0.5
    with running(backend, "masked_linear_grad_weight", g, x):
        gw = ops.masked_linear_grad_weight(g, x, pack_bitmask(mask))
    assert gw.dtype == dtype and gw.shape == (o, k)
    assert (gw[~mask] == 0).all(), "pruned positions must get a zero gradient"
    ref = (g.reshape(-1, o).double().t() @ x.reshape(-1, k).double()) * mask
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gw.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()))


@pytest.mark.parametrize("device,backend", pairs("masked_linear"))
def test_pruned_inf_and_nan_weights_do_not_reach_the_output(device, backend):
    # a pruned weight is never read: W*M at a pruned inf is 0, not inf * 0 = NaN
    o, k = 9, 200  # three full mask words and a tail
    w = torch.randn(o, k, device=device)
    mask = torch.rand(o, k, device=device) < 0.5
    w_bad = w.clone()
    w_bad[~mask] = float("inf")
    w_bad[~mask & (torch.rand(o, k, device=device) < 0.5)] = float("nan")
    x, g = torch.randn(4, k, device=device), torch.randn(4, o, device=device)
    bits = pack_bitmask(mask)
    with running(backend, "masked_linear", x), running(backend, "masked_linear_grad_input", g):
        y = ops.masked_linear(x, w_bad, bits)
        gx = ops.masked_linear_grad_input(g, w_bad, bits)
    if backend == "reference":  # the reference multiplies by the mask: inf * 0 = NaN
        return
    torch.testing.assert_close(y.double(), x.double() @ (w * mask).double().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), g.double() @ (w * mask).double(), rtol=1e-5, atol=1e-5)


def test_grad_weight_bad_inputs():
    bm = pack_bitmask(torch.rand(8, 70) < 0.5)
    with pytest.raises(ValueError, match="leading shape"):
        ops.masked_linear_grad_weight(torch.randn(3, 8), torch.randn(2, 70), bm)
    with pytest.raises(TypeError, match="share dtype"):
        ops.masked_linear_grad_weight(torch.randn(2, 8), torch.randn(2, 70, dtype=torch.float64), bm)
    with pytest.raises(ValueError, match="bitmask must have shape"):
        ops.masked_linear_grad_weight(torch.randn(2, 8), torch.randn(2, 70), bm[:, :1])
    with pytest.raises(TypeError, match="grad_out must be a floating"):
        ops.masked_linear_grad_weight(torch.ones(2, 8, dtype=torch.int64), torch.randn(2, 70), bm)


def test_grad_weight_kernel_checks_its_arguments():
    """The C++ entry point refuses what the Python wrapper would (called directly)."""
    if not ops.explain_backend("masked_linear_grad_weight", torch.randn(2, 8), torch.randn(2, 70))[0] == "cpp":
        pytest.skip("the C++ kernel is not what runs here")
    op = torch.ops.sparsekern.masked_linear_grad_weight
    bm = pack_bitmask(torch.rand(8, 70) < 0.5)
    with pytest.raises(ValueError, match="masked_linear_grad_weight: grad_out .* leading shape"):
        op(torch.randn(3, 8), torch.randn(2, 70), bm)
    with pytest.raises(ValueError, match="masked_linear_grad_weight: bitmask must have shape"):
        op(torch.randn(2, 8), torch.randn(2, 70), bm[:, :1])
    with pytest.raises(TypeError, match="masked_linear_grad_weight: bitmask must be Long"):
        op(torch.randn(2, 8), torch.randn(2, 70), bm.int())
    with pytest.raises(TypeError, match="masked_linear_grad_weight: grad_out dtype"):
        op(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 70), bm)


def test_bad_inputs():
    w = torch.randn(8, 70)
    bm = pack_bitmask(torch.rand(8, 70) < 0.5)
    with pytest.raises(ValueError, match="bitmask must have shape"):
        ops.masked_linear(torch.randn(2, 70), w, bm[:, :1])
    with pytest.raises(TypeError, match="bitmask must be an int64"):
        ops.masked_linear(torch.randn(2, 70), w, torch.rand(8, 70) < 0.5)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        ops.masked_linear(torch.randn(2, 69), w, bm)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        ops.masked_linear(torch.randn(2, 70), w[0], bm)


def _gemm_input_dtypes(fn):
    """The input dtypes of every aten::mm / aten::addmm that fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [tuple(d for d in e.input_dtypes if d and d != "Scalar") for e in prof.events() if e.name in ("aten::mm", "aten::addmm")]


def test_cpu_bf16_operands_multiply_in_bf16_where_the_cpu_has_bf16_dot_products():
    from test_nm_gemm_bf16 import HAS_BF16_DOT
    torch.manual_seed(0)
    o, k = 48, 200
    w = torch.randn(o, k, dtype=torch.bfloat16)
    mask = torch.rand(o, k) < 0.5
    x = torch.randn(3, 5, k, dtype=torch.bfloat16)
    b = torch.randn(o, dtype=torch.bfloat16)
    g = torch.randn(3, 5, o, dtype=torch.bfloat16)
    bm = pack_bitmask(mask)
    calls = {"masked_linear": (x, w, bm, b), "masked_linear_grad_input": (g, w, bm),
             "masked_linear_grad_weight": (g, x, bm)}
    want = "c10::BFloat16" if HAS_BF16_DOT else "float"
    for name, args in calls.items():
        assert ops.explain_backend(name, *args)[0] == "cpp", name
        dtypes = _gemm_input_dtypes(lambda: getattr(ops, name)(*args))
        assert dtypes and all(all(d == want for d in ds) for ds in dtypes), (name, dtypes)
    wm = (w * mask).double()
    torch.testing.assert_close(ops.masked_linear(x, w, bm, b).double(), x.double() @ wm.t() + b.double(),
                               rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(ops.masked_linear_grad_input(g, w, bm).double(), g.double() @ wm, rtol=2e-2, atol=5e-2)
    gw = ops.masked_linear_grad_weight(g, x, bm)
    assert gw.dtype == torch.bfloat16 and bool((gw[~mask] == 0).all())
    torch.testing.assert_close(gw.double(), (g.reshape(-1, o).double().t() @ x.reshape(-1, k).double()) * mask,
                               rtol=2e-2, atol=1e-1)
