"""The CUDA decode kernels' index arithmetic, checked on the CPU.

tests/gpu_layout_emulator.cpp includes csrc/cuda/decode_layout.cuh (the functions
nm24_mma_kernel calls to find its loads, transpose index bytes within a quad, build
tensor-core fragments and address the padded x slice) and plays a warp through the PTX ISA's
mma.m16n8k16 fragment tables against a dense product, including padded 2:4 groups, row and K
tails, splits of K and every batch tile width, and checks that a quad's value loads are 64
adjacent bytes and that the kernel's shared-memory reads are free of bank conflicts. No GPU
needed; a host C++ compiler is (CI has one: it builds the extension)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_nm24_fragment_mapping_matches_the_mma_layout(tmp_path):
    exe = tmp_path / "gpu_layout_emulator"
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "cuda"),
                    os.path.join(ROOT, "tests", "gpu_layout_emulator.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
