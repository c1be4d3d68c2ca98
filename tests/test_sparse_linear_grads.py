"""Gradients through every sparse linear op on every backend this machine runs: to x, to
the kept values and to the bias, against fp64 dense autograd. (Triton: test_triton.py.)"""
import pytest
import torch

from backends import pairs, running
from linear_cases import assert_linear_grads_match_fp64
from sparsekern import ops
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight


def make_weight(op, device):
    w = torch.randn(32, 96, device=device)
    if op == "nm_linear":
        return NMWeight.from_dense(w, 2, 4)
    if op == "bitmask_linear":
        return BitmaskWeight.from_dense(w, torch.rand(32, 96, device=device) < 0.3)
    keep = torch.rand(2, 6, device=device) < 0.5
    return BlockWeight.from_dense(w, (16, 16), keep.repeat_interleave(16, 0).repeat_interleave(16, 1))


CASES = [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}")
         for op in ("nm_linear", "bitmask_linear", "block_linear") for p in pairs(op)]


@pytest.mark.parametrize("op,device,backend", CASES)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 9)])
def test_gradients_reach_x_values_and_bias(op, device, backend, lead):
    W = make_weight(op, device)
    x = torch.randn(*lead, 96, device=device)
    bias = torch.randn(32, device=device)
    with running(backend, op, x, W):
        assert_linear_grads_match_fp64(getattr(ops, op), W, x, bias, f"{op} {backend} x{tuple(x.shape)}")


@pytest.mark.parametrize("op,device,backend", CASES)
def test_no_gradient_work_when_nothing_requires_grad(op, device, backend):
    W = make_weight(op, device)
    x = torch.randn(3, 96, device=device)
    with running(backend, op, x, W):
        y = getattr(ops, op)(x, W)
    assert not y.requires_grad and y.grad_fn is None
