"""SparseGPT: the Hessian op, reconstruction quality against magnitude pruning, mask
structure, sequential calibration through a model, determinism, sparsify integration."""
import copy

import pytest
import torch
from torch import nn

import sparsekern
import sparsekern.prune as prune
from sparsekern import ops
from sparsekern.sparsegpt import sparsegpt_prune_model, sparsegpt_weight


def test_hessian_accumulate_matches_reference():
    H = torch.rand(24, 24, dtype=torch.float64)
    start = H.clone()
    xs = [torch.randn(5, 3, 24), torch.randn(7, 24)]
    for x in xs:
        ops.hessian_accumulate(H, x)
    ref = start + sum(x.reshape(-1, 24).double().t() @ x.reshape(-1, 24).double() for x in xs)
    torch.testing.assert_close(H, ref)
    with pytest.raises(ValueError, match="square"):
        ops.hessian_accumulate(torch.zeros(3, 4, dtype=torch.float64), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x.shape\[-1\] == 24"):
        ops.hessian_accumulate(torch.zeros(24, 24, dtype=torch.float64), torch.randn(2, 23))


def _correlated_inputs(n, k, gen):
    base = torch.randn(n, k // 4, generator=gen)
    mix = torch.randn(k // 4, k, generator=gen)
    return base @ mix + 0.1 * torch.randn(n, k, generator=gen)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None),
                                              ("block8", 0.5)])
def test_reconstruction_beats_magnitude(pattern, sparsity):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=gen)
    X = _correlated_inputs(512, 128, gen)
    H = torch.zeros(128, 128, dtype=torch.float64)
    ops.hessian_accumulate(H, X)
    Wn, mask = sparsegpt_weight(W, H, pattern, sparsity or 0.5, blocksize=32)
    assert torch.equal(Wn != 0, mask & (Wn != 0)) and (Wn[~mask] == 0).all()
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        assert (mask.reshape(64, -1, m).sum(-1) == n).all()
        mag = prune.nm_mask(W.abs(), n, m)
    elif pattern == "unstructured":
        assert float(mask.float().mean()) == pytest.approx(0.5, abs=0.01)
        mag = prune.unstructured_mask(W.abs(), 0.5)
    else:
        blocks = mask.reshape(8, 8, 16, 8)
        assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1))
        mag = prune.block_mask(W, (8, 8), 0.5)
    err_sgpt = (X @ (Wn - W).t()).norm()
    err_mag = (X @ (W * mag - W).t()).norm()
    # whole blocks leave less room to compensate than single weights
    factor = 0.85 if pattern.startswith("block") else 0.7
    assert err_sgpt < factor * err_mag, f"{pattern}: sparsegpt {err_sgpt:.3f} vs magnitude {err_mag:.3f}"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))


def test_sequential_model_pruning_and_determinism():
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(8, 32, generator=gen)  # one input distribution for calibration and test

    def inputs(n):
        return torch.randn(n, 8, generator=gen) @ mix + 0.1 * torch.randn(n, 32, generator=gen)

    calib = [inputs(64) for _ in range(4)]
    test = inputs(256)
    dense = _mlp()
    y = dense(test).detach()
    a = copy.deepcopy(dense)
    masks = sparsegpt_prune_model(a, calib, "2:4", show_progress=False)
    assert list(masks) == ["0", "2", "4"]
    assert all(hasattr(a[i], "weight_mask") for i in (0, 2, 4))
    b = copy.deepcopy(dense)
    sparsegpt_prune_model(b, calib, "2:4", show_progress=False)
    for i in (0, 2, 4):
        assert torch.equal(a[i].weight, b[i].weight), "not deterministic"
    mag = copy.deepcopy(dense)
    prune.nm_prune(mag, 2, 4)
    err = (a(test) - y).norm() / y.norm()
    err_mag = (mag(test) - y).norm() / y.norm()
    assert err < 0.8 * err_mag, f"model: sparsegpt {err:.3f} vs magnitude {err_mag:.3f}"


def test_sparsify_quality_order_sparsegpt_wanda_magnitude():
    """Through sparsify, on a BERT fed dict batches: on held-out inputs SparseGPT's output is
    closer to the dense model's than wanda's, and wanda's closer than magnitude's, by clear
    margins. The LayerNorm gains get a spread (lognormal), so a few hidden features carry
    large activations as in trained transformers; that is what activation-aware pruning
    exploits. Measured over seeds 0-7 (2:4, relative error of last_hidden_state): wanda /
    magnitude 0.33-0.66, sparsegpt / wanda 0.25-0.46; without the spread wanda is within
    7-22% of magnitude, too close to test."""
    transformers = pytest.importorskip("transformers")  # in requirements.txt
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.mul_(torch.exp(torch.randn(64)))
    gen = torch.Generator().manual_seed(100)

    def batch(n):
        return {"input_ids": torch.randint(0, 100, (n, 12), generator=gen),
                "attention_mask": torch.ones(n, 12, dtype=torch.long)}

    calib, test = [batch(4) for _ in range(3)], batch(16)
    with torch.no_grad():
        ref = model(**test).last_hidden_state
    err = {}
    for method in ("l1", "wanda", "sparsegpt"):
        sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", method=method,
                                             calibration=None if method == "l1" else calib, min_features=32,
                                             policy=sparsekern.nn.Policy("sparse"), show_progress=False)
        assert sum(r["status"] == "sparse" for r in report) == 13
        layer = sparse.encoder.layer[0].attention.self.query
        assert float((layer.dense_weight_2d() != 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        with torch.no_grad():
            err[method] = float((sparse(**test).last_hidden_state - ref).norm() / ref.norm())
    assert err["wanda"] < 0.8 * err["l1"], err
    assert err["sparsegpt"] < 0.7 * err["wanda"], err


def test_bad_inputs():
    W = torch.randn(8, 16)
    H = torch.eye(16, dtype=torch.float64)
    with pytest.raises(ValueError, match="hessian must be"):
        sparsegpt_weight(W, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by m"):
        sparsegpt_weight(torch.randn(8, 18), torch.eye(18, dtype=torch.float64), "2:4")
    with pytest.raises(ValueError, match="unknown pattern"):
        sparsegpt_weight(W, H, "diagonal")
    with pytest.raises(ValueError, match="needs calibration"):
        sparsekern.sparsify(nn.Linear(8, 8), "2:4", method="sparsegpt")
    with pytest.raises(ValueError, match="calibration data is required"):
        sparsegpt_prune_model(nn.Linear(8, 8), None)


def test_bad_calibration_and_layers_name_the_problem():
    model = _mlp()
    with pytest.raises(ValueError, match="calibration set is empty"):
        sparsegpt_prune_model(model, [], "2:4", show_progress=False)
    with pytest.raises(ValueError, match="cannot take the calibration batches"):
        sparsegpt_prune_model(model, [torch.randn(4, 31)], "2:4", show_progress=False)
    odd = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 8))
    with pytest.raises(ValueError, match="layer '4'.*divisible by m"):
        sparsegpt_prune_model(odd, [torch.randn(16, 32)], "2:4", show_progress=False)


def test_dead_inputs_and_tiny_calibration_fall_back():
    model = _mlp()
    x = torch.randn(3, 32)
    x[:, :8] = 0  # dead inputs and fewer rows than features: singular X^T X
    masks = sparsegpt_prune_model(model, [x], "unstructured", 0.5, show_progress=False)
    assert (model[0].weight[:, :8] == 0).all()  # weights of dead inputs dropped
    assert all(torch.isfinite(model[i].weight).all() for i in (0, 2, 4))
    assert float(masks["2"].float().mean()) == pytest.approx(0.5, abs=0.02)


def test_per_layer_sparsity_from_allocation():
    model = _mlp()
    calib = [torch.randn(64, 32)]
    masks = sparsegpt_prune_model(model, calib, "unstructured", {"0": 0.3, "4": 0.7}, show_progress=False)
    assert set(masks) == {"0", "4"} and not hasattr(model[2], "weight_mask")
    assert float(1 - masks["0"].float().mean()) == pytest.approx(0.3, abs=0.02)
    assert float(1 - masks["4"].float().mean()) == pytest.approx(0.7, abs=0.02)
