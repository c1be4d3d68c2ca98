"""Triton nm_linear: y = x @ W^T + b with W in N:M format (sparsekern/formats.py).

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Per K step of BLOCK_K dense columns
(G = BLOCK_K / M groups) it loads the weight in the compressed domain, as the CUDA decode
kernel does: G-wide loads of the kept values and of their packed indices per row (M times
fewer load instructions than one per dense element), rebuilds the dense [BLOCK_N, BLOCK_K]
tile in registers by comparing each slot's index with the group's M positions, and
multiplies on the tensor cores with tl.dot. 2:4 takes a fast path: the two values of a
group are one contiguous load of 2G values split in two, and one index byte serves two
groups. Bytes read from memory are the compressed ones: 56.25% of dense for 2:4 in bf16.
Offsets are int64 (M*K and N*KEPT may pass 2^31). Block shapes: _common.linear_config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..patterns import nm_index_bits
from ._common import autotune_configs, autotuning, batch_bucket, dot_meta, linear_config, mma, run_linear


@triton.jit
def _nm_linear_kernel(
    x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,  # x [M, K], values [N, KEPT], indices [N, IDX_BYTES]
    M, N, K, KEPT, IDX_BYTES, M_BUCKET,  # M_BUCKET: the autotune key's batch bucket
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,  # the pattern NN:MM, bits per index
    PAIR: tl.constexpr,  # 2:4 fast path
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    G: tl.constexpr = BLOCK_K // MM  # groups per K step
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    vrow = values_ptr + rn.to(tl.int64)[:, None] * KEPT  # [BLOCK_N, 1] row starts
    irow = indices_ptr + rn.to(tl.int64)[:, None] * IDX_BYTES
    xrow = x_ptr + rm.to(tl.int64)[:, None] * K
    j = tl.arange(0, MM)[None, None, :]
    zero = tl.zeros((BLOCK_N, G, MM), dtype=values_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // MM + tl.arange(0, G)
        ok = n_ok[:, None] & (g < K // MM)[None, :]
        if PAIR:
            s = k0 // 2 + tl.arange(0, 2 * G)
            vals = tl.load(vrow + s[None, :], mask=n_ok[:, None] & (s < KEPT)[None, :], other=0.0)
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))
            byte = tl.load(irow + (g // 2)[None, :], mask=ok, other=0).to(tl.int32)
            nib = (byte >> ((g % 2) * 4)[None, :]) & 15
            w3 = tl.where(j == (nib & 3)[:, :, None], v0[:, :, None], zero)
            w3 = tl.where(j == (nib >> 2)[:, :, None], v1[:, :, None], w3)
        else:
            w3 = zero
            for t in tl.static_range(NN):
                slot = g * NN + t
                val = tl.load(vrow + slot[None, :], mask=ok, other=0.0)
                bit = slot * BITS
                packed = tl.load(irow + (bit // 8)[None, :], mask=ok, other=0).to(tl.int32)
                idx = (packed >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
                w3 = tl.where(j == idx[:, :, None], val[:, :, None], w3)
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xrow + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_nm_linear_tuned = triton.autotune(configs=autotune_configs(), key=["N", "K", "M_BUCKET"])(_nm_linear_kernel)


@triton_op("sparsekern_triton::nm_linear", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    N = values.shape[0]

    def launch(x2, y, M, K, bm):
        args = (x2, values.contiguous(), indices.contiguous(), bias if bias is not None else x2, y,
                M, N, K, values.shape[1], indices.shape[1], batch_bucket(M))
        meta = dict(NN=n, MM=m, BITS=nm_index_bits(m), PAIR=(n == 2 and m == 4), HAS_BIAS=bias is not None,
                    **dot_meta(x.dtype), BLOCK_M=bm)
        if autotuning():
            wrap_triton(_nm_linear_tuned)[lambda c: (triton.cdiv(M, bm), triton.cdiv(N, c["BLOCK_N"]))](*args, **meta)
        else:
            cfg = linear_config(M)
            wrap_triton(_nm_linear_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, cfg["BLOCK_N"]))](*args, **meta, **cfg)

    return run_linear(x, N, launch)
