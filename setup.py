"""Builds sparsekern and its one compiled extension, sparsekern._C.

A CUDA extension when a CUDA toolkit and a CUDA build of torch are present (no GPU is
needed to compile), otherwise a C++-only one. Environment:

  SPARSEKERN_CUDA_ARCHS  targets, ';'-separated (default "80;90a": sm_80 and sm_90a)
  SPARSEKERN_FORCE_CPU=1 skip CUDA even when it is available
  SPARSEKERN_REQUIRE_CUDA=1 fail unless the CUDA code is compiled (CI)
  CUDA_HOME / CUDA_PATH  the toolkit root (found from nvcc when unset, wrapper scripts too)
  MAX_JOBS               parallel compile jobs (ninja)
  SPARSEKERN_NVCC_EXTRA  extra nvcc flags, e.g. "-Xptxas=-v" for the resource report
                         (bench/ptxas_report.py tabulates it); register spills fail the build

Install with `pip install --no-build-isolation -e .` (or without -e) once torch is installed.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    text = open(os.path.join(ROOT, "sparsekern", "__init__.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and any(
        os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib")
    )


def find_cuda_home():
    """The CUDA toolkit root, or None.

    The `nvcc` on PATH may be a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`),
    whose parent folder is no toolkit; torch's own guess then points at the wrong place.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a script: look for the real nvcc it runs
                for path in re.findall(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(path.decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def cuda_arch_flags(spec):
    flags = []
    for arch in [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]:
        if not re.fullmatch(r"\d+[af]?", arch):
            sys.exit(f"setup.py: SPARSEKERN_CUDA_ARCHS entry {arch!r} is not like '80' or '90a'")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        sys.exit("setup.py: SPARSEKERN_CUDA_ARCHS is empty")
    return flags


FORCE_CPU = os.environ.get("SPARSEKERN_FORCE_CPU", "0") not in ("", "0")
CUDA_HOME = None if FORCE_CPU else find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = CUDA_HOME is not None and torch.version.cuda is not None
if os.environ.get("SPARSEKERN_REQUIRE_CUDA", "0") not in ("", "0") and not WITH_CUDA:
    sys.exit(f"setup.py: SPARSEKERN_REQUIRE_CUDA=1 but CUDA cannot be built (toolkit: {CUDA_HOME}, "
             f"torch CUDA: {torch.version.cuda}, SPARSEKERN_FORCE_CPU={int(FORCE_CPU)})")
ARCHS = os.environ.get("SPARSEKERN_CUDA_ARCHS", "80;90a")

cpu_sources = ["csrc/sparsekern.cpp", "csrc/kept_call_check.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
define = [
    f'-DSPARSEKERN_VERSION="{_version()}"',
    f'-DSPARSEKERN_TORCH_VERSION="{torch.__version__}"',
]
# The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 by torch version).
cxx_flags = ["-O3", "-fopenmp"]
if WITH_CUDA:
    nvcc_version = re.search(r"release (\S+),", subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True))
    define += [
        "-DSPARSEKERN_WITH_CUDA",
        f'-DSPARSEKERN_CUDA_ARCHS="{ARCHS}"',
        f'-DSPARSEKERN_CUDA_VERSION="{nvcc_version.group(1) if nvcc_version else torch.version.cuda}"',
    ]
    ext = CUDAExtension(
        "sparsekern._C",
        cpu_sources + cuda_sources,
        extra_compile_args={
            "cxx": cxx_flags + define,
            # -warn-spills -Werror: a kernel that spills registers fails the build (CI, gpu_check)
            "nvcc": ["-O3", "-Xptxas=-warn-spills", "-Xptxas=-Werror", "--expt-relaxed-constexpr"]
            + cuda_arch_flags(ARCHS)
            + os.environ.get("SPARSEKERN_NVCC_EXTRA", "").split(),
        },
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "sparsekern._C",
        cpu_sources + ["csrc/cuda/not_built.cpp"],
        extra_compile_args={"cxx": cxx_flags + define},
        extra_link_args=["-fopenmp"],
    )
print(f"setup.py: sparsekern._C with CUDA={WITH_CUDA} (CUDA_HOME={CUDA_HOME}, archs={ARCHS if WITH_CUDA else '-'})")

setup(
    name="sparsekern",
    version=_version(),
    description="Kernels and tools that turn neural-network pruning into real speed",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    entry_points={"console_scripts": ["sparsekern=sparsekern.__main__:main"]},
)
