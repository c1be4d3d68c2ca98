"""Fused scoring ops (group_score, act_norm_accumulate, nm_score_compress) on every backend
against fp64, one NaN policy for all of them, and a test for every bad input."""
import pytest
import torch

from backends import pairs, running
from sparsekern import ops, reference


@pytest.mark.parametrize("device,backend", pairs("group_score"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [(1, 96), (24, 1), (24, 96), (4, 8), (1, 4), (2, 16), (1, 1)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("with_grad,with_act", [(False, False), (True, False), (False, True), (True, True)])
def test_group_score_matches_fp64(device, backend, dtype, group, p, with_grad, with_act):
    w = torch.randn(24, 96, dtype=dtype, device=device)
    g = torch.randn(24, 96, dtype=dtype, device=device) if with_grad else None
    a = torch.rand(96, device=device) if with_act else None
    with running(backend, "group_score", w):
        out = ops.group_score(w, *group, p, grad=g, act_norm=a)
    e = (w.double().abs() * (g.double().abs() if with_grad else 1) * (a.double() if with_act else 1)).cpu()
    e = e.reshape(24 // group[0], group[0], 96 // group[1], group[1])
    ref = e.sum((1, 3)) if p == 1 else e.square().sum((1, 3)).sqrt()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", pairs("group_score"))
def test_group_score_hand_checked(device, backend):
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -1.0, 2.0]], device=device)
    with running(backend, "group_score", w):
        assert ops.group_score(w, 1, 2, 1).tolist() == [[3.0, 7.0], [1.0, 3.0]]
        assert ops.group_score(w, 2, 4, 2).tolist() == [[pytest.approx((1 + 4 + 9 + 16 + .25 + .25 + 1 + 4) ** .5)]]


@pytest.mark.parametrize("device,backend", pairs("act_norm_accumulate"))
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 33), (1, 33), (0, 33)])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_act_norm_accumulate(device, backend, shape, acc_dtype, strided):
    start = torch.rand(33, dtype=acc_dtype, device=device)
    xs = [torch.randn(shape, device=device) for _ in range(3)]
    # A strided accumulator (every other element of a buffer) is updated in place too.
    buf = torch.zeros(66, dtype=acc_dtype, device=device)
    s = buf[::2] if strided else buf[:33]
    s.copy_(start)
    for x in xs:
        with running(backend, "act_norm_accumulate", s, x):
            ops.act_norm_accumulate(s, x)
    ref = start.double() + sum(x.reshape(-1, 33).double().square().sum(0) for x in xs)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
    if strided:
        assert torch.equal(buf[1::2], torch.zeros_like(buf[1::2]))


@pytest.mark.parametrize("device,backend", pairs("hessian_accumulate"))
@pytest.mark.parametrize("strided", [False, True])
def test_hessian_accumulate(device, backend, strided):
    start = torch.rand(16, 16, dtype=torch.float64, device=device)
    h = start.clone().t() if strided else start.clone()
    x = torch.randn(3, 5, 16, device=device)
    with running(backend, "hessian_accumulate", h, x):
        ops.hessian_accumulate(h, x)
    x2 = x.reshape(-1, 16).double()
    torch.testing.assert_close(h, (start.t() if strided else start) + x2.t() @ x2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", pairs("nm_score_compress"))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_score_compress_is_the_fused_pipeline(device, backend, n, m, dtype):
    w = torch.randn(20, 64, dtype=dtype, device=device)
    g = torch.randn(20, 64, dtype=dtype, device=device)
    a = torch.rand(64, device=device)
    with running(backend, "nm_score_compress", w):
        v, ix = ops.nm_score_compress(w, n, m, grad=g, act_norm=a)
    # the eager pipeline: score, topk per group, scatter, compress
    sc = (w.float().abs() * g.float().abs() * a).reshape(20, -1, m)
    mask = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, sc.topk(n, -1).indices, True).reshape(20, 64)
    assert torch.equal(reference.nm_decompress(v, ix, n, m, 64), w * mask)
    rv, rix = reference.nm_score_compress(w, g, a, n, m)
    assert torch.equal(v, rv) and torch.equal(ix, rix)


@pytest.mark.parametrize("device,backend", pairs("nm_score_compress"))
@pytest.mark.parametrize("where", ["weight", "grad", "act_norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nm_score_compress_refuses_non_finite_scores_on_every_backend(device, backend, where, bad):
    """One policy, whichever backend runs: a NaN or inf anywhere in the score is refused
    (the selection would be undefined, and a kernel could leave slots unwritten)."""
    t = {"weight": torch.randn(8, 16, device=device), "grad": torch.randn(8, 16, device=device),
         "act_norm": torch.rand(16, device=device)}
    t[where][(1,) * t[where].dim()] = bad
    with running(backend, "nm_score_compress", t["weight"]), pytest.raises(ValueError, match=where):
        ops.nm_score_compress(t["weight"], 2, 4, grad=t["grad"], act_norm=t["act_norm"])


def test_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="group shape"):
        ops.group_score(w, 3, 16)
    with pytest.raises(ValueError, match="p must be 1"):
        ops.group_score(w, 1, 16, 3)
    with pytest.raises(ValueError, match="act_norm must have shape"):
        ops.group_score(w, 1, 16, act_norm=torch.rand(8))
    with pytest.raises(ValueError, match="grad must have"):
        ops.nm_score_compress(w, 2, 4, grad=torch.randn(8, 8))
    with pytest.raises(ValueError, match="divisible by m"):
        ops.nm_score_compress(torch.randn(8, 18), 2, 4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] == 16"):
        ops.act_norm_accumulate(torch.zeros(16), torch.randn(3, 15))
    with pytest.raises(ValueError, match="sumsq must be"):
        ops.act_norm_accumulate(torch.zeros(16, dtype=torch.int64), torch.randn(3, 16))
