"""bench/gpu_check.sh --dry-run: every step of the GPU check with its CPU stand-in, within the
time and file limits of a lent GPU machine (at most 8 files, no folders, names the device tool
accepts), the steps' timeouts inside the 8-minute budget. CI runs this; the dry run itself
must finish within 2 minutes."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def check_env(tmp_path, **extra):
    """The environment of the script: PYTHON is the interpreter running these tests (as
    with `venv/bin/python -m pytest` and no activated venv), and a `python3`/`python` on
    PATH that fails, so a step that ignores PYTHON fails here too."""
    stub = tmp_path / "wrong-python"
    stub.mkdir()
    for name in ("python3", "python"):
        (stub / name).write_text("#!/bin/sh\necho 'not the interpreter running the tests' >&2\nexit 4\n")
        (stub / name).chmod(0o755)
    return dict(os.environ, PYTHON=sys.executable, PATH=f"{stub}{os.pathsep}{os.environ.get('PATH', '')}", **extra)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    t0 = time.time()
    run = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, timeout=240,
                         cwd=ROOT, env=check_env(tmp_path))
    took = time.time() - t0
    summary = (out / "summary.log").read_text()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert took < 150, f"dry run took {took:.0f} s"  # the script itself fails past 120 s; slack for a busy CI
    for step in ("env", "build", "tests", "smoke", "sanitizer", "bench", "ncu"):
        assert re.search(rf"^  {step}: ok in \d+ s$", summary, re.M), f"{step} did not pass:\n{summary}"
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert all(p.parent == out for p in files), "the device tool takes files at most 2 folders down; keep them flat"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {p.name for p in files} == {"summary.log", "build.log", "tests.log", "smoke.log", "sanitizer.log",
                                       "bench.log", "bench.json", "tuning.json"}
    planned = int(re.search(r"steps planned (\d+) s", summary).group(1))
    budget = int(re.search(r"budget (\d+) s", summary).group(1))
    assert planned <= budget <= 480
    assert "tests collected" in (out / "tests.log").read_text()
    assert "gpu_smoke:" in (out / "smoke.log").read_text() and "sanitize_case: ok" in (out / "sanitizer.log").read_text()


def test_gpu_check_refuses_a_plan_over_budget(tmp_path):
    env = check_env(tmp_path, GPU_CHECK_BUDGET_S="100")
    run = subprocess.run(["bash", SCRIPT, "--dry-run", str(tmp_path / "gc")], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env=env)
    assert run.returncode != 0 and "PLAN TOO LONG" in run.stdout
