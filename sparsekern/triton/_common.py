"""Shared launch helpers for the Triton kernels: the device guard, block shapes from a
heuristic table (at most four autotune candidates, opt-in), and the linear-op shell.

Offsets: kernels build every pointer offset that multiplies a row index by a row length
(x, y, weights) in int64, so tensors past 2^31 elements (batch 70000 x 32768) stay in range.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import interpreting


def on_device(t: torch.Tensor):
    """Launches go to the tensor's GPU, whatever the current device is (Triton launches on the
    current one): a no-op context for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def block_m(batch: int) -> int:
    """Rows of x per program: tl.dot needs at least 16; decode batches pad to 16."""
    return 16 if batch <= 16 else (32 if batch <= 32 else 64)


# --------------------------------------------------------- block shapes (heuristics)
# One row per batch bucket (rows of x, upper edge): BLOCK_N, BLOCK_K, num_warps, num_stages.
# Decode (few rows) wants many programs over N with deep pipelines (memory bound); larger
# batches want wider tiles (the weight tile is reused by more rows). Predictions, to be
# replaced by measured rows (bench/bench_gpu_linear.py times each candidate; the GPU session
# updates this table).
LINEAR_TABLE = {
    16: (32, 64, 4, 4),
    64: (64, 64, 4, 3),
    256: (128, 64, 8, 3),
    -1: (128, 64, 8, 3),
}
AUTOTUNE_ENV = "SPARSEKERN_TRITON_AUTOTUNE"  # "1": time the candidates below once per key


def linear_config(m: int) -> dict:
    """Block shape and launch parameters for a linear kernel with `m` rows of x."""
    for edge in (16, 64, 256):
        if m <= edge:
            bn, bk, w, s = LINEAR_TABLE[edge]
            break
    else:
        bn, bk, w, s = LINEAR_TABLE[-1]
    if interpreting():  # the interpreter runs one program at a time: small blocks, no pipelining
        return {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}


def autotune_configs() -> list:
    """At most four candidates (the table's distinct rows), for SPARSEKERN_TRITON_AUTOTUNE=1."""
    seen = []
    for bn, bk, w, s in LINEAR_TABLE.values():
        c = (bn, bk, w, s)
        if c not in seen:
            seen.append(c)
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in seen[:4]]


def autotuning() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1" and not interpreting()


def batch_bucket(m: int) -> int:
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def flatten_x(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def out_like(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Output buffer in x's dtype; fp32 for bf16 under the interpreter, whose fp32 -> bf16
    conversion truncates instead of rounding to nearest (doubling the error): `unflatten`
    then rounds with torch."""
    dtype = torch.float32 if (x.dtype == torch.bfloat16 and interpreting()) else x.dtype
    return torch.empty(rows, cols, device=x.device, dtype=dtype)


def unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def dot_f32(dtype: torch.dtype) -> bool:
    """Multiply in fp32: always for fp32 inputs, and for bf16 under the interpreter, whose
    tl.dot on bf16 operands returns garbage (seen with Triton 3.8 on the CPU)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def dot_meta(dtype: torch.dtype) -> dict:
    """The PRECISION and DOT_F32 kernel arguments for inputs of `dtype` (see mma)."""
    return {"PRECISION": dot_precision(dtype), "DOT_F32": dot_f32(dtype)}


def run_linear(x: torch.Tensor, n_out: int, launch) -> torch.Tensor:
    """Shared shell of the linear-type ops: x [..., K] -> x2 [M, K], an output y [M, n_out],
    launch(x2, y, M, K, block_m) on x's device when there is work, then y back to
    [..., n_out] in x's dtype."""
    x2 = flatten_x(x)
    M, K = x2.shape
    y = out_like(x2, M, n_out)
    if M > 0 and n_out > 0:
        with on_device(x2):
            launch(x2, y, M, K, block_m(M))
    return unflatten(y, x)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 keeps IEEE products (1e-5 accuracy); tf32 would give ~3e-4.
    return "ieee" if dot_f32(dtype) else "tf32"


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_F32 multiplies in fp32 (see dot_f32)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b.to(a.dtype), input_precision=PRECISION)
