"""Policy(cold="auto"): a model whose weights fit the last-level cache measures its layers'
paths with the weights starting there, a larger model (or a lone layer) from memory."""
import pytest
import torch
from torch import nn

import sparsekern
import sparsekern.nn as sknn
from sparsekern import dispatch_rules
from sparsekern.nn import Policy, SparseLinear


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _recording_measure(seen):
    def measure(runners, device, reps, cold, evict=None):
        seen.append(cold)
        with torch.no_grad():
            for fn in runners.values():
                fn()
        return {p: {"sparse": 1.0}.get(p, 2.0) for p in runners}
    return measure


@pytest.mark.parametrize("bad", ["yes", 1, 0, 0.5, None, "AUTO"])
def test_bad_cold_raises_naming_it(bad):
    with pytest.raises(ValueError, match="cold must be True, False or 'auto'"):
        Policy(cold=bad)


def test_the_default_is_auto_and_explicit_values_are_kept():
    assert Policy().cold == "auto" and Policy(cold=True).cold is True and Policy(cold=False).cold is False
    assert "cold='auto'" in repr(Policy())


def test_model_weight_bytes_counts_each_tensor_once_and_no_embedding_table():
    emb = nn.Embedding(1000, 16)
    lin = nn.Linear(16, 8)
    model = nn.Sequential(emb, lin, nn.LayerNorm(8))
    model.append(lin)  # the same layer twice: its tensors count once
    expected = (16 * 8 + 8) * 4 + (8 + 8) * 4
    assert sknn.model_weight_bytes(model) == expected
    sparse = sparsekern.sparsify(_mlp(), "2:4", min_features=8, show_progress=False)[0]
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    held = sum(t.numel() * t.element_size() for m in layers for t in [*m.buffers(), *m.parameters()])
    assert sknn.model_weight_bytes(sparse) == held  # the compressed tensors (and their meta), the biases
    assert held < sum(m.weight_format().nbytes + m.bias.numel() * 4 for m in layers) + 64 * len(layers)


def test_model_weight_bytes_counts_torch_dynamic_int8_linear():
    q = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(32, 16, bias=False)), {nn.Linear},
                                               dtype=torch.qint8)
    assert sknn.model_weight_bytes(q) == 32 * 16


def test_sparsify_notes_the_footprint_and_a_small_model_measures_from_the_llc(monkeypatch):
    seen = []
    monkeypatch.setattr(sknn, "measure_paths", _recording_measure(seen))
    model = sparsekern.sparsify(_mlp(), "2:4", min_features=8, show_progress=False)[0].eval()
    footprint = sknn.model_footprint(model)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert all(m.__dict__["_model_footprint"] == footprint for m in layers)
    # each layer counted as its dense weight (the larger), the biases as they are
    assert footprint == sum(m.in_features * m.out_features * 4 + m.out_features * 4 for m in layers)
    monkeypatch.setattr(sknn, "_last_level_cache_bytes", lambda device: 2 * footprint)
    with torch.no_grad():
        model(torch.randn(5, 64))
    assert seen and all(s == "llc" for s in seen)
    assert all(c.start == "llc" for m in layers for c in m.bucket_choices.values())
    assert "weights from the last-level cache" in sparsekern.explain(model)


def test_a_model_larger_than_the_fraction_and_a_lone_layer_measure_from_memory(monkeypatch):
    seen = []
    monkeypatch.setattr(sknn, "measure_paths", _recording_measure(seen))
    model = sparsekern.sparsify(_mlp(), "2:4", min_features=8, show_progress=False)[0].eval()
    footprint = sknn.model_footprint(model)
    # the model fits the cache, but not the fraction of it the rule allows
    llc = int(footprint / dispatch_rules.WARM_MODEL_LLC_FRACTION) - 1
    monkeypatch.setattr(sknn, "_last_level_cache_bytes", lambda device: llc)
    with torch.no_grad():
        model(torch.randn(5, 64))
        assert seen and all(s is True for s in seen)
        seen.clear()
        lone = SparseLinear.from_dense(nn.Linear(64, 32), "2:4").eval()  # no model, no footprint
        lone(torch.randn(3, 64))
    assert seen == [True] and lone.bucket_choices[4].start is True
    assert "weights from memory" in lone.describe()


@pytest.mark.parametrize("cold", [True, False])
def test_an_explicit_cold_is_used_whatever_the_footprint(monkeypatch, cold):
    seen = []
    monkeypatch.setattr(sknn, "measure_paths", _recording_measure(seen))
    monkeypatch.setattr(sknn, "_last_level_cache_bytes", lambda device: 1 << 40)
    model = sparsekern.sparsify(_mlp(), "2:4", min_features=8, show_progress=False,
                                policy=Policy(cold=cold, share=False, cache=False))[0].eval()
    with torch.no_grad():
        model(torch.randn(5, 64))
    assert seen and all(s is cold for s in seen)


def test_layers_measured_from_different_starts_do_not_share_a_choice(monkeypatch):
    seen = []
    monkeypatch.setattr(sknn, "measure_paths", _recording_measure(seen))
    sknn.clear_shared_choices()
    policy = Policy(cache=False)
    lin = nn.Linear(64, 32)
    a = SparseLinear.from_dense(lin, "2:4", policy=policy).eval()
    b = SparseLinear.from_dense(lin, "2:4", policy=policy).eval()
    a.__dict__["_model_footprint"] = 1  # fits any cache
    with torch.no_grad():
        a(torch.randn(3, 64))
        b(torch.randn(3, 64))  # identical layer, but alone: measured again, from memory
    assert seen == ["llc", True]
    assert not b.bucket_choices[4].shared


def test_the_llc_start_writes_the_l2_buffer_and_evicts_nothing(monkeypatch):
    pushed, evicted = [], []
    monkeypatch.setattr(sknn, "_push_to_llc", lambda device: pushed.append(device))
    monkeypatch.setattr(sknn, "_evict_op", lambda: lambda ts: evicted.append(ts))
    times = sknn.measure_paths({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), 3, "llc",
                               evict=lambda: [torch.zeros(4)])
    assert set(times) == {"a", "b"} and len(pushed) >= 6 and not evicted
    pushed.clear()
    sknn.measure_paths({"a": lambda: None}, torch.device("cpu"), 2, True, evict=lambda: [torch.zeros(4)])
    assert evicted and not pushed


def test_push_to_llc_buffer_is_twice_the_l2(monkeypatch):
    sknn._FLUSH.clear()
    monkeypatch.setattr(sknn, "_cpu_cache_bytes", lambda level: {2: 1 << 20, 3: 32 << 20}[level])
    sknn._push_to_llc(torch.device("cpu"))
    buf = sknn._FLUSH[("llc", torch.device("cpu"))]
    assert buf.numel() * 4 == 2 << 20 and float(buf[0]) == 1.0
    sknn._FLUSH.clear()


def test_tune_and_freeze_note_the_footprint():
    model = sparsekern.sparsify(_mlp(), "2:4", min_features=8, show_progress=False, trainable=True)[0]
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.__dict__.pop("_model_footprint", None)
    sparsekern.freeze(model)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert all(m.__dict__["_model_footprint"] == sknn.model_footprint(model) for m in layers)
    for m in layers:
        m.__dict__.pop("_model_footprint")
    sparsekern.tune(model, torch.randn(2, 64), show_progress=False)
    assert all("_model_footprint" in m.__dict__ for m in layers)
