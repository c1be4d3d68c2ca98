"""Loading, build information and `python -m sparsekern info`."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import sparsekern
from sparsekern import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)


def test_build_info_matches_running_torch():
    if not _extension.LOADED:
        pytest.skip(f"extension not loaded: {_extension.LOAD_ERROR}")
    info = _extension.BUILD_INFO
    assert info["sparsekern_version"] == sparsekern.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert _extension.cuda_archs(), "a CUDA build must record its architectures"


def test_a_built_extension_loads():
    """A compiled sparsekern/_C next to the package must load: if it did not, every kernel
    test would skip (needs_extension) and the suite would pass on the reference paths."""
    if os.environ.get("SPARSEKERN_DISABLE_EXTENSION", "0") not in ("", "0"):
        pytest.skip("SPARSEKERN_DISABLE_EXTENSION is set")
    package = os.path.dirname(sparsekern.__file__)
    built = glob.glob(os.path.join(package, "_C*.so")) + glob.glob(os.path.join(package, "_C*.pyd"))
    if not built:
        pytest.skip("no compiled extension in this install (the pure-torch references run)")
    assert _extension.LOADED, f"{built[0]} is there but did not load: {_extension.LOAD_ERROR}"


def test_ci_builds_cuda_code():
    """CI must compile the CUDA kernels (SPARSEKERN_REQUIRE_CUDA_BUILD=1 in .ci/run)."""
    if os.environ.get("SPARSEKERN_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("only checked where SPARSEKERN_REQUIRE_CUDA_BUILD=1")
    assert _extension.LOADED, _extension.LOAD_ERROR
    assert _extension.BUILD_INFO["with_cuda"] is True
    assert set(_extension.cuda_archs()) >= {"80", "90a"}


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as ws:\n"
        "    warnings.simplefilter('always')\n"
        "    import sparsekern\n"
        "    from sparsekern import ops, NMWeight\n"
        "    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)\n"
        "    x = torch.randn(3, 16)\n"
        "    y = ops.nm_linear(x, W)\n"
        "    assert torch.allclose(y, x @ W.to_dense().t(), atol=1e-5)\n"
        "    print(ops.backend_for('nm_linear', x))\n"
        "msgs = [str(w.message) for w in ws if 'sparsekern' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    r = _run(code, SPARSEKERN_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "reference"
    assert "SPARSEKERN_DISABLE_EXTENSION" in r.stdout


def test_info_command():
    r = _run("import sparsekern.__main__ as m; m.main(['info', '--json'])")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["sparsekern"] == sparsekern.__version__
    assert d["usable_now"]["cpu_kernels"] == _extension.LOADED
    r = _run("import sparsekern.__main__ as m; m.main(['info'])", SPARSEKERN_DISABLE_EXTENSION="1")
    assert r.returncode == 0 and "NOT loaded" in r.stdout


def test_arch_matching():
    assert _extension.arch_runs_on("80", (8, 6))
    assert _extension.arch_runs_on("90a", (9, 0))
    assert not _extension.arch_runs_on("80", (9, 0))
    assert not _extension.arch_runs_on("90a", (10, 0))
    assert not _extension.arch_runs_on("86", (8, 0))


def test_explain_backend():
    x = torch.randn(2, 4)
    backend, why = sparsekern.ops.explain_backend("nm_linear", x)
    assert backend == ("cpp" if _extension.LOADED else "reference") and why
    assert sparsekern.ops.backend_for("nm_linear", x.double()) == "reference"
    with sparsekern.ops.use_backend("reference"):
        assert sparsekern.ops.backend_for("nm_linear", x) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        with sparsekern.ops.use_backend("fast"):
            pass
