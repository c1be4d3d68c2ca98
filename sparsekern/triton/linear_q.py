"""Triton nm_linear_q and bitmask_linear_q: y = x @ W^T + b with W's kept values stored int8
(N:M also int4, two per byte) and dequantized in registers (layouts: sparsekern/precisions.py,
sparsekern/formats.py).

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Per K step it loads the weight in the
compressed, quantized domain: the stored bytes of each kept value (int8, or the byte holding
its nibble), its scale (int8: the row's, loaded once; int4: its group's) and its in-group
index (N:M) or mask bit (bitmask); rebuilds the dense fp32 [BLOCK_N, BLOCK_K] tile in
registers as the fp kernels do (nm_linear.py, bitmask_linear.py) and multiplies with tl.dot
(fp32 accumulation). Bytes read from memory are the packed ones. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..patterns import nm_index_bits
from ._common import dot_meta, linear_config, mma, run_linear


@triton.jit
def _nm_linear_q_kernel(
    x_ptr, values_ptr, indices_ptr, scales_ptr, bias_ptr, y_ptr,  # values [N, VAL_BYTES] int8/uint8
    M, N, K, KEPT, VAL_BYTES, IDX_BYTES, GROUPS, GROUP_SIZE,  # scales [N] (int8) or [N, GROUPS] (int4)
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,  # the pattern NN:MM, bits per index
    VBITS: tl.constexpr,  # 8: int8 values, 4: two int4 per byte (low nibble first, stored q + 8)
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
    rn64 = rn.to(tl.int64)
    vrow = values_ptr + rn64[:, None] * VAL_BYTES
    irow = indices_ptr + rn64[:, None] * IDX_BYTES
    xrow = x_ptr + rm.to(tl.int64)[:, None] * K
    j = tl.arange(0, MM)[None, None, :]
    zero = tl.zeros((BLOCK_N, G, MM), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // MM + tl.arange(0, G)
        ok = n_ok[:, None] & (g < K // MM)[None, :]
        w3 = zero
        for t in tl.static_range(NN):
            slot = g * NN + t
            if VBITS == 8:
                q = tl.load(vrow + slot[None, :], mask=ok, other=0).to(tl.float32)
            else:
                byte = tl.load(vrow + (slot // 2)[None, :], mask=ok, other=8).to(tl.int32)
                q = (((byte >> ((slot % 2) * 4)[None, :]) & 15) - 8).to(tl.float32)
                s = tl.load(scales_ptr + rn64[:, None] * GROUPS + (slot // GROUP_SIZE)[None, :], mask=ok, other=0.0)
                q = q * s
            bit = slot * BITS
            packed = tl.load(irow + (bit // 8)[None, :], mask=ok, other=0).to(tl.int32)
            idx = (packed >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
            w3 = tl.where(j == idx[:, :, None], q[:, :, None], w3)
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K))
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xrow + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    if VBITS == 8:  # one scale per output row: applied to the finished sums
        acc = acc * tl.load(scales_ptr + rn64, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton_op("sparsekern_triton::nm_linear_q", mutates_args=())
def _nm_linear_q_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor, n: int,
                    m: int, in_features: int, bits: int, group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    N = indices.shape[0]
    kept = in_features // m * n

    def launch(x2, y, M, K, bm):
        cfg = linear_config(M)
        groups = scales.shape[1] if scales.dim() == 2 else 1
        wrap_triton(_nm_linear_q_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, cfg["BLOCK_N"]))](
            x2, values.contiguous(), indices.contiguous(), scales.contiguous(), bias if bias is not None else x2, y,
            M, N, K, kept, values.shape[1], indices.shape[1], groups, max(group_size, 1),
            NN=n, MM=m, BITS=nm_index_bits(m), VBITS=bits, HAS_BIAS=bias is not None, **dot_meta(x.dtype),
            BLOCK_M=bm, **cfg)

    return run_linear(x, N, launch)


@triton.jit
def _bitmask_linear_q_kernel(
    x_ptr, values_ptr, bitmask_ptr, offsets_ptr, scales_ptr, bias_ptr, y_ptr,  # values [nnz] int8, scales [N]
    M, N, K, WORDS, TILES,
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
        w = tl.load(values_ptr + run[:, None] + rank.to(tl.int64), mask=keep, other=0).to(tl.float32)
        rk = wi * 64 + lane
        x = tl.load(xrow + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
        run += tl.sum(bits, axis=1).to(tl.int64)
    acc = acc * tl.load(scales_ptr + rn64, mask=n_ok, other=0.0)[None, :]  # one scale per output row
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton_op("sparsekern_triton::bitmask_linear_q", mutates_args=())
def _bitmask_linear_q_op(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, offsets: torch.Tensor,
                         scales: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    N = bitmask.shape[0]

    def launch(x2, y, M, K, bm):
        cfg = linear_config(M)
        wrap_triton(_bitmask_linear_q_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, cfg["BLOCK_N"]))](
            x2, values if values.numel() else bitmask, bitmask.contiguous(), offsets.contiguous(), scales.contiguous(),
            bias if bias is not None else x2, y, M, N, K, bitmask.shape[1], offsets.shape[1],
            HAS_BIAS=bias is not None, **dot_meta(x.dtype), BLOCK_M=bm, **cfg)

    return run_linear(x, N, launch)
