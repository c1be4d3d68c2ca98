"""Pure-torch references for every sparsekern op.

One module serves three roles: the fallback when a compiled kernel cannot run, the
oracle the tests compare against (call with float64 tensors for an fp64 reference),
and the baseline the benchmarks time. Each function has the same name, arguments and
results as its op in `torch.ops.sparsekern` (schemas in csrc/sparsekern.cpp), and the
same tensor layouts, documented in sparsekern/formats.py.

Everything here is plain differentiable torch and runs on any device and dtype.
"""
from __future__ import annotations

import torch

from .patterns import (BITMASK_TILE_COLS, NM24_PANEL_KT, NM24_PANEL_ROWS, check_nm24_panels, from_2d, nm_index_bits,
                       pack_bitmask, pack_bits, unpack_bitmask, unpack_bits)


# ---------------------------------------------------------------------------- helpers
def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- N:M
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask keeping the n largest |w| of each group of m along the input
    dimension; ties go to the lower column."""
    out, k = weight.shape
    g = weight.abs().reshape(out, k // m, m)
    # Each value's rank in its group: how many of the group beat it (larger, or equal at a
    # lower column), in m passes over byte-sized temporaries, where a stable sort's int64
    # indices took 2 x the weight's fp32 bytes (sparsify's peak memory per layer).
    # (a NaN ranks above every number, as in a descending sort; the formats reject it later)
    g = g.nan_to_num_(nan=float("inf")) if g.is_floating_point() else g
    rank = torch.zeros(out, k // m, m, dtype=torch.uint8, device=weight.device)
    for j in range(m):
        other = g[..., j:j + 1]
        beats = other > g
        beats[..., j + 1:] |= other == g[..., j + 1:]
        rank += beats
    return (rank < n).reshape(out, k)


def nm_compress(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int):
    out, k = weight.shape
    if mask is None:
        mask = nm_mask(weight, n, m)
    g = mask.reshape(out, k // m, m)
    if bool((g.sum(-1) > n).any()):
        raise ValueError(f"nm_compress: mask is not {n}:{m} (some group keeps more than {n} of {m})")
    # Kept positions first, in column order, then unused ones (padding, stored as 0).
    first = torch.sort((~g).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    order = torch.sort(first, dim=-1).values
    vals = weight.reshape(out, k // m, m).gather(-1, order) * g.gather(-1, order)
    values = vals.reshape(out, -1).to(weight.dtype)
    indices = pack_bits(order.reshape(out, -1), nm_index_bits(m))
    return values, indices


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    out, kept = values.shape
    idx = unpack_bits(indices, nm_index_bits(m), kept).reshape(out, -1, n)
    dense = torch.zeros(out, in_features // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(out, -1, n))
    return dense.reshape(out, in_features)


def nm_linear(x, values, indices, n: int, m: int, in_features: int, bias=None, panels=None):
    # `panels` (NMWeight.gemm_panels) only feeds a CPU kernel; checked, the result is the same.
    check_nm24_panels(x, n, m, values.shape[0], in_features, panels)
    return _linear(x, nm_decompress(values, indices, n, m, in_features), bias)


def nm24_pack_panels(values, indices, in_features: int) -> torch.Tensor:
    """A 2:4 weight in the pre-packed layout of csrc/nm24_panels.h, built with torch ops
    (the C++ op's twin: tests compare the bytes)."""
    out, kept = values.shape
    kt = NM24_PANEL_KT
    k_tiles, blocks = -(-in_features // kt), -(-out // 3)
    slots = k_tiles * kt // 2
    s = torch.arange(slots, device=values.device)
    k0 = (s // (kt // 2)) * kt  # first column of each slot's K tile
    cols = torch.full((blocks * 3, slots), in_features, dtype=torch.int64, device=values.device)  # past the row: column K
    cols[:out, :kept] = (s[:kept] // 2) * 4 + unpack_bits(indices, 2, kept)
    cols[out:] = k0  # rows past `out`: the K tile's first column, value 0
    vals = torch.zeros(blocks * 3, slots, dtype=torch.float32, device=values.device)
    vals[:out, :kept] = values.float()
    off = ((cols - k0) << 8).to(torch.int32).to(torch.int16)  # uint16 bits (at most 127 << 8 here)
    quads = kt // 8
    # [blocks, 3 rows, k_tiles, quads, 4 slots] -> [blocks, k_tiles, quads, 3, 4]
    def by_quad(t):
        return t.view(blocks, 3, k_tiles, quads, 4).permute(0, 2, 3, 1, 4).contiguous()
    quad = torch.cat([by_quad(off).view(torch.uint8).view(blocks, k_tiles, quads, 24),
                      by_quad(vals).view(torch.uint8).view(blocks, k_tiles, quads, 48)], dim=-1)
    # Quads that start past the row's last slot are zero (nothing reads them).
    first_slot = (torch.arange(k_tiles, device=values.device)[:, None] * (kt // 2) +
                  torch.arange(quads, device=values.device)[None, :] * 4)
    quad[:, first_slot >= kept] = 0
    per_panel = NM24_PANEL_ROWS // 3
    parts = [quad[b0:b0 + per_panel].transpose(0, 1).reshape(-1) for b0 in range(0, blocks, per_panel)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=values.device)


def nm_conv2d(x, values, indices, n: int, m: int, weight_shape, stride, padding, dilation, bias=None, panels=None):
    """The convolution with the N:M weight [out, kh*kw*in] (patterns.as_2d layout). `panels`
    (NMWeight.gemm_panels) only feeds a CPU kernel; checked, the result is the same."""
    check_nm24_panels(x, n, m, values.shape[0], values.shape[1] // n * m, panels, op="nm_conv2d")
    w = from_2d(nm_decompress(values, indices, n, m, values.shape[1] // n * m), tuple(weight_shape))
    return torch.nn.functional.conv2d(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                      tuple(stride), tuple(padding), tuple(dilation))


# ----------------------------------------------------------- quantized values
def _dequant_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 for the oracle (q * s exactly), float32 otherwise (as the kernels compute it)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def nm_q_values(values, scales, kept: int, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """The [out, kept] float values of an N:M weight's quantized values (sparsekern/precisions.py
    layouts): bits 8 int8 [out, kept] * scales [out]; bits 4 nibbles (low first, stored q + 8)
    [out, ceil(kept / 2)] * scales [out, ceil(kept / group_size)]. Computed in `dtype`."""
    if bits == 8:
        return values.to(dtype) * scales.to(dtype)[:, None]
    b = values.to(torch.int32)
    q = torch.stack([b & 15, b >> 4], -1).reshape(values.shape[0], -1)[:, :kept] - 8
    s = scales.to(dtype).repeat_interleave(group_size, 1)[:, :kept]
    return q.to(dtype) * s


def nm_linear_q(x, values, indices, scales, n: int, m: int, in_features: int, bits: int, group_size: int,
                bias=None):
    """nm_linear with quantized values: the weight dequantized (fp32, fp64 for an fp64 x), then x @ W^T + b."""
    kept = in_features // m * n
    w = nm_q_values(values, scales, kept, bits, group_size, _dequant_dtype(x))
    return _linear(x, nm_decompress(w, indices, n, m, in_features), bias)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8-valued [..., K] in x's dtype, scale [..., 1]): symmetric per row,
    scale = max|x| / 127, q = round-half-even(x * (127 / max|x|)) in [-127, 127], computed in
    float32 as csrc/cpu/nm_gemm_int8.h does (a row of zeros: q = 0, scale 0)."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    # a tensor division (127.0 / amax would be amax.reciprocal() * 127, rounded twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp(-127, 127)
    return q, amax / 127.0


def _int8_rows_dot(x, w, row_scales, bias):
    """The int8 GEMMs' math: x quantized per row (quantize_rows_int8), times the dense fp64
    weight w [out, in] (int8-valued, or already scaled) summed exactly, times x's row scales
    and `row_scales` [out] (None: w is scaled), + bias; in x's dtype."""
    q, xs = quantize_rows_int8(x)
    y = (q.double() @ w.T) * xs.double()
    if row_scales is not None:
        y = y * row_scales.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def nm_linear_q_int8_dot(x, values, indices, scales, n: int, m: int, in_features: int, bias=None):
    """nm_linear_q with int8 values as the int8 dot-product GEMM computes it: x quantized per
    row (quantize_rows_int8), products summed exactly (fp64), times x's and the weight row's
    scales, + bias; in x's dtype."""
    kept = in_features // m * n
    w = nm_decompress(nm_q_values(values, torch.ones_like(scales), kept, 8, 0, torch.float64), indices, n, m,
                      in_features)
    return _int8_rows_dot(x, w, scales, bias)


def nm_linear_q_int4_dot(x, values, indices, scales, n: int, m: int, in_features: int, group_size: int,
                         bias=None):
    """nm_linear_q with int4 values as the int8 dot-product GEMM computes it: x quantized per
    row (quantize_rows_int8), each group's products summed exactly and times its scale (fp64:
    a nibble times an fp32 scale, and sums of such products, are exact or nearly so), times x's
    row scale, + bias; in x's dtype."""
    kept = in_features // m * n
    w = nm_decompress(nm_q_values(values, scales, kept, 4, group_size, torch.float64), indices, n, m, in_features)
    return _int8_rows_dot(x, w, None, bias)


def nm_linear_q_dot(x, values, indices, scales, n: int, m: int, in_features: int, bits: int, group_size: int,
                    bias=None):
    """The 2:4 int8 dot-product GEMM's math for either value precision (arguments in
    NMWeight.kernel_args() order): nm_linear_q_int8_dot or nm_linear_q_int4_dot."""
    if bits == 8:
        return nm_linear_q_int8_dot(x, values, indices, scales, n, m, in_features, bias)
    return nm_linear_q_int4_dot(x, values, indices, scales, n, m, in_features, group_size, bias)


def bitmask_q_values(values, bitmask, scales, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """The [nnz] float values of a bitmask weight's int8 values (one scale per output row)."""
    rows_of = unpack_bitmask(bitmask, in_features).nonzero()[:, 0]
    return values.to(dtype) * scales.to(dtype)[rows_of]


def bitmask_linear_q(x, values, bitmask, offsets, scales, in_features: int, bias=None):
    """bitmask_linear with int8 values and a float32 scale per output row."""
    w = bitmask_q_values(values, bitmask, scales, in_features, _dequant_dtype(x))
    return _linear(x, bitmask_decompress(w, bitmask, offsets, in_features), bias)


def bitmask_linear_q_int8_dot(x, values, bitmask, offsets, scales, in_features: int, bias=None):
    """bitmask_linear_q as its int8 GEMM computes it (dispatch_rules.Q_ALGO_INT8_EXPAND): x
    quantized per row (quantize_rows_int8), products summed exactly (fp64), times x's and the
    weight row's scales, + bias; in x's dtype."""
    return _int8_rows_dot(x, bitmask_decompress(values.to(torch.float64), bitmask, offsets, in_features), scales, bias)


def block_q_values(crow_indices, values, scales, dtype=torch.float32) -> torch.Tensor:
    """The float values [blocks, bh, bw] of a block weight's int8 values (one scale per output row)."""
    bh = values.shape[1]
    rows = torch.repeat_interleave(torch.arange(crow_indices.numel() - 1, device=values.device),
                                   crow_indices.diff(), output_size=values.shape[0])
    return values.to(dtype) * scales.to(dtype).view(-1, bh)[rows][:, :, None]


def block_linear_q(x, crow_indices, col_indices, values, scales, in_features: int, bias=None):
    """block_linear with int8 values and a float32 scale per output row."""
    w = block_q_values(crow_indices, values, scales, _dequant_dtype(x))
    return block_linear(x, crow_indices, col_indices, w, in_features, bias)


def block_linear_q_int8_dot(x, crow_indices, col_indices, values, scales, in_features: int, bias=None):
    """block_linear_q as its int8 GEMM computes it (dispatch_rules.Q_ALGO_INT8_EXPAND): x
    quantized per row (quantize_rows_int8), products summed exactly (fp64), times x's and the
    weight row's scales, + bias; in x's dtype."""
    w = block_decompress(crow_indices, col_indices, values.to(torch.float64), in_features)
    return _int8_rows_dot(x, w, scales, bias)


# ------------------------------------------------------------------------- bitmask
def bitmask_compress(weight: torch.Tensor, mask: torch.Tensor | None):
    out, k = weight.shape
    keep = weight != 0 if mask is None else mask
    values = weight[keep]  # row-major order: row, then column
    tiles = -(-k // BITMASK_TILE_COLS)
    pad = tiles * BITMASK_TILE_COLS - k
    counts = torch.nn.functional.pad(keep.to(torch.int64), (0, pad)).view(out, tiles, -1).sum(-1).reshape(-1)
    offsets = (torch.cumsum(counts, 0) - counts).view(out, tiles).to(torch.int32)
    return values, pack_bitmask(keep), offsets


def bitmask_decompress(values, bitmask, offsets, in_features: int) -> torch.Tensor:
    keep = unpack_bitmask(bitmask, in_features)
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense


def bitmask_linear(x, values, bitmask, offsets, in_features: int, bias=None, columns=None):
    # `columns` (BitmaskWeight.column_index) only speeds up a CPU kernel; the result is the same.
    return _linear(x, bitmask_decompress(values, bitmask, offsets, in_features), bias)


# --------------------------------------------------------------------------- block
def block_compress(weight: torch.Tensor, mask: torch.Tensor | None, block_rows: int, block_cols: int):
    out, k = weight.shape
    nbr, nbc = out // block_rows, k // block_cols
    keep = weight != 0 if mask is None else mask
    w = weight if mask is None else weight.masked_fill(~mask, 0)
    block_keep = keep.reshape(nbr, block_rows, nbc, block_cols).any(3).any(1)
    crow = torch.zeros(nbr + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = block_keep.sum(1).cumsum(0)
    nz = block_keep.nonzero()
    blocks = w.reshape(nbr, block_rows, nbc, block_cols).permute(0, 2, 1, 3)
    return crow, nz[:, 1].contiguous(), blocks[nz[:, 0], nz[:, 1]].contiguous()


def block_decompress(crow_indices, col_indices, values, in_features: int) -> torch.Tensor:
    nbr = crow_indices.numel() - 1
    _, bh, bw = values.shape
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), crow_indices.diff())
    dense = torch.zeros(nbr, in_features // bw, bh, bw, dtype=values.dtype, device=values.device)
    dense[rows, col_indices] = values
    return dense.permute(0, 2, 1, 3).reshape(nbr * bh, in_features)


def block_linear(x, crow_indices, col_indices, values, in_features: int, bias=None):
    return _linear(x, block_decompress(crow_indices, col_indices, values, in_features), bias)


# -------------------------------------------------------------------------- masked
def masked_linear(x, weight, bitmask, bias=None):
    return _linear(x, weight * unpack_bitmask(bitmask, weight.shape[1]).to(weight.dtype), bias)


def masked_linear_grad_input(grad_out, weight, bitmask):
    wm = weight * unpack_bitmask(bitmask, weight.shape[1]).to(weight.dtype)
    return grad_out @ wm.to(grad_out.dtype)


# ------------------------------------------------------------ scoring (pruning toolkit)
def element_score(weight, grad=None, act_norm=None) -> torch.Tensor:
    """e = |w| * |grad| * act_norm[col] in float32 (float64 for float64 weights), the
    precision the compiled scoring ops use, so both pick the same elements."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    e = weight.to(dt).abs()
    if grad is not None:
        e = e * grad.to(dt).abs()
    if act_norm is not None:
        e = e * act_norm.to(dt)
    return e


def group_score(weight, grad, act_norm, block_rows: int, block_cols: int, p: int) -> torch.Tensor:
    out, k = weight.shape
    e = element_score(weight, grad, act_norm).double().reshape(out // block_rows, block_rows, k // block_cols, block_cols)
    r = e.sum((1, 3)) if p == 1 else e.square().sum((1, 3)).sqrt()
    return r.float()


def act_norm_accumulate(sumsq: torch.Tensor, x: torch.Tensor) -> None:
    sumsq += x.reshape(-1, x.shape[-1]).double().square().sum(0).to(sumsq.dtype)


def nm_score_compress(weight, grad, act_norm, n: int, m: int):
    return nm_compress(weight, nm_mask(element_score(weight, grad, act_norm), n, m), n, m)


def hessian_accumulate(hessian: torch.Tensor, x: torch.Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1]).to(hessian.dtype)
    hessian += x2.t() @ x2


def masked_linear_grad_weight(grad_out, x, bitmask):
    """(grad_out^T @ x) * M: masked_linear's weight gradient, [out, in] in x's dtype."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return (g2.t() @ x2.to(g2.dtype)) * unpack_bitmask(bitmask, x.shape[-1]).to(g2.dtype)
