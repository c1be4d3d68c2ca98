"""Triton block_linear: y = x @ W^T + b with W in BSR format, square blocks of 16, 32 or 64.

A program owns BLOCK_M rows of x and one block row of W (bh outputs) and walks only that
block row's kept blocks (crow_indices[i]:crow_indices[i+1]): each is one tl.dot of the x
tile [BLOCK_M, bw] at the block's columns with the [bh, bw] block. Zero blocks cost nothing.
Offsets are int64 (M*K, M*N and nnz_blocks*bh*bw may pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import dot_meta, mma, run_linear

SUPPORTED_BLOCKS = (16, 32, 64)


@triton.jit
def _block_linear_kernel(
    x_ptr, crow_ptr, col_ptr, values_ptr, bias_ptr, y_ptr,  # values [NNZB, BH, BW]
    M, N, K,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    pid_m = tl.program_id(0)
    br = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    ri = tl.arange(0, BH)
    rj = tl.arange(0, BW)
    start = tl.load(crow_ptr + br)
    end = tl.load(crow_ptr + br + 1)
    acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
    for blk in range(start, end):
        c = tl.load(col_ptr + blk)
        # blk counts in int64 (it runs over crow_indices, an int64 tensor)
        w = tl.load(values_ptr + blk * (BH * BW) + ri[:, None] * BW + rj[None, :])
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + (c * BW + rj)[None, :], mask=m_ok[:, None], other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    rn = br * BH + ri
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton_op("sparsekern_triton::block_linear", mutates_args=())
def _block_linear_op(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                     in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    nbr, bh, bw = crow_indices.shape[0] - 1, values.shape[1], values.shape[2]

    def launch(x2, y, M, K, bm):
        wrap_triton(_block_linear_kernel)[(triton.cdiv(M, bm), nbr)](
            x2, crow_indices.contiguous(), col_indices.contiguous(), values.contiguous() if values.numel() else x2,
            bias if bias is not None else x2, y, M, nbr * bh, K,
            HAS_BIAS=bias is not None, **dot_meta(x.dtype), BLOCK_M=bm, BH=bh, BW=bw,
            num_warps=4 if bh * bw <= 1024 else 8)

    return run_linear(x, nbr * bh, launch)


