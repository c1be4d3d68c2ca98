"""Triton masked_linear for masked fine-tuning, without materialising W*M:

  forward      y  = x @ (W*M)^T + b     tiles of W expanded with their mask word, tl.dot
  grad_input   gx = g @ (W*M)           same expansion, K tiles as outputs
  grad_weight  gw = (g^T @ x) * M       the mask applied as the tile is stored

The mask is the packed bitmask [out, ceil(in/64)] (bit j of word w is column 64w+j); K
steps are one 64-bit word wide. Autograd: forward saves x, W and the bitmask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import dot_meta, flatten_x, mma, out_like, run_linear


@triton.jit
def _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS):
    """[BLOCK_N, 64] tile of W*M at columns [64*wi, 64*wi + 64)."""
    lane = tl.arange(0, 64)
    rk = wi * 64 + lane
    word = tl.load(bitmask_ptr + rn * WORDS + wi, mask=n_ok, other=0)
    keep = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1) != 0
    return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=keep & n_ok[:, None] & (rk[None, :] < K), other=0.0)


@triton.jit
def _masked_linear_fwd_kernel(x_ptr, w_ptr, bitmask_ptr, bias_ptr, y_ptr, M, N, K, WORDS,
                              HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for wi in range(0, WORDS):
        w = _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS)
        rk = wi * 64 + tl.arange(0, 64)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _masked_linear_grad_input_kernel(g_ptr, w_ptr, bitmask_ptr, gx_ptr, M, N, K, WORDS, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    wi = tl.program_id(1)
    rk = wi * 64 + tl.arange(0, 64)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        w = _masked_tile(w_ptr, bitmask_ptr, rn, n_ok, wi, K, WORDS)
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += mma(g, w, PRECISION, DOT_F32)
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rk[None, :] < K))


@triton.jit
def _masked_linear_grad_weight_kernel(g_ptr, x_ptr, bitmask_ptr, gw_ptr, M, N, K, WORDS, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.program_id(1)
    lane = tl.arange(0, 64)
    rk = wi * 64 + lane
    n_ok, k_ok = rn < N, rk < K
    acc = tl.zeros((BLOCK_N, 64), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += mma(tl.trans(g), x, PRECISION, DOT_F32)
    word = tl.load(bitmask_ptr + rn * WORDS + wi, mask=n_ok, other=0)
    keep = ((word[:, None] >> lane[None, :].to(tl.int64)) & 1) != 0
    acc = tl.where(keep, acc, 0.0)
    tl.store(gw_ptr + rn[:, None] * K + rk[None, :], acc.to(gw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton_op("sparsekern_triton::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    N = weight.shape[0]

    def launch(x2, y, M, K, bm):
        wrap_triton(_masked_linear_fwd_kernel)[(triton.cdiv(M, bm), triton.cdiv(N, 32))](
            x2, weight.contiguous(), bitmask.contiguous(), bias if bias is not None else x2, y, M, N, K,
            bitmask.shape[1], HAS_BIAS=bias is not None, **dot_meta(x.dtype), BLOCK_M=bm, BLOCK_N=32)

    return run_linear(x, N, launch)


@triton_op("sparsekern_triton::masked_linear_grad_input", mutates_args=())
def _masked_linear_grad_input_op(grad_out: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    K = weight.shape[1]

    def launch(g2, gx, M, N, bm):  # here the "input" is grad_out [M, N] and the output gx [M, K]
        wrap_triton(_masked_linear_grad_input_kernel)[(triton.cdiv(M, bm), bitmask.shape[1])](
            g2, weight.contiguous(), bitmask.contiguous(), gx, M, N, K, bitmask.shape[1],
            **dot_meta(grad_out.dtype), BLOCK_M=bm, BLOCK_N=32)

    return run_linear(grad_out, K, launch)


@triton_op("sparsekern_triton::masked_linear_grad_weight", mutates_args=())
def _masked_linear_grad_weight_op(grad_out: torch.Tensor, x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    g2, x2 = flatten_x(grad_out), flatten_x(x)
    M, N = g2.shape
    K = x2.shape[1]
    gw = out_like(x2, N, K)
    if N > 0 and K > 0:
        wrap_triton(_masked_linear_grad_weight_kernel)[(triton.cdiv(N, 32), bitmask.shape[1])](
            g2, x2, bitmask.contiguous(), gw, M, N, K, bitmask.shape[1], **dot_meta(x.dtype),
            BLOCK_M=32, BLOCK_N=32)
    return gw.to(x.dtype)


