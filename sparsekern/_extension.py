"""Loads sparsekern._C and says what it holds and what can run here.

`import sparsekern` never fails because the extension is missing or was built for
another torch: the pure-torch references still work, one warning says why, and
`python -m sparsekern info` shows it.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

LOADED = False
LOAD_ERROR: str | None = None
BUILD_INFO: dict = {}


def _load() -> None:
    global LOADED, LOAD_ERROR, BUILD_INFO
    try:
        if os.environ.get("SPARSEKERN_DISABLE_EXTENSION", "0") not in ("", "0"):
            raise ImportError("disabled by SPARSEKERN_DISABLE_EXTENSION=1")
        from sparsekern import _C  # noqa: F401  (registers torch.ops.sparsekern.*)

        info = json.loads(torch.ops.sparsekern.build_info())
    except (ImportError, OSError, RuntimeError, AttributeError) as e:
        LOAD_ERROR = f"sparsekern._C could not be loaded ({type(e).__name__}: {e})"
    else:
        BUILD_INFO = info
        built_for = info.get("torch_version", "?")
        if built_for.split("+")[0] != torch.__version__.split("+")[0]:
            LOAD_ERROR = f"sparsekern._C was built for torch {built_for} but torch {torch.__version__} is running"
        else:
            LOADED = True
    if LOAD_ERROR:
        warnings.warn(
            f"{LOAD_ERROR}; using the pure-torch reference paths (slow). Rebuild with "
            "`pip install --no-build-isolation -e .`; `python -m sparsekern info` shows details.",
            RuntimeWarning,
            stacklevel=3,
        )


def kept_call_check(fields: tuple):
    """sparsekern._C.kept_call_fresh(kept, x, bias) when the extension is loaded and reads a
    record whose fields start with the ones it names (sparsekern.nn's _KeptCall: `fields`),
    else None (the caller checks in Python)."""
    if not LOADED:
        return None
    from sparsekern import _C

    check = getattr(_C, "kept_call_fresh", None)
    read = getattr(_C, "KEPT_CALL_FIELDS", None)
    return check if read is not None and tuple(fields[:len(read)]) == read else None


def cuda_archs() -> list[str]:
    return [a for a in BUILD_INFO.get("cuda_archs", "").replace(",", ";").split(";") if a]


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("80", "90a") runs on a GPU of `capability`.

    Binary code runs on the same major version with an equal or higher minor version;
    the "a" (architecture-specific) targets run only on exactly that chip.
    """
    digits = arch.rstrip("af")
    major, minor = int(digits[:-1]), int(digits[-1])
    if arch.endswith(("a", "f")):
        return capability == (major, minor) if arch.endswith("a") else capability[0] == major and capability[1] >= minor
    return capability[0] == major and capability[1] >= minor


def cpu_kernels_available() -> bool:
    return LOADED


def cuda_kernels_available(device: torch.device | None = None) -> bool:
    if not (LOADED and BUILD_INFO.get("with_cuda") and torch.cuda.is_available()):
        return False
    cap = torch.cuda.get_device_capability(device)
    return any(arch_runs_on(a, cap) for a in cuda_archs())


_TRITON_INSTALLED: bool | None = None


def triton_installed() -> bool:
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        import importlib.util

        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    return _TRITON_INSTALLED


def triton_available() -> bool:
    """Triton is installed and has somewhere to run: a CUDA GPU, or the interpreter."""
    return triton_installed() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


_load()
