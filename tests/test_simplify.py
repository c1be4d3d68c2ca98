"""Structure simplification (layer importance, layer removal, channel pruning, BN folding)
and selection (sensitivity, allocation, sweep) with its reports."""
import copy
import importlib.util
import json
import os

import pytest
import torch
from torch import nn

from sparsekern import reporting, selection, simplify


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_fold_batchnorm_identical_outputs():
    net = ConvNet()
    _randomize_bn(net)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    pairs = simplify.fold_batchnorm(net)
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert isinstance(net.bn1, nn.Identity)
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match="model.eval"):
        simplify.fold_batchnorm(ConvNet().train())


def test_prune_channels_shrinks_and_matches_cut_reference():
    net = ConvNet()
    _randomize_bn(net)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    original = __import__("copy").deepcopy(net)
    res = simplify.prune_channels(net, 0.5, x, round_to=8)
    assert net.conv1.out_channels == 8 and net.bn1.num_features == 8 and net.conv2.in_channels == 8
    assert net.conv2.out_channels == 16 and net.fc1.in_features == 16 * 4  # 12 kept -> rounded up to 16
    assert net.fc1.out_features == 16 and net.fc2.in_features == 16
    assert "fc2" in res["skipped"]  # its output is the model output
    ref = simplify.channel_cut_reference(original, res["kept"], x)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
    params_before = sum(p.numel() for p in original.parameters())
    assert sum(p.numel() for p in net.parameters()) < 0.5 * params_before


def test_prune_channels_leaves_residual_tied_layers_alone():
    net = ResNetish()
    x = torch.randn(1, 3, 6, 6)
    res = simplify.prune_channels(net, 0.5, x, round_to=1)
    assert "stem" in res["skipped"] and "block.2" in res["skipped"]
    assert net.block[0].out_channels == 8 and net.block[2].in_channels == 8
    assert net(x).shape == (1, 4)


def two_conv_head(flatten=None):
    """The textbook head: conv -> BN -> ReLU, twice, then AdaptiveAvgPool2d -> nn.Flatten()
    (the module) -> Linear."""
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), flatten or nn.Flatten(), nn.Linear(128, 10))


def _pruned_matches_cut_reference(net, x, amount=0.5, **kw):
    """prune_channels on a copy of net (BatchNorm statistics as a trained model has them);
    the pruned model must compute what the original computes with the removed channels
    cut at the consumers' inputs. Returns (pruned, result, parameters kept / before)."""
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, *x.shape[1:]) * 2 + 0.5)
    net.eval()
    original = copy.deepcopy(net)
    res = simplify.prune_channels(net, amount, x, **kw)
    ref = simplify.channel_cut_reference(original, res["kept"], x)
    with torch.no_grad():
        y, r = net(x), ref(x)
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(r, original(x), rtol=1e-3, atol=1e-4)  # channels that mattered were cut
    return net, res, sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in original.parameters())


def test_prune_channels_two_conv_head_with_module_flatten():
    net, res, kept = _pruned_matches_cut_reference(two_conv_head(), torch.randn(2, 3, 8, 8))
    assert sorted(res["kept"]) == ["0", "3"] and list(res["skipped"]) == ["8"]  # the Linear's output is the output
    assert net[0].out_channels == 32 and net[1].num_features == 32 and net[3].in_channels == 32
    assert net[3].out_channels == 64 and net[4].num_features == 64 and net[8].in_features == 64
    assert kept <= 0.30  # 26%; 51% when the last convolution was left alone


class _Lambda(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class _Head(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> `how` -> Linear, the forms heads take."""

    def __init__(self, how, spatial):
        super().__init__()
        self.how, self.conv1, self.bn1 = how, nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.pool = nn.Conv2d(16, 24, 3, padding=1), nn.AdaptiveAvgPool2d(spatial)
        self.flat = nn.Flatten()
        self.bnf = nn.BatchNorm1d(24 * spatial * spatial)
        self.fc = nn.Linear(24 * (1 if how.endswith("mean") else spatial * spatial), 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        if self.how == "module":
            x = self.flat(x)
        elif self.how == "module + BatchNorm1d":
            x = self.bnf(self.flat(x))
        elif self.how == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.how == "method":
            x = x.flatten(1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "torch.reshape":
            x = torch.reshape(x, (x.size(0), -1))
        elif self.how == "mean":
            x = x.mean((2, 3))
        elif self.how == "squeeze":
            x = x.squeeze(-1).squeeze(-1)
        elif self.how == "flatten(2) then mean":
            x = x.flatten(2).mean(-1)
        return self.fc(x)


@pytest.mark.parametrize("how,spatial", [
    ("module", 1), ("module", 3), ("module + BatchNorm1d", 2), ("torch.flatten", 2), ("method", 1), ("view", 2),
    ("reshape", 1), ("torch.reshape", 3), ("mean", 2), ("squeeze", 1), ("flatten(2) then mean", 2)])
def test_prune_channels_follows_every_form_of_the_head(how, spatial):
    net, res, _ = _pruned_matches_cut_reference(_Head(how, spatial), torch.randn(3, 3, 6, 6), round_to=1)
    assert sorted(res["kept"]) == ["conv1", "conv2"], res["skipped"]
    assert net.conv2.out_channels == 12 and net.fc.in_features == 12 * (1 if how.endswith("mean") else spatial ** 2)
    if how == "module + BatchNorm1d":
        assert net.bnf.num_features == 12 * spatial ** 2


class _Tied(nn.Module):
    """A Linear/Conv2d whose channels cannot be followed to a consumer's inputs."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(4, 8)
        self.fc = nn.Linear(8 * 16, 5) if case != "linear 3-D then flatten" else nn.Linear(3 * 8, 5)

    def forward(self, x):
        if self.case == "linear 3-D then flatten":  # (N, 3, 8): channels last, flattened with dim 1
            return self.fc(nn.functional.relu(self.lin(x.mean((2,)))).flatten(1))
        y = torch.relu(self.conv(x))
        if self.case == "view to a fixed size":
            return self.fc(y.view(-1, 8 * 16))
        if self.case == "size of the channel dim":
            n = y.size(1)  # the output changes with the channel count
            return self.fc(y.flatten(1)) * n
        if self.case == "flatten from dim 0":
            return self.fc(torch.flatten(y, 0).reshape(y.shape[0], -1))
        if self.case == "mean over channels":
            return self.fc(y.mean(1, keepdim=True).expand(-1, 8, -1, -1).flatten(1))
        raise AssertionError(self.case)


@pytest.mark.parametrize("case,producer,why", [
    ("linear 3-D then flatten", "lin", "mixes the channels"),
    ("view to a fixed size", "conv", "only a flatten from the channel dim"),
    ("size of the channel dim", "conv", "channel count is read"),
    ("flatten from dim 0", "conv", "mixes the channels"),
    ("mean over channels", "conv", "reduction over the channel dim")])
def test_prune_channels_leaves_alone_what_it_cannot_follow(case, producer, why):
    net = _Tied(case).eval()
    x = torch.randn(2, 3, 4, 4)
    before = net(x)
    res = simplify.prune_channels(net, 0.5, x, round_to=1)
    assert producer in res["skipped"] and why in res["skipped"][producer], res["skipped"]
    assert producer not in res["kept"]
    torch.testing.assert_close(net(x), before)  # nothing it could not follow was touched


def test_prune_channels_tracing_leaves_batchnorm_statistics_alone():
    net = two_conv_head().train()
    stats = net[4].running_mean.clone()
    res = simplify.prune_channels(net, 0.5, torch.randn(2, 3, 8, 8))
    assert torch.equal(net[4].running_mean, stats[res["kept"]["3"]]) and net.training


@pytest.mark.slow
def test_prune_channels_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")  # in requirements.txt
    net, res, kept = _pruned_matches_cut_reference(tv.models.resnet18(weights=None, num_classes=10),
                                                   torch.randn(1, 3, 32, 32))
    first = {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}
    assert set(res["kept"]) == first  # each block's inner convolution; the rest is tied by residual additions
    assert "add" in res["skipped"]["layer4.1.conv2"] and "output" in res["skipped"]["fc"]
    assert net.layer4[1].conv1.out_channels == 256 and net.layer4[1].conv2.in_channels == 256
    assert 0.45 < kept < 0.6


@pytest.mark.parametrize("name,heads", [
    # conv_head -> BatchNormAct2d -> AdaptiveAvgPool2d -> nn.Flatten -> timm Linear
    ("test_efficientnet", {"conv_head"}),
    # last block -> AdaptiveAvgPool2d -> conv_head -> Hardswish -> nn.Flatten -> timm Linear
    ("lcnet_050", {"blocks.5.1.conv_pw", "conv_head"})])
def test_prune_channels_timm_heads(name, heads):
    timm = pytest.importorskip("timm")  # in requirements.txt
    model = timm.create_model(name, pretrained=False, num_classes=10)
    net, res, kept = _pruned_matches_cut_reference(model, torch.randn(2, 3, 32, 32))
    assert heads <= set(res["kept"]), res["skipped"]
    head = net.conv_head
    assert head.out_channels == len(res["kept"]["conv_head"]) == net.classifier.in_features
    assert kept < 0.6


def test_remove_layers():
    net = ResNetish()
    x = torch.randn(1, 3, 6, 6)
    simplify.remove_layers(net, ["block"], x)
    assert isinstance(net.block, nn.Identity) and net(x).shape == (1, 4)
    with pytest.raises(ValueError, match="changes the shape"):
        simplify.remove_layers(ResNetish(), ["stem"], x)
    with pytest.raises(ValueError, match="no submodule named"):
        simplify.remove_layers(ResNetish(), ["nope"], x)


def test_layer_importance_sums_abs_gradients():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    data = [torch.randn(5, 4) for _ in range(2)]
    imp = simplify.layer_importance(net, lambda m, b: m(b).sum(), data, show_progress=False)
    expected = 0.0
    for b in data:
        net.zero_grad()
        net(b).sum().backward()
        expected += float(net[2].weight.grad.abs().sum() + net[2].bias.grad.abs().sum())
    assert imp["2"] == pytest.approx(expected, rel=1e-5)
    assert imp["<model>"] == pytest.approx(imp["0"] + imp["2"], rel=1e-6)


def _line_colours(path) -> int:
    """How many of matplotlib's first cycle colours (C0, C1, C2) a PNG shows in more than a
    few pixels: a plot file with empty axes has none."""
    import matplotlib.colors
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = torch.from_numpy(matplotlib.image.imread(str(path))[..., :3].copy())
    found = 0
    for c in ("C0", "C1", "C2"):
        rgb = torch.tensor(matplotlib.colors.to_rgb(c), dtype=img.dtype)
        found += int(((img - rgb).abs().amax(-1) < 0.08).sum() > 30)
    return found


def test_sensitivity_allocate_and_sweep(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(64, 16)
    y = net(x).detach()

    def fidelity(m):
        with torch.no_grad():
            return -float((m(x) - y).square().mean())

    sens = selection.sensitivity(net, fidelity, (0.5, 0.9), show_progress=False)
    assert set(sens["layers"]) == {"0", "2"} and sens["layers"]["0"]["metric"][0.9] < sens["baseline"]
    assert torch.equal(net(x), y)  # restored
    alloc = selection.allocate(sens, 0.5)
    total = sum(v["params"] for v in sens["layers"].values())
    assert sum(alloc[n] * sens["layers"][n]["params"] for n in alloc) / total >= 0.5
    rows = selection.sweep(net, fidelity, (0.0, 0.5, 0.9), show_progress=False)
    written = reporting.write_sweep(rows, str(tmp_path), "l1")
    assert [r["amount"] for r in rows] == [0.0, 0.5, 0.9]
    assert rows[0]["metric"] == 0.0 and rows[2]["metric"] < rows[1]["metric"]
    assert rows[2]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert json.load(open(tmp_path / "sweep.json"))["rows"][1]["amount"] == 0.5
    assert "| 0.50 | " in open(tmp_path / "sweep.md").read()
    assert all(os.path.exists(p) for p in written)
    table = reporting.format_sensitivity(sens)
    assert table.count("\n") == 3 and "drop @ 90%" in table
    png = tmp_path / "sens.png"
    if importlib.util.find_spec("matplotlib") is None:  # matplotlib is in requirements.txt; without it: no plot
        assert reporting.plot_sensitivity(sens, str(png)) is False and not png.exists()
        assert [os.path.basename(p) for p in written] == ["sweep.json", "sweep.md"]
    else:
        assert [os.path.basename(p) for p in written] == ["sweep.json", "sweep.md", "sweep.png"]
        assert _line_colours(tmp_path / "sweep.png") >= 1  # the sweep's curve is drawn
        assert reporting.plot_sensitivity(sens, str(png)) is True
        assert _line_colours(png) == 2  # one line per layer ("0" and "2"), in the first two colours
    with pytest.raises(ValueError, match="exceeds the largest"):
        selection.allocate(sens, 0.95)
