"""Triton kernels: the GPU path that runs wherever Triton runs, and the one CI tests on
the CPU through the interpreter (TRITON_INTERPRET=1, set before this package is imported).

One file per op family, each op registered with torch.library.triton_op under the
`sparsekern_triton` namespace, with a fake kernel:

  nm_linear.py       nm_linear       N:M weight decompressed in registers, then tl.dot
  bitmask_linear.py  bitmask_linear  bitmask expanded on chip ("load as sparse, compute as dense")
  block_linear.py    block_linear    BSR, skipping zero blocks (block 16, 32, 64)
  masked_linear.py   masked_linear (+ grad_input, grad_weight) for masked fine-tuning
  scoring.py         group_norm, act_norm_accumulate, nm_score_compress (+ nm_pack_indices)

Layouts: sparsekern/formats.py. sparsekern.ops routes CUDA tensors here when the CUDA C++
kernel is not built for the GPU (or the op has none); the functions below can also be
called directly.
"""
from __future__ import annotations

import os


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_loaded = None


def kernels():
    """Imports (once) and returns the module namespace with every Triton op wrapper."""
    global _loaded
    if _loaded is None:
        from . import bitmask_linear, block_linear, masked_linear, nm_linear, scoring  # noqa: F401
        from types import SimpleNamespace

        _loaded = SimpleNamespace(
            nm_linear=nm_linear.nm_linear, bitmask_linear=bitmask_linear.bitmask_linear,
            block_linear=block_linear.block_linear, masked_linear=masked_linear.masked_linear,
            masked_linear_grad_input=masked_linear.masked_linear_grad_input,
            masked_linear_grad_weight=masked_linear.masked_linear_grad_weight,
            group_norm=scoring.group_norm, act_norm_accumulate=scoring.act_norm_accumulate,
            nm_score_compress=scoring.nm_score_compress)
    return _loaded
