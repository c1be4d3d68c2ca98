"""The dispatch table: one `OpSpec` per op, and each op's typed dispatch key.

A key is what a decision depends on besides the device and dtype of the tensor that decides
(`OpSpec.key(*public_args) -> (tensor, key)`). Each op has its own NamedTuple, whose fields
say what they mean (no positions that mean different things per op). Ops whose decision
depends on nothing else use `NoKey` through `plain_key(arg)`, which names the argument whose
device and dtype decide. Rules and thresholds behind the fields: sparsekern/dispatch_rules.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .. import dispatch_rules as rules
from .. import reference
from ..patterns import conv_output_size


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


# ------------------------------------------------------------------ typed keys
class NoKey(NamedTuple):
    """The decision depends only on the deciding tensor's device and dtype."""


class RowsKey(NamedTuple):
    """masked_linear and its gradients, the quantized linear ops: the batch bucket of rows
    (rules.batch_bucket)."""

    bucket: int


class QLinearKey(NamedTuple):
    """nm_linear_q / bitmask_linear_q: the batch bucket and the CPU algorithm passed to the C++
    kernel (rules.Q_ALGO_*: the decode activations' precision, or an int8 GEMM); for
    nm_linear_q on a GPU, given the weight, its pattern, shape and value bits and whether
    activations are int8 there (rules.q_activations_int8, read per call: decisions are cached
    per key): what decides whether the int8 sparse tensor-core GEMM can take it."""

    bucket: int
    cpu_algo: int = rules.Q_ALGO_EXACT
    shape: "NmShape | None" = None
    bits: int = 0
    int8_activations: bool = False

    @property
    def out_in(self):
        return None if self.shape is None else (self.shape.out_features, self.shape.in_features)


class NmShape(NamedTuple):
    n: int
    m: int
    out_features: int
    in_features: int


class NmLinearKey(NamedTuple):
    """nm_linear: the batch bucket; given the weight, its pattern and shape (the 2:4 GEMM
    backends and the measured timings depend on them), the CPU algorithm passed to the C++
    kernel (rules.NM_ALGO_*) and whether it reads the pre-packed weight (NMWeight.gemm_panels)."""

    bucket: int
    shape: NmShape | None = None
    cpu_algo: int = rules.NM_ALGO_DECODE
    panels: bool = False

    @property
    def out_in(self):
        return None if self.shape is None else (self.shape.out_features, self.shape.in_features)


class NmConv2dKey(NamedTuple):
    """nm_conv2d: the CPU algorithm (by output pixels; None when the geometry was not given to
    explain_backend) and whether the pre-packed weight is read."""

    cpu_algo: int | None = None
    panels: bool = False


class BitmaskLinearKey(NamedTuple):
    """bitmask_linear: the batch bucket; given the weight, whether the C++ kernel reads the
    column index (BitmaskWeight.column_index) instead of the mask, and the CPU algorithm passed
    to it (rules.BITMASK_ALGO_*)."""

    bucket: int
    column_index: bool | None = None
    cpu_algo: int | None = None


class BlockLinearKey(NamedTuple):
    """block_linear: the batch bucket and the block shape (the Triton kernel takes square
    blocks); given the weight, the CPU algorithm passed to the C++ kernel (rules.BLOCK_ALGO_*)."""

    bucket: int
    block: tuple | None = None
    cpu_algo: int | None = None


def plain_key(arg: str, index: int) -> Callable:
    """The key function of an op decided by the device and dtype of its argument `arg`
    (position `index` of its public arguments) alone."""
    def key(*args):
        return args[index], NoKey()
    key.__name__ = f"key_by_{arg}"
    return key


def rows_key(x, *rest):
    return x, RowsKey(rules.batch_bucket(_rows(x)))


def q_linear_key(x, weight=None, bias=None):
    """nm_linear_q / bitmask_linear_q: the batch bucket and, on the CPU, the algorithm by the
    bucket's first row count (rules.q_cpu_algo for int8 values, all a bitmask weight holds:
    fp32 or int8 activations up to 16 rows, the expanded int8 weight or the exact tiles above);
    nm_linear_q_key refines it by the weight."""
    return x, _q_key(x, rules.q_cpu_algo)


def block_linear_q_key(x, weight=None, bias=None):
    """block_linear_q: the batch bucket and, on the CPU, the algorithm by the bucket's first row
    count (rules.block_q_cpu_algo: the row kernel, the int8 GEMM over the expanded values, the
    tiles)."""
    return x, _q_key(x, rules.block_q_cpu_algo)


def _q_key(x, cpu_algo) -> QLinearKey:
    """The batch bucket and, on the CPU, cpu_algo(the bucket's first row count)."""
    bucket = rules.batch_bucket(_rows(x))
    algo = rules.Q_ALGO_EXACT
    if x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES:
        algo = cpu_algo(rules.bucket_min_rows(bucket))
    return QLinearKey(bucket, algo)


def nm_linear_q_key(x, weight=None, bias=None):
    """nm_linear_q: the batch bucket; given the weight, the CPU algorithm (by the bucket's first
    row count, as nm_linear_key: a compiled graph guards on the bucket): the 2:4 int8
    dot-product GEMM or, as q_linear_key, the decode activations' precision."""
    x, key = q_linear_key(x)
    if weight is not None and x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES:
        bits = weight.kernel_args()[6]
        key = key._replace(cpu_algo=rules.nm_q_cpu_algo(weight.n, weight.m, bits, rules.bucket_min_rows(key.bucket)))
    elif weight is not None and x.device.type == "cuda":
        key = key._replace(shape=NmShape(weight.n, weight.m, weight.shape[0], weight.in_features),
                           bits=weight.kernel_args()[6], int8_activations=rules.q_activations_int8(x.device))
    return x, key


def nm_linear_key(x, weight=None, bias=None):
    bucket = rules.batch_bucket(_rows(x))
    if weight is None:
        return x, NmLinearKey(bucket)
    shape = NmShape(weight.n, weight.m, weight.shape[0], weight.in_features)
    algo = rules.NM_ALGO_DECODE
    if x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES:
        # by the bucket, not the row count: a compiled graph guards on the bucket, as the
        # decision does (the GEMM's first row count is a bucket edge)
        algo = rules.nm_cpu_algo(weight.n, weight.m, rules.bucket_min_rows(bucket), x.dtype)
    return x, NmLinearKey(bucket, shape, algo,
                          rules.uses_gemm_panels(algo, x.dtype) and weight.keeps_derived("_gemm_panels"))


def nm_conv2d_key(x, weight=None, kernel_size=None, bias=None, stride=1, padding=0, dilation=1):
    if weight is None or kernel_size is None:
        return x, NmConv2dKey()
    pix = None
    if x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES and x.dim() == 4:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        pix = x.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], pair(kernel_size), pair(stride), pair(padding), pair(dilation)):
            pix = pix * conv_output_size(size, k, s, p, d)
    algo = rules.nm_cpu_algo(weight.n, weight.m, pix, x.dtype)
    return x, NmConv2dKey(algo, rules.uses_gemm_panels(algo, x.dtype) and weight.keeps_derived("_gemm_panels"))


def bitmask_linear_key(x, weight=None, bias=None):
    bucket = rules.batch_bucket(_rows(x))
    if weight is None:
        return x, BitmaskLinearKey(bucket)
    algo = None
    if x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES:  # by the bucket, as nm_linear_key
        algo = rules.bitmask_cpu_algo(rules.bucket_min_rows(bucket), weight.density)
    columns = rules.uses_column_index(x.device, x.dtype, bucket, weight.density, weight.in_features,
                                      weight.COLUMN_INDEX_MAX_IN) and weight.keeps_derived("_column_index")
    return x, BitmaskLinearKey(bucket, columns, algo)


def block_linear_key(x, weight=None, bias=None):
    bucket = rules.batch_bucket(_rows(x))
    if weight is None:
        return x, BlockLinearKey(bucket)
    algo = None
    if x.device.type == "cpu" and x.dtype in rules.KERNEL_DTYPES:  # by the bucket, as nm_linear_key
        algo = rules.block_cpu_algo(rules.bucket_min_rows(bucket), weight.density)
    return x, BlockLinearKey(bucket, tuple(weight.block), algo)


# ------------------------------------------------------------------ notes and limits
_PANELS_NOTE = "reads NMWeight.gemm_panels (the 2:4 weight pre-packed for the GEMM kernel, 6 bytes per kept value)"


def nm_note(backend: str, key) -> str:
    """The C++ kernel's algorithm (and pre-packed weight), added to the decision's reason."""
    if backend != "cpp" or getattr(key, "cpu_algo", None) is None:
        return ""
    text = f"; algorithm: {rules.NM_ALGO_NAMES[key.cpu_algo]}"
    return text + ("; " + _PANELS_NOTE if key.panels else "")


def bitmask_note(backend: str, key: BitmaskLinearKey) -> str:
    if backend != "cpp" or key.cpu_algo is None:
        return ""
    text = f"; algorithm: {rules.BITMASK_ALGO_NAMES[key.cpu_algo]}"
    if key.column_index:
        text += "; reads BitmaskWeight.column_index (a 16-bit column per kept value) instead of the mask"
    return text


def block_note(backend: str, key: BlockLinearKey) -> str:
    if backend != "cpp" or key.cpu_algo is None:
        return ""
    return f"; algorithm: {rules.BLOCK_ALGO_NAMES[key.cpu_algo]}"


def q_note(backend: str, key: QLinearKey) -> str:
    """The C++ algorithm of the quantized linear ops, added to the decision's reason."""
    if backend == "cpp" and key.cpu_algo != rules.Q_ALGO_EXACT:
        return f"; algorithm: {rules.Q_ALGO_NAMES[key.cpu_algo]}"
    return ""


def triton_block_limit(key: BlockLinearKey) -> str | None:
    from ..triton.block_linear import SUPPORTED_BLOCKS

    block = key.block
    if block is None or (block[0] == block[1] and block[0] in SUPPORTED_BLOCKS):
        return None
    return f"Triton block_linear takes square blocks of {SUPPORTED_BLOCKS}, not {block}"


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class OpSpec:
    """What implements an op. `key(*public_args)` returns (the tensor whose device and dtype
    decide, the op's typed key); `triton_limit(key)` why the Triton kernel cannot take these
    arguments, or None; `note(backend, key)` text added to the decision's reason.
    `cpu_op`: the CPU-only op with the CPU kernel's own arguments (the algorithm chosen in
    sparsekern/dispatch_rules.py, pre-packed or derived layouts) that no other backend sees;
    the C++ backend runs it where the key asks for them. `differentiable`: autograd registered."""

    name: str
    reference: Callable
    key: Callable
    cpp: bool = True
    cuda: bool = False
    triton: str | None = None  # family module in sparsekern.triton
    triton_limit: Callable | None = None
    semi_structured: bool = False  # the 2:4 GEMM backends "cusparselt" and "cutlass" (semi_structured.why_not_key)
    note: Callable | None = None
    cpu_op: str | None = None
    differentiable: bool = False


def _nm_linear_cpu_reference(x, values, indices, n, m, in_features, bias, algo, panels=None):
    return reference.nm_linear(x, values, indices, n, m, in_features, bias)


def _nm_conv2d_cpu_reference(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias, algo,
                             panels=None):
    return reference.nm_conv2d(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias)


def _bitmask_linear_cpu_reference(x, values, bitmask, offsets, in_features, bias, columns, algo=0):
    return reference.bitmask_linear(x, values, bitmask, offsets, in_features, bias)


def _nm_linear_q_cpu_reference(x, values, indices, scales, n, m, in_features, bits, group_size, bias, algo):
    if algo in (rules.Q_ALGO_INT8_DOT, rules.Q_ALGO_INT8_EXPAND):  # x quantized per row first, as the op does
        return reference.nm_linear_q_dot(x, values, indices, scales, n, m, in_features, bits, group_size, bias)
    return reference.nm_linear_q(x, values, indices, scales, n, m, in_features, bits, group_size, bias)


def _bitmask_linear_q_cpu_reference(x, values, bitmask, offsets, scales, in_features, bias, algo):
    if algo == rules.Q_ALGO_INT8_EXPAND:  # x quantized per row first, as the op does
        return reference.bitmask_linear_q_int8_dot(x, values, bitmask, offsets, scales, in_features, bias)
    return reference.bitmask_linear_q(x, values, bitmask, offsets, scales, in_features, bias)


def _block_linear_q_cpu_reference(x, crow_indices, col_indices, values, scales, in_features, bias, algo):
    if algo == rules.Q_ALGO_INT8_EXPAND:  # x quantized per row first, as the op does
        return reference.block_linear_q_int8_dot(x, crow_indices, col_indices, values, scales, in_features, bias)
    return reference.block_linear_q(x, crow_indices, col_indices, values, scales, in_features, bias)


def _block_linear_cpu_reference(x, crow_indices, col_indices, values, in_features, bias, algo):
    return reference.block_linear(x, crow_indices, col_indices, values, in_features, bias)


# The references of the CPU-only ops (the public op's reference, the CPU arguments dropped, or
# the algorithm's own numerics where the int8 GEMM changes them).
CPU_OP_REFERENCES = {"nm_linear_cpu": _nm_linear_cpu_reference, "nm_conv2d_cpu": _nm_conv2d_cpu_reference,
                     "bitmask_linear_cpu": _bitmask_linear_cpu_reference,
                     "block_linear_cpu": _block_linear_cpu_reference,
                     "nm_linear_q_cpu": _nm_linear_q_cpu_reference,
                     "bitmask_linear_q_cpu": _bitmask_linear_q_cpu_reference,
                     "block_linear_q_cpu": _block_linear_q_cpu_reference}

OPS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("nm_linear", reference.nm_linear, nm_linear_key, cuda=True, triton="nm_linear", semi_structured=True,
           note=nm_note, cpu_op="nm_linear_cpu", differentiable=True),
    OpSpec("nm24_pack_panels", reference.nm24_pack_panels, plain_key("values", 0)),
    # The CPU convolution; on a GPU sparse convolutions run as patches through nm_linear.
    OpSpec("nm_conv2d", reference.nm_conv2d, nm_conv2d_key, note=nm_note, cpu_op="nm_conv2d_cpu",
           differentiable=True),
    OpSpec("bitmask_linear", reference.bitmask_linear, bitmask_linear_key, cuda=True, triton="bitmask_linear",
           note=bitmask_note, cpu_op="bitmask_linear_cpu", differentiable=True),
    # Quantized values read packed (int8; N:M also int4), dequantized in registers.
    # On a GPU with int8 activations asked for (rules.q_activations_int8), 2:4 int8 weights also
    # through cuSPARSELt's int8 GEMM (sparsekern/semi_structured.py).
    OpSpec("nm_linear_q", reference.nm_linear_q, nm_linear_q_key, triton="linear_q", cpu_op="nm_linear_q_cpu",
           semi_structured=True, note=q_note, differentiable=True),
    OpSpec("bitmask_linear_q", reference.bitmask_linear_q, q_linear_key, triton="linear_q",
           cpu_op="bitmask_linear_q_cpu", note=q_note, differentiable=True),
    OpSpec("block_linear", reference.block_linear, block_linear_key, triton="block_linear",
           triton_limit=triton_block_limit, note=block_note, cpu_op="block_linear_cpu", differentiable=True),
    # Block int8 values read as stored (the CPU's kernels; elsewhere sparsekern.ops.block_linear_q
    # runs block_linear on the dequantized values).
    OpSpec("block_linear_q", reference.block_linear_q, block_linear_q_key, cpu_op="block_linear_q_cpu",
           note=q_note, differentiable=True),
    OpSpec("masked_linear", reference.masked_linear, rows_key, cuda=True, triton="masked_linear",
           differentiable=True),
    OpSpec("masked_linear_grad_input", reference.masked_linear_grad_input, rows_key, cuda=True,
           triton="masked_linear"),
    OpSpec("masked_linear_grad_weight", reference.masked_linear_grad_weight, plain_key("x", 1),
           triton="masked_linear"),
    OpSpec("nm_compress", reference.nm_compress, plain_key("weight", 0)),
    OpSpec("nm_decompress", reference.nm_decompress, plain_key("values", 0), cuda=True),
    OpSpec("bitmask_compress", reference.bitmask_compress, plain_key("weight", 0)),
    OpSpec("bitmask_decompress", reference.bitmask_decompress, plain_key("values", 0), cuda=True),
    OpSpec("block_compress", reference.block_compress, plain_key("weight", 0)),
    OpSpec("block_decompress", reference.block_decompress, plain_key("values", 1)),
    OpSpec("group_score", reference.group_score, plain_key("weight", 0), triton="scoring"),
    OpSpec("act_norm_accumulate", reference.act_norm_accumulate, plain_key("x", 1), triton="scoring"),
    OpSpec("nm_score_compress", reference.nm_score_compress, plain_key("weight", 0), triton="scoring"),
    OpSpec("hessian_accumulate", reference.hessian_accumulate, plain_key("x", 1)),
)}
