"""Pruning toolkit: scores, masks, torch.nn.utils.prune compatibility, bad input."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sparsekern.prune as prune
from sparsekern import reference
from sparsekern.formats import BlockWeight, NMWeight


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# ---------------------------------------------------------------------------- scores
def test_scores_hand_checked():
    w = torch.tensor([[1.0, -3.0], [2.0, -0.5]])
    g = torch.tensor([[2.0, 1.0], [-1.0, 4.0]])
    assert prune.score(w, "l1").tolist() == [[1.0, 3.0], [2.0, 0.5]]
    assert prune.score(w, "l2").tolist() == [[1.0, 9.0], [4.0, 0.25]]
    assert prune.score(w, "taylor", grad=g).tolist() == [[2.0, 3.0], [2.0, 2.0]]
    assert prune.score(w, "wanda", act_norm=torch.tensor([10.0, 1.0])).tolist() == [[10.0, 3.0], [20.0, 0.5]]
    a = prune.score(w, "random", generator=torch.Generator().manual_seed(3))
    b = prune.score(w, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_wanda_conv_uses_input_channel_norms():
    w = torch.randn(4, 3, 2, 2)
    an = torch.tensor([1.0, 2.0, 3.0])
    s = prune.score(w, "wanda", act_norm=an)
    torch.testing.assert_close(s, w.abs() * an.view(1, 3, 1, 1))


@pytest.mark.parametrize("group,shape", [("row", (5, 1)), ("column", (1, 12)), ("layer", (1, 1)),
                                         (("block", 5, 4), (1, 3)), (("nm", 4), (5, 3)), ((1, 6), (5, 2))])
def test_group_score_shapes_and_values(group, shape):
    w = torch.randn(5, 12)
    g = prune.group_score(w, group, norm="l2")
    assert g.shape == shape
    br, bc = 5 // shape[0], 12 // shape[1]
    ref = w.abs().reshape(shape[0], br, shape[1], bc).square().sum((1, 3)).sqrt()
    torch.testing.assert_close(g, ref)


def test_layer_norms():
    w = torch.randn(6, 10)
    d = prune.layer_norms(w)
    assert d["l1"] == pytest.approx(float(w.abs().sum()), rel=1e-5)
    assert d["l2"] == pytest.approx(float(w.norm()), rel=1e-5)


def test_conv_channel_group_score():
    w = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(prune.group_score(w, "channel", norm="l1").reshape(-1), w.abs().sum((1, 2, 3)))


# ----------------------------------------------------------------------------- masks
def test_unstructured_mask_hand_checked():
    s = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    assert prune.unstructured_mask(s, 0.5).tolist() == [[False, True], [True, False]]
    assert prune.unstructured_mask(s, 1).tolist() == [[False, True], [True, True]]
    assert prune.unstructured_mask(s, 0.0).all()


def test_global_masks_one_threshold():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 10.0])}
    m = prune.global_masks(scores, 2)
    assert m["a"].tolist() == [False, True, True] and m["b"].tolist() == [False, True]


def test_nm_mask_feeds_the_format():
    w = torch.randn(6, 16)
    mask = prune.nm_mask(prune.score(w, "l1"), 2, 4)
    assert torch.equal(mask.reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    assert torch.equal(NMWeight.from_dense(w, 2, 4, mask=mask).to_dense(), w * mask)


def test_nm_mask_conv_runs_along_input_channels():
    w = torch.randn(2, 8, 3, 3)
    mask = prune.nm_mask(prune.score(w, "l1"), 2, 4)
    per_position = mask.permute(0, 2, 3, 1).reshape(2, 3, 3, 2, 4).sum(-1)
    assert (per_position == 2).all()


def test_block_and_channel_masks():
    w = torch.randn(8, 8)
    w[:4, 4:] *= 100  # the strongest block
    m = prune.block_mask(w, (4, 4), 0.75)
    assert m[:4, 4:].all() and m.sum() == 16
    assert torch.equal(BlockWeight.from_dense(w, (4, 4), m).to_dense(), w * m)
    w = torch.randn(6, 5)
    w[2] *= 100
    c = prune.channel_mask(w, 5)
    assert c[2].all() and c.sum() == 5


# ---------------------------------------------------- torch.nn.utils.prune compatibility
def test_l1_prune_named_layer_records_masks_like_torch():
    net = Net()
    prune.l1_prune(net, name="fc1", amount=0.5)
    assert hasattr(net.fc1, "weight_orig") and hasattr(net.fc1, "weight_mask")
    assert not hasattr(net.fc2, "weight_mask")
    assert float((net.fc1.weight == 0).float().mean()) == pytest.approx(0.5)
    torch_prune.remove(net.fc1, "weight")
    assert not hasattr(net.fc1, "weight_orig") and float((net.fc1.weight == 0).float().mean()) == pytest.approx(0.5)


def test_random_prune_with_prune_fn_applies_that_function():
    net = mlp()
    prune.random_prune(net, prune_fn=prune.l1_prune, amount=0.5)
    for m in net:
        if isinstance(m, nn.Linear):
            kept = m.weight_orig.detach().abs()[m.weight_mask.bool()]
            dropped = m.weight_orig.detach().abs()[~m.weight_mask.bool()]
            assert kept.min() >= dropped.max()  # magnitude, not random


def test_zeros_stay_zero_through_finetuning():
    net = mlp()
    prune.nm_prune(net, 2, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 32)).square().mean().backward()
        opt.step()
    for m in net:
        if isinstance(m, nn.Linear) and m.in_features % 4 == 0:
            assert torch.equal(m.weight.reshape(m.out_features, -1, 4).ne(0).sum(-1).le(2),
                               torch.ones(m.out_features, m.in_features // 4, dtype=torch.bool))


def test_pruning_twice_keeps_earlier_zeros():
    net = mlp()
    prune.l1_prune(net, amount=0.3)
    first = [m.weight_mask.clone() for m in net if isinstance(m, nn.Linear)]
    prune.random_prune(net, amount=0.6, generator=torch.Generator().manual_seed(0))
    for f, m in zip(first, [m for m in net if isinstance(m, nn.Linear)]):
        assert not (m.weight_mask.bool() & ~f.bool()).any()
        assert float(1 - m.weight_mask.float().mean()) == pytest.approx(0.6, abs=0.02)


def test_global_prune_reaches_the_global_amount():
    net = mlp()
    prune.global_prune(net, 0.7, "l1")
    assert prune.sparsity(net)["total"] == pytest.approx(0.7, abs=1e-3)


def test_taylor_and_wanda_prune_from_calibration():
    net = mlp()
    data = [torch.randn(16, 32) for _ in range(3)]
    grads = prune.collect_gradients(net, lambda m, b: m(b).square().mean(), data, show_progress=False)
    norms = prune.collect_activation_norms(net, data, show_progress=False)
    assert norms["0"].shape == (32,) and grads["2"].shape == (48, 64)
    ref = torch.cat([b for b in data]).norm(dim=0)
    torch.testing.assert_close(norms["0"], ref, rtol=1e-5, atol=1e-5)
    prune.nm_prune(net, 2, 4, method="wanda", act_norms=norms)
    net2 = mlp()
    prune.taylor_prune(net2, amount=0.5, grads=prune.collect_gradients(net2, lambda m, b: m(b).sum(), data,
                                                                       show_progress=False))
    assert prune.sparsity(net2)["total"] == pytest.approx(0.5, abs=0.01)


def test_conv_calibration_and_block_and_channel_prune():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3))
    norms = prune.collect_activation_norms(net, [torch.randn(2, 3, 8, 8)], show_progress=False)
    assert norms["2"].shape == (8,)
    prune.nm_prune(net, 2, 4, method="wanda", act_norms=norms, name="2")
    prune.channel_prune(net, amount=0.5, name="0")
    rows_kept = net[0].weight_mask.reshape(8, -1).all(1)
    assert int(rows_kept.sum()) == 4
    net = mlp()
    prune.block_prune(net, block=(2, 8), amount=0.5)
    for m in (net[0], net[2], net[4]):
        blocks = m.weight_mask.reshape(m.out_features // 2, 2, m.in_features // 8, 8)
        kept = blocks.all(3).all(1)
        assert torch.equal(kept, blocks.any(3).any(1)) and float(kept.float().mean()) == pytest.approx(0.5, abs=0.1)


# ------------------------------------------------------------------------ bad input
def test_bad_inputs():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        prune.score(w, "magic")
    with pytest.raises(ValueError, match="amount must be in \\[0, 1\\]"):
        prune.unstructured_mask(w, 1.5)
    with pytest.raises(ValueError, match="larger than the 32 elements"):
        prune.unstructured_mask(w, 33)
    with pytest.raises(ValueError, match="needs grad="):
        prune.score(w, "taylor")
    with pytest.raises(ValueError, match="needs act_norm="):
        prune.score(w, "wanda")
    with pytest.raises(ValueError, match="not divisible by m = 4"):
        prune.nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(TypeError, match="floating point"):
        prune.score(torch.ones(4, 8, dtype=torch.int32), "l1")
    with pytest.raises(ValueError, match="no submodule named 'fc9'"):
        prune.l1_prune(Net(), name="fc9")
    with pytest.raises(ValueError, match="needs grads= with an entry for layer 'fc1'"):
        prune.taylor_prune(Net(), amount=0.5, grads={})
    with pytest.raises(ValueError, match="layer '0'.*not divisible by m = 4"):
        prune.nm_prune(nn.Sequential(nn.Linear(6, 4)), 2, 4)
    with pytest.raises(ValueError, match="unknown group"):
        prune.group_score(w, "diagonal")


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (4, 8), (3, 16), (5, 32)])
def test_reference_nm_mask_is_the_stable_descending_sort_of_each_group(n, m):
    # The mask counts each value's rank in its group (byte temporaries): it must keep what a
    # stable descending sort of |w| keeps, ties to the lower column (m = 32 beyond what
    # check_nm allows, as a reference must hold wherever it is called).
    torch.manual_seed(0)
    w = torch.randn(23, m * 7)
    w[0, :m] = 1.0                                        # a group of equal values
    w[1, :m] = torch.tensor([0.5, -0.5] * (m // 2))       # equal magnitudes, both signs
    w[2, m:2 * m] = 0.0                                   # an all-zero group
    w[3, 2 * m + 1] = float("nan")                        # a NaN ranks first, as in the sort
    w[4, 3 * m] = float("inf")
    w = w.to(torch.float64)
    out, k = w.shape
    order = torch.sort(w.abs().reshape(out, k // m, m), dim=-1, descending=True, stable=True).indices[..., :n]
    expected = torch.zeros(out, k // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(out, k)
    got = reference.nm_mask(w, n, m)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert torch.equal(got.reshape(out, -1, m).sum(-1), torch.full((out, k // m), n))
    assert torch.isnan(w).sum() == 1  # the caller's weight is left as it was
