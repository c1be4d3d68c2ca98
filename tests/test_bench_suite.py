"""The in-package benchmark suite's pieces, fast: every provider's correctness check before
timing, quantiles in milliseconds, summary tables and plots redrawn from stored rows, and
the benchmark models (tiny configurations)."""
import json
import os

import pytest
import torch

from sparsekern import models
from sparsekern.bench import cases, plots
from sparsekern.bench.common import environment, quantiles, write_json


def test_quantiles_in_milliseconds():
    q = quantiles([0.001, 0.002, 0.003, 0.004, 0.005])
    assert q["median_ms"] == pytest.approx(3.0) and q["p20_ms"] <= 3.0 <= q["p80_ms"]
    assert quantiles([0.002]) == {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}


@pytest.mark.parametrize("pattern,density", [("2:4", 0.5), ("unstructured", 0.3), ("block16", 0.25)])
def test_every_cpu_provider_passes_its_check_and_a_wrong_one_fails(pattern, density):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    x = torch.randn(3, 96, generator=gen)
    provs = cases.providers("cpu", pattern)
    assert "sparsekern" in provs
    for name, make in provs.items():
        built = make(w, density, gen)
        assert cases.check(built, x, name) < 1e-4
        assert len(cases.time_calls([lambda: built.fn(x)], "cpu", 2)) == 2
    wrong = cases.Built(lambda t: t @ w.t(), 0, w * 0.5)
    with pytest.raises(RuntimeError, match="not timing it"):
        cases.check(wrong, x, "wrong")


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
