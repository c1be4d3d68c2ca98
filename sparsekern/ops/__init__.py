"""The one door to the kernels: every op's checks, backend choice, fake kernel and autograd.

Each public function here checks its arguments once (clear exceptions that name the op
and the argument, whatever backend then runs), asks the dispatch table which backend
runs these tensors, and calls it. Backends of an op, in the order they are tried
(sparsekern/dispatch_rules.py BACKEND_ORDER):

  CPU tensors:  "cpp"       compiled C++ kernel (sparsekern._C, csrc/cpu/)
                "reference" pure torch (sparsekern/reference.py)
  CUDA tensors: "cusparselt" 2:4 bf16/fp16 nm_linear at large batch: cuSPARSELt's sparse
                            tensor-core GEMM on a cached converted weight; 2:4 int8
                            nm_linear_q the same in int8 where SPARSEKERN_Q_ACT=int8
                "cutlass"   the same through torch's CUTLASS 2:4 GEMM (sparsekern/semi_structured.py)
                "cuda"      compiled CUDA kernel, when built for this GPU's architecture
                "triton"    Triton kernel (sparsekern/triton/)
                "reference"
  float64 always runs the reference (the oracle's precision).

The package, by job:
  checks.py        argument checks (public: formats and prune check with the same words)
  table.py         `OPS` (one `OpSpec` per op) and each op's typed dispatch key
  backends.py      one object per backend: implements / available / supports / run
  dispatch.py      the cached decision, `explain_backend`, `use_backend`
  public.py        the public ops
  registration.py  fake kernels and autograd, registered on every namespace

Every rule, threshold and noise margin behind a decision is in sparsekern/dispatch_rules.py.
A decision is made once per (op, device, dtype, key) and cached; `explain_backend(op, *args)`
reads the very same decision the call uses. `use_backend(name)` forces a backend inside a
`with` block: ops that have that backend must run it (or raise, saying why it cannot run
here); ops without it choose as usual.

CPU-only arguments (the C++ kernel's algorithm, the pre-packed 2:4 weight, the bitmask column
index) are not in the shared schemas: the C++ backend passes them through the CPU-only ops
`nm_linear_cpu`, `nm_conv2d_cpu` and `bitmask_linear_cpu` (`OpSpec.cpu_op`).

This package reads format objects (sparsekern/formats.py) only through what they declare
(`OP`, `kernel_args()`), so it does not import them: formats sit above ops and compress
through it.
"""
from __future__ import annotations

import sys
import types

from .. import dispatch_rules
from ..dispatch_rules import BATCH_BUCKETS, KERNEL_DTYPES, batch_bucket
from . import registration  # noqa: F401  (registers fakes and autograd)
from .backends import BACKENDS as _BACKEND_OBJECTS
from .checks import (check_bias, check_bitmask, check_dense_weight, check_finite, check_format, check_mask,
                     check_masked_weight, check_score_inputs, check_x)
from .dispatch import Decision, backend_for, clear_decisions, explain_backend, use_backend
from .public import (act_norm_accumulate, bitmask_compress, bitmask_decompress, bitmask_linear, block_compress,
                     block_decompress, block_linear, block_linear_q, bitmask_linear_q, group_score, hessian_accumulate,
                     keeping_derived_changes_call, masked_linear,
                     masked_linear_grad_input, masked_linear_grad_weight, nm24_pack_panels, nm_compress, nm_conv2d,
                     nm_decompress, nm_linear, nm_linear_q, nm_score_compress, rounds_activations, sparse_linear,
                     sparse_linear_call, LinearCall)
from .table import OPS, OpSpec

BACKENDS = tuple(_BACKEND_OBJECTS)

__all__ = [
    "BACKENDS", "BATCH_BUCKETS", "KERNEL_DTYPES", "OPS", "Decision", "OpSpec", "act_norm_accumulate",
    "backend_for", "batch_bucket", "bitmask_compress", "bitmask_decompress", "bitmask_linear", "bitmask_linear_q",
    "block_compress",
    "block_decompress", "block_linear", "block_linear_q", "check_bias", "check_bitmask", "check_dense_weight", "check_finite",
    "check_format", "check_mask", "check_masked_weight", "check_score_inputs", "check_x", "clear_decisions",
    "explain_backend", "group_score", "hessian_accumulate", "masked_linear", "masked_linear_grad_input",
    "masked_linear_grad_weight", "nm24_pack_panels", "nm_compress", "nm_conv2d", "nm_decompress", "nm_linear",
    "nm_linear_q",
    "nm_score_compress", "rounds_activations", "sparse_linear", "sparse_linear_call", "LinearCall", "use_backend",
]


def _rule(name: str) -> property:
    return property(lambda self: getattr(dispatch_rules, name),
                    lambda self, value: setattr(dispatch_rules, name, value))


class _Ops(types.ModuleType):
    """`ops.CPU_GEMM_PANELS` and the column-index limits read and set the one copy in
    sparsekern/dispatch_rules.py (older callers set them here)."""

    CPU_GEMM_PANELS = _rule("CPU_GEMM_PANELS")
    COLUMN_INDEX_MAX_DENSITY = _rule("COLUMN_INDEX_MAX_DENSITY")
    COLUMN_INDEX_MAX_DENSITY_AVX2 = _rule("COLUMN_INDEX_MAX_DENSITY_AVX2")


sys.modules[__name__].__class__ = _Ops
