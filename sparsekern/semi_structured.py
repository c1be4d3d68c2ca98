"""2:4 weights at large batch: the NMWeight layout converted once to the layouts torch's sparse
tensor-core GEMMs read, cached, and run as two backends of nm_linear (and, for int8 values,
cuSPARSELt as a backend of nm_linear_q).

Backends (sparsekern.ops tries them first for bfloat16/float16 2:4 weights on CUDA tensors;
each says why it is skipped: pattern, shape, GPU, torch build here (`why_not`); small batch
and measurements in sparsekern/dispatch_rules.py):

  "cusparselt"  torch._cslt_sparse_mm on torch._cslt_compress(W) (cuSPARSELt; its packed layout
                is opaque and made on the GPU from the dense weight)
  "cutlass"     torch._sparse_semi_structured_mm on (values, meta) (CUTLASS; layout below,
                converted here in pure torch, so the conversion runs and is tested on the CPU)

Both are exposed as custom ops `sparsekern_cusparselt::nm_linear` and
`sparsekern_cutlass::nm_linear` with nm_linear's schema; sparsekern.ops registers the shared
fake kernel and autograd on them (gradients through the same formulas as every backend).

CUTLASS layout for bf16/fp16 (torch.sparse._semi_structured_conversions.
sparse_semi_structured_from_dense_cutlass), for a weight [out, in], out % 32 == 0, in % 64 == 0:
  packed int [out, in/2]: the two kept values of each group of 4 columns, in column order:
          exactly NMWeight.values of a 2:4 weight.
  meta    int16 [out, in/16] before reordering: 4 bits per group (idx0 | idx1 << 2, idx0 < idx1),
          four groups per int16, group g at bits 4*(g % 4): exactly NMWeight.indices (2-bit
          in-group indices, little-endian in each byte) read as little-endian int16. The int16
          elements are then scattered into CUTLASS's ColumnMajorInterleaved<2> order
          (`cutlass_meta_offsets`, CUTLASS's reorder_meta()).
NMWeight pads a group with fewer than 2 kept elements with a zero value at the lowest free
index, so idx0 < idx1 always holds for weights it built; a loaded weight that breaks it is
converted through its dense form instead.

int8 (nm_linear_q, 2:4 int8 values with one scale per output row, where activations are int8:
dispatch_rules.q_activations_int8, on a GPU only with SPARSEKERN_Q_ACT=int8): cuSPARSELt's int8
GEMM through torch._cslt_sparse_mm with int32 output. x is quantized per row as the CPU's int8
GEMMs quantize it (reference.quantize_rows_int8), the int32 sums are exact, and the fp32
epilogue multiplies them by x's row scale and the weight's row scale and adds the bias:
reference.nm_linear_q_int8_dot's math (`int8_rows_linear`, run on the CPU by the tests with
the GEMM emulated). The weight is compressed from its dense int8 form on the GPU
(cusparselt_weight: one int8 copy per values tensor, cached as below).

Caching: a converted weight is cached per values tensor (weakly: it goes when the tensor
goes) and rebuilt when the values or indices are modified in place (their version counters).
`prepare(weight)` converts ahead of the first call (what a module should do at swap or freeze
time). The cache holds one extra copy of the compressed weight per backend used.

Nothing here has run on a GPU yet; bench/gpu_check.sh checks and times it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _extension, reference

BACKENDS = ("cusparselt", "cutlass")
_DTYPES = (torch.bfloat16, torch.float16)
_PAD_ROWS = 8  # rows of x are padded to a multiple of this (both libraries' dense minimum)
# int8: torch's SparseSemiStructuredTensorCUSPARSELT takes int8 weights from 32 x 32 and dense
# operands from 16 rows (its _DTYPE_SHAPE_CONSTRAINTS); x's rows are padded to this.
_PAD_ROWS_INT8 = 16
_INT8_MULTIPLE = 32  # out and in of an int8 weight

_cache: dict[str, WeakIdKeyDictionary] = {b: WeakIdKeyDictionary() for b in BACKENDS}


# ------------------------------------------------------------------ CUTLASS conversion
def cutlass_meta_offsets(rows: int, meta_cols: int, device=None) -> torch.Tensor:
    """Where each int16 meta element of a [rows, meta_cols] matrix goes in CUTLASS's
    reordered meta (flat index), for 16-bit weights. Re-derived from CUTLASS's reorder_meta()
    as torch.sparse._semi_structured_conversions does; tested against it."""
    dst_rows = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    dst_cols = torch.arange(meta_cols, device=device)[None, :].expand(rows, meta_cols)
    group, interweave = 32, 4  # int16 meta
    dst_rows = dst_rows // group * group + (dst_rows % 8) * interweave + (dst_rows % group) // 8
    topright = ((dst_rows % 2 == 0) & (dst_cols % 2 == 1)).to(torch.int64)
    bottomleft = ((dst_rows % 2 == 1) & (dst_cols % 2 == 0)).to(torch.int64)
    dst_rows = dst_rows + topright - bottomleft
    dst_cols = dst_cols - topright + bottomleft
    interleave = 2
    return ((dst_cols // interleave) * rows * interleave + dst_rows * interleave + dst_cols % interleave).reshape(-1)


def _sorted_pairs(indices: torch.Tensor) -> bool:
    """True when every 2:4 group's two indices satisfy idx0 < idx1 (valid sparse metadata)."""
    b = indices.to(torch.int32)
    lo, hi = b & 0xF, b >> 4  # two groups per byte
    return bool((((lo & 3) < (lo >> 2)) & ((hi & 3) < (hi >> 2))).all())


def _dense_to_cutlass(dense: torch.Tensor):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(dense)


def to_cutlass(values: torch.Tensor, indices: torch.Tensor, in_features: int):
    """(packed [out, in/2], meta int16 [out, in/16] reordered) for a 2:4 NMWeight's tensors.
    Runs on any device (pure torch)."""
    out = values.shape[0]
    if values.dim() != 2 or values.shape[1] * 2 != in_features or values.dtype not in _DTYPES:
        raise ValueError(f"to_cutlass: values must be bfloat16/float16 [out, in/2] of a 2:4 weight, got "
                         f"{tuple(values.shape)} {values.dtype} for in_features={in_features}")
    if out % 32 or in_features % 64:
        raise ValueError(f"to_cutlass: CUTLASS needs out % 32 == 0 and in % 64 == 0, got {out}x{in_features}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != (out, in_features // 8):
        raise ValueError(f"to_cutlass: indices must be uint8 [{out}, {in_features // 8}], got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if not _sorted_pairs(indices):
        return _dense_to_cutlass(reference.nm_decompress(values, indices, 2, 4, in_features))
    meta = indices.contiguous().view(torch.int16)  # [out, in/16]: four 4-bit groups per int16
    offsets = cutlass_meta_offsets(out, meta.shape[1], meta.device)
    reordered = torch.empty(meta.numel(), dtype=torch.int16, device=meta.device)
    reordered.scatter_(0, offsets, meta.reshape(-1))
    return values.contiguous(), reordered.view(out, meta.shape[1])


def cusparselt_packed(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """cuSPARSELt's packed weight (values and metadata in one opaque tensor), made on the GPU."""
    if not values.is_cuda:
        raise RuntimeError("cusparselt_packed: cuSPARSELt compresses on a CUDA GPU only")
    dense = reference.nm_decompress(values, indices, 2, 4, in_features).contiguous()
    return torch._cslt_compress(dense)


def _cached(backend: str, values: torch.Tensor, indices: torch.Tensor, build):
    stamp = (values._version, indices._version, values.data_ptr(), indices.data_ptr(), values.device)
    per = _cache[backend]
    hit = per.get(values)
    if hit is None or hit[0] != stamp:
        hit = (stamp, build())
        per[values] = hit
    return hit[1]


def cutlass_weight(values, indices, in_features: int):
    return _cached("cutlass", values, indices, lambda: to_cutlass(values, indices, in_features))


def cusparselt_weight(values, indices, in_features: int):
    return _cached("cusparselt", values, indices, lambda: cusparselt_packed(values, indices, in_features))


def prepare(weight, backends=BACKENDS) -> list[str]:
    """Converts a 2:4 bf16/fp16 CUDA NMWeight (anything with values, indices, n, m,
    in_features) for the backends that can take it, ahead of its first large-batch call.
    Returns the backends prepared."""
    done = []
    if (getattr(weight, "n", None), getattr(weight, "m", None)) != (2, 4) or weight.values.dtype not in _DTYPES \
            or not weight.values.is_cuda:
        return done
    out, k = weight.values.shape[0], weight.in_features
    for b in backends:
        if why_not(b, weight.values.device, weight.values.dtype, 2, 4, out, k) is None:
            (cusparselt_weight if b == "cusparselt" else cutlass_weight)(weight.values, weight.indices, k)
            done.append(b)
    return done


def clear_cache() -> None:
    for per in _cache.values():
        per.clear()


# ------------------------------------------------------------------------- dispatch
def why_not(backend: str, device: torch.device, dtype: torch.dtype, n: int, m: int, out: int, k: int) -> str | None:
    """None when `backend` can run nm_linear on this GPU for a [out, k] n:m weight in `dtype`,
    else why not. Whether it should (batch bucket, measurements) is sparsekern/dispatch_rules.py's
    semi_structured_verdict."""
    if dtype not in _DTYPES:
        return f"{backend} takes bfloat16/float16 weights, not {dtype}"
    if (n, m) != (2, 4):
        return f"{backend} runs 2:4 only, not {n}:{m}"
    if why := _no_sparse_tensor_cores(device):
        return why
    if backend == "cusparselt":
        if why := _no_cusparselt():
            return why
        if out % 16 or k % 16:
            return f"cuSPARSELt needs out and in multiples of 16, got {out}x{k}"
        return None
    if not hasattr(torch, "_sparse_semi_structured_mm"):
        return "this torch has no CUTLASS semi-structured GEMM"
    cap = torch.cuda.get_device_capability(device)
    if cap >= (10, 0):
        return f"torch's CUTLASS 2:4 kernels are built for compute capability 8.x/9.x, this GPU is {cap}"
    if out % 32 or k % 64:
        return f"CUTLASS 2:4 needs out % 32 == 0 and in % 64 == 0, got {out}x{k}"
    return None


def why_not_key(op: str, backend: str, device: torch.device, dtype: torch.dtype, key) -> str | None:
    """why_not for an op's dispatch key (its shape given): nm_linear's bf16/fp16 GEMMs, or
    nm_linear_q's int8 one (why_not_int8)."""
    if op == "nm_linear_q":
        return why_not_int8(backend, device, dtype, *key.shape, key.bits, key.int8_activations)
    return why_not(backend, device, dtype, *key.shape)


def why_not_int8(backend: str, device: torch.device, dtype: torch.dtype, n: int, m: int, out: int, k: int,
                 bits: int, int8_activations: bool) -> str | None:
    """None when `backend` can run nm_linear_q for a [out, k] n:m weight of `bits`-bit values
    and x in `dtype` on this GPU (cuSPARSELt's int8 GEMM), where activations are int8
    (dispatch_rules.q_activations_int8, given), else why not."""
    if backend != "cusparselt":
        return f"nm_linear_q's int8 sparse tensor-core GEMM runs through cuSPARSELt, not {backend}"
    if bits != 8:
        return f"cuSPARSELt multiplies int8 values, not int{bits} (the Triton kernel reads them)"
    if (n, m) != (2, 4):
        return f"cuSPARSELt runs 2:4 only, not {n}:{m}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"cuSPARSELt's int8 path takes float32/bfloat16/float16 activations, not {dtype}"
    if not int8_activations:
        return ("activations stay in their float dtype on a GPU unless SPARSEKERN_Q_ACT=int8 "
                "(cuSPARSELt multiplies int8 activations)")
    if out % _INT8_MULTIPLE or k % _INT8_MULTIPLE:
        return f"cuSPARSELt's int8 GEMM needs out and in multiples of {_INT8_MULTIPLE}, got {out}x{k}"
    return _no_cusparselt() or _no_sparse_tensor_cores(device)


def _no_cusparselt() -> str | None:
    if not (hasattr(torch, "_cslt_sparse_mm") and torch.backends.cusparselt.is_available()):
        return "this torch build has no cuSPARSELt"
    return None


def _no_sparse_tensor_cores(device: torch.device) -> str | None:
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"sparse tensor cores need compute capability 8.0 or newer, this GPU is {cap}"
    return None


def int8_rows_linear(x: torch.Tensor, packed, scales: torch.Tensor, out: int, in_features: int,
                     bias: torch.Tensor | None, sparse_mm, fused_passes: bool = False) -> torch.Tensor:
    """y [..., out] in x's dtype: x quantized per row to int8 (reference.quantize_rows_int8),
    sparse_mm(packed, xq.t()) -> the exact int32 sums [rows padded to 16, out], times x's row
    scale and the weight's row scale in fp32, + bias. sparse_mm is cuSPARSELt's GEMM on a GPU
    (_cslt_int32_mm), an emulation in the tests. fused_passes: the quantization and the
    epilogue each one Triton kernel (sparsekern/triton/quantize_rows.py: the same int8 x bit
    for bit) instead of several torch ops."""
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*x.shape[:-1], out)
    pad = (-rows) % _PAD_ROWS_INT8
    passes = None
    if fused_passes:
        from .triton import load

        passes = load("quantize_rows")
        xq, x_scales = passes.quantize_rows_int8(x2, rows + pad)
    else:
        q, x_scales = reference.quantize_rows_int8(x2)
        xq = q.to(torch.int8)
        if pad:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, pad))
    acc = sparse_mm(packed, xq.contiguous().t())[:rows]
    if passes is not None:
        y = passes.int8_rows_epilogue(acc, x_scales, scales, bias, x)
    else:
        y = acc.float() * (x_scales * scales.float()[None, :])
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def _cslt_int32_mm(packed: torch.Tensor, xq_t: torch.Tensor) -> torch.Tensor:
    return torch._cslt_sparse_mm(packed, xq_t, out_dtype=torch.int32, transpose_result=True)


# ------------------------------------------------------------------------ the ops
def _flat(x: torch.Tensor, in_features: int):
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    pad = (-rows) % _PAD_ROWS
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    return x2.contiguous(), rows


@torch.library.custom_op("sparsekern_cusparselt::nm_linear", mutates_args=())
def _cusparselt_nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                          in_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = values.shape[0]
    x2, rows = _flat(x, in_features)
    if rows == 0:
        return x.new_empty(*x.shape[:-1], out)
    packed = cusparselt_weight(values, indices, in_features)
    y = torch._cslt_sparse_mm(packed, x2.t(), bias=bias, transpose_result=True)  # [rows_padded, out]
    return y[:rows].reshape(*x.shape[:-1], out).clone() if y.shape[0] != rows else y.reshape(*x.shape[:-1], out)


@torch.library.custom_op("sparsekern_cutlass::nm_linear", mutates_args=())
def _cutlass_nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                       in_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = values.shape[0]
    x2, rows = _flat(x, in_features)
    if rows == 0:
        return x.new_empty(*x.shape[:-1], out)
    packed, meta = cutlass_weight(values, indices, in_features)
    y = torch._sparse_semi_structured_mm(packed, meta, x2.t())  # [out, rows_padded]
    y = y.t()[:rows]
    if bias is not None:
        y = y + bias
    return y.contiguous().reshape(*x.shape[:-1], out)


@torch.library.custom_op("sparsekern_cusparselt::nm_linear_q", mutates_args=())
def _cusparselt_nm_linear_q(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor,
                            n: int, m: int, in_features: int, bits: int, group_size: int,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    packed = cusparselt_weight(values, indices, in_features)  # int8 values: the scales stay outside
    return int8_rows_linear(x, packed, scales, values.shape[0], in_features, bias, _cslt_int32_mm,
                            fused_passes=_extension.triton_available())


def load() -> None:
    """Importing this module registers the custom ops (nm_linear on both backends, nm_linear_q
    on cuSPARSELt); sparsekern.ops calls this."""
