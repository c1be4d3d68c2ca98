"""Fake kernels (torch.compile, opcheck) and autograd, defined once per op and registered on
every custom-op namespace that implements it (`sparsekern::` for C++/CUDA, `sparsekern_triton::`,
`sparsekern_cusparselt::`, `sparsekern_cutlass::`), so every backend is the same op. Sparse
linear ops give gradients to x, to the kept values and to the bias; the reference is plain
differentiable torch with the same gradients."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import _extension, reference
from .. import dispatch_rules as rules
from ..patterns import BITMASK_TILE_COLS, as_2d, conv_output_size, from_2d, nm24_panels_bytes, nm_index_bits, \
    unpack_bitmask, unpack_bits
from .public import bitmask_decompress, block_decompress, masked_linear_grad_input, masked_linear_grad_weight, \
    nm_decompress
from .table import OPS


# ---------------------------------------------- fake kernels (one per op, all backends)
def _out_shape(x: torch.Tensor, out_features) -> list:
    return list(x.shape[:-1]) + [out_features]


def _nm_packed(weight, n, m):
    out, k = weight.shape
    kept = k // m * n
    return (weight.new_empty((out, kept)),
            weight.new_empty((out, math.ceil(kept * nm_index_bits(m) / 8)), dtype=torch.uint8))


def _fake_nm_linear(x, values, indices, n, m, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "nm_linear: x.shape[-1] must equal in_features")
    torch._check(values.dtype == x.dtype, lambda: "nm_linear: values dtype must match x dtype")
    return x.new_empty(_out_shape(x, values.shape[0]))


def _check_algo(op: str, algo: int, n: int, m: int) -> None:
    torch._check(algo in rules.NM_ALGO_NAMES, lambda: f"{op}: algo must be one of {sorted(rules.NM_ALGO_NAMES)}")
    torch._check(algo not in (rules.NM_ALGO_GEMM, rules.NM_ALGO_GEMM_FP32) or (n, m) == (2, 4),
                 lambda: f"{op}: algo {algo} (the 2:4 GEMM kernel) runs 2:4 weights, got {n}:{m}")


def _fake_nm_linear_cpu(x, values, indices, n, m, in_features, bias, algo, panels=None):
    _check_algo("nm_linear", algo, n, m)
    return _fake_nm_linear(x, values, indices, n, m, in_features, bias)


def _fake_nm_conv2d_cpu(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias, algo, panels=None):
    _check_algo("nm_conv2d", algo, n, m)
    return _fake_nm_conv2d(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias)


def _fake_nm_conv2d(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias):
    torch._check(x.dim() == 4 and x.shape[1] == weight_shape[1], lambda: "nm_conv2d: x must be [N, in, H, W]")
    oh, ow = (conv_output_size(*geo) for geo in zip(x.shape[2:], weight_shape[2:], stride, padding, dilation))
    return torch.empty((x.shape[0], weight_shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _fake_bitmask_linear(x, values, bitmask, offsets, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "bitmask_linear: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, bitmask.shape[0]))


def _fake_bitmask_linear_cpu(x, values, bitmask, offsets, in_features, bias, columns, algo=0):
    torch._check(algo in rules.BITMASK_ALGO_NAMES,
                 lambda: f"bitmask_linear: algo must be one of {sorted(rules.BITMASK_ALGO_NAMES)}")
    torch._check(columns is None or columns.shape[0] == values.shape[0],
                 lambda: "bitmask_linear: columns must hold one entry per kept value")
    return _fake_bitmask_linear(x, values, bitmask, offsets, in_features, bias)


def _fake_nm_linear_q(x, values, indices, scales, n, m, in_features, bits, group_size, bias):
    torch._check(x.shape[-1] == in_features, lambda: "nm_linear_q: x.shape[-1] must equal in_features")
    torch._check(bits in (4, 8), lambda: "nm_linear_q: bits must be 8 or 4")
    return x.new_empty(_out_shape(x, indices.shape[0]))


def _fake_nm_linear_q_cpu(x, values, indices, scales, n, m, in_features, bits, group_size, bias, algo):
    torch._check(algo in rules.Q_ALGO_NAMES, lambda: f"nm_linear_q: algo must be one of {sorted(rules.Q_ALGO_NAMES)}")
    torch._check(algo != rules.Q_ALGO_INT8_DOT or (n, m) == (2, 4),
                 lambda: f"nm_linear_q: algo {algo} (the 2:4 int8 dot-product GEMM) runs 2:4 int8 or int4 weights")
    torch._check(algo != rules.Q_ALGO_INT8_EXPAND or bits == 8,
                 lambda: f"nm_linear_q: algo {algo} (int8 values expanded for torch's int8 GEMM) runs int8 values")
    return _fake_nm_linear_q(x, values, indices, scales, n, m, in_features, bits, group_size, bias)


def _fake_bitmask_linear_q_cpu(x, values, bitmask, offsets, scales, in_features, bias, algo):
    bitmask_algos = (rules.Q_ALGO_EXACT, rules.Q_ALGO_INT8_ACT, rules.Q_ALGO_INT8_EXPAND, rules.Q_ALGO_EXACT_TILES)
    torch._check(algo in bitmask_algos, lambda: f"bitmask_linear_q: algo must be one of {bitmask_algos}")
    return _fake_bitmask_linear_q(x, values, bitmask, offsets, scales, in_features, bias)


def _fake_bitmask_linear_q(x, values, bitmask, offsets, scales, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "bitmask_linear_q: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, bitmask.shape[0]))


def _fake_block_linear(x, crow_indices, col_indices, values, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "block_linear: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, (crow_indices.shape[0] - 1) * values.shape[1]))


def _fake_block_linear_cpu(x, crow_indices, col_indices, values, in_features, bias, algo):
    torch._check(algo in rules.BLOCK_ALGO_NAMES,
                 lambda: f"block_linear: algo must be one of {sorted(rules.BLOCK_ALGO_NAMES)}")
    return _fake_block_linear(x, crow_indices, col_indices, values, in_features, bias)


def _fake_block_linear_q(x, crow_indices, col_indices, values, scales, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "block_linear_q: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, (crow_indices.shape[0] - 1) * values.shape[1]))


def _fake_block_linear_q_cpu(x, crow_indices, col_indices, values, scales, in_features, bias, algo):
    block_algos = (rules.Q_ALGO_EXACT, rules.Q_ALGO_INT8_EXPAND, rules.Q_ALGO_EXACT_TILES)
    torch._check(algo in block_algos, lambda: f"block_linear_q: algo must be one of {block_algos}")
    return _fake_block_linear_q(x, crow_indices, col_indices, values, scales, in_features, bias)


def _fake_masked_linear(x, weight, bitmask, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "masked_linear: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, weight.shape[0]))


def _fake_bitmask_compress(weight, mask):
    out, k = weight.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (weight.new_empty((nnz,)), weight.new_empty((out, math.ceil(k / 64)), dtype=torch.int64),
            weight.new_empty((out, math.ceil(k / BITMASK_TILE_COLS)), dtype=torch.int32))


def _fake_block_compress(weight, mask, block_rows, block_cols):
    out, k = weight.shape
    nnzb = torch.library.get_ctx().new_dynamic_size()
    return (weight.new_empty((out // block_rows + 1,), dtype=torch.int64),
            weight.new_empty((nnzb,), dtype=torch.int64), weight.new_empty((nnzb, block_rows, block_cols)))


FAKES: dict[str, Callable] = {
    "nm_linear": _fake_nm_linear,
    "nm_linear_cpu": _fake_nm_linear_cpu,
    "nm_conv2d_cpu": _fake_nm_conv2d_cpu,
    "bitmask_linear_cpu": _fake_bitmask_linear_cpu,
    "nm24_pack_panels": lambda values, indices, in_features: values.new_empty(
        (nm24_panels_bytes(values.shape[0], in_features),), dtype=torch.uint8),
    "nm_conv2d": _fake_nm_conv2d,
    "bitmask_linear": _fake_bitmask_linear,
    "block_linear": _fake_block_linear,
    "block_linear_cpu": _fake_block_linear_cpu,
    "block_linear_q": _fake_block_linear_q,
    "block_linear_q_cpu": _fake_block_linear_q_cpu,
    "nm_linear_q": _fake_nm_linear_q,
    "bitmask_linear_q": _fake_bitmask_linear_q,
    "nm_linear_q_cpu": _fake_nm_linear_q_cpu,
    "bitmask_linear_q_cpu": _fake_bitmask_linear_q_cpu,
    "masked_linear": _fake_masked_linear,
    "masked_linear_grad_input": lambda grad_out, weight, bitmask: grad_out.new_empty(
        _out_shape(grad_out, weight.shape[1])),
    "masked_linear_grad_weight": lambda grad_out, x, bitmask: x.new_empty((grad_out.shape[-1], x.shape[-1])),
    "nm_compress": lambda weight, mask, n, m: _nm_packed(weight, n, m),
    "nm_score_compress": lambda weight, grad, act_norm, n, m: _nm_packed(weight, n, m),
    "nm_decompress": lambda values, indices, n, m, in_features: values.new_empty((values.shape[0], in_features)),
    "bitmask_compress": _fake_bitmask_compress,
    "bitmask_decompress": lambda values, bitmask, offsets, in_features: values.new_empty(
        (bitmask.shape[0], in_features)),
    "block_compress": _fake_block_compress,
    "block_decompress": lambda crow_indices, col_indices, values, in_features: values.new_empty(
        ((crow_indices.shape[0] - 1) * values.shape[1], in_features)),
    "group_score": lambda weight, grad, act_norm, block_rows, block_cols, p: weight.new_empty(
        (weight.shape[0] // block_rows, weight.shape[1] // block_cols), dtype=torch.float32),
    "act_norm_accumulate": lambda sumsq, x: None,
    "hessian_accumulate": lambda hessian, x: None,
}


# ------------------------------------------------- autograd (one per op, all backends)
def _grad_bias(ctx, grad, slot):
    return grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[slot] else None


def _weight_grad(grad, x) -> torch.Tensor:
    """grad^T @ x over all leading positions: the dense [out, in] weight gradient."""
    return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)


def _sparse_setup(values_slot: int, fmt_len: int):
    def setup(ctx, inputs, output):
        x = inputs[0]
        ctx.fmt = inputs[1:1 + fmt_len]  # the format's tensors and ints
        ctx.x = x if ctx.needs_input_grad[values_slot] else None
    return setup


def _nm_kept_columns(values, indices, n: int, m: int) -> torch.Tensor:
    """[out, kept] int64: the column of each kept value of an N:M weight (for gathering the
    kept values' gradients out of a dense [out, in] one)."""
    kept = values.shape[1]
    return (torch.arange(kept, device=values.device) // n * m) + unpack_bits(indices, nm_index_bits(m), kept)


def _nm_backward(ctx, grad):
    values, indices, n, m, k = ctx.fmt
    gx = grad @ nm_decompress(values, indices, n, m, k).to(grad.dtype) if ctx.needs_input_grad[0] else None
    gv = None
    if ctx.needs_input_grad[1]:
        gv = _weight_grad(grad, ctx.x).gather(1, _nm_kept_columns(values, indices, n, m)).to(values.dtype)
    return gx, gv, None, None, None, None, _grad_bias(ctx, grad, 6)


def _nm_conv2d_backward(ctx, grad):
    values, indices, n, m, shape, stride, padding, dilation = ctx.fmt
    k = values.shape[1] // n * m
    gx = gv = None
    if ctx.needs_input_grad[0]:
        w = from_2d(nm_decompress(values, indices, n, m, k), tuple(shape)).to(grad.dtype)
        gx = torch.nn.grad.conv2d_input(list(ctx.x_shape), w, grad, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        gw = as_2d(torch.nn.grad.conv2d_weight(ctx.x.to(grad.dtype), list(shape), grad, stride, padding, dilation))
        gv = gw.gather(1, _nm_kept_columns(values, indices, n, m)).to(values.dtype)
    gb = grad.sum((0, 2, 3)) if ctx.needs_input_grad[9] else None
    return gx, gv, None, None, None, None, None, None, None, gb


def _nm_conv2d_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.fmt = inputs[1:9]
    ctx.x_shape = x.shape
    ctx.x = x if ctx.needs_input_grad[1] else None


def _bitmask_backward(ctx, grad):
    values, bitmask, offsets, k = ctx.fmt
    gx = grad @ bitmask_decompress(values, bitmask, offsets, k).to(grad.dtype) if ctx.needs_input_grad[0] else None
    gv = None
    if ctx.needs_input_grad[1]:  # values are the kept elements in row-major order
        gv = _weight_grad(grad, ctx.x).masked_select(unpack_bitmask(bitmask, k)).to(values.dtype)
    return gx, gv, None, None, None, _grad_bias(ctx, grad, 5)


def _block_backward(ctx, grad):
    crow, col, values, k = ctx.fmt
    gx = grad @ block_decompress(crow, col, values, k).to(grad.dtype) if ctx.needs_input_grad[0] else None
    gv = None
    if ctx.needs_input_grad[3]:
        nbr, (_, bh, bw) = crow.numel() - 1, values.shape
        rows = torch.repeat_interleave(torch.arange(nbr, device=crow.device), crow.diff())
        blocks = _weight_grad(grad, ctx.x).reshape(nbr, bh, k // bw, bw).permute(0, 2, 1, 3)
        gv = blocks[rows, col].to(values.dtype)
    return gx, None, None, gv, None, _grad_bias(ctx, grad, 5)


def _q_setup(fmt_len: int):
    def setup(ctx, inputs, output):
        ctx.fmt = inputs[1:1 + fmt_len]  # the format's tensors and ints (no gradient to integer values)
    return setup


def _nm_q_backward(ctx, grad):
    values, indices, scales, n, m, k, bits, group_size = ctx.fmt
    gx = None
    if ctx.needs_input_grad[0]:
        dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w = reference.nm_q_values(values, scales, k // m * n, bits, group_size, dt)
        gx = grad @ nm_decompress(w, indices, n, m, k).to(grad.dtype)
    return gx, None, None, None, None, None, None, None, None, _grad_bias(ctx, grad, 9)


def _bitmask_q_backward(ctx, grad):
    values, bitmask, offsets, scales, k = ctx.fmt
    gx = None
    if ctx.needs_input_grad[0]:
        dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w = reference.bitmask_q_values(values, bitmask, scales, k, dt)
        gx = grad @ bitmask_decompress(w, bitmask, offsets, k).to(grad.dtype)
    return gx, None, None, None, None, None, _grad_bias(ctx, grad, 6)


def _block_q_backward(ctx, grad):
    crow, col, values, scales, k = ctx.fmt
    gx = None
    if ctx.needs_input_grad[0]:
        dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
        w = reference.block_q_values(crow, values, scales, dt)
        gx = grad @ block_decompress(crow, col, w, k).to(grad.dtype)
    return gx, None, None, None, None, None, _grad_bias(ctx, grad, 6)


def _masked_setup(ctx, inputs, output):
    x, weight, bitmask, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None, bitmask)


def _masked_backward(ctx, grad):
    x, weight, bitmask = ctx.saved_tensors
    gx = masked_linear_grad_input(grad, weight, bitmask) if ctx.needs_input_grad[0] else None
    gw = masked_linear_grad_weight(grad, x, bitmask) if ctx.needs_input_grad[1] else None
    return gx, gw, None, _grad_bias(ctx, grad, 3)


def _cpu_args(backward: Callable, extra: int) -> Callable:
    """The backward of a CPU-only op: the shared op's, with None for its `extra` CPU arguments."""
    def cpu_backward(ctx, grad):
        return (*backward(ctx, grad), *([None] * extra))
    return cpu_backward


AUTOGRAD: dict[str, tuple[Callable, Callable]] = {
    "nm_linear": (_nm_backward, _sparse_setup(1, 5)),
    "nm_linear_cpu": (_cpu_args(_nm_backward, 2), _sparse_setup(1, 5)),
    "nm_conv2d": (_nm_conv2d_backward, _nm_conv2d_setup),
    "nm_conv2d_cpu": (_cpu_args(_nm_conv2d_backward, 2), _nm_conv2d_setup),
    "bitmask_linear": (_bitmask_backward, _sparse_setup(1, 4)),
    "bitmask_linear_cpu": (_cpu_args(_bitmask_backward, 2), _sparse_setup(1, 4)),
    "block_linear": (_block_backward, _sparse_setup(3, 4)),
    "block_linear_cpu": (_cpu_args(_block_backward, 1), _sparse_setup(3, 4)),
    "nm_linear_q": (_nm_q_backward, _q_setup(8)),
    "bitmask_linear_q": (_bitmask_q_backward, _q_setup(5)),
    # int8 activations (algos 1 and 2): the gradient of the exact product (straight through the
    # rounding of x)
    "nm_linear_q_cpu": (_cpu_args(_nm_q_backward, 1), _q_setup(8)),
    "bitmask_linear_q_cpu": (_cpu_args(_bitmask_q_backward, 1), _q_setup(5)),
    "block_linear_q": (_block_q_backward, _q_setup(5)),
    "block_linear_q_cpu": (_cpu_args(_block_q_backward, 1), _q_setup(5)),
    "masked_linear": (_masked_backward, _masked_setup),
}


def register(namespace: str, names) -> None:
    """Registers the fake kernel and autograd of each op in `names` on `namespace::op`."""
    for name in names:
        qualname = f"{namespace}::{name}"
        if name in FAKES:
            torch.library.register_fake(qualname)(FAKES[name])
        if name in AUTOGRAD:
            backward, setup = AUTOGRAD[name]
            torch.library.register_autograd(qualname, backward, setup_context=setup)


_triton_loaded: set[str] = set()
_semi_structured_loaded = False


def load_semi_structured() -> None:
    global _semi_structured_loaded
    if not _semi_structured_loaded:
        from .. import semi_structured

        semi_structured.load()
        register("sparsekern_cusparselt", ["nm_linear", "nm_linear_q"])
        register("sparsekern_cutlass", ["nm_linear"])
        _semi_structured_loaded = True


def load_triton(family: str) -> None:
    if family in _triton_loaded:
        return
    from .. import triton as sktriton

    sktriton.load(family)
    register("sparsekern_triton", [s.name for s in OPS.values() if s.triton == family])
    _triton_loaded.add(family)


def compiled_ops() -> list[str]:
    """Every op of the sparsekern:: namespace (C++ and CUDA): the table's, and their CPU-only ops."""
    names = []
    for s in OPS.values():
        if s.cpp or s.cuda:
            names.append(s.name)
        if s.cpu_op is not None:
            names.append(s.cpu_op)
    return names


if _extension.LOADED:
    register("sparsekern", compiled_ops())
