"""The two passes around nm_linear_q's int8 GEMM on cuSPARSELt (sparsekern/semi_structured.py),
each one kernel: x quantized per row to int8, and the int32 sums' fp32 epilogue. In torch ops
they take about six passes over x and four over the int32 sums (docs/GPU_KERNELS.md).

quantize_rows_int8: the numbers of reference.quantize_rows_int8, bit for bit: per row
amax = max|x| in fp32, inv = 127 / amax (IEEE division, div_rn), q = round-half-even of
x * inv clamped to [-127, 127] (the clamp first, so the multiply cannot be fused into the
rounding's add; rounding by adding and subtracting 1.5 * 2**23, exact for |v| <= 2**22), a
row of zeros gives q = 0 and scale 0. Rows from `rows` up to the padded count are written as
zeros (cuSPARSELt's int8 GEMM takes rows in multiples of 16).

int8_rows_epilogue: y = acc * (s_x[row] * s_w[col]) + bias in fp32, then x's dtype, as the
torch ops compute it; a GPU may contract the multiply and the add into one fused
multiply-add (within one fp32 rounding of the torch ops' result).

Plain kernel launches, not registered ops: they run inside the custom op
sparsekern_cusparselt::nm_linear_q, whose fakes and autograd sparsekern.ops registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import out_like

ROUND_HALF_EVEN = 12582912.0  # 1.5 * 2**23: (v + it) - it rounds |v| <= 2**22 to an even tie
QUANT_BLOCK_K = 512
EPILOGUE_BLOCK_M, EPILOGUE_BLOCK_N = 32, 128


@triton.jit
def _quantize_rows_int8_kernel(x_ptr, q_ptr, s_ptr, ROWS, K, BLOCK_K: tl.constexpr, ROUND: tl.constexpr):
    row = tl.program_id(0)
    live = row < ROWS  # a padding row: zeros
    cols = tl.arange(0, BLOCK_K)
    xrow = x_ptr + row.to(tl.int64) * K
    qrow = q_ptr + row.to(tl.int64) * K
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = (k0 + cols < K) & live
        amax = tl.maximum(amax, tl.abs(tl.load(xrow + k0 + cols, mask=ok, other=0.0).to(tl.float32)))
    m = tl.max(amax, axis=0) + tl.zeros((1,), dtype=tl.float32)
    inv = tl.where(m > 0, tl.math.div_rn(tl.full((1,), 127.0, tl.float32), tl.where(m > 0, m, 1.0)), 0.0)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        v = tl.load(xrow + k0 + cols, mask=ok & live, other=0.0).to(tl.float32)
        c = tl.minimum(tl.maximum(v * inv, -127.0), 127.0)
        tl.store(qrow + k0 + cols, ((c + ROUND) - ROUND).to(tl.int8), mask=ok)
    scale = tl.math.div_rn(m, tl.full((1,), 127.0, tl.float32))
    tl.store(s_ptr + row + tl.arange(0, 1), scale, mask=live)


def quantize_rows_int8(x: torch.Tensor, padded_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (q int8 [padded_rows, K], the padding rows zero; scales fp32 [rows, 1]):
    reference.quantize_rows_int8's numbers, bit for bit (the module's docstring)."""
    rows, k = x.shape
    if padded_rows < rows:
        raise ValueError(f"quantize_rows_int8: padded_rows={padded_rows} is below x's {rows} rows")
    q = torch.empty(padded_rows, k, device=x.device, dtype=torch.int8)
    scales = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if padded_rows and k:
        _quantize_rows_int8_kernel[(padded_rows,)](x.contiguous(), q, scales, rows, k, BLOCK_K=QUANT_BLOCK_K,
                                                   ROUND=ROUND_HALF_EVEN)
    return q, scales


@triton.jit
def _int8_rows_epilogue_kernel(acc_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, ROWS, N, ACC_STRIDE,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < ROWS)[:, None] & (rn < N)[None, :]
    acc = tl.load(acc_ptr + rm.to(tl.int64)[:, None] * ACC_STRIDE + rn[None, :], mask=ok, other=0).to(tl.float32)
    xs = tl.load(xs_ptr + rm, mask=rm < ROWS, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc * (xs[:, None] * ws[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def int8_rows_epilogue(acc: torch.Tensor, x_scales: torch.Tensor, w_scales: torch.Tensor,
                       bias: torch.Tensor | None, dtype_of: torch.Tensor) -> torch.Tensor:
    """acc int32 [rows, N], x_scales fp32 [rows, 1], w_scales [N], bias [N] or None ->
    acc * (x_scales * w_scales) + bias in fp32, then dtype_of's dtype (fp32 for bf16 under the
    interpreter; the caller converts)."""
    if acc.stride(1) != 1:
        acc = acc.contiguous()
    rows, n = acc.shape
    y = out_like(dtype_of, rows, n)
    if rows and n:
        grid = (triton.cdiv(rows, EPILOGUE_BLOCK_M), triton.cdiv(n, EPILOGUE_BLOCK_N))
        _int8_rows_epilogue_kernel[grid](
            acc, x_scales.contiguous(), w_scales.contiguous(), bias if bias is not None else w_scales, y,
            rows, n, acc.stride(0), HAS_BIAS=bias is not None, BLOCK_M=EPILOGUE_BLOCK_M, BLOCK_N=EPILOGUE_BLOCK_N)
    return y
