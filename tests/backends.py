"""Which (device, backend) pairs the op tests run on this machine, and a runner that
asserts the backend it asked for is the one that ran.

CPU tensors: "cpp" (when the extension is loaded: in CI it must be, see test_extension)
and "reference"; "triton" only through the interpreter (TRITON_INTERPRET=1, tests/
conftest.py sets it on machines without a GPU), kept to tests/test_triton.py since the
interpreter is slow. CUDA tensors, when there is a GPU: "cuda", "triton", "reference".
A pair the op does not implement is left out; a pair it implements but cannot run here
is a skip with the reason.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from sparsekern import _extension, ops
from sparsekern.triton import interpreting

HAS_GPU = torch.cuda.is_available()


def _why_skip(device: str, backend: str) -> str | None:
    if device == "cuda" and not HAS_GPU:
        return "no CUDA GPU"
    if backend == "cpp" and not _extension.LOADED:
        return f"extension not loaded: {_extension.LOAD_ERROR}"
    if backend == "cuda" and not (HAS_GPU and _extension.cuda_kernels_available()):
        return "CUDA kernels not built for this GPU"
    if backend == "triton":
        if not _extension.triton_installed():
            return "Triton not installed"
        if device == "cpu" and (HAS_GPU or not interpreting()):
            return "Triton on CPU tensors only runs in the interpreter on machines without a GPU"
    return None


def pairs(op: str, backends=("cpp", "cuda", "triton", "reference"), devices=("cpu", "cuda")):
    """pytest params (device, backend) for `op`, over the backends it implements. Triton runs
    on CUDA tensors here (its CPU interpreter cases stay in tests/test_triton.py: slow)."""
    spec = ops.OPS[op]
    out = []
    for device in devices:
        for backend in backends:
            if device == "cpu" and backend in ("cuda", "triton") or device == "cuda" and backend == "cpp":
                continue
            implemented = backend == "reference" or getattr(spec, backend) not in (False, None)
            if not implemented:
                continue
            why = _why_skip(device, backend)
            marks = [pytest.mark.skip(reason=why)] if why else []
            out.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return out


@contextlib.contextmanager
def running(backend: str, op: str, *key_args):
    """Forces `backend` and asserts, before the body runs, that the dispatch table picks it
    for `op` on these arguments (the decision the call itself reads)."""
    with ops.use_backend(backend):
        ran, why = ops.explain_backend(op, *key_args)
        assert ran == backend, f"{op}: asked for {backend}, dispatch says {ran} ({why})"
        yield
