"""Triton backends of masked fine-tuning: cuBLAS products around one Triton masking kernel.

  forward      y  = x @ (W*M)^T + b     W*M made by _apply_bitmask_kernel, then F.linear (cuBLAS)
  grad_input   gx = g @ (W*M)           the same masked copy, then matmul
  grad_weight  gw = (g^T @ x) * M       the cuBLAS product, masked in place

The mask is the packed bitmask [out, ceil(in/64)] (bit j of word w is column 64w+j). A
program of the masking kernel takes BLOCK_R rows x one 64-bit word of columns: one word
load per row, the row's 64 elements read and written once (int64 offsets). Against the GEMM
of a training batch the extra pass over the weight is a few percent (docs/GPU_KERNELS.md).

The fused kernels (the tile expanded with its mask word inside a tl.dot loop, W*M never
materialised) are kept as `fused_forward`, `fused_grad_input`, `fused_grad_weight` for the
GPU benchmark, which decides whether one of them beats cuBLAS; they are not registered ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import dot_meta, flatten_x, mma, on_device, out_like, run_linear

BLOCK_R = 32


@triton.jit
def _apply_bitmask_kernel(w_ptr, bitmask_ptr, out_ptr, N, K, WORDS, BLOCK_R: tl.constexpr):
    """out[r, c] = w[r, c] if bit c of row r is set else 0, for BLOCK_R rows x 64 columns."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    wi = tl.program_id(1)
    lane = tl.arange(0, 64)
    rk = wi * 64 + lane
    r_ok = r < N
    r64 = r.to(tl.int64)
    word = tl.load(bitmask_ptr + r64 * WORDS + wi, mask=r_ok, other=0)
    keep = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1) != 0
    ok = r_ok[:, None] & (rk[None, :] < K)
    offs = r64[:, None] * K + rk[None, :]
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, tl.where(keep, w, tl.zeros_like(w)), mask=ok)


def _mask_into(w: torch.Tensor, bitmask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = w * M (out may be w itself: each element is read, then written, by one program)."""
    N, K = w.shape
    if w.numel():
        with on_device(w):
            wrap_triton(_apply_bitmask_kernel)[(triton.cdiv(N, BLOCK_R), bitmask.shape[1])](
                w, bitmask.contiguous(), out, N, K, bitmask.shape[1], BLOCK_R=BLOCK_R)
    return out


def masked_weight(weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    w = weight.contiguous()
    return _mask_into(w, bitmask, torch.empty_like(w))


@triton_op("sparsekern_triton::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, masked_weight(weight, bitmask), bias)


@triton_op("sparsekern_triton::masked_linear_grad_input", mutates_args=())
def _masked_linear_grad_input_op(grad_out: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    return torch.matmul(grad_out, masked_weight(weight, bitmask))


@triton_op("sparsekern_triton::masked_linear_grad_weight", mutates_args=())
def _masked_linear_grad_weight_op(grad_out: torch.Tensor, x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    g2, x2 = flatten_x(grad_out), flatten_x(x)
    gw = (g2.t() @ x2.to(g2.dtype)).contiguous()
    return _mask_into(gw, bitmask, gw).to(x.dtype)


# ------------------------------------------------------- fused kernels (benchmark only)
@triton.jit
def _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS):
    """[BLOCK_N, 64] tile of W*M at columns [64*wi, 64*wi + 64)."""
    lane = tl.arange(0, 64)
    rk = wi * 64 + lane
    rn64 = rn.to(tl.int64)
    word = tl.load(bitmask_ptr + rn64 * WORDS + wi, mask=n_ok, other=0)
    keep = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1) != 0
    return tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=keep & n_ok[:, None] & (rk[None, :] < K), other=0.0)


@triton.jit
def _fused_fwd_kernel(x_ptr, w_ptr, bitmask_ptr, bias_ptr, y_ptr, M, N, K, WORDS,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for wi in range(0, WORDS):
        w = _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS)
        rk = wi * 64 + tl.arange(0, 64)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K),
                    other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fused_grad_input_kernel(g_ptr, w_ptr, bitmask_ptr, gx_ptr, M, N, K, WORDS, PRECISION: tl.constexpr,
                             DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    wi = tl.program_id(1)
    rk = wi * 64 + tl.arange(0, 64)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        w = _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS)
        g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += mma(g, w, PRECISION, DOT_F32)
    tl.store(gx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rk[None, :] < K))


@triton.jit
def _fused_grad_weight_kernel(g_ptr, x_ptr, bitmask_ptr, gw_ptr, M, N, K, WORDS, PRECISION: tl.constexpr,
                              DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.program_id(1)
    lane = tl.arange(0, 64)
    rk = wi * 64 + lane
    n_ok, k_ok = rn < N, rk < K
    acc = tl.zeros((BLOCK_N, 64), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        g = tl.load(g_ptr + rm64[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm64[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += mma(tl.trans(g), x, PRECISION, DOT_F32)
    rn64 = rn.to(tl.int64)
    word = tl.load(bitmask_ptr + rn64 * WORDS + wi, mask=n_ok, other=0)
    keep = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1) != 0
    acc = tl.where(keep, acc, 0.0)
    tl.store(gw_ptr + rn64[:, None] * K + rk[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


def fused_forward(x, weight, bitmask, bias=None):
    """x @ (W*M)^T + b in one Triton kernel (benchmark candidate, not dispatched)."""
    N = weight.shape[0]

    def launch(x2, y, M, K, bm):
        _fused_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, 32))](
            x2, weight.contiguous(), bitmask.contiguous(), bias if bias is not None else x2, y, M, N, K,
            bitmask.shape[1], HAS_BIAS=bias is not None, **dot_meta(x.dtype), BLOCK_M=bm, BLOCK_N=32)

    return run_linear(x, N, launch)


def fused_grad_input(grad_out, weight, bitmask):
    K = weight.shape[1]

    def launch(g2, gx, M, N, bm):
        _fused_grad_input_kernel[(triton.cdiv(M, bm), bitmask.shape[1])](
            g2, weight.contiguous(), bitmask.contiguous(), gx, M, N, K, bitmask.shape[1],
            **dot_meta(grad_out.dtype), BLOCK_M=bm, BLOCK_N=32)

    return run_linear(grad_out, K, launch)


def fused_grad_weight(grad_out, x, bitmask):
    g2, x2 = flatten_x(grad_out), flatten_x(x)
    M, N = g2.shape
    K = x2.shape[1]
    gw = out_like(x2, N, K)
    if N > 0 and K > 0:
        with on_device(x2):
            _fused_grad_weight_kernel[(triton.cdiv(N, 32), bitmask.shape[1])](
                g2, x2, bitmask.contiguous(), gw, M, N, K, bitmask.shape[1], **dot_meta(x.dtype),
                BLOCK_M=32, BLOCK_N=32)
    return gw.to(x.dtype)
