"""The in-package benchmark suite's pieces, fast (nothing here asserts a timing): the
interleaved loop, the noise floor and verdicts on injected samples, every provider's
correctness check before timing (and the test suite's tolerance), quantiles in
milliseconds, argument parsing, the fields of every suite's rows (what the README table
script reads), summary tables and plots redrawn from stored rows, and the benchmark models
(tiny configurations)."""
import copy
import json
import os
import re

import pytest
import torch

from sparsekern import _extension, models
from sparsekern.bench import cases, common, peers, plots, profile, run
from sparsekern.bench.common import environment, quantiles, write_json

# What the README table script reads from every timed row of every suite.
TABLE_FIELDS = {"op", "variant", "metric", "batch", "median_ms", "p20_ms", "p80_ms", "speedup", "noise_floor",
                "verdict", "device", "commit"}


def test_quantiles_in_milliseconds():
    q = quantiles([0.001, 0.002, 0.003, 0.004, 0.005])
    assert q["median_ms"] == pytest.approx(3.0) and q["p20_ms"] <= 3.0 <= q["p80_ms"]
    assert quantiles([0.002]) == {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}


def test_interleaved_shuffles_the_order_and_samples_every_variant_each_round():
    seen = []
    calls = {"a": lambda: seen.append("a"), "b": [lambda: seen.append("b1"), lambda: seen.append("b2")],
             "c": lambda: seen.append("c")}
    out = common.interleaved(calls, 12)
    assert {k: len(v) for k, v in out.items()} == {"a": 12, "b": 12, "c": 12}
    assert seen[:3] == ["a", "b1", "c"]  # warm-up: each once, untimed
    rounds = [[x for x in seen[3 + 4 * i:7 + 4 * i] if x != "b2"] for i in range(12)]
    assert all(sorted(r) == ["a", "b1", "c"] for r in rounds)  # every variant once per round (b: both copies)
    assert all(seen[3 + 4 * i:7 + 4 * i].index("b2") == seen[3 + 4 * i:7 + 4 * i].index("b1") + 1 for i in range(12))
    assert len({tuple(r) for r in rounds}) > 2  # the order changes between rounds
    predecessors_of_b = {r[r.index("b1") - 1] for r in rounds if r.index("b1") > 0}
    assert predecessors_of_b == {"a", "c"}  # no variant always runs right after the same one
    assert all(t >= 0 for v in out.values() for t in v)
    seen.clear()
    common.interleaved(calls, 12)
    assert [x for x in seen[3:]] == [x for r in rounds for x in (r[:r.index("b1") + 1] + ["b2"] + r[r.index("b1") + 1:])]


def test_compare_gives_speedup_noise_floor_and_verdicts():
    base = [1.0, 1.1, 0.9, 1.0, 1.05]
    samples = {"dense": base, "again": [t * 1.01 for t in base], "fast": [t / 2 for t in base],
               "slow": [t * 1.5 for t in base], "same": [t * 1.015 for t in base],
               "noisy": [0.5, 2.0, 0.6, 1.9, 0.8]}
    r = common.compare(samples, "dense", "again")
    assert r["dense"]["verdict"] == "baseline" and r["dense"]["speedup"] == 1.0
    assert r["dense"]["noise_floor"] == pytest.approx(0.01 / 1.01)
    assert r["fast"]["speedup"] == pytest.approx(2.0) and r["fast"]["verdict"] == "faster"
    assert r["fast"]["speedup_p20"] == pytest.approx(2.0) and r["fast"]["speedup_p80"] == pytest.approx(2.0)
    assert r["slow"]["verdict"] == "slower"
    assert r["same"]["verdict"] == "no difference"  # 1.5% < NOISE_MIN
    assert r["noisy"]["verdict"] == "no difference"  # per-round ratios on both sides of 1
    assert r["again"]["verdict"] == "no difference" and r["fast"]["rounds"] == 5
    assert common.verdict(1.3, 1.2, 1.4, noise_floor=0.35) == "no difference"  # inside a wide floor
    assert common.verdict(0.7, 0.6, 0.8, noise_floor=0.05) == "slower"
    assert common.compare({"d": [1.0, 1.0], "x": [0.5, 0.5]}, "d")["x"]["noise_floor"] is None


def test_tolerance_is_the_test_suites_rule():
    assert common.tolerance(torch.float32, 1e-7) == 1e-5
    assert common.tolerance(torch.float32, 1e-4) == 2e-4  # a whole model: 2x torch's own error
    assert common.tolerance(torch.bfloat16, 3e-3) == pytest.approx(6e-3 + 1e-6)
    assert common.rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")


@pytest.mark.parametrize("pattern,density", [("2:4", 0.5), ("unstructured", 0.3), ("block16", 0.25)])
def test_every_cpu_provider_passes_its_check_and_a_wrong_one_fails(pattern, density):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    x = torch.randn(3, 96, generator=gen)
    provs = cases.providers("cpu", pattern)
    assert "sparsekern" in provs
    for name, make in provs.items():
        built = make(w, density, gen)
        assert cases.check(built, x, name) < 1e-5
        assert len(cases.time_calls([lambda: built.fn(x)], "cpu", 2)) == 2
    wrong = cases.Built(lambda t: t @ w.t(), 0, w * 0.5)
    with pytest.raises(RuntimeError, match="not timing it"):
        cases.check(wrong, x, "wrong")
    slightly = cases.Built(lambda t: t @ (w * (1 + 1e-4)).t(), 0, w)  # 1e-4 relative: passed the old 1e-4 gate
    with pytest.raises(RuntimeError, match="exceeds 1.0e-05"):
        cases.check(slightly, x, "slightly off")


def test_low_precision_check_is_2x_torchs_own_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen).bfloat16()
    x = torch.randn(4, 128, generator=gen).bfloat16()
    ok = cases.Built(lambda t: torch.nn.functional.linear(t, w), 0, w)
    assert cases.check(ok, x, "torch itself") >= 0
    # rounding the weight once more (fp16 of bf16 values stays exact; a 1% change is not)
    off = cases.Built(lambda t: torch.nn.functional.linear(t, (w.float() * 1.01).bfloat16()), 0, w)
    with pytest.raises(RuntimeError, match="torch's own"):
        cases.check(off, x, "1% off")


def test_kernel_sweep_rows_are_interleaved_with_a_noise_floor():
    env = {"device_name": "cpu"}
    rows = cases.linear_sweep("cpu", torch.float32, {"tiny": (32, 64)}, [1, 5], [("2:4", 0.5)], 3, 1, env, False)
    timed = [r for r in rows if "median_ms" in r]
    assert {r["provider"] for r in timed} == {"torch.dense", "torch.dense (again)", "sparsekern"}
    for r in timed:
        assert TABLE_FIELDS - {"commit"} <= set(r), TABLE_FIELDS - set(r)
        assert r["rounds"] == 3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["metric"] == "latency"
    by = {(r["provider"], r["batch"]): r for r in timed}
    assert by[("torch.dense", 1)]["verdict"] == "baseline"
    assert by[("sparsekern", 5)]["noise_floor"] == by[("torch.dense (again)", 5)]["noise_floor"]


def _tiny_specs(quick):
    return [{"name": "llama", "desc": "tiny HF Llama", "variants": ["dense", "2:4", "unstructured 70%"],
             "build": lambda: models.hf_llama(hidden=64, intermediate=128, layers=1, heads=4, vocab=96),
             "workloads": lambda m: models.llama_workloads(m, prompt=6, steps=2),
             "sparsify": dict(exclude=["lm_head"], min_features=32)},
            {"name": "resnet50", "desc": "tiny torchvision ResNet", "variants": ["dense", "dense channels-last", "2:4"],
             "build": lambda: models.tv_resnet(18), "workloads": lambda m: [models.image_workload(m, 1, 32)],
             "sparsify": dict(min_features=64)}]


@pytest.mark.slow
def test_models_suite_rows_have_the_table_fields(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    monkeypatch.setattr(run, "model_specs", _tiny_specs)
    run.main(["--suite", "models", "--quick", "--rounds", "2", "--threads", "1", "--no-progress",
              "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "results.json"))
    rows = data["rows"]
    assert not [r for r in rows if "error" in r and not r.get("skipped")], [r["error"] for r in rows if "error" in r]
    skipped = {(r["model"], r["variant"]): r for r in rows if r.get("skipped")}
    for r in skipped.values():  # a peer that cannot run here says why, with its fields
        assert r["peer"] == r["variant"] in peers.PEERS and r["error"] and r["precision"] and "median_ms" not in r
    if not torch.cuda.is_available():
        assert "cuda only" in skipped[("llama", "torch 2:4 semi-structured")]["error"]
    assert "changes only" in skipped[("resnet50", "torch int8 dynamic")]["error"]  # convolutions: not its peer
    rows = [r for r in rows if not r.get("skipped")]
    for r in rows:
        assert TABLE_FIELDS <= set(r), TABLE_FIELDS - set(r)
        assert r["op"] == "model" and r["value"] > 0 and r["rel_err"] <= r["tolerance"]
    got = {(r["model"], r["variant"], r["metric"]) for r in rows}
    assert ("llama", "dense (again)", "decode_tokens_per_s") in got and ("llama", "2:4", "prefill_tokens_per_s") in got
    assert ("resnet50", "2:4", "images_per_s") in got and ("resnet50", "dense channels-last", "images_per_s") in got
    # the variant, not also the peer of the same name (peers.PEERS has it for the demo and the quality suite)
    assert sum((r["model"], r["variant"]) == ("resnet50", "dense channels-last") for r in rows) == 1
    # the peers, timed in the same loop, checked against the fp32 model with their own tolerance
    for peer, model in [("dense bf16", "llama"), ("torch int8 dynamic", "llama"), ("dense bf16", "resnet50"),
                        ("dense bf16 channels-last", "resnet50")]:
        for metric in {m for mo, _, m in got if mo == model}:
            r = next(x for x in rows if (x["model"], x["variant"], x["metric"]) == (model, peer, metric))
            assert r["peer"] == peer and r["precision"] and r["reference"] == "fp32 dense"
            assert 0 < r["rel_err"] <= r["tolerance"] == peers.PEERS[peer].rel_tol and r["sparse_layers"] == 0
            assert r["param_bytes"] > 0 and r["weight_bytes"] > 0 and r["baseline"] == "dense"
    by = {(r["model"], r["variant"], r["metric"]): r for r in rows}
    int8, bf16, dense = (by[("llama", v, "decode_tokens_per_s")] for v in ("torch int8 dynamic", "dense bf16", "dense"))
    assert int8["param_bytes"] < bf16["param_bytes"] < dense["param_bytes"]  # packed int8 weights counted
    assert int8["weight_bytes"] < bf16["weight_bytes"] < dense["weight_bytes"]  # bytes each decode call reads
    # torch's quantized::linear_dynamic counts as a dense GEMM, so its layer rate is measured
    assert int8["share_gemm"] > 0 and int8["layer_gflop_per_s"] > 0 and "profile_note" not in int8
    for r in rows:  # every timed row against each peer of its loop: x dense bf16 = its median over ours
        if r["model"] == "llama" and r["variant"] != "dense bf16":
            peer = by[("llama", "dense bf16", r["metric"])]
            assert r["speedup_vs_dense_bf16"] == pytest.approx(peer["median_ms"] / r["median_ms"])
    for r in rows:  # the profile beside every variant's timing (not the noise-floor repeat)
        if r["variant"] == "dense (again)":
            assert "share_other" not in r
            continue
        shares = [r[f"share_{c}"] for c in profile.CATEGORIES]
        assert min(shares) >= 0 and abs(sum(shares) - 1) < 1e-6
        assert r["weight_bytes"] > 0 and r["kept_macs"] > 0 and r["weight_gb_per_s"] > 0
        # the C++ operators (the reference backend's torch ops count as what they are); peers run none
        # (a small layer may keep a measured dense copy in every bucket: then no sparse op runs)
        if _extension.LOADED and not r.get("peer"):
            ran_sparse = r["sparse_layers"] > 0 and re.search(r"\bsparse [1-9]", r.get("paths") or "") is not None
            assert (r["share_sparse"] > 0) == ran_sparse, r
    env = data["environment"]
    assert env["gemm_gflops"] > 0
    assert (env["fma_peak_gflops"] > 0) if _extension.LOADED else env["fma_peak_gflops"] is None
    by = {(r["model"], r["variant"], r["metric"]): r for r in rows}
    assert "rows<=1: " in by[("llama", "2:4", "decode_tokens_per_s")]["paths"]  # the decode bucket's paths
    assert by[("llama", "2:4", "decode_tokens_per_s")]["first_call_s"] > 0
    assert data["environment"]["threads"] == 1 and data["environment"]["machine"]["cpus"] >= 1
    text = open(tmp_path / "summary.md").read()
    assert "## Models" in text and "1 (baseline)" in text and "noise floor" in text
    assert "| x peers |" in text and "x dense bf16" in text and "## Peers that did not run here" in text
    assert "## llama 2:4" in open(tmp_path / "explain.txt").read()
    if __import__("importlib").util.find_spec("matplotlib"):
        assert os.path.getsize(tmp_path / "models_speedup.png") > 1000


def test_layer_costs_count_each_layer_calls_bytes_and_multiply_adds():
    from sparsekern.nn import Policy, SparseConv2d, SparseLinear

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    sconv = SparseConv2d.from_dense(torch.nn.Conv2d(8, 8, 1), "2:4", policy=Policy("sparse"))
    lin = SparseLinear.from_dense(torch.nn.Linear(8 * 5 * 5, 16), "unstructured", sparsity=0.75,
                                  policy=Policy("sparse"))
    model = torch.nn.Sequential(conv, sconv, torch.nn.Flatten(), lin, torch.nn.Linear(16, 16)).eval()
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        got = profile.layer_costs(model, lambda: model(x))
    fl, ff = lin.weight_format(), sconv.weight_format()
    assert got["layer_calls"] == 4
    assert got["weight_bytes"] == 8 * 4 * 9 * 4 + ff.nbytes + fl.nbytes + 16 * 16 * 4
    dense = 3 * 8 * 25 * 36 + 3 * 8 * 25 * 8 + 3 * 16 * 200 + 3 * 16 * 16
    assert got["dense_macs"] == dense
    kept = 3 * 8 * 25 * 36 + 3 * 8 * 25 * 8 * 0.5 + 3 * 16 * 200 * fl.density + 3 * 16 * 16
    assert got["kept_macs"] == round(kept)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed

    def boom():
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        profile.layer_costs(model, boom)
    assert not any(m._forward_hooks for m in model.modules())  # removed when the call raises too


def test_time_shares_put_sparse_ops_dense_gemms_and_the_rest_apart():
    from sparsekern.nn import Policy, SparseLinear

    dense = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 256))
    sparse = copy.deepcopy(dense)
    sparse[0] = SparseLinear.from_dense(sparse[0], "2:4", policy=Policy("sparse"))
    x = torch.randn(64, 256)
    with torch.no_grad():
        d = profile.time_shares(lambda: dense(x), calls=3)
        s = profile.time_shares(lambda: sparse(x), calls=3)
    for got in (d, s):
        assert abs(sum(got[f"share_{c}"] for c in profile.CATEGORIES) - 1) < 1e-9 and got["profiled_ms"] > 0
    assert d["share_sparse"] == 0 and d["share_gemm"] > 0 and d["share_attention"] == 0
    assert s["share_sparse"] > 0 and s["share_gemm"] > 0
    assert profile._category("sparsekern::nm_linear") == "sparse"
    assert profile._category("aten::mkldnn_convolution") == "gemm"
    assert profile._category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile._category("aten::layer_norm") is None


def test_time_shares_count_torchs_int8_linears_as_dense_gemms():
    """The int8 peer's layers (and the lm_head a quantized variant leaves to torch's int8) are
    dense GEMMs, not "other"."""
    from sparsekern.bench.common import int8_dynamic

    model = int8_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)))
    x = torch.randn(64, 256)
    with torch.no_grad():
        got = profile.time_shares(lambda: model(x), calls=3)
    assert got["share_gemm"] > 0 and got["share_sparse"] == 0, got


def test_roofs_and_the_fma_probe():
    r = profile.roofs("cpu", torch.get_num_threads())
    assert r["gemm_gflops"] > 0 and r["roof_threads"] == torch.get_num_threads()
    from sparsekern import _extension

    if not _extension.LOADED:
        assert r["fma_peak_gflops"] is None
        return
    assert r["fma_peak_gflops"] > 0 and r["fma_lanes"] in (1, 8, 16)
    seconds, flops, lanes = torch.ops.sparsekern.cpu_fma_probe(1000)
    assert seconds > 0 and flops == 2 * lanes * 12 * 1000 * torch.get_num_threads() and lanes == r["fma_lanes"]
    for bad in (0, -5, 2**40):
        with pytest.raises(RuntimeError, match="iterations"):
            torch.ops.sparsekern.cpu_fma_probe(bad)


def test_check_model_refuses_a_variant_that_is_off():
    base = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()

    def wls(m):
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(next(m.parameters()).dtype)
        return [models.Workload("out", 3, 3, lambda: m(x))]

    ok = common.check_model(wls, base, base, None, "dense")
    assert ok["rel_err"] <= ok["tolerance"] and len(ok["first_call_s"]) == 1
    off = copy.deepcopy(base)
    with torch.no_grad():
        off[0].weight.mul_(1.001)
    with pytest.raises(RuntimeError, match="not timing it"):
        common.check_model(wls, base, off, None, "off")


def test_suite_arguments_are_checked():
    for bad in (["--rounds", "1"], ["--models", "gpt5"], ["--threads", "zero"], ["--suite", "nope"],
                ["--peers", "fp8 magic"]):
        with pytest.raises(SystemExit):
            run.main(bad)


def test_pick_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert common.pick_threads(1) == (1, "as given") and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(common, "machine", lambda: {"loadavg": [99.0, 99.0, 99.0], "cpus": 2, "host": "x"})
        monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
        n, why = common.pick_threads("auto")
        assert n == 1 and "busy" in why
        torch.set_num_threads(2)
        monkeypatch.setattr(common, "machine", lambda: {"loadavg": [0.1, 0.1, 0.1], "cpus": 2, "host": "x"})
        assert common.pick_threads("auto")[0] == 2
        with pytest.raises(ValueError):
            common.pick_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_masks_suite_compares_with_what_users_write():
    import argparse

    rows = run.suite_masks(argparse.Namespace(device="cpu", quick=True, rounds=2), {"device_name": "cpu"})
    timed = {r["provider"]: r for r in rows if "median_ms" in r}
    assert {"sparsekern.nm_score_compress", "torch topk+gather", "torch topk+gather (again)", "torch.ao.pruning",
            "sparsekern.group_score", "torch.linalg.vector_norm"} <= set(timed)
    assert all(r["baseline"] in ("torch topk+gather", "torch.linalg.vector_norm") for r in timed.values())
    assert all(TABLE_FIELDS - {"commit", "batch"} <= set(r) for r in timed.values())
    if not torch.cuda.is_available():  # torch's own 2:4 conversion runs on CUDA only: a row says so
        err = [r for r in rows if r["provider"] == "torch.sparse.to_sparse_semi_structured"]
        assert err and "error" in err[0]


def _rows():
    rows = []
    for prov in ("torch.dense", "sparsekern"):
        for batch in (1, 8):
            for density in (0.3, 0.1):
                ms = 1.0 if prov == "torch.dense" else 0.5
                rows.append({"op": "linear", "provider": prov, "pattern": "dense" if prov == "torch.dense" else
                             "unstructured", "density": density, "shape": "64x64", "batch": batch, "median_ms": ms,
                             "p20_ms": ms, "p80_ms": ms, "gb_per_s": 1.0, "speedup_vs_dense": 1.0 / ms})
    rows.append({"op": "group_norm_nm_l2", "provider": "torch.eager", "shape": "8x8", "median_ms": 1.0,
                 "gb_per_s": 2.0})  # a row stored before the rename still shows
    rows.append({"op": "model", "model": "vit", "variant": "2:4", "error": "ValueError: nope"})
    return rows


def test_summary_and_plots_redrawn_from_stored_rows(tmp_path):
    env = {"device_name": "cpu", "copy_gbs": 10.0, "commit": "abc"}
    text = plots.summary_markdown(env, _rows())
    assert "## Kernels" in text and "| 64x64 | unstructured | 30% | sparsekern | 8 | 0.500 |" in text
    assert "## Mask generation" in text and "group_norm_nm_l2" in text
    assert "## Did not run" in text and "- vit 2:4: ValueError: nope" in text
    write_json(str(tmp_path / "results.json"), env, _rows())
    paths = plots.redraw(str(tmp_path / "results.json"))
    assert open(tmp_path / "summary.md").read() == text
    if __import__("importlib").util.find_spec("matplotlib"):
        assert sorted(os.path.basename(p) for p in paths) == ["roofline_fraction.png", "speedup_vs_batch.png",
                                                              "speedup_vs_density.png", "summary.md"]


def test_environment_names_versions_and_device():
    env = environment("cpu")
    assert env["device_name"] == env["cpu"] and env["sparsekern"] and env["torch"] == torch.__version__
    json.dumps(env)  # stored with every run


def test_benchmark_models_run_tiny():
    llama = models.LlamaStyle(vocab=64, dim=32, layers=2, heads=4, hidden=48).eval()
    ids = torch.randint(0, 64, (2, 5))
    assert llama(ids).shape == (2, 5, 64)
    out = llama.generate(ids, 3)
    assert out.shape == (2, 3)
    with torch.no_grad():  # the KV cache gives the same next token as a full forward
        full = llama(torch.cat([ids, out[:, :2]], 1))[:, -1].argmax(-1)
    assert torch.equal(full, out[:, 2])
    vit = models.ViT(image=16, patch=8, dim=32, depth=1, heads=4, mlp=64, classes=7).eval()
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    for kind, make in models.DIGITS_MODELS.items():
        m = make()
        assert m(torch.randn(4, 1, 8, 8)).shape == (4, 10)
        block = m.get_submodule(models.DIGITS_REMOVABLE[kind])
        x = torch.randn(2, *((256,) if kind == "mlp" else (64, 4, 4)))
        assert block(x).shape == x.shape  # removable: keeps its shape
    assert models.param_bytes(torch.nn.Linear(4, 2)) == (8 + 2) * 4
    assert models.checkpoint_bytes(torch.nn.Linear(4, 2)) > 40
