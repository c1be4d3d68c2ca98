"""Triton backends: the GPU path that runs wherever Triton runs, and the one CI tests on
the CPU through the interpreter (TRITON_INTERPRET=1, set before a kernel module is
imported).

One module per op family; each registers its ops with torch.library.triton_op under the
`sparsekern_triton` namespace and holds nothing else (no argument checks, fakes or autograd:
sparsekern.ops defines those once per op and registers them on every backend).
quantize_rows.py registers nothing: its kernels are launched inside another op.

  nm_linear.py       nm_linear       N:M weight decompressed in registers, then tl.dot
  bitmask_linear.py  bitmask_linear  bitmask expanded on chip ("load as sparse, compute as dense")
  block_linear.py    block_linear    BSR, skipping zero blocks (square blocks of SUPPORTED_BLOCKS)
  linear_q.py        nm_linear_q, bitmask_linear_q   int8/int4 values dequantized in registers
  quantize_rows.py   quantize_rows_int8, int8_rows_epilogue   the passes around the int8 GEMM
                     on cuSPARSELt (semi_structured.py)
  masked_linear.py   masked_linear, masked_linear_grad_input, masked_linear_grad_weight
  scoring.py         group_score, act_norm_accumulate, nm_score_compress

Layouts: sparsekern/formats.py. Call these through sparsekern.ops (`use_backend("triton")`
forces them); this package imports nothing from sparsekern but `patterns`.
"""
from __future__ import annotations

import importlib
import os

FAMILIES = ("nm_linear", "bitmask_linear", "block_linear", "masked_linear", "scoring", "linear_q", "quantize_rows")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def load(family: str):
    """Imports (once) the module of an op family, which registers its triton_ops."""
    if family not in FAMILIES:
        raise ValueError(f"sparsekern.triton.load: unknown family {family!r}; one of {FAMILIES}")
    return importlib.import_module(f"{__name__}.{family}")
