"""After the README's quick start, `git status` shows nothing new: everything the
commands write by default (build outputs, the demo's and the suite's output folders, the
scripts' bench/out/, test caches) is ignored by git, and the trained-model cache lives
outside the clone."""
import os
import shutil
import subprocess

import pytest

import sparsekern
from sparsekern import demo, models
from sparsekern.bench import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ignored(rel: str) -> bool:
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=ROOT)
    assert r.returncode in (0, 1), f"git check-ignore failed on {rel}"
    return r.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def _git_checkout():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout (installed from a package): nothing to keep clean")


def test_default_outputs_are_ignored():
    written = [
        # python -m pip install --no-build-isolation -e . / setup.py build_ext
        "build/temp.linux-x86_64-cpython-311/csrc/cpu/nm_linear.o", "sparsekern.egg-info/PKG-INFO",
        os.path.relpath(os.path.join(os.path.dirname(sparsekern.__file__), "_C.cpython-311-x86_64-linux-gnu.so"), ROOT),
        # python -m sparsekern demo --quick (default --out), from the root and from a sub-folder
        os.path.join(demo.DEFAULT_OUT, "demo.json"), os.path.join(demo.DEFAULT_OUT, "demo.png"),
        os.path.join("examples", demo.DEFAULT_OUT, "demo.md"),
        # python -m sparsekern bench (default --out), python bench/*.py (bench/out/)
        os.path.join(run.default_out(), "results.json"), "bench/out/quality/quality.json",
        # python -m pytest tests
        ".pytest_cache/v/cache/lastfailed", ".pytest_demo_cache/digits-mlp.pt", "tests/__pycache__/x.pyc",
        "bench/__pycache__/make_tables.cpython-311.pyc",
    ]
    not_ignored = [p for p in written if not _ignored(p)]
    assert not not_ignored, f"these default outputs would show in git status: {not_ignored}"
    assert not os.path.isabs(demo.DEFAULT_OUT) and demo.DEFAULT_OUT.startswith("sparsekern-out")
    assert run.default_out().startswith("sparsekern-out")


def test_committed_files_are_not_ignored():
    """The ignore rules do not hide what belongs in the repository."""
    for rel in ("bench/results/cpu-linear-20261128/cpu_linear.json", "bench/make_tables.py", "csrc/sparsekern.cpp",
                "examples/hf_swap.py", "sparsekern/bench/run.py", "docs/RESULTS.md"):
        assert not _ignored(rel), rel


def test_model_cache_is_outside_the_clone(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_CACHE", raising=False)
    cache = os.path.realpath(models.cache_dir())
    assert not cache.startswith(os.path.realpath(ROOT) + os.sep) or _ignored(os.path.relpath(cache, ROOT))
