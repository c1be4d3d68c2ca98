"""Triton fused scoring ops for the pruning toolkit (references: sparsekern/reference.py).

  group_score           score e = |w| * |grad| * act_norm[col], reduced per (br, bc) group with
                       L1 (sum) or L2 (sqrt of the sum of squares) in one pass over the weight
  act_norm_accumulate  sumsq[j] += sum x[..., j]^2, one pass over the activations
  nm_score_compress    score -> N:M selection -> compressed values + packed indices in one pass
                       over the weight (plus a pass over the 1-byte-per-slot indices to pack them)

Row offsets (row * K) are int64; launches go to the tensors' GPU (on_device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..patterns import nm_index_bits
from ._common import on_device

TILE_R, TILE_C = 32, 64


@triton.jit
def _score(w_ptr, g_ptr, an_ptr, rr, cc, ok, K, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr):
    e = tl.abs(tl.load(w_ptr + rr * K + cc, mask=ok, other=0.0).to(tl.float32))
    if HAS_GRAD:
        e = e * tl.abs(tl.load(g_ptr + rr * K + cc, mask=ok, other=0.0).to(tl.float32))
    if HAS_ACT:
        e = e * tl.load(an_ptr + cc, mask=ok, other=0.0).to(tl.float32)
    return e


@triton.jit
def _group_score_kernel(w_ptr, g_ptr, an_ptr, out_ptr, R, K, BR, BC, NBC,
                       P: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
                       TR: tl.constexpr, TC: tl.constexpr):
    r = tl.program_id(0) * TR + tl.arange(0, TR)
    c = tl.program_id(1) * TC + tl.arange(0, TC)
    ok = (r[:, None] < R) & (c[None, :] < K)
    e = _score(w_ptr, g_ptr, an_ptr, r.to(tl.int64)[:, None], c[None, :], ok, K, HAS_GRAD, HAS_ACT)
    if P == 2:
        e = e * e
    if TILE_IN_GROUP:  # the whole tile lies in one group: reduce on chip, one atomic
        gid = (tl.program_id(0) * TR // BR) * NBC + tl.program_id(1) * TC // BC
        tl.atomic_add(out_ptr + gid, tl.sum(tl.sum(e, axis=1), axis=0))
    else:
        gid = (r[:, None] // BR) * NBC + c[None, :] // BC
        tl.atomic_add(out_ptr + gid, e, mask=ok)


@triton_op("sparsekern_triton::group_score", mutates_args=())
def _group_score_op(weight: torch.Tensor, grad: torch.Tensor | None, act_norm: torch.Tensor | None, block_rows: int,
                   block_cols: int, p: int) -> torch.Tensor:
    R, K = weight.shape
    out = torch.zeros(R // block_rows, K // block_cols, device=weight.device, dtype=torch.float32)
    if weight.numel():
        in_group = block_rows % TILE_R == 0 and block_cols % TILE_C == 0
        w = weight.contiguous()
        with on_device(w):
            _launch_group_score(w, grad, act_norm, out, R, K, block_rows, block_cols, p, in_group)
    return out.sqrt() if p == 2 else out


def _launch_group_score(w, grad, act_norm, out, R, K, block_rows, block_cols, p, in_group):
    wrap_triton(_group_score_kernel)[(triton.cdiv(R, TILE_R), triton.cdiv(K, TILE_C))](
        w, grad.contiguous() if grad is not None else w, act_norm.contiguous() if act_norm is not None else w, out,
        R, K, block_rows, block_cols, K // block_cols, P=p, HAS_GRAD=grad is not None,
        HAS_ACT=act_norm is not None, TILE_IN_GROUP=in_group, TR=TILE_R, TC=TILE_C)


@triton.jit
def _act_norm_kernel(sumsq_ptr, x_ptr, R, K, TR: tl.constexpr, TC: tl.constexpr):
    c = tl.program_id(0) * TC + tl.arange(0, TC)
    acc = tl.zeros((TC,), dtype=tl.float32)
    for r0 in range(0, R, TR):
        r = r0 + tl.arange(0, TR)
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * K + c[None, :], mask=(r[:, None] < R) & (c[None, :] < K),
                    other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    old = tl.load(sumsq_ptr + c, mask=c < K, other=0.0)
    tl.store(sumsq_ptr + c, old + acc.to(old.dtype), mask=c < K)


@triton_op("sparsekern_triton::act_norm_accumulate", mutates_args=("sumsq",))
def _act_norm_op(sumsq: torch.Tensor, x: torch.Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0]:
        with on_device(x2):
            wrap_triton(_act_norm_kernel)[(triton.cdiv(x2.shape[1], 128),)](sumsq, x2, x2.shape[0], x2.shape[1],
                                                                           TR=32, TC=128)


@triton.jit
def _nm_select_kernel(w_ptr, g_ptr, an_ptr, values_ptr, slots_ptr, R, K, KEPT,
                      NN: tl.constexpr, MM: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_ACT: tl.constexpr,
                      BR: tl.constexpr, BG: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BG * MM + tl.arange(0, BG * MM)
    ok = (r[:, None] < R) & (c[None, :] < K)
    r64 = r.to(tl.int64)
    w = tl.load(w_ptr + r64[:, None] * K + c[None, :], mask=ok, other=0.0)
    e = _score(w_ptr, g_ptr, an_ptr, r64[:, None], c[None, :], ok, K, HAS_GRAD, HAS_ACT)
    s = tl.reshape(e, (BR, BG, MM))
    j = tl.arange(0, MM)[None, None, :]
    sel = tl.zeros((BR, BG, MM), dtype=tl.int32)
    for t in tl.static_range(NN):  # n rounds of "largest remaining, lowest column on ties"
        mx = tl.max(s, axis=2)
        first = tl.min(tl.where(s == mx[:, :, None], j, MM), axis=2)
        pick = j == first[:, :, None]
        sel = tl.where(pick, 1, sel)
        s = tl.where(pick, -1.0, s)
    rank = tl.cumsum(sel, axis=2) - sel  # slot within the group, in column order
    g = tl.program_id(1) * BG + tl.arange(0, BG)[None, :, None]
    slot = g * NN + rank
    keep = (sel != 0) & tl.reshape(ok, (BR, BG, MM))
    rr = r64[:, None, None]
    tl.store(values_ptr + rr * KEPT + slot, tl.reshape(w, (BR, BG, MM)), mask=keep)
    tl.store(slots_ptr + rr * KEPT + slot, (j + 0 * slot).to(tl.uint8), mask=keep)


@triton.jit
def _pack_kernel(slots_ptr, idx_ptr, R, KEPT, NBYTES, BITS: tl.constexpr, TB: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * TB + tl.arange(0, TB)
    acc = tl.zeros((TB,), dtype=tl.int32)
    for s in tl.static_range(8 // BITS):
        slot = b * (8 // BITS) + s
        v = tl.load(slots_ptr + r * KEPT + slot, mask=(slot < KEPT) & (b < NBYTES), other=0).to(tl.int32)
        acc = acc | (v << (s * BITS))
    tl.store(idx_ptr + r * NBYTES + b, acc.to(tl.uint8), mask=b < NBYTES)


@triton_op("sparsekern_triton::nm_score_compress", mutates_args=())
def _nm_score_compress_op(weight: torch.Tensor, grad: torch.Tensor | None, act_norm: torch.Tensor | None, n: int,
                          m: int) -> tuple[torch.Tensor, torch.Tensor]:
    R, K = weight.shape
    kept = K // m * n
    bits = nm_index_bits(m)
    nbytes = (kept * bits + 7) // 8
    values = torch.empty(R, kept, device=weight.device, dtype=weight.dtype)
    slots = torch.empty(R, kept, device=weight.device, dtype=torch.uint8)
    indices = torch.empty(R, nbytes, device=weight.device, dtype=torch.uint8)
    if R and K:
        w = weight.contiguous()
        bg = 16
        with on_device(w):
            _launch_nm_score(w, grad, act_norm, values, slots, indices, R, K, kept, n, m, bits, nbytes, bg)
    return values, indices


def _launch_nm_score(w, grad, act_norm, values, slots, indices, R, K, kept, n, m, bits, nbytes, bg):
    wrap_triton(_nm_select_kernel)[(triton.cdiv(R, 16), triton.cdiv(K // m, bg))](
        w, grad.contiguous() if grad is not None else w, act_norm.contiguous() if act_norm is not None else w,
        values, slots, R, K, kept, NN=n, MM=m, HAS_GRAD=grad is not None, HAS_ACT=act_norm is not None,
        BR=16, BG=bg)
    wrap_triton(_pack_kernel)[(R, triton.cdiv(nbytes, 128))](slots, indices, R, kept, nbytes, BITS=bits, TB=128)
