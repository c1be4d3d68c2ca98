"""Outlier-weighted layer sparsity (selection.outlier_ratios, owl_sparsities, owl_allocation)
and per-layer sparsities through sparsify(..., sparsity={layer: fraction})."""
import math

import pytest
import torch
from torch import nn

from sparsekern import selection
from sparsekern.sparsify import sparsify


def weighted_mean(alloc, params):
    return sum(alloc[g] * params[g] for g in alloc) / sum(params.values())


# ------------------------------------------------------------------ owl_sparsities
def test_two_equal_groups_sit_at_target_plus_and_minus_lam():
    s = selection.owl_sparsities({"a": 0.01, "b": 0.03}, {"a": 10, "b": 10}, 0.5, lam=0.1)
    assert s == pytest.approx({"a": 0.6, "b": 0.4})


def test_unequal_groups_mean_weighted_by_params():
    # u = 0, 1; u_bar = 3/4; spread 3/4: a = T + lam, b = T - lam / 3
    s = selection.owl_sparsities({"a": 0.0, "b": 0.2}, {"a": 1, "b": 3}, 0.7, lam=0.06)
    assert s == pytest.approx({"a": 0.76, "b": 0.68})
    assert weighted_mean(s, {"a": 1, "b": 3}) == pytest.approx(0.7)


def test_three_groups_hand_checked():
    # u = 0, 0.5, 1; u_bar = (0 + 0.5 + 2) / 4 = 0.625 = spread
    s = selection.owl_sparsities({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1, "b": 1, "c": 2}, 0.5, lam=0.1)
    assert s == pytest.approx({"a": 0.6, "b": 0.52, "c": 0.44})


def test_equal_ratios_give_the_target():
    assert selection.owl_sparsities({"a": 0.02, "b": 0.02}, {"a": 5, "b": 9}, 0.5, 0.1) == {"a": 0.5, "b": 0.5}


def test_random_allocations_hold_bounds_mean_and_order():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        n = int(torch.randint(2, 12, (1,), generator=g))
        ratios = {f"g{i}": float(torch.rand(1, generator=g)) * 0.05 for i in range(n)}
        params = {f"g{i}": int(torch.randint(1, 1000, (1,), generator=g)) for i in range(n)}
        target, lam = 0.3 + 0.4 * float(torch.rand(1, generator=g)), 0.1
        s = selection.owl_sparsities(ratios, params, target, lam)
        assert weighted_mean(s, params) == pytest.approx(target, abs=1e-12)
        assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s.values())
        assert max(abs(v - target) for v in s.values()) == pytest.approx(lam)  # the farthest group reaches lam
        by_ratio = sorted(s, key=ratios.get)
        assert all(s[a] >= s[b] for a, b in zip(by_ratio, by_ratio[1:])), "more outliers must mean lower sparsity"


@pytest.mark.parametrize("ratios,params,target,lam,match", [
    ({"a": 0.1}, {"b": 1}, 0.5, 0.1, "same, non-empty"),
    ({}, {}, 0.5, 0.1, "same, non-empty"),
    ({"a": -0.1, "b": 0.0}, {"a": 1, "b": 1}, 0.5, 0.1, r"ratios\['a'\]"),
    ({"a": math.nan, "b": 0.0}, {"a": 1, "b": 1}, 0.5, 0.1, r"ratios\['a'\]"),
    ({"a": 0.1, "b": 0.0}, {"a": 0, "b": 1}, 0.5, 0.1, r"params\['a'\]"),
    ({"a": 0.1, "b": 0.0}, {"a": 1.5, "b": 1}, 0.5, 0.1, r"params\['a'\]"),
    ({"a": 0.1, "b": 0.0}, {"a": 1, "b": 1}, 0.5, -0.1, "lam"),
    ({"a": 0.1, "b": 0.0}, {"a": 1, "b": 1}, 0.95, 0.08, "target_sparsity"),
    ({"a": 0.1, "b": 0.0}, {"a": 1, "b": 1}, 0.05, 0.08, "target_sparsity"),
])
def test_owl_sparsities_bad_inputs(ratios, params, target, lam, match):
    with pytest.raises(ValueError, match=match):
        selection.owl_sparsities(ratios, params, target, lam)


# ------------------------------------------------------------------ outlier_ratios
def test_block_of():
    assert selection.block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert selection.block_of("blocks.10.mlp.fc1") == "blocks.10"
    assert selection.block_of("pooler.dense") == "pooler.dense"
    assert selection.block_of("0") == "0"
    assert selection.block_of("blocks.0.1") == "blocks.0"
    assert selection.block_of("encoder.block.2.layer.1.DenseReluDense.wi") == "encoder.block.2"


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
                                     for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.cat([b(x), b(x)], -1)
        return x


def hand_model():
    m = TwoBlocks()
    with torch.no_grad():
        for b in m.blocks:
            b[0].weight.fill_(1.0)
            b[1].weight.fill_(1.0)
        m.blocks[1][1].weight[1, 3] = 60.0  # one outlier in block 1
    return m


def test_outlier_ratios_hand_checked():
    m = hand_model()
    calib = [torch.ones(1, 4)]  # every input feature norm of blocks.0.0 is 1
    r = selection.outlier_ratios(m, calib, m=5.0, group="layer", show_progress=False)
    assert set(r) == {"blocks.0.0", "blocks.0.1", "blocks.1.0", "blocks.1.1"}
    assert r["blocks.0.0"] == {"outlier_ratio": 0.0, "params": 16, "layers": ["blocks.0.0"]}
    # blocks.1.1: inputs are block 0's outputs, all equal, so A is |W| times one norm: the
    # mean of |W| is (7 + 60) / 8 = 8.375, 5x that is 41.9 and only the 60 is above
    assert r["blocks.1.1"]["outlier_ratio"] == pytest.approx(1 / 8)
    blocks = selection.outlier_ratios(m, calib, m=5.0, show_progress=False)
    assert set(blocks) == {"blocks.0", "blocks.1"}
    # block 1 together: |W| sums 16 + 67 over 24 entries, 5x mean = 17.3: still one outlier
    assert blocks["blocks.1"]["outlier_ratio"] == pytest.approx(1 / 24)
    assert blocks["blocks.1"]["params"] == 24 and blocks["blocks.1"]["layers"] == ["blocks.1.0", "blocks.1.1"]


def test_outlier_ratio_weighs_activation_norms():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    big_input = torch.tensor([[1.0, 1.0, 1.0, 100.0]])  # column 3's scores are 100x: both its entries count
    r = selection.outlier_ratios(lin, [big_input], m=3.0, group="layer", show_progress=False)
    assert r[""]["outlier_ratio"] == pytest.approx(2 / 8)
    assert selection.outlier_ratios(lin, [torch.ones(1, 4)], m=3.0, group="layer",
                                    show_progress=False)[""]["outlier_ratio"] == 0.0


def test_outlier_ratios_bad_inputs():
    m = hand_model()
    with pytest.raises(ValueError, match="m must be"):
        selection.outlier_ratios(m, [torch.ones(1, 4)], m=0, show_progress=False)
    with pytest.raises(ValueError, match="group must be"):
        selection.outlier_ratios(m, [torch.ones(1, 4)], group="row", show_progress=False)
    with pytest.raises(ValueError, match="no submodule"):
        selection.outlier_ratios(m, [torch.ones(1, 4)], layers=["nope"], show_progress=False)
    with pytest.raises(ValueError, match="calibration"):
        selection.outlier_ratios(m, [], show_progress=False)


def test_owl_allocation_lowers_the_sparsity_of_the_outlier_block():
    m = hand_model()
    alloc = selection.owl_allocation(m, [torch.ones(1, 4)], 0.5, lam=0.1, show_progress=False)
    assert alloc == pytest.approx({"blocks.0.0": 0.6, "blocks.0.1": 0.6, "blocks.1.0": 0.4, "blocks.1.1": 0.4})
    params = {n: m.get_submodule(n).weight.numel() for n in alloc}
    assert weighted_mean(alloc, params) == pytest.approx(0.5)


# ------------------------------------------------------------ sparsify with a dict
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))


@pytest.mark.parametrize("method", ["l1", "wanda", "sparsegpt"])
def test_sparsify_takes_per_layer_sparsities(method):
    model = mlp()
    x = torch.randn(64, 256)
    alloc = {"0": 0.3, "2": 0.7}  # layer "4" left out: stays dense
    calib = [x] if method != "l1" else None
    _, report = sparsify(model, "unstructured", method, sparsity=alloc, calibration=calib, show_progress=False)
    rows = {r["layer"]: r for r in report}
    assert rows["0"]["status"] == "sparse" and rows["2"]["status"] == "sparse"
    assert rows["0"]["density"] == pytest.approx(0.7, abs=2e-3)
    assert rows["2"]["density"] == pytest.approx(0.3, abs=2e-3)
    assert rows["4"]["status"] == "dense" and "sparsity=" in rows["4"]["reason"]
    assert isinstance(model[4], nn.Linear)


def test_sparsify_zero_in_the_dict_keeps_the_layer_dense():
    model = mlp()
    _, report = sparsify(model, "unstructured", sparsity={"0": 0.0, "2": 0.5, "4": 0.5}, show_progress=False)
    assert {r["layer"]: r["status"] for r in report} == {"0": "dense", "2": "sparse", "4": "sparse"}


@pytest.mark.parametrize("pattern,alloc,exc,match", [
    ("unstructured", {"9": 0.5}, ValueError, "names no module"),
    ("unstructured", {"0": 1.5}, ValueError, r"sparsity\['0'\]"),
    ("unstructured", {"0": "half"}, TypeError, r"sparsity\['0'\]"),
    ("unstructured", {"0": True}, TypeError, r"sparsity\['0'\]"),
    ("2:4", {"0": 0.5}, ValueError, "per-layer sparsity dict needs a pattern"),
])
def test_sparsify_per_layer_bad_inputs(pattern, alloc, exc, match):
    with pytest.raises(exc, match=match):
        sparsify(mlp(), pattern, sparsity=alloc, show_progress=False)
