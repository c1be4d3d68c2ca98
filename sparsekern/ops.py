"""The one module that calls torch.ops.sparsekern.*.

Each public function validates its arguments (clear exceptions naming the argument,
the same whatever backend runs), picks a backend, and calls the compiled op or the
pure-torch reference (sparsekern/reference.py). Backends, in order:

  GPU: "cuda" (compiled CUDA kernel, built for this GPU's architecture), else
       "triton" (sparsekern.triton, where an op has one), else "reference";
  CPU: "cpp" (compiled C++ kernel), else "reference".
  float64 always runs the reference (it is the oracle's precision).

`backend_for(op, tensor)` returns the choice and `explain_backend(op, tensor)` says
why; `use_backend("reference")` forces one inside a `with` block.

Every compiled op has a fake kernel (torch.library.register_fake), so it traces under
torch.compile(fullgraph=True), and autograd registered on the op itself.
Tensor layouts: sparsekern/formats.py. Schemas: csrc/sparsekern.cpp.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import _extension, reference
from .formats import BitmaskWeight, BlockWeight, NMWeight

# Ops with a compiled CUDA kernel (csrc/cuda/*.cu); the rest run the reference on GPU.
CUDA_OPS = frozenset({"nm_linear", "bitmask_linear", "masked_linear", "masked_linear_grad_input"})
# Ops with a Triton kernel (sparsekern/triton/), used on GPUs where the CUDA one cannot run.
TRITON_OPS = frozenset({"nm_linear", "bitmask_linear", "block_linear", "masked_linear", "masked_linear_grad_input",
                        "group_norm", "act_norm_accumulate", "nm_score_compress"})
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_override: str | None = None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("reference", "cpp", "cuda", "triton") inside the block (None: automatic)."""
    global _override
    if name not in (None, "reference", "cpp", "cuda", "triton"):
        raise ValueError(f"use_backend: unknown backend {name!r}")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def explain_backend(op: str, t: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) for running `op` on tensors like `t`."""
    if _override is not None:
        return _override, "forced by use_backend()"
    if t.dtype not in KERNEL_DTYPES:
        return "reference", f"{t.dtype} has no compiled kernel"
    if t.device.type == "cpu":
        if _extension.cpu_kernels_available():
            return "cpp", "compiled C++ kernel"
        return "reference", _extension.LOAD_ERROR or "extension not loaded"
    if t.device.type == "cuda":
        if op in CUDA_OPS and _extension.cuda_kernels_available(t.device):
            return "cuda", "compiled CUDA kernel for this GPU"
        if op in TRITON_OPS and _extension.triton_available():
            why = "no CUDA kernel for this op" if op not in CUDA_OPS else "CUDA kernel not built for this GPU"
            return "triton", f"Triton kernel ({why})"
        if op not in CUDA_OPS:
            return "reference", f"{op} has no CUDA kernel and Triton is not installed"
        if not _extension.LOADED:
            return "reference", _extension.LOAD_ERROR or "extension not loaded"
        if not _extension.BUILD_INFO.get("with_cuda"):
            return "reference", "extension built without CUDA"
        return "reference", (f"CUDA kernels built for sm_{_extension.cuda_archs()} do not run on compute "
                             f"capability {torch.cuda.get_device_capability(t.device)}")
    return "reference", f"no kernels for device type {t.device.type}"


def backend_for(op_or_tensor, t: torch.Tensor | None = None) -> str:
    if t is None:  # backend_for(tensor): any op
        return explain_backend("nm_linear", op_or_tensor)[0]
    return explain_backend(op_or_tensor, t)[0]


def _compiled(op: str, t: torch.Tensor) -> bool:
    return backend_for(op, t) in ("cpp", "cuda")


def _triton(op: str, t: torch.Tensor):
    """The Triton kernels' namespace when `op` should run there, else None."""
    if backend_for(op, t) != "triton":
        return None
    from . import triton as sktriton

    return sktriton.kernels()


# ------------------------------------------------------------------ argument checks
def _check_x(op: str, x, in_features: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x.shape[-1] ({x.shape[-1] if x.dim() else 'scalar'}) must equal in_features "
                         f"({in_features})")
    if x.dtype != dtype:
        raise TypeError(f"{op}: x dtype ({x.dtype}) must match the weight dtype ({dtype}); convert one of them")
    if x.device != device:
        raise ValueError(f"{op}: x is on {x.device} but the weight is on {device}")


def _check_bias(op: str, bias, out_features: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias dtype ({bias.dtype}) must match x dtype ({x.dtype})")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _check_format(op: str, weight, cls) -> None:
    if not isinstance(weight, cls):
        raise TypeError(f"{op}: weight must be a sparsekern.formats.{cls.__name__}, got {type(weight).__name__}")


# --------------------------------------------------------------------- linear ops
def nm_linear(x: torch.Tensor, weight: NMWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W in N:M format.

    x [..., in] (float32/bfloat16/float16, the weight's dtype), weight NMWeight of shape
    [out, in], bias [out] or None -> y [..., out] in x's dtype, fp32 accumulation.
    """
    _check_format("nm_linear", weight, NMWeight)
    _check_x("nm_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("nm_linear", bias, weight.shape[0], x)
    tk = _triton("nm_linear", x)
    if tk is not None:
        return tk.nm_linear(x, weight, bias)
    args = (x, weight.values, weight.indices, weight.n, weight.m, weight.in_features, bias)
    if _compiled("nm_linear", x):
        return torch.ops.sparsekern.nm_linear(*args)
    return reference.nm_linear(*args)


def bitmask_linear(x: torch.Tensor, weight: BitmaskWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W in the tiled bitmask format (unstructured sparsity).
    Shapes and dtypes as nm_linear."""
    _check_format("bitmask_linear", weight, BitmaskWeight)
    _check_x("bitmask_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("bitmask_linear", bias, weight.shape[0], x)
    tk = _triton("bitmask_linear", x)
    if tk is not None:
        return tk.bitmask_linear(x, weight, bias)
    args = (x, weight.values, weight.bitmask, weight.offsets, weight.in_features, bias)
    if _compiled("bitmask_linear", x):
        return torch.ops.sparsekern.bitmask_linear(*args)
    return reference.bitmask_linear(*args)


def block_linear(x: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W in block (BSR) format. Shapes and dtypes as nm_linear."""
    _check_format("block_linear", weight, BlockWeight)
    _check_x("block_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("block_linear", bias, weight.shape[0], x)
    tk = _triton("block_linear", x)
    if tk is not None and weight.block[0] == weight.block[1] and weight.block[0] in (16, 32, 64):
        return tk.block_linear(x, weight, bias)
    args = (x, weight.crow_indices, weight.col_indices, weight.values, weight.in_features, bias)
    if _compiled("block_linear", x):
        return torch.ops.sparsekern.block_linear(*args)
    return reference.block_linear(*args)


_LINEAR_BY_FORMAT = {NMWeight: nm_linear, BitmaskWeight: bitmask_linear, BlockWeight: block_linear}


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for any sparsekern format: picks nm/bitmask/block_linear by type."""
    fn = _LINEAR_BY_FORMAT.get(type(weight))
    if fn is None:
        raise TypeError(f"sparse_linear: weight must be NMWeight, BitmaskWeight or BlockWeight, got "
                        f"{type(weight).__name__}")
    return fn(x, weight, bias)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T + bias without materialising W*M (the training-time op).

    weight [out, in] dense, bitmask int64 [out, ceil(in/64)] (reference.pack_bitmask of
    a bool mask). Differentiable in x, weight (gradient masked) and bias.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("masked_linear: weight must be a 2-D tensor [out, in]")
    _check_x("masked_linear", x, weight.shape[1], weight.dtype, weight.device)
    _check_bitmask("masked_linear", bitmask, weight)
    _check_bias("masked_linear", bias, weight.shape[0], x)
    tk = _triton("masked_linear", x)
    if tk is not None:
        return tk.masked_linear(x, weight, bitmask, bias)
    if _compiled("masked_linear", x):
        return torch.ops.sparsekern.masked_linear(x, weight, bitmask, bias)
    return reference.masked_linear(x, weight, bitmask, bias)


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """grad_out [..., out] @ (W*M) -> [..., in]: masked_linear's input gradient."""
    _check_x("masked_linear_grad_input", grad_out, weight.shape[0], weight.dtype, weight.device)
    _check_bitmask("masked_linear_grad_input", bitmask, weight)
    tk = _triton("masked_linear_grad_input", grad_out)
    if tk is not None:
        return tk.masked_linear_grad_input(grad_out, weight, bitmask)
    if _compiled("masked_linear_grad_input", grad_out):
        return torch.ops.sparsekern.masked_linear_grad_input(grad_out, weight, bitmask)
    return reference.masked_linear_grad_input(grad_out, weight, bitmask)


def _check_bitmask(op: str, bitmask, weight: torch.Tensor) -> None:
    words = math.ceil(weight.shape[1] / 64)
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.int64:
        raise TypeError(f"{op}: bitmask must be an int64 tensor (sparsekern.reference.pack_bitmask(mask))")
    if tuple(bitmask.shape) != (weight.shape[0], words):
        raise ValueError(f"{op}: bitmask must have shape ({weight.shape[0]}, {words}), got {tuple(bitmask.shape)}")
    if bitmask.device != weight.device:
        raise ValueError(f"{op}: bitmask is on {bitmask.device} but weight is on {weight.device}")


# ------------------------------------------------------- compress / decompress ops
def nm_compress(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int):
    """weight [out, in] -> (values [out, in*n/m], indices uint8); see formats.NMWeight."""
    if _compiled("nm_compress", weight):
        return torch.ops.sparsekern.nm_compress(weight, mask, n, m)
    return reference.nm_compress(weight, mask, n, m)


def nm_decompress(values, indices, n: int, m: int, in_features: int) -> torch.Tensor:
    if _compiled("nm_decompress", values):
        return torch.ops.sparsekern.nm_decompress(values, indices, n, m, in_features)
    return reference.nm_decompress(values, indices, n, m, in_features)


def bitmask_compress(weight: torch.Tensor, mask: torch.Tensor | None):
    """weight [out, in] -> (values [nnz], bitmask int64, offsets int32); see formats."""
    if _compiled("bitmask_compress", weight):
        return torch.ops.sparsekern.bitmask_compress(weight, mask)
    return reference.bitmask_compress(weight, mask)


def bitmask_decompress(values, bitmask, offsets, in_features: int) -> torch.Tensor:
    if _compiled("bitmask_decompress", values):
        return torch.ops.sparsekern.bitmask_decompress(values, bitmask, offsets, in_features)
    return reference.bitmask_decompress(values, bitmask, offsets, in_features)


def block_compress(weight: torch.Tensor, mask: torch.Tensor | None, block_rows: int, block_cols: int):
    """weight [out, in] -> (crow_indices, col_indices, values [nnzb, bh, bw]) (BSR)."""
    if _compiled("block_compress", weight):
        return torch.ops.sparsekern.block_compress(weight, mask, block_rows, block_cols)
    return reference.block_compress(weight, mask, block_rows, block_cols)


def block_decompress(crow_indices, col_indices, values, in_features: int) -> torch.Tensor:
    if _compiled("block_decompress", values):
        return torch.ops.sparsekern.block_decompress(crow_indices, col_indices, values, in_features)
    return reference.block_decompress(crow_indices, col_indices, values, in_features)


# ------------------------------------------------------------- fused scoring ops
def _check_score_inputs(op: str, weight, grad, act_norm) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{op}: weight must be a 2-D floating tensor")
    if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != weight.shape):
        raise ValueError(f"{op}: grad must have the weight's shape {tuple(weight.shape)}")
    if act_norm is not None and (not isinstance(act_norm, torch.Tensor) or act_norm.shape != (weight.shape[1],)):
        raise ValueError(f"{op}: act_norm must have shape ({weight.shape[1]},) (one norm per input feature)")
    for name, t in (("grad", grad), ("act_norm", act_norm)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")


def group_norm(weight: torch.Tensor, block_rows: int, block_cols: int, p: int = 1, *,
               grad: torch.Tensor | None = None, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Group reduction of the score e = |w| * |grad| * act_norm[col] in one pass.

    weight [rows, cols]; groups of (block_rows, block_cols) tiling it; p=1: sum(e),
    p=2: sqrt(sum(e^2)). Returns float32 [rows/block_rows, cols/block_cols]. Rows:
    (1, cols); columns: (rows, 1); N:M groups: (1, m); the layer: (rows, cols).
    """
    _check_score_inputs("group_norm", weight, grad, act_norm)
    if p not in (1, 2):
        raise ValueError(f"group_norm: p must be 1 (L1) or 2 (L2), got {p}")
    rows, cols = weight.shape
    if not (block_rows > 0 and block_cols > 0 and rows % block_rows == 0 and cols % block_cols == 0):
        raise ValueError(f"group_norm: group shape ({block_rows}, {block_cols}) must divide weight shape {(rows, cols)}")
    tk = _triton("group_norm", weight)
    if tk is not None:
        return tk.group_norm(weight, block_rows, block_cols, p, grad=grad, act_norm=act_norm)
    if _compiled("group_norm", weight):
        return torch.ops.sparsekern.group_norm(weight, grad, act_norm, block_rows, block_cols, p)
    return reference.group_norm(weight, grad, act_norm, block_rows, block_cols, p)


def act_norm_accumulate(sumsq: torch.Tensor, x: torch.Tensor) -> None:
    """In place: sumsq[j] += sum of x[..., j]^2 over every leading position (one pass)."""
    if not isinstance(sumsq, torch.Tensor) or sumsq.dim() != 1 or sumsq.dtype not in (torch.float32, torch.float64):
        raise ValueError("act_norm_accumulate: sumsq must be a 1-D float32/float64 tensor")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != sumsq.shape[0]:
        raise ValueError(f"act_norm_accumulate: x must be floating with x.shape[-1] == {sumsq.shape[0]}")
    if x.device != sumsq.device:
        raise ValueError(f"act_norm_accumulate: x is on {x.device} but sumsq is on {sumsq.device}")
    tk = _triton("act_norm_accumulate", x)
    if tk is not None and sumsq.is_contiguous():
        return tk.act_norm_accumulate(sumsq, x)
    if _compiled("act_norm_accumulate", x) and sumsq.is_contiguous():
        torch.ops.sparsekern.act_norm_accumulate(sumsq, x)
    else:
        reference.act_norm_accumulate(sumsq, x)


def nm_score_compress(weight: torch.Tensor, n: int, m: int, *, grad: torch.Tensor | None = None,
                      act_norm: torch.Tensor | None = None):
    """Score (|w| * |grad| * act_norm[col]) -> N:M mask -> (values, indices) in one pass."""
    _check_score_inputs("nm_score_compress", weight, grad, act_norm)
    NMWeight.check_nm(n, m, "nm_score_compress")
    if weight.shape[1] % m:
        raise ValueError(f"nm_score_compress: in_features ({weight.shape[1]}) must be divisible by m = {m}")
    tk = _triton("nm_score_compress", weight)
    if tk is not None:
        return tk.nm_score_compress(weight, n, m, grad=grad, act_norm=act_norm)
    if _compiled("nm_score_compress", weight):
        return torch.ops.sparsekern.nm_score_compress(weight, grad, act_norm, n, m)
    return reference.nm_score_compress(weight, grad, act_norm, n, m)


def hessian_accumulate(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """In place: hessian += X^T X with X = x reshaped to [rows, K] (SparseGPT's Hessian)."""
    if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1] or \
            hessian.dtype not in (torch.float32, torch.float64):
        raise ValueError("hessian_accumulate: hessian must be a square float32/float64 tensor")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != hessian.shape[0]:
        raise ValueError(f"hessian_accumulate: x must be floating with x.shape[-1] == {hessian.shape[0]}")
    if x.device != hessian.device:
        raise ValueError(f"hessian_accumulate: x is on {x.device} but hessian is on {hessian.device}")
    if _compiled("hessian_accumulate", x):
        torch.ops.sparsekern.hessian_accumulate(hessian, x)
    else:
        reference.hessian_accumulate(hessian, x)


# ------------------------------------------------ fake kernels and autograd (compiled)
def _out_shape(x: torch.Tensor, out_features) -> list:
    return list(x.shape[:-1]) + [out_features]


def _register() -> None:
    lib = "sparsekern::"
    rf = torch.library.register_fake

    @rf(lib + "nm_linear")
    def _(x, values, indices, n, m, in_features, bias):
        torch._check(x.shape[-1] == in_features, lambda: "nm_linear: x.shape[-1] must equal in_features")
        torch._check(values.dtype == x.dtype, lambda: "nm_linear: values dtype must match x dtype")
        return x.new_empty(_out_shape(x, values.shape[0]))

    @rf(lib + "nm_compress")
    def _(weight, mask, n, m):
        out, k = weight.shape
        kept = k // m * n
        return (weight.new_empty((out, kept)),
                weight.new_empty((out, math.ceil(kept * reference.nm_index_bits(m) / 8)), dtype=torch.uint8))

    @rf(lib + "nm_score_compress")
    def _(weight, grad, act_norm, n, m):
        out, k = weight.shape
        kept = k // m * n
        return (weight.new_empty((out, kept)),
                weight.new_empty((out, math.ceil(kept * reference.nm_index_bits(m) / 8)), dtype=torch.uint8))

    @rf(lib + "group_norm")
    def _(weight, grad, act_norm, block_rows, block_cols, p):
        return weight.new_empty((weight.shape[0] // block_rows, weight.shape[1] // block_cols), dtype=torch.float32)

    @rf(lib + "act_norm_accumulate")
    def _(sumsq, x):
        return None

    @rf(lib + "hessian_accumulate")
    def _(hessian, x):
        return None

    @rf(lib + "nm_decompress")
    def _(values, indices, n, m, in_features):
        return values.new_empty((values.shape[0], in_features))

    @rf(lib + "bitmask_linear")
    def _(x, values, bitmask, offsets, in_features, bias):
        torch._check(x.shape[-1] == in_features, lambda: "bitmask_linear: x.shape[-1] must equal in_features")
        return x.new_empty(_out_shape(x, bitmask.shape[0]))

    @rf(lib + "bitmask_compress")
    def _(weight, mask):
        out, k = weight.shape
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (weight.new_empty((nnz,)), weight.new_empty((out, math.ceil(k / 64)), dtype=torch.int64),
                weight.new_empty((out, math.ceil(k / reference.BITMASK_TILE_COLS)), dtype=torch.int32))

    @rf(lib + "bitmask_decompress")
    def _(values, bitmask, offsets, in_features):
        return values.new_empty((bitmask.shape[0], in_features))

    @rf(lib + "block_linear")
    def _(x, crow_indices, col_indices, values, in_features, bias):
        torch._check(x.shape[-1] == in_features, lambda: "block_linear: x.shape[-1] must equal in_features")
        return x.new_empty(_out_shape(x, (crow_indices.shape[0] - 1) * values.shape[1]))

    @rf(lib + "block_compress")
    def _(weight, mask, block_rows, block_cols):
        out, k = weight.shape
        nnzb = torch.library.get_ctx().new_dynamic_size()
        return (weight.new_empty((out // block_rows + 1,), dtype=torch.int64),
                weight.new_empty((nnzb,), dtype=torch.int64), weight.new_empty((nnzb, block_rows, block_cols)))

    @rf(lib + "block_decompress")
    def _(crow_indices, col_indices, values, in_features):
        return values.new_empty(((crow_indices.shape[0] - 1) * values.shape[1], in_features))

    @rf(lib + "masked_linear")
    def _(x, weight, bitmask, bias):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "masked_linear: x.shape[-1] must equal in_features")
        return x.new_empty(_out_shape(x, weight.shape[0]))

    @rf(lib + "masked_linear_grad_input")
    def _(grad_out, weight, bitmask):
        return grad_out.new_empty(_out_shape(grad_out, weight.shape[1]))

    # ---- autograd: gradients for x and bias through the dense view of the weight;
    # compressed values are not trainable (masked_linear is the training op).
    def _grad_bias(ctx, grad):
        return grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[-1] else None

    def _no_value_grad(op, ctx, value_slots):
        if any(ctx.needs_input_grad[i] for i in value_slots):
            raise RuntimeError(f"{op}: gradients for the compressed weight are not supported; train with the dense "
                               "weight and a mask (ops.masked_linear, or a sparse module in training mode)")

    def _sparse_setup(ctx, inputs, output):
        ctx.inputs = inputs[1:-1]  # the format tensors and ints (no activations needed)

    def _make_backward(op, decompress, value_slots):
        def backward(ctx, grad):
            _no_value_grad(op, ctx, value_slots)
            gx = grad @ decompress(*ctx.inputs).to(grad.dtype) if ctx.needs_input_grad[0] else None
            return (gx,) + (None,) * (len(ctx.needs_input_grad) - 2) + (_grad_bias(ctx, grad),)
        return backward

    torch.library.register_autograd(
        lib + "nm_linear", _make_backward("nm_linear", nm_decompress, (1,)), setup_context=_sparse_setup)
    torch.library.register_autograd(
        lib + "bitmask_linear", _make_backward("bitmask_linear", bitmask_decompress, (1,)),
        setup_context=_sparse_setup)
    torch.library.register_autograd(
        lib + "block_linear",
        _make_backward("block_linear", lambda crow, col, vals, k: block_decompress(crow, col, vals, k), (3,)),
        setup_context=_sparse_setup)

    def _masked_setup(ctx, inputs, output):
        x, weight, bitmask, _ = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, bitmask)

    def _masked_backward(ctx, grad):
        x, weight, bitmask = ctx.saved_tensors
        gx = masked_linear_grad_input(grad, weight, bitmask) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gw = (g2.t() @ x2) * reference.unpack_bitmask(bitmask, weight.shape[1]).to(grad.dtype)
        return gx, gw, None, _grad_bias(ctx, grad)

    torch.library.register_autograd(lib + "masked_linear", _masked_backward, setup_context=_masked_setup)


if _extension.LOADED:
    _register()
