"""Fused scoring ops: group_norm, act_norm_accumulate, nm_score_compress vs references."""
import pytest
import torch

from sparsekern import ops, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("group", [(1, 96), (24, 1), (24, 96), (4, 8), (1, 4), (2, 16), (1, 1)])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("with_grad,with_act", [(False, False), (True, False), (False, True), (True, True)])
def test_group_norm_matches_reference(dtype, group, p, with_grad, with_act):
    w = torch.randn(24, 96, dtype=dtype)
    g = torch.randn(24, 96, dtype=dtype) if with_grad else None
    a = torch.rand(96) if with_act else None
    out = ops.group_norm(w, *group, p, grad=g, act_norm=a)
    e = w.double().abs() * (g.double().abs() if with_grad else 1) * (a.double() if with_act else 1)
    e = e.reshape(24 // group[0], group[0], 96 // group[1], group[1])
    ref = e.sum((1, 3)) if p == 1 else e.square().sum((1, 3)).sqrt()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_group_norm_hand_checked():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -1.0, 2.0]])
    assert ops.group_norm(w, 1, 2, 1).tolist() == [[3.0, 7.0], [1.0, 3.0]]
    assert ops.group_norm(w, 2, 4, 2).tolist() == [[pytest.approx((1 + 4 + 9 + 16 + .25 + .25 + 1 + 4) ** .5)]]


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 33), (1, 33), (0, 33)])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_act_norm_accumulate(shape, acc_dtype):
    start = torch.rand(33, dtype=acc_dtype)
    xs = [torch.randn(shape) for _ in range(3)]
    s = start.clone()
    for x in xs:
        ops.act_norm_accumulate(s, x)
    ref = start.double() + sum(x.reshape(-1, 33).double().square().sum(0) for x in xs)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_score_compress_is_the_fused_pipeline(n, m, dtype):
    w = torch.randn(20, 64, dtype=dtype)
    g = torch.randn(20, 64, dtype=dtype)
    a = torch.rand(64)
    v, ix = ops.nm_score_compress(w, n, m, grad=g, act_norm=a)
    # the eager pipeline: score, topk per group, scatter, compress
    sc = (w.float().abs() * g.float().abs() * a).reshape(20, -1, m)
    mask = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, sc.topk(n, -1).indices, True).reshape(20, 64)
    assert torch.equal(reference.nm_decompress(v, ix, n, m, 64), w * mask)
    rv, rix = reference.nm_score_compress(w, g, a, n, m)
    assert torch.equal(v, rv) and torch.equal(ix, rix)


def test_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="group shape"):
        ops.group_norm(w, 3, 16)
    with pytest.raises(ValueError, match="p must be 1"):
        ops.group_norm(w, 1, 16, 3)
    with pytest.raises(ValueError, match="act_norm must have shape"):
        ops.group_norm(w, 1, 16, act_norm=torch.rand(8))
    with pytest.raises(ValueError, match="grad must have"):
        ops.nm_score_compress(w, 2, 4, grad=torch.randn(8, 8))
    with pytest.raises(ValueError, match="divisible by m"):
        ops.nm_score_compress(torch.randn(8, 18), 2, 4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] == 16"):
        ops.act_norm_accumulate(torch.zeros(16), torch.randn(3, 15))
    with pytest.raises(ValueError, match="sumsq must be"):
        ops.act_norm_accumulate(torch.zeros(16, dtype=torch.int64), torch.randn(3, 16))
