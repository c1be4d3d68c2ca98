"""The command line: demo (quick, on real digits data), prune, bench, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsekern.bench.common import NOISE_MIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, **env):
    e = dict(os.environ, SPARSEKERN_CACHE=env.pop("cache", os.environ.get("SPARSEKERN_CACHE", "")) or
             os.path.join(ROOT, ".pytest_demo_cache"), **env)
    return subprocess.run([sys.executable, "-m", "sparsekern", *args], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=900)


@pytest.mark.slow
def test_demo_digits_part_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    methods = "2:4 l1,2:4 wanda,channels 50%,layer removed"
    r = run("demo", "--quick", "--device", "cpu", "--parts", "digits", "--methods", methods, "--rounds", "2",
            "--out", str(tmp_path), cache=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {tmp_path / 'demo.json'}" in r.stdout
    d = json.load(open(tmp_path / "demo.json"))
    assert d["environment"]["commit"]  # the source the rows came from ("unknown" outside a checkout)
    methods = {(x["model"], x["method"]) for x in d["rows"]}
    assert ("mlp", "2:4 wanda") in methods and ("cnn", "channels 50%") in methods and ("mlp", "layer removed") in methods
    assert ("mlp", "dense (again)") in methods  # the noise floor, timed in the same loop
    by = {(x["model"], x["method"]): x for x in d["rows"]}
    assert by[("mlp", "dense")]["accuracy"] > 90 and by[("cnn", "2:4 l1")]["accuracy"] > by[("cnn", "dense")]["accuracy"] - 3
    assert by[("cnn", "channels 50%")]["param_bytes"] < 0.6 * by[("cnn", "dense")]["param_bytes"]
    for (model, method), x in by.items():  # every verdict is the one its own numbers give
        if method == "dense":
            assert x["verdict"] == "baseline" and x["speedup"] == 1.0
            continue
        assert x["speedup"] == pytest.approx(by[(model, "dense")]["median_ms"] / x["median_ms"], rel=1e-9), method
        assert x["speedup_p20"] <= x["speedup_p80"] and x["noise_floor"] == by[(model, "dense")]["noise_floor"]
        inside = abs(x["speedup"] - 1) <= max(x["noise_floor"], NOISE_MIN) or x["speedup_p20"] <= 1 <= x["speedup_p80"]
        assert x["verdict"] == ("no difference" if inside else "faster" if x["speedup"] > 1 else "slower"), (model, method, x)
    assert by[("cnn", "2:4 l1")]["paths"].startswith("4 layers, backend")
    # the vision model optimized per layer (sparsekern.optimize), timed in the same loop; the MLP is not
    opt = by[("cnn", "optimize (floor 0.99)")]
    assert opt["accuracy"] > by[("cnn", "dense")]["accuracy"] - 3 and opt["median_ms"] > 0 and opt["note"]
    assert ("mlp", "optimize (floor 0.99)") not in by
    assert "## digits cnn optimize (floor 0.99)" in open(tmp_path / "explain.txt").read()
    assert "| model | method | quality |" in open(tmp_path / "demo.md").read()
    if __import__("importlib").util.find_spec("matplotlib"):
        assert os.path.getsize(tmp_path / "demo.png") > 1000
    again = run("demo", "--quick", "--device", "cpu", "--parts", "digits", "--models", "mlp", "--methods", "l1 50%",
                "--rounds", "2", "--out", str(tmp_path / "2"), cache=str(tmp_path / "cache"))
    assert again.returncode == 0 and json.load(open(tmp_path / "2" / "demo.json"))["rows"][0]["note"].endswith("(cache)")


def test_demo_arguments_are_checked(tmp_path):
    r = run("demo", "--parts", "digits", "--methods", "magic", "--out", str(tmp_path / "3"))
    assert r.returncode == 2 and "unknown method(s) ['magic']" in r.stderr
    r = run("demo", "--parts", "minilm,sonnet", "--out", str(tmp_path / "4"))
    assert r.returncode == 2 and "unknown part(s) ['sonnet']" in r.stderr
    for bad in (["--rounds", "1"], ["--threads", "many"], ["--device", "tpu"]):
        r = run("demo", *bad, "--out", str(tmp_path / "5"))
        assert r.returncode == 2 and "error" in r.stderr, bad
    assert not os.path.exists(tmp_path / "5")


def test_prune_module_and_state_dict(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.randn(64, 256), tmp_path / "calib.pt")
    r = run("prune", str(tmp_path / "m.pt"), "--pattern", "2:4", "--method", "wanda", "--calibration",
            str(tmp_path / "calib.pt"), "--out", str(tmp_path / "out.pt"))
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert type(out[0]).__name__ == "SparseLinear"
    report = json.load(open(tmp_path / "out.report.json"))
    by = {x["layer"]: x for x in report}
    assert by["0"]["status"] == "sparse" and by["2"]["status"] == "dense"
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    r = run("prune", str(tmp_path / "sd.pt"), "--pattern", "unstructured", "--sparsity", "0.7")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "sd.unstructured.pt", weights_only=True)
    assert float((sd["0.weight"] == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


def test_cli_errors(tmp_path):
    r = run("prune", str(tmp_path / "missing.pt"))
    assert r.returncode != 0 and "no such file" in r.stderr
    torch.save(nn.Linear(256, 256).state_dict(), tmp_path / "sd.pt")
    r = run("prune", str(tmp_path / "sd.pt"), "--pattern", "4:4")
    assert r.returncode == 2 and "n must satisfy" in r.stderr
    r = run("prune", str(tmp_path / "sd.pt"), "--pattern", "zigzag")
    assert r.returncode == 2 and "unknown pattern" in r.stderr
    r = run("prune", str(tmp_path / "sd.pt"), "--method", "wanda")
    assert r.returncode != 0 and "needs the model" in r.stderr
    torch.save([1, 2, 3], tmp_path / "list.pt")
    r = run("prune", str(tmp_path / "list.pt"))
    assert r.returncode != 0 and "expected an nn.Module or a state dict" in r.stderr
    for cmd in ("info", "demo", "prune", "bench"):
        assert run(cmd, "--help").returncode == 0
    r = run("info")
    assert r.returncode == 0 and "usable now:" in r.stdout
    # the OpenMP wait policy: unset, the kernels stop libgomp's spinning on a contended machine
    # (csrc/cpu/contention.cpp); ACTIVE spins whatever they do, hence the advice for a shared
    # machine; PASSIVE never spins
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-m", "sparsekern", "info"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=300)
    assert "OMP_WAIT_POLICY unset" in unset.stdout and "the kernels stop them" in unset.stdout
    assert "start with" not in unset.stdout
    active = run("info", OMP_WAIT_POLICY="ACTIVE")
    assert "OMP_WAIT_POLICY ACTIVE" in active.stdout and "start with OMP_WAIT_POLICY=PASSIVE" in active.stdout
    passive = run("info", OMP_WAIT_POLICY="passive")
    assert "OMP_WAIT_POLICY passive" in passive.stdout and "start with" not in passive.stdout


def test_bench_command_runs_the_suite(tmp_path):
    r = run("bench", "--suite", "masks", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(tmp_path / "results.json"))["rows"]
    assert {x["provider"] for x in rows if x["op"] == "nm_mask_compress"} >= {
        "sparsekern.nm_score_compress", "torch topk+gather", "torch topk+gather (again)", "torch.ao.pruning"}
    r = run("bench", "--help")
    assert r.returncode == 0 and all(f in r.stdout for f in ("--rounds", "--models", "--threads"))
