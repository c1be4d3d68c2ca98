"""Triton nm_linear: y = x @ W^T + b with W in N:M format (sparsekern/formats.py).

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Per K step it rebuilds the dense
[BLOCK_N, BLOCK_K] weight tile in registers from the kept values and their packed in-group
indices (N compare-selects per element; the loads hit L1 since each slot is read M times
from the same lines), then multiplies on the tensor cores with tl.dot. Bytes read from
memory are the compressed ones: 56.25% of dense for 2:4 in bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..patterns import nm_index_bits
from ._common import batch_bucket, dot_meta, linear_configs, mma, run_linear


@triton.autotune(configs=linear_configs(), key=["N", "K", "M_BUCKET"])
@triton.jit
def _nm_linear_kernel(
    x_ptr, values_ptr, indices_ptr, bias_ptr, y_ptr,  # x [M, K], values [N, KEPT], indices [N, IDX_BYTES]
    M, N, K, KEPT, IDX_BYTES, M_BUCKET,
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,  # the pattern NN:MM, bits per index
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        group = rk // MM
        within = rk % MM
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ok = n_ok[:, None] & k_ok[None, :]
        for t in tl.static_range(NN):
            slot = group * NN + t
            bit = slot * BITS
            packed = tl.load(indices_ptr + rn[:, None] * IDX_BYTES + (bit // 8)[None, :], mask=ok, other=0)
            idx = (packed.to(tl.int32) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
            val = tl.load(values_ptr + rn[:, None] * KEPT + slot[None, :], mask=ok, other=0.0)
            w = tl.where(idx == within[None, :], val.to(tl.float32), w)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += mma(x, tl.trans(w), PRECISION, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton_op("sparsekern_triton::nm_linear", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    N = values.shape[0]

    def launch(x2, y, M, K, bm):
        def grid(meta):
            return (triton.cdiv(M, bm), triton.cdiv(N, meta["BLOCK_N"]))

        wrap_triton(_nm_linear_kernel)[grid](
            x2, values.contiguous(), indices.contiguous(), bias if bias is not None else x2, y,
            M, N, K, values.shape[1], indices.shape[1], batch_bucket(M),
            NN=n, MM=m, BITS=nm_index_bits(m), HAS_BIAS=bias is not None, **dot_meta(x.dtype),
            BLOCK_M=bm, BLOCK_K=64)

    return run_linear(x, N, launch)


