"""The public ops: each checks its arguments once (sparsekern/ops/checks.py), asks the
dispatch table which backend runs these tensors (sparsekern/ops/dispatch.py) and calls it.
Tensor layouts: sparsekern/formats.py. Schemas: csrc/sparsekern.cpp."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .. import dispatch_rules as rules
from .. import precisions
from ..patterns import check_nm
from .checks import (check_bias, check_bitmask, check_dense_weight, check_finite, check_format, check_mask,
                     check_masked_weight, check_pair, check_score_inputs, check_x)
from .backends import BACKENDS
from .dispatch import decide, run


# --------------------------------------------------------------------- linear ops
class LinearCall(NamedTuple):
    """A sparse linear op as decided for one input's key: `call(x, bias)` runs
    run(x, *before_bias, bias, *after_bias) (the schema's order)."""

    run: Callable
    before_bias: tuple
    after_bias: tuple
    # x is rounded per row to int8 first (precisions.round_activation_rows): a quantized op's
    # path that multiplies floats, where its integer kernels round x themselves
    # (rules.q_activations_int8)
    round_rows: bool = False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.round_rows:
            x = precisions.round_activation_rows(x)
        return self.run(x, *self.before_bias, bias, *self.after_bias)

    def no_grad(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The same call where the caller knows no gradient is wanted: the op below autograd,
        without asking each time."""
        op = getattr(self.run, "op", None)
        if op is None:
            return self(x, bias)
        if self.round_rows:
            x = precisions.round_activation_rows(x)
        with torch._C._AutoDispatchBelowAutograd():
            return op(x, *self.before_bias, bias, *self.after_bias)


def nm_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W an NMWeight.

    x [..., in] (float32/bfloat16/float16/float64, the weight's dtype), weight NMWeight of
    shape [out, in], bias [out] or None -> y [..., out] in x's dtype, fp32 accumulation.
    Differentiable in x, weight.values and bias. A quantized NMWeight (int8/int4 values, its
    OP is "nm_linear_q") runs nm_linear_q.
    """
    if getattr(weight, "OP", None) == "nm_linear_q":
        return nm_linear_q(x, weight, bias)
    check_format("nm_linear", weight, "NMWeight")
    check_x("nm_linear", x, weight.in_features, weight.dtype, weight.device)
    check_bias("nm_linear", bias, weight.shape[0], x)
    return _nm_linear_call(x, weight)(x, bias)


def _nm_linear_call(x: torch.Tensor, weight) -> "LinearCall":
    d, key = decide("nm_linear", (x, weight))
    if d.cpu_run is not None:  # the C++ kernel with the algorithm dispatch_rules chose
        return LinearCall(d.cpu_run, weight.kernel_args(),
                          (key.cpu_algo, weight.gemm_panels() if key.panels else None))
    return LinearCall(d.run, weight.kernel_args(), ())


def bitmask_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BitmaskWeight (unstructured). Shapes, dtypes and
    gradients as nm_linear. A quantized BitmaskWeight runs bitmask_linear_q."""
    if getattr(weight, "OP", None) == "bitmask_linear_q":
        return bitmask_linear_q(x, weight, bias)
    check_format("bitmask_linear", weight, "BitmaskWeight")
    check_x("bitmask_linear", x, weight.in_features, weight.dtype, weight.device)
    check_bias("bitmask_linear", bias, weight.shape[0], x)
    return _bitmask_linear_call(x, weight)(x, bias)


def _bitmask_linear_call(x: torch.Tensor, weight) -> "LinearCall":
    d, key = decide("bitmask_linear", (x, weight))
    if d.cpu_run is not None and key.cpu_algo is not None:  # the algorithm dispatch_rules chose
        return LinearCall(d.cpu_run, weight.kernel_args(),
                          (weight.column_index() if key.column_index else None, key.cpu_algo))
    return LinearCall(d.run, weight.kernel_args(), ())


def _check_quantized(op: str, weight, cls_name: str) -> None:
    if getattr(weight, "OP", None) == op.removesuffix("_q") and type(weight).__name__ == cls_name:
        raise TypeError(f"{op}: weight must be a {cls_name} with quantized values (W.quantize('int8')), got float "
                        f"values; run {op.removesuffix('_q')} (or sparse_linear) for those")
    check_format(op, weight, cls_name)


def nm_linear_q(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W an NMWeight whose kept values are stored int8 (one scale per
    output row) or int4 (one scale per 32/64/128 kept values of a row, two values per byte),
    read as stored and dequantized in registers (sparsekern/precisions.py).

    x [..., in] in the weight's compute dtype (W.dtype: float32/bfloat16/float16, or float64
    for the reference), bias [out] or None -> y [..., out] in x's dtype, fp32 accumulation.
    Differentiable in x and bias (the values are integers).

    On CPUs with AVX512_VNNI (rules.q_activations_int8), x is rounded per row to int8
    (symmetric, scale max|x| / 127), as torch's dynamic quantization does per tensor: the
    decode kernels and, for 2:4 int8 and int4 weights over more than 16 rows, the int8
    dot-product GEMM (nm_q_cpu_algo, reference.nm_linear_q_int8_dot / nm_linear_q_int4_dot)
    quantize x themselves, and the other paths
    multiply precisions.round_activation_rows(x), so the result carries that rounding on every
    path; the gradient to x passes it straight through. SPARSEKERN_Q_ACT=exact: exact products.
    """
    _check_quantized("nm_linear_q", weight, "NMWeight")
    check_x("nm_linear_q", x, weight.in_features, weight.dtype, weight.device)
    check_bias("nm_linear_q", bias, weight.shape[0], x)
    return _q_linear_call("nm_linear_q", x, weight)(x, bias)


def _q_linear_call(op: str, x: torch.Tensor, weight) -> "LinearCall":
    """nm_linear_q / bitmask_linear_q as decided for x: the CPU-only op with the algorithm
    dispatch_rules chose, where it is not the shared schema's exact one."""
    d, key = decide(op, (x, weight))
    # a path that multiplies x in floats takes the rounded x where the integer kernels would round it
    round_rows = rounds_activations(weight, x.device)
    if d.cpu_run is not None and key.cpu_algo != rules.Q_ALGO_EXACT:
        return LinearCall(d.cpu_run, weight.kernel_args(), (key.cpu_algo,),
                          round_rows and key.cpu_algo in rules.Q_ALGOS_FLOAT_X)
    return LinearCall(d.run, weight.kernel_args(), (), round_rows and not BACKENDS[d.backend].quantizes_activations)


# The ops whose integer kernels multiply int8 activations (rules.q_activations_int8).
_ROUNDING_OPS = ("nm_linear_q", "bitmask_linear_q", "block_linear_q")


def rounds_activations(weight, device) -> bool:
    """Whether `weight`'s op (a format, or an op name) multiplies activations rounded per row
    to int8 on `device`, on every path (rules.q_activations_int8): a path that multiplies
    floats (a module's dense copy, the tiles, the training forward) rounds x with
    precisions.round_activation_rows first. False for float values and convolutions (no
    integer kernels)."""
    op = weight if isinstance(weight, str) else getattr(weight, "OP", None)
    return op in _ROUNDING_OPS and rules.q_activations_int8(device)


def bitmask_linear_q(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BitmaskWeight whose kept values are int8 with one scale
    per output row, dequantized in registers. Shapes, dtypes and gradients as nm_linear_q."""
    _check_quantized("bitmask_linear_q", weight, "BitmaskWeight")
    check_x("bitmask_linear_q", x, weight.in_features, weight.dtype, weight.device)
    check_bias("bitmask_linear_q", bias, weight.shape[0], x)
    return _q_linear_call("bitmask_linear_q", x, weight)(x, bias)


def block_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BlockWeight (BSR). Shapes, dtypes and gradients as nm_linear.
    A quantized BlockWeight runs block_linear_q."""
    if getattr(weight, "OP", None) == "block_linear_q":
        return block_linear_q(x, weight, bias)
    check_format("block_linear", weight, "BlockWeight")
    check_x("block_linear", x, weight.in_features, weight.dtype, weight.device)
    check_bias("block_linear", bias, weight.shape[0], x)
    return _block_linear_call(x, weight)(x, bias)


def block_linear_q(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BlockWeight whose kept values are stored int8 (one scale per
    output row). On the CPU the C++ kernels read them as stored: the row kernel up to 16 rows,
    above them (where rules.q_activations_int8 holds and the CPU has AVX512_VNNI) x quantized
    per row and torch's int8 GEMM over the values expanded for the call, so x is rounded per
    row on every path, as nm_linear_q's docstring says; else dequantized tiles. Other devices
    run block_linear on the values dequantized for the call. Differentiable in x and bias."""
    _check_quantized("block_linear_q", weight, "BlockWeight")
    check_x("block_linear_q", x, weight.in_features, weight.dtype, weight.device)
    check_bias("block_linear_q", bias, weight.shape[0], x)
    return _block_linear_q_call(x, weight)(x, bias)


def _block_linear_q_call(x: torch.Tensor, weight) -> "LinearCall":
    if x.device.type != "cpu":  # no quantized block kernel there: the float one, values dequantized per call
        # (x rounded per row where int8 activations were asked for on a GPU, as nm_linear_q's paths)
        return _block_linear_call(x, weight.dequantized())._replace(round_rows=rounds_activations(weight, x.device))
    return _q_linear_call("block_linear_q", x, weight)


def _block_linear_call(x: torch.Tensor, weight) -> "LinearCall":
    d, key = decide("block_linear", (x, weight))
    if d.cpu_run is not None and key.cpu_algo is not None:  # the algorithm dispatch_rules chose
        return LinearCall(d.cpu_run, weight.kernel_args(), (key.cpu_algo,))
    return LinearCall(d.run, weight.kernel_args(), ())


def nm_conv2d(x: torch.Tensor, weight, kernel_size, bias: torch.Tensor | None = None, stride=1, padding=0,
              dilation=1) -> torch.Tensor:
    """2-D convolution of x [N, C, H, W] with an NMWeight [out, kh*kw*C] (input channels
    fastest within each tap: patterns.as_2d of an [out, C, kh, kw] weight), bias [out] or None,
    zero padding -> [N, out, OH, OW] in x's dtype. The C++ kernel returns channels-last memory.
    Differentiable in x, weight.values and bias.
    """
    op = "nm_conv2d"
    if getattr(weight, "OP", None) == "nm_linear_q":
        weight = weight.dequantized()  # no quantized convolution kernel: values dequantized per call
    check_format(op, weight, "NMWeight", fmt_op="nm_linear")
    kh, kw = check_pair("kernel_size", kernel_size, 1, op)
    stride, padding, dilation = (check_pair("stride", stride, 1, op), check_pair("padding", padding, 0, op),
                                 check_pair("dilation", dilation, 1, op))
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if weight.in_features % (kh * kw):
        raise ValueError(f"{op}: weight in_features ({weight.in_features}) is not kh*kw*C for kernel_size "
                         f"({kh}, {kw})")
    channels = weight.in_features // (kh * kw)
    if channels % weight.m:
        raise ValueError(f"{op}: the weight's {channels} input channels are not a multiple of m={weight.m} "
                         f"(N:M groups run along input channels)")
    if x.shape[1] != channels:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but the weight takes {channels} "
                         f"(in_features {weight.in_features} / kernel {kh}x{kw})")
    check_x(op, x.movedim(1, -1), channels, weight.dtype, weight.device, size_name="the weight's channels")
    for i, (size, k) in enumerate(zip(x.shape[2:], (kh, kw))):
        if size + 2 * padding[i] < dilation[i] * (k - 1) + 1:
            raise ValueError(f"{op}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                             f"dilated kernel")
    check_bias(op, bias, weight.shape[0], x)
    shape = [weight.shape[0], channels, kh, kw]
    values, indices, n, m, _ = weight.kernel_args()
    d, key = decide(op, (x, weight, (kh, kw), bias, stride, padding, dilation))
    args = (x, values, indices, n, m, shape, list(stride), list(padding), list(dilation), bias)
    if d.cpu_run is not None and key.cpu_algo is not None:
        return d.cpu_run(*args, key.cpu_algo, weight.gemm_panels() if key.panels else None)
    return d.run(*args)


_LINEAR = {"nm_linear": nm_linear, "bitmask_linear": bitmask_linear, "block_linear": block_linear,
           "nm_linear_q": nm_linear_q, "bitmask_linear_q": bitmask_linear_q, "block_linear_q": block_linear_q}


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for any sparsekern format: the op the format declares (weight.OP; a
    quantized NMWeight, BitmaskWeight or BlockWeight declares nm_linear_q, bitmask_linear_q or
    block_linear_q)."""
    fn = _LINEAR.get(getattr(weight, "OP", None))
    if fn is None:
        raise TypeError(f"sparse_linear: weight must be an NMWeight, BitmaskWeight or BlockWeight, got "
                        f"{type(weight).__name__}")
    return fn(x, weight, bias)


# Every op of _LINEAR: the call its public function makes (the same algorithm, decided once).
_LINEAR_CALL = {"nm_linear": _nm_linear_call, "bitmask_linear": _bitmask_linear_call,
                "block_linear": _block_linear_call,
                "nm_linear_q": lambda x, weight: _q_linear_call("nm_linear_q", x, weight),
                "bitmask_linear_q": lambda x, weight: _q_linear_call("bitmask_linear_q", x, weight),
                "block_linear_q": _block_linear_q_call}


def sparse_linear_call(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> LinearCall:
    """What sparse_linear(x, weight, bias) runs, checked and decided once: the returned call
    runs it for any input of x's decision key (same last size, dtype, device and batch bucket)
    and any bias of the same shape, dtype and device, with no checks. The caller keeps it only
    while the weight stays as checked (its tensors neither replaced nor edited in place: what
    is_validated stamps) and calls it only where no gradient is needed (it runs below autograd)."""
    fn = _LINEAR.get(getattr(weight, "OP", None))
    if fn is None:
        raise TypeError(f"sparse_linear_call: weight must be an NMWeight, BitmaskWeight or BlockWeight, got "
                        f"{type(weight).__name__}")
    op = weight.OP
    check_format(op, weight, type(weight).__name__)
    check_x(op, x, weight.in_features, weight.dtype, weight.device)
    check_bias(op, bias, weight.shape[0], x)
    return _LINEAR_CALL[op](x, weight)


def keeping_derived_changes_call(op: str, *key_args) -> bool:
    """Whether `op` on key_args (x, a format object, then the op's other arguments) would read
    a derived layout of the format (NMWeight.gemm_panels, BitmaskWeight.column_index) that
    the format's derived budget leaves out: its dispatch key with the budget lifted differs
    from the key under it. sparsekern.nn measures keeping the layout ("sparse_kept") only then."""
    weight = key_args[1]
    budget = weight.derived_budget
    if budget is None:
        return False
    key = decide(op, key_args)[1]
    weight.set_derived_budget(None)
    try:
        return decide(op, key_args)[1] != key
    finally:
        weight.set_derived_budget(budget)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T + bias (the training-time op): W*M built in one masking pass per call,
    then one dense GEMM; the mask is never stored expanded.

    weight [out, in] dense, bitmask int64 [out, ceil(in/64)] (patterns.pack_bitmask of a
    bool mask). Differentiable in x, weight (gradient masked) and bias.
    """
    check_masked_weight("masked_linear", weight)
    check_x("masked_linear", x, weight.shape[1], weight.dtype, weight.device)
    check_bitmask("masked_linear", bitmask, weight.shape[0], weight.shape[1], weight.device)
    check_bias("masked_linear", bias, weight.shape[0], x)
    return run("masked_linear", (x,), x, weight, bitmask, bias)


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """grad_out [..., out] @ (W*M) -> [..., in]: masked_linear's input gradient."""
    check_masked_weight("masked_linear_grad_input", weight)
    check_x("masked_linear_grad_input", grad_out, weight.shape[0], weight.dtype, weight.device, "grad_out",
             "out_features")
    check_bitmask("masked_linear_grad_input", bitmask, weight.shape[0], weight.shape[1], weight.device)
    return run("masked_linear_grad_input", (grad_out,), grad_out, weight, bitmask)


def masked_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(grad_out^T @ x) * M -> [out, in]: masked_linear's weight gradient (x [..., in],
    grad_out [..., out] with the same leading shape)."""
    op = "masked_linear_grad_weight"
    for name, t in (("grad_out", grad_out), ("x", x)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"{op}: {name} must be a floating tensor with at least one dimension")
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share their leading "
                         "shape")
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise TypeError(f"{op}: grad_out and x must share dtype and device")
    check_bitmask(op, bitmask, grad_out.shape[-1], x.shape[-1], x.device)
    return run(op, (grad_out, x), grad_out, x, bitmask)


# ------------------------------------------------------- compress / decompress ops
def nm_compress(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int):
    """weight [out, in] (+ bool mask keeping at most n of every m) -> (values [out, in*n/m],
    indices uint8); without a mask keeps the n largest |w| per group. See formats.NMWeight."""
    check_dense_weight("nm_compress", weight)
    check_mask("nm_compress", mask, weight)
    check_nm(n, m, "nm_compress")
    if weight.shape[1] % m:
        raise ValueError(f"nm_compress: in_features ({weight.shape[1]}) must be divisible by m = {m}")
    return run("nm_compress", (weight,), weight, mask, n, m)


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """(values, indices) of an N:M weight -> the dense [out, in_features] weight."""
    return run("nm_decompress", (values,), values, indices, n, m, in_features)


def nm24_pack_panels(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """A 2:4 weight (NMWeight's values [out, in/2] and indices) pre-packed for the CPU GEMM
    kernel: uint8 [patterns.nm24_panels_bytes(out, in)], layout in csrc/nm24_panels.h.
    NMWeight.gemm_panels() builds and keeps it; nm_linear passes it on its own."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.dtype not in rules.KERNEL_DTYPES:
        raise ValueError("nm24_pack_panels: values must be a 2-D float32/bfloat16/float16 tensor [out, in/2]")
    if not isinstance(in_features, int) or in_features <= 0 or in_features % 4 or values.shape[1] != in_features // 2:
        raise ValueError(f"nm24_pack_panels: in_features must be a positive multiple of 4 with values.shape[1] == "
                         f"in_features // 2, got in_features={in_features!r} and values {list(values.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.uint8 or \
            tuple(indices.shape) != (values.shape[0], math.ceil(values.shape[1] / 4)):
        raise ValueError(f"nm24_pack_panels: indices must be uint8 [{values.shape[0]}, {math.ceil(values.shape[1] / 4)}]")
    if indices.device != values.device:
        raise ValueError(f"nm24_pack_panels: indices is on {indices.device} but values is on {values.device}")
    return run("nm24_pack_panels", (values,), values, indices, in_features)


def bitmask_compress(weight: torch.Tensor, mask: torch.Tensor | None):
    """weight [out, in] (+ bool mask, default weight != 0) -> (values [nnz], bitmask int64,
    offsets int32); see formats.BitmaskWeight."""
    check_dense_weight("bitmask_compress", weight)
    check_mask("bitmask_compress", mask, weight)
    return run("bitmask_compress", (weight,), weight, mask)


def bitmask_decompress(values, bitmask, offsets, in_features: int) -> torch.Tensor:
    """(values, bitmask, offsets) of a bitmask weight -> the dense [out, in_features] weight."""
    return run("bitmask_decompress", (values,), values, bitmask, offsets, in_features)


def block_compress(weight: torch.Tensor, mask: torch.Tensor | None, block_rows: int, block_cols: int):
    """weight [out, in] -> (crow_indices, col_indices, values [nnzb, bh, bw]) (BSR)."""
    check_dense_weight("block_compress", weight)
    check_mask("block_compress", mask, weight)
    if not (block_rows > 0 and block_cols > 0 and weight.shape[0] % block_rows == 0
            and weight.shape[1] % block_cols == 0):
        raise ValueError(f"block_compress: block ({block_rows}, {block_cols}) must divide weight shape "
                         f"{tuple(weight.shape)}")
    return run("block_compress", (weight,), weight, mask, block_rows, block_cols)


def block_decompress(crow_indices, col_indices, values, in_features: int) -> torch.Tensor:
    """BSR (crow_indices, col_indices, values) -> the dense [out, in_features] weight."""
    return run("block_decompress", (crow_indices, values), crow_indices, col_indices, values, in_features)


# ------------------------------------------------------------- fused scoring ops
def group_score(weight: torch.Tensor, block_rows: int, block_cols: int, p: int = 1, *,
                grad: torch.Tensor | None = None, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Group reduction of the score e = |w| * |grad| * act_norm[col] in one pass.

    weight [rows, cols]; groups of (block_rows, block_cols) tiling it; p=1: sum(e),
    p=2: sqrt(sum(e^2)). Returns float32 [rows/block_rows, cols/block_cols]. Rows:
    (1, cols); columns: (rows, 1); N:M groups: (1, m); the layer: (rows, cols).
    """
    check_score_inputs("group_score", weight, grad, act_norm)
    if p not in (1, 2):
        raise ValueError(f"group_score: p must be 1 (L1) or 2 (L2), got {p}")
    rows, cols = weight.shape
    if not (block_rows > 0 and block_cols > 0 and rows % block_rows == 0 and cols % block_cols == 0):
        raise ValueError(f"group_score: group shape ({block_rows}, {block_cols}) must divide weight shape "
                         f"{(rows, cols)}")
    return run("group_score", (weight,), weight, grad, act_norm, block_rows, block_cols, p)


def _in_place(op: str, target: torch.Tensor, x: torch.Tensor) -> None:
    """Kernels accumulate into contiguous memory: a strided target gets a contiguous copy."""
    if target.is_contiguous():
        run(op, (target, x), target, x)
    else:
        tmp = target.contiguous()
        run(op, (tmp, x), tmp, x)
        target.copy_(tmp)


def act_norm_accumulate(sumsq: torch.Tensor, x: torch.Tensor) -> None:
    """In place: sumsq[j] += sum of x[..., j]^2 over every leading position (one pass)."""
    if not isinstance(sumsq, torch.Tensor) or sumsq.dim() != 1 or sumsq.dtype not in (torch.float32, torch.float64):
        raise ValueError("act_norm_accumulate: sumsq must be a 1-D float32/float64 tensor")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != sumsq.shape[0]:
        raise ValueError(f"act_norm_accumulate: x must be floating with x.shape[-1] == {sumsq.shape[0]}")
    if x.device != sumsq.device:
        raise ValueError(f"act_norm_accumulate: x is on {x.device} but sumsq is on {sumsq.device}")
    _in_place("act_norm_accumulate", sumsq, x)


def nm_score_compress(weight: torch.Tensor, n: int, m: int, *, grad: torch.Tensor | None = None,
                      act_norm: torch.Tensor | None = None):
    """Score (|w| * |grad| * act_norm[col]) -> N:M mask -> (values, indices) in one pass.
    weight, grad and act_norm must be finite (ValueError naming the argument otherwise)."""
    check_score_inputs("nm_score_compress", weight, grad, act_norm)
    check_nm(n, m, "nm_score_compress")
    if weight.shape[1] % m:
        raise ValueError(f"nm_score_compress: in_features ({weight.shape[1]}) must be divisible by m = {m}")
    check_finite("nm_score_compress", weight=weight, grad=grad, act_norm=act_norm)
    return run("nm_score_compress", (weight,), weight, grad, act_norm, n, m)


def hessian_accumulate(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """In place: hessian += X^T X with X = x reshaped to [rows, K] (SparseGPT's Hessian)."""
    if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1] or \
            hessian.dtype not in (torch.float32, torch.float64):
        raise ValueError("hessian_accumulate: hessian must be a square float32/float64 tensor")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != hessian.shape[0]:
        raise ValueError(f"hessian_accumulate: x must be floating with x.shape[-1] == {hessian.shape[0]}")
    if x.device != hessian.device:
        raise ValueError(f"hessian_accumulate: x is on {x.device} but hessian is on {hessian.device}")
    _in_place("hessian_accumulate", hessian, x)
