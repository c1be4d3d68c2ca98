"""Triton bitmask_linear: y = x @ W^T + b with W in the tiled bitmask format.

"Load as sparse, compute as dense": per K step of 64 columns each weight row's 64-bit mask
word is expanded on chip into a [BLOCK_N, 64] tile; a kept element's value sits at the
row's running count plus its rank among the word's set bits (an exclusive prefix sum of
the bits), so only kept values are read from memory (compressed-domain loads: the addresses
of a row are one contiguous run). The tile then goes to tl.dot. Values of a row are
contiguous and in column order, so the running count starts at the row's first offset and
grows by each word's popcount. Offsets are int64. Block shapes: _common.linear_config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import autotune_configs, autotuning, batch_bucket, dot_meta, linear_config, mma, run_linear


@triton.jit
def _bitmask_linear_kernel(
    x_ptr, values_ptr, bitmask_ptr, offsets_ptr, bias_ptr, y_ptr,  # bitmask [N, WORDS] int64, offsets [N, TILES]
    M, N, K, WORDS, TILES, M_BUCKET,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K: unused (a K step is one 64-bit word)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    xrow = x_ptr + rm.to(tl.int64)[:, None] * K
    lane = tl.arange(0, 64)
    run = tl.load(offsets_ptr + rn64 * TILES, mask=n_ok, other=0).to(tl.int64)  # first value of each row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for wi in range(0, WORDS):
        word = tl.load(bitmask_ptr + rn64 * WORDS + wi, mask=n_ok, other=0)
        bits = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1).to(tl.int32)
        rank = tl.cumsum(bits, axis=1) - bits
        keep = (bits != 0) & n_ok[:, None]
        w = tl.load(values_ptr + run[:, None] + rank.to(tl.int64), mask=keep, other=0.0)
        rk = wi * 64 + lane
        x = tl.load(xrow + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
        run += tl.sum(bits, axis=1).to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_bitmask_linear_tuned = triton.autotune(configs=autotune_configs(), key=["N", "K", "M_BUCKET"])(_bitmask_linear_kernel)


@triton_op("sparsekern_triton::bitmask_linear", mutates_args=())
def _bitmask_linear_op(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, offsets: torch.Tensor,
                       in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    N = bitmask.shape[0]

    def launch(x2, y, M, K, bm):
        args = (x2, values if values.numel() else x2, bitmask.contiguous(), offsets.contiguous(),
                bias if bias is not None else x2, y, M, N, K, bitmask.shape[1], offsets.shape[1], batch_bucket(M))
        meta = dict(HAS_BIAS=bias is not None, **dot_meta(x.dtype), BLOCK_M=bm)
        if autotuning():
            wrap_triton(_bitmask_linear_tuned)[lambda c: (triton.cdiv(M, bm), triton.cdiv(N, c["BLOCK_N"]))](
                *args, **meta)
        else:
            cfg = linear_config(M)
            wrap_triton(_bitmask_linear_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, cfg["BLOCK_N"]))](
                *args, **meta, **cfg)

    return run_linear(x, N, launch)
