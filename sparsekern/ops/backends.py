"""The backends: one object each, asked in the order of dispatch_rules.BACKEND_ORDER.

Each answers three questions with None (yes) or the reason (no), which explain_backend prints:
  implements(spec)                     does it have a kernel for the op at all
  available(device, dtype)             can it run on these tensors, with this build, here
  supports(spec, key, device, dtype)   can it take these arguments (pattern, shape, blocks)
and `run(spec)` returns the callable that runs the op's shared schema (`cpu_run(spec)` the
CPU-only op with the C++ kernel's own arguments). Whether a backend that can run should
(measured timings, batch rules) is the decision module's question: `prefers_not`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _extension
from .. import dispatch_rules as rules
from .table import OpSpec


def _below_autograd_unless_needed(op: Callable) -> Callable:
    """Calls `op`, entering its (Python) autograd kernel only when a gradient can flow.

    The autograd kernel registered by torch.library costs ~6 us per call even when it
    just redispatches; skipping it when grad mode is off or no input requires grad does
    what it would do, for a third of a decode kernel's time. Under torch.compile the op
    is called as is (the compiler handles autograd)."""
    def call(*args):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    call.op = op  # the op itself, for callers that know no gradient flows (ops.LinearCall)
    return call


class Backend:
    name = ""
    label = ""  # what the decision's reason says when this backend runs
    # Its quantized ops quantize x per row themselves (an int8 GEMM): ops passes x unrounded
    # where int8 activations are asked for (rules.q_activations_int8).
    quantizes_activations = False

    def implements(self, spec: OpSpec) -> bool:
        raise NotImplementedError

    def available(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in rules.KERNEL_DTYPES:
            return f"{dtype} has no compiled kernel (the reference is the float64 oracle)"
        return None

    def supports(self, spec: OpSpec, key, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def prefers_not(self, spec: OpSpec, key, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the measured timings or the decision rules pass over this backend (a
        preference: a forced backend is never passed over for it)."""
        return None

    def why_not(self, spec: OpSpec, key, device, dtype) -> str | None:
        """None when this backend can run `spec` on these tensors, else why not."""
        if not self.implements(spec):
            return f"{spec.name} has no {self.name} kernel"
        return self.available(device, dtype) or self.supports(spec, key, device, dtype)

    def _op(self, name: str):
        raise NotImplementedError

    def run(self, spec: OpSpec) -> Callable:
        op = self._op(spec.name)
        return _below_autograd_unless_needed(op) if spec.differentiable else op

    def cpu_run(self, spec: OpSpec) -> Callable | None:
        return None


class Reference(Backend):
    name, label = "reference", "pure-torch reference"

    def implements(self, spec):
        return True

    def available(self, device, dtype):
        return None

    def run(self, spec):
        return spec.reference


class Cpp(Backend):
    name, label = "cpp", "compiled C++ kernel"

    def implements(self, spec):
        return spec.cpp

    def available(self, device, dtype):
        if why := super().available(device, dtype):
            return why
        if device.type != "cpu":
            return f"C++ kernels run on CPU tensors, not {device.type}"
        return None if _extension.cpu_kernels_available() else (_extension.LOAD_ERROR or "extension not loaded")

    def _op(self, name):
        return getattr(torch.ops.sparsekern, name).default

    def cpu_run(self, spec):
        if spec.cpu_op is None:
            return None
        op = self._op(spec.cpu_op)
        return _below_autograd_unless_needed(op) if spec.differentiable else op


def _measured(spec: OpSpec, backend: str, key, device, dtype) -> str | None:
    bucket = getattr(key, "bucket", None)
    return rules.measured_verdict(spec.name, backend, torch.cuda.get_device_name(device), dtype, bucket,
                                  getattr(key, "out_in", None), rules.BACKEND_ORDER["cuda"])


class Cuda(Backend):
    name, label = "cuda", "compiled CUDA kernel for this GPU"

    def implements(self, spec):
        return spec.cuda

    def available(self, device, dtype):
        if why := super().available(device, dtype):
            return why
        if device.type != "cuda":
            return f"CUDA kernels run on CUDA tensors, not {device.type}"
        if not _extension.LOADED:
            return _extension.LOAD_ERROR or "extension not loaded"
        if not _extension.BUILD_INFO.get("with_cuda"):
            return "extension built without CUDA"
        if not _extension.cuda_kernels_available(device):
            return (f"CUDA kernels built for sm_{_extension.cuda_archs()} do not run on compute capability "
                    f"{torch.cuda.get_device_capability(device)}")
        return None

    def prefers_not(self, spec, key, device, dtype):
        return rules.cuda_kernel_verdict(spec.name, torch.cuda.get_device_name(device), dtype,
                                         getattr(key, "bucket", None), getattr(key, "out_in", None),
                                         rules.BACKEND_ORDER["cuda"])

    def _op(self, name):
        return getattr(torch.ops.sparsekern, name).default


class Triton(Backend):
    name, label = "triton", "Triton kernel"

    def implements(self, spec):
        return spec.triton is not None

    def available(self, device, dtype):
        if why := super().available(device, dtype):
            return why
        if not _extension.triton_installed():
            return "Triton is not installed"
        from ..triton import interpreting

        if device.type == "cpu" and not interpreting():
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"no Triton kernels for device type {device.type}"
        return None

    def supports(self, spec, key, device, dtype):
        return spec.triton_limit(key) if spec.triton_limit is not None else None

    def prefers_not(self, spec, key, device, dtype):
        return _measured(spec, self.name, key, device, dtype) if device.type == "cuda" else None

    def run(self, spec):
        from .registration import load_triton

        load_triton(spec.triton)
        return super().run(spec)

    def _op(self, name):
        return getattr(torch.ops.sparsekern_triton, name).default


class SemiStructured(Backend):
    """cuSPARSELt or CUTLASS: torch's 2:4 sparse tensor-core GEMMs (sparsekern/semi_structured.py)."""

    def __init__(self, name: str, label: str, quantizes_activations: bool = False):
        self.name, self.label, self.quantizes_activations = name, label, quantizes_activations

    def implements(self, spec):
        return spec.semi_structured

    def available(self, device, dtype):
        if why := super().available(device, dtype):
            return why
        if device.type != "cuda":
            return f"{self.name} runs on CUDA tensors, not {device.type}"
        return None

    def supports(self, spec, key, device, dtype):
        if key.shape is None:
            return "needs the weight to decide (pattern and shape): pass it to explain_backend"
        from .. import semi_structured

        return semi_structured.why_not_key(spec.name, self.name, device, dtype, key)

    def prefers_not(self, spec, key, device, dtype):
        return rules.semi_structured_verdict(spec.name, self.name, torch.cuda.get_device_name(device), dtype,
                                             key.bucket, key.out_in, rules.BACKEND_ORDER["cuda"])

    def run(self, spec):
        from .registration import load_semi_structured

        load_semi_structured()
        return super().run(spec)

    def _op(self, name):
        return getattr(getattr(torch.ops, f"sparsekern_{self.name}"), name).default


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Cpp(),
    SemiStructured("cusparselt", "cuSPARSELt 2:4 GEMM on the sparse tensor cores",
                   quantizes_activations=True),  # nm_linear_q's int8 GEMM (semi_structured.int8_rows_linear)
    SemiStructured("cutlass", "CUTLASS 2:4 GEMM on the sparse tensor cores"),
    Cuda(),
    Triton(),
    Reference(),
)}
