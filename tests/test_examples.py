"""The examples in examples/ run, on tiny configurations."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,needs", [("hf_swap.py", "transformers"), ("resnet_channels_24.py", "torchvision"),
                                          ("ddp_masked_finetune.py", None)])
def test_example_runs(script, needs):
    if needs:
        pytest.importorskip(needs)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--tiny"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
