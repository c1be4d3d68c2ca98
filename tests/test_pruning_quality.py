"""Pruning quality on real data that ships with scikit-learn (handwritten digits, no
downloads): 50% unstructured and 2:4, by l1, wanda and taylor, fine-tuned briefly with
masks kept, stay within 2 points of dense; random pruning at 90% loses clearly more."""
import copy

import pytest
import torch
from torch import nn

import sparsekern.prune as prune

sklearn = pytest.importorskip("sklearn.datasets")


def digits():
    d = sklearn.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model, x, y, epochs, lr=3e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(1) == y).float().mean()) * 100


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def dense(request, data):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = data
    model = train(mlp() if request.param == "mlp" else cnn(), xtr, ytr, epochs=25)
    return request.param, model, accuracy(model, xte, yte)


def _prune(model, pattern, method, data):
    xtr, ytr, _, _ = data
    calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
    kw = {}
    if method == "wanda":
        kw["act_norms"] = prune.collect_activation_norms(model, calib, show_progress=False)
    if method == "taylor":
        kw["grads"] = prune.collect_gradients(
            model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 512, 128)], show_progress=False)
    for name, layer in prune.prunable_layers(model):
        if pattern == "2:4":
            if layer.weight.shape[1] % 4 == 0:  # the first conv has one input channel: left dense
                prune.nm_prune(model, 2, 4, method, name=name, **kw)
        elif method == "l1":
            prune.l1_prune(model, name=name, amount=0.5)
        elif method == "taylor":
            prune.taylor_prune(model, name=name, amount=0.5, grads=kw["grads"])
        else:
            prune.wanda_prune(model, name=name, amount=0.5, act_norms=kw["act_norms"])
    return model


@pytest.mark.parametrize("pattern", ["unstructured50", "2:4"])
@pytest.mark.parametrize("method", ["l1", "wanda", "taylor"])
def test_pruned_and_finetuned_stays_within_two_points(dense, data, pattern, method):
    kind, model, dense_acc = dense
    xtr, ytr, xte, yte = data
    m = _prune(copy.deepcopy(model), pattern, method, data)
    train(m, xtr, ytr, epochs=4, lr=1e-3, seed=1)
    acc = accuracy(m, xte, yte)
    sp = prune.sparsity(m)
    assert sp["total"] > 0.4, sp
    assert acc >= dense_acc - 2.0, f"{kind} {pattern} {method}: {acc:.1f}% vs dense {dense_acc:.1f}%"


def test_random_90_percent_loses_clearly_more(dense, data):
    kind, model, dense_acc = dense
    xtr, ytr, xte, yte = data
    m = prune.random_prune(copy.deepcopy(model), amount=0.9, generator=torch.Generator().manual_seed(0))
    train(m, xtr, ytr, epochs=4, lr=1e-3, seed=1)
    acc_random = accuracy(m, xte, yte)
    m1 = prune.l1_prune(copy.deepcopy(model), amount=0.5)
    train(m1, xtr, ytr, epochs=4, lr=1e-3, seed=1)
    assert acc_random < dense_acc - 5.0, f"{kind}: random 90% kept {acc_random:.1f}% (dense {dense_acc:.1f}%)"
    assert acc_random < accuracy(m1, xte, yte) - 5.0
