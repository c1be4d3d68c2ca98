"""Triton backends through sparsekern.ops (use_backend("triton")) against fp64: on CUDA
tensors when there is a GPU, else on CPU tensors through the interpreter
(TRITON_INTERPRET=1, set in conftest.py), never on CPU tensors with the interpreter off.
Each test asserts the dispatch table runs Triton; checks, fakes and autograd are the
ones every backend shares (sparsekern/ops.py)."""
import pytest
import torch

from backends import running
from conftest import assert_linear_close
from linear_cases import assert_linear_grads_match_fp64, lowp_torch_linear, ref64
from sparsekern import ops, reference
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
from sparsekern.patterns import pack_bitmask
from sparsekern.triton import interpreting

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    DEVICES = ["cuda"]
elif interpreting():
    DEVICES = ["cpu"]
else:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = [1, 3, 17]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n,m,k", [(2, 4, 72), (1, 4, 40), (4, 8, 200), (2, 8, 64), (5, 16, 96)])
def test_triton_nm_linear(device, dtype, batch, n, m, k, poison):
    w = torch.randn(37, k, device=device, dtype=dtype)
    W = NMWeight.from_dense(w, n, m)
    x = torch.randn(batch, k, device=device, dtype=dtype)
    b = torch.randn(37, device=device, dtype=dtype)
    dense = W.to_dense()
    with running("triton", "nm_linear", x, W):
        y = ops.nm_linear(x, W, b)
    assert_linear_close(y, ref64(x, dense, b), dtype, lowp_torch_linear(x, dense, b),
                        f"triton nm_linear {n}:{m} B={batch} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,density", [(100, 0.3), (64, 0.9), (530, 0.1), (7, 0.5)])
def test_triton_bitmask_linear(device, dtype, batch, k, density, poison):
    w = torch.randn(33, k, device=device, dtype=dtype)
    W = BitmaskWeight.from_dense(w, torch.rand(33, k, device=device) < density)
    x = torch.randn(batch, k, device=device, dtype=dtype)
    dense = W.to_dense()
    with running("triton", "bitmask_linear", x, W):
        y = ops.bitmask_linear(x, W)
    assert_linear_close(y, ref64(x, dense, None), dtype, lowp_torch_linear(x, dense, None),
                        f"triton bitmask_linear {density} B={batch} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("block", [16, 32, 64])
def test_triton_block_linear(device, dtype, batch, block, poison):
    o, k = 2 * block, 3 * block
    w = torch.randn(o, k, device=device, dtype=dtype)
    keep = torch.rand(2, 3, device=device) < 0.5
    keep[0, 0] = True
    keep[1] = False  # an empty block row
    W = BlockWeight.from_dense(w, (block, block), keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
    x = torch.randn(batch, k, device=device, dtype=dtype)
    b = torch.randn(o, device=device, dtype=dtype)
    dense = W.to_dense()
    with running("triton", "block_linear", x, W):
        y = ops.block_linear(x, W, b)
    assert_linear_close(y, ref64(x, dense, b), dtype, lowp_torch_linear(x, dense, b),
                        f"triton block_linear {block} B={batch} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
def test_triton_masked_linear_forward_and_backward(device, batch):
    o, k = 24, 100
    w = torch.randn(o, k, device=device, requires_grad=True)
    b = torch.randn(o, device=device, requires_grad=True)
    x = torch.randn(batch, k, device=device, requires_grad=True)
    mask = torch.rand(o, k, device=device) < 0.5
    bits = pack_bitmask(mask)
    g = torch.randn(batch, o, device=device)
    with running("triton", "masked_linear", x), running("triton", "masked_linear_grad_input", g), \
            running("triton", "masked_linear_grad_weight", g, x):
        y = ops.masked_linear(x, w, bits, b)
        (y * g).sum().backward()
    w64, b64, x64 = (t.detach().double().requires_grad_() for t in (w, b, x))
    y64 = torch.nn.functional.linear(x64, w64 * mask, b64)
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for ours, ref, name in ((x.grad, x64.grad, "x"), (w.grad, w64.grad, "weight"), (b.grad, b64.grad, "bias")):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,p", [((1, 96), 1), ((40, 1), 2), ((40, 96), 1), ((1, 4), 2), ((4, 8), 1),
                                     ((32, 64), 2)])
def test_triton_group_score(device, group, p):
    w = torch.randn(64 if group == (32, 64) else 40, 128 if group == (32, 64) else 96, device=device)
    g = torch.randn_like(w)
    a = torch.rand(w.shape[1], device=device)
    with running("triton", "group_score", w):
        out = ops.group_score(w, *group, p, grad=g, act_norm=a)
    torch.testing.assert_close(out.double(), reference.group_score(w.double(), g.double(), a.double(), *group, p).double(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_act_norm_accumulate(device):
    s = torch.rand(150, device=device)
    start = s.clone()
    xs = [torch.randn(3, 7, 150, device=device), torch.randn(40, 150, device=device)]
    for x in xs:
        with running("triton", "act_norm_accumulate", s, x):
            ops.act_norm_accumulate(s, x)
    ref = start.double() + sum(x.reshape(-1, 150).double().square().sum(0) for x in xs)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (6, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_nm_score_compress(device, n, m, dtype):
    w = torch.randn(37, 5 * 16, device=device, dtype=dtype)
    g = torch.randn_like(w)
    a = torch.rand(80, device=device)
    with running("triton", "nm_score_compress", w):
        v, ix = ops.nm_score_compress(w, n, m, grad=g, act_norm=a)
        rv, rix = reference.nm_score_compress(w, g, a, n, m)
        assert torch.equal(v, rv) and torch.equal(ix, rix)
        v, ix = ops.nm_score_compress(w, n, m)
    assert torch.equal(reference.nm_decompress(v, ix, n, m, 80), w * reference.nm_mask(w, n, m))


@pytest.mark.parametrize("op", ["nm_linear", "bitmask_linear", "block_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gradients_reach_x_values_and_bias(op, dtype):
    device = DEVICES[0]
    w = torch.randn(32, 64, device=device, dtype=dtype)
    if op == "nm_linear":
        W = NMWeight.from_dense(w, 2, 4)
    elif op == "bitmask_linear":
        W = BitmaskWeight.from_dense(w, torch.rand(32, 64, device=device) < 0.3)
    else:
        W = BlockWeight.from_dense(w, (16, 16), torch.rand(32, 64, device=device) < 0.02)
    x = torch.randn(5, 64, device=device, dtype=dtype)
    with running("triton", op, x, W):
        if dtype == torch.float32:
            assert_linear_grads_match_fp64(getattr(ops, op), W, x, torch.randn(32, device=device), f"triton {op}")
        else:  # low precision: the same gradients as the reference backend in that dtype
            xg = x.clone().requires_grad_()
            getattr(ops, op)(xg, W).float().square().sum().backward()
            with ops.use_backend("reference"):
                xr = x.clone().requires_grad_()
                getattr(ops, op)(xr, W).float().square().sum().backward()
            torch.testing.assert_close(xg.grad.float(), xr.grad.float(), rtol=5e-2, atol=5e-2)


def _q_exact_dense(W) -> torch.Tensor:
    """fp64 dense weight of a quantized format's values, q * s exactly."""
    if W.OP == "nm_linear_q":
        values, indices, scales, n, m, k, bits, group = W.kernel_args()
        return reference.nm_decompress(reference.nm_q_values(values, scales, k // m * n, bits, group, torch.float64),
                                       indices, n, m, k)
    values, bitmask, offsets, scales, k = W.kernel_args()
    return reference.bitmask_decompress(reference.bitmask_q_values(values, bitmask, scales, k, torch.float64),
                                        bitmask, offsets, k)


# The Triton quantized kernels multiply x exactly (as the dispatch does on a GPU); on CPU
# tensors under the interpreter the dispatch would round x first, so these tests ask for the
# exact products (conftest.exact_products) to check the kernels themselves.
@pytest.mark.usefixtures("exact_products")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n,m,k,precision,group", [(2, 4, 72, "int8", 0), (2, 4, 200, "int4", 32),
                                                   (1, 4, 36, "int4", 64), (4, 8, 136, "int8", 0),
                                                   (2, 4, 264, "int4", 128)])
def test_triton_nm_linear_q(device, dtype, batch, n, m, k, precision, group, poison):
    W = NMWeight.from_dense(torch.randn(37, k, device=device), n, m, quantize=precision, group_size=group).to(
        dtype=dtype)
    x = torch.randn(batch, k, device=device, dtype=dtype)
    b = torch.randn(37, device=device, dtype=dtype)
    dense = _q_exact_dense(W)
    with running("triton", "nm_linear_q", x, W):
        y = ops.sparse_linear(x, W, b)
    assert_linear_close(y, ref64(x, dense, b), dtype, lowp_torch_linear(x, dense.to(dtype), b),
                        f"triton nm_linear_q {n}:{m} {precision}/{group} B={batch} {dtype}")


@pytest.mark.usefixtures("exact_products")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,density", [(100, 0.3), (530, 0.1), (7, 0.5)])
def test_triton_bitmask_linear_q(device, dtype, batch, k, density, poison):
    W = BitmaskWeight.from_dense(torch.randn(33, k, device=device), torch.rand(33, k, device=device) < density,
                                 quantize="int8").to(dtype=dtype)
    x = torch.randn(batch, k, device=device, dtype=dtype)
    dense = _q_exact_dense(W)
    with running("triton", "bitmask_linear_q", x, W):
        y = ops.sparse_linear(x, W)
    assert_linear_close(y, ref64(x, dense, None), dtype, lowp_torch_linear(x, dense.to(dtype), None),
                        f"triton bitmask_linear_q {density} B={batch} {dtype}")


@pytest.mark.usefixtures("exact_products")
@pytest.mark.parametrize("op", ["nm_linear_q", "bitmask_linear_q"])
def test_triton_quantized_gradients_reach_x_and_bias(op):
    device = DEVICES[0]
    w = torch.randn(32, 64, device=device)
    W = (NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32) if op == "nm_linear_q" else
         BitmaskWeight.from_dense(w, torch.rand(32, 64, device=device) < 0.3, quantize="int8"))
    x = torch.randn(5, 64, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    g = torch.randn(5, 32, device=device)
    with running("triton", op, x, W):
        (getattr(ops, op)(x, W, b) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    (torch.nn.functional.linear(x64, _q_exact_dense(W), b64) * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_triton_runs_only_what_it_supports():
    """A block shape the Triton kernel cannot take is refused when Triton is forced, with
    the reason; automatic dispatch on a GPU then runs the next backend and says so."""
    W = BlockWeight.from_dense(torch.randn(8, 16, device=DEVICES[0]), (4, 4))
    x = torch.randn(2, 16, device=DEVICES[0])
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="square blocks"):
        ops.block_linear(x, W)
    if DEVICES[0] == "cuda":
        backend, why = ops.explain_backend("block_linear", x, W)
        assert backend != "triton" and "square blocks" in why


def test_triton_ops_fake_tensor_check():
    # opcheck's aot-dispatch and torch.compile need a GPU for triton_op (see CONVENTIONS.md);
    # the fake kernels (the ones every backend shares) are checked here.
    w = torch.randn(16, 64)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(3, 64)
    with ops.use_backend("triton"):  # loads the Triton families, registering their fakes
        ops.nm_linear(x, W)
        ops.group_score(w, 1, 64, 2)
    torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear.default,
                          (x, W.values, W.indices, 2, 4, 64, None), test_utils=["test_schema", "test_faketensor"])
    torch.library.opcheck(torch.ops.sparsekern_triton.group_score.default, (w, None, None, 1, 64, 2),
                          test_utils=["test_schema", "test_faketensor"])
    q = NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32)
    bq = BitmaskWeight.from_dense(w, torch.rand(16, 64) < 0.3, quantize="int8")
    with ops.use_backend("triton"):
        ops.nm_linear_q(x, q)
        ops.bitmask_linear_q(x, bq)
    torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear_q.default, (x, *q.kernel_args(), None),
                          test_utils=["test_schema", "test_faketensor"])
    torch.library.opcheck(torch.ops.sparsekern_triton.bitmask_linear_q.default, (x, *bq.kernel_args(), None),
                          test_utils=["test_schema", "test_faketensor"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="opcheck aot-dispatch and torch.compile of triton_op need a GPU")
def test_triton_ops_full_opcheck_and_compile_on_gpu():
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("triton"):
        ops.nm_linear(x, W)
        torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear.default, (x, W.values, W.indices, 2, 4, 128, None))
        f = torch.compile(lambda x: ops.nm_linear(x, W), fullgraph=True)
        torch.testing.assert_close(f(x), ops.nm_linear(x, W))
        for Q in (NMWeight.from_dense(w.float(), 2, 4, quantize="int4", group_size=64).to(dtype=torch.bfloat16),
                  BitmaskWeight.from_dense(w.float(), torch.rand(64, 128, device="cuda") < 0.3,
                                           quantize="int8").to(dtype=torch.bfloat16)):
            ops.sparse_linear(x, Q)
            torch.library.opcheck(getattr(torch.ops.sparsekern_triton, Q.OP).default, (x, *Q.kernel_args(), None))
            fq = torch.compile(lambda x, Q=Q: ops.sparse_linear(x, Q), fullgraph=True)
            torch.testing.assert_close(fq(x), ops.sparse_linear(x, Q))


def test_triton_bad_inputs_get_the_same_errors_as_every_backend():
    W = NMWeight.from_dense(torch.randn(8, 16, device=DEVICES[0]), 2, 4)
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
            ops.nm_linear(torch.randn(2, 12, device=DEVICES[0]), W)
        with pytest.raises(TypeError, match="x dtype"):
            ops.nm_linear(torch.randn(2, 16, dtype=torch.float16, device=DEVICES[0]), W)
        with pytest.raises(ValueError, match="bitmask must have shape"):
            ops.masked_linear(torch.randn(2, 16, device=DEVICES[0]), torch.randn(8, 16, device=DEVICES[0]),
                              torch.zeros(8, 2, dtype=torch.int64, device=DEVICES[0]))
        with pytest.raises(ValueError, match="NaN or inf"):
            ops.nm_score_compress(torch.full((4, 8), float("nan"), device=DEVICES[0]), 2, 4)
        with pytest.raises(ValueError, match="group shape"):
            ops.group_score(torch.randn(8, 16, device=DEVICES[0]), 3, 16)
