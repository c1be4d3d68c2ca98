"""Triton kernels against fp64 references: on the CPU through the interpreter
(TRITON_INTERPRET=1, set in conftest.py), on the GPU when there is one."""
import pytest
import torch

from conftest import DEVICES, assert_linear_close
from linear_cases import lowp_torch_linear, ref64
from sparsekern import reference
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import sparsekern.triton as sktriton  # noqa: E402

T = sktriton.kernels()
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
    assert_linear_close(T.nm_linear(x, W, b), ref64(x, dense, b), dtype, lowp_torch_linear(x, dense, b),
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
    assert_linear_close(T.bitmask_linear(x, W), ref64(x, dense, None), dtype, lowp_torch_linear(x, dense, None),
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
    assert_linear_close(T.block_linear(x, W, b), ref64(x, dense, b), dtype, lowp_torch_linear(x, dense, b),
                        f"triton block_linear {block} B={batch} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
def test_triton_masked_linear_forward_and_backward(device, batch):
    o, k = 24, 100
    w = torch.randn(o, k, device=device, requires_grad=True)
    b = torch.randn(o, device=device, requires_grad=True)
    x = torch.randn(batch, k, device=device, requires_grad=True)
    mask = torch.rand(o, k, device=device) < 0.5
    bits = reference.pack_bitmask(mask)
    g = torch.randn(batch, o, device=device)
    y = T.masked_linear(x, w, bits, b)
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
def test_triton_group_norm(device, group, p):
    w = torch.randn(64 if group == (32, 64) else 40, 128 if group == (32, 64) else 96, device=device)
    g = torch.randn_like(w)
    a = torch.rand(w.shape[1], device=device)
    out = T.group_norm(w, *group, p, grad=g, act_norm=a)
    torch.testing.assert_close(out.double(), reference.group_norm(w.double(), g.double(), a.double(), *group, p).double(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_act_norm_accumulate(device):
    s = torch.rand(150, device=device)
    start = s.clone()
    xs = [torch.randn(3, 7, 150, device=device), torch.randn(40, 150, device=device)]
    for x in xs:
        T.act_norm_accumulate(s, x)
    ref = start.double() + sum(x.reshape(-1, 150).double().square().sum(0) for x in xs)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (6, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_nm_score_compress(device, n, m, dtype):
    w = torch.randn(37, 5 * 16, device=device, dtype=dtype)
    g = torch.randn_like(w)
    a = torch.rand(80, device=device)
    v, ix = T.nm_score_compress(w, n, m, grad=g, act_norm=a)
    rv, rix = reference.nm_score_compress(w, g, a, n, m)
    assert torch.equal(v, rv) and torch.equal(ix, rix)
    v, ix = T.nm_score_compress(w, n, m)
    assert torch.equal(reference.nm_decompress(v, ix, n, m, 80), w * reference.nm_mask(w, n, m))


def test_triton_ops_fake_tensor_check():
    # opcheck's aot-dispatch and torch.compile need a GPU for triton_op (see CONVENTIONS.md);
    # the fake kernels are checked here.
    w = torch.randn(16, 64)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear.default,
                          (x, W.values, W.indices, 2, 4, 64, None), test_utils=["test_schema", "test_faketensor"])
    torch.library.opcheck(torch.ops.sparsekern_triton.group_norm.default, (w, None, None, 1, 64, 2),
                          test_utils=["test_schema", "test_faketensor"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="opcheck aot-dispatch and torch.compile of triton_op need a GPU")
def test_triton_ops_full_opcheck_and_compile_on_gpu():
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    W = NMWeight.from_dense(w, 2, 4)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparsekern_triton.nm_linear.default, (x, W.values, W.indices, 2, 4, 128, None))
    f = torch.compile(lambda x: T.nm_linear(x, W), fullgraph=True)
    torch.testing.assert_close(f(x), T.nm_linear(x, W))


def test_triton_bad_inputs():
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        T.nm_linear(torch.randn(2, 12), W)
    with pytest.raises(TypeError, match="x dtype"):
        T.nm_linear(torch.randn(2, 16, dtype=torch.float16), W)
    with pytest.raises(ValueError, match="block shape"):
        T.block_linear(torch.randn(2, 16), BlockWeight.from_dense(torch.randn(8, 16), (4, 4)))
    with pytest.raises(ValueError, match="bitmask must have shape"):
        T.masked_linear(torch.randn(2, 16), torch.randn(8, 16), torch.zeros(8, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        T.nm_score_compress(torch.full((4, 8), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="group shape"):
        T.group_norm(torch.randn(8, 16), 3, 16)
