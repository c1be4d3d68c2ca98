"""The one door to the kernels: every op's checks, backend choice, fake kernel and autograd.

Each public function here checks its arguments once (clear exceptions that name the op
and the argument, whatever backend then runs), asks the dispatch table which backend
runs these tensors, and calls it. Backends of an op, in the order they are tried:

  CPU tensors:  "cpp"       compiled C++ kernel (sparsekern._C, csrc/cpu/)
                "reference" pure torch (sparsekern/reference.py)
  CUDA tensors: "cusparselt" 2:4 bf16/fp16 nm_linear at large batch: cuSPARSELt's sparse
                            tensor-core GEMM on a cached converted weight
                "cutlass"   the same through torch's CUTLASS 2:4 GEMM (sparsekern/semi_structured.py)
                "cuda"      compiled CUDA kernel, when built for this GPU's architecture
                "triton"    Triton kernel (sparsekern/triton/)
                "reference"
  float64 always runs the reference (the oracle's precision).

`OPS` is the table: one `OpSpec` per op says which backends implement it. A decision is
made once per (op, device, dtype, key) and cached; the key holds the batch bucket of
batched ops (`batch_bucket`) and any argument a backend depends on (a Triton block
shape). `explain_backend(op, *args)` reads the very same decision the call uses, so the
explanation is, by construction, what runs. `use_backend(name)` forces a backend inside
a `with` block: ops that have that backend must run it (or raise, saying why it cannot
run here); ops without it choose as usual. On a GPU, median times measured per batch bucket
(sparsekern/tuning.py) pass over a backend that measured slower than another for the key.

Every backend is the same op: fake kernels (torch.compile, opcheck) and autograd are
defined once below and registered on each custom-op namespace that implements the op
(`sparsekern::` for C++/CUDA, `sparsekern_triton::` for Triton); the reference is plain
differentiable torch with the same gradients. Sparse linear ops give gradients to x, to
the kept values and to the bias.

This module reads format objects (sparsekern/formats.py) only through what they declare
(`OP`, `kernel_args()`), so it does not import them: formats sit above ops and compress
through it. Tensor layouts: sparsekern/formats.py. Schemas: csrc/sparsekern.cpp.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import _extension, reference
from .patterns import (BITMASK_TILE_COLS, as_2d, check_nm, conv_output_size, from_2d, nm24_panels_bytes, nm_index_bits,
                       unpack_bitmask, unpack_bits)

BACKENDS = ("cpp", "cusparselt", "cutlass", "cuda", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Upper edges of the batch buckets (rows of x); rows above the last share one bucket.
BATCH_BUCKETS = (1, 4, 16, 64, 256)
_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cusparselt", "cutlass", "cuda", "triton", "reference")}


@dataclass(frozen=True)
class OpSpec:
    """What implements an op. `key` maps the op's public arguments to (the tensor whose
    device and dtype decide, extra key); `triton_limit(extra)` returns why the Triton
    kernel cannot take arguments with that key, or None."""

    name: str
    reference: Callable
    key: Callable
    cpp: bool = True
    cuda: bool = False
    triton: str | None = None  # family module in sparsekern.triton
    triton_limit: Callable | None = None
    semi_structured: bool = False  # the 2:4 GEMM backends "cusparselt" and "cutlass"
    note: Callable | None = None  # note(backend, extra) -> text added to the decision's reason


class Decision(NamedTuple):
    backend: str
    reason: str
    run: Callable


def batch_bucket(rows: int) -> int:
    """The upper edge of the bucket `rows` falls in (BATCH_BUCKETS), or -1 above the last."""
    for edge in BATCH_BUCKETS:
        if rows <= edge:
            return edge
    return -1


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _linear_key(x, weight=None, bias=None):
    return x, (batch_bucket(_rows(x)),)


# From 17 rows (the buckets above 16) the C++ backend runs 2:4 on AVX2 and AVX-512 CPUs through the
# weight-stationary GEMM kernel, which packs (decodes) the weight anew at every call unless
# it gets it pre-packed: NMWeight.gemm_panels(), built on first use and kept with the weight,
# 6 bytes per kept value (0.75x a dense fp32 weight's bytes, reported by explain as
# derived_index_bytes; fp32 weights only). In-process interleaved against the packing kernel (2 threads,
# fp32, one weight each, dense F.linear alongside): 128 rows, Llama-style 2048x2048,
# 5632x2048, 2048x5632 and 4096x4096: 0.95-1.30x dense packing, 1.16-1.48x pre-packed;
# 788 rows (ViT-B's layers): 0.90-1.02x against 0.97-1.06x. With weights streaming from
# memory: bench/results/cpu-gemm-20261128e (providers cpp.nm24_gemm and cpp.nm24_gemm_panels).
# Set CPU_GEMM_PANELS = False to keep the memory (the kernel then packs per call, as before).
CPU_GEMM_PANELS = True


def _uses_panels(x, weight, bucket: int) -> bool:
    """Whether nm_linear (bucket: x's batch bucket) or nm_conv2d (bucket -1) on the C++ backend
    passes weight.gemm_panels() for this x. Not under torch.compile: a traced graph holds no
    cache, so it would pack the weight at every call."""
    # fp32 only: the layout holds fp32 values, 1.5x a dense bf16/fp16 weight's bytes.
    # SPARSEKERN_NM_GEMM=tile (a benchmarking switch) turns the kernel off, so nothing reads it.
    return (CPU_GEMM_PANELS and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == torch.float32 and (getattr(weight, "n", 0), getattr(weight, "m", 0)) == (2, 4)
            and (bucket == -1 or bucket > 16)
            and bool(_extension.BUILD_INFO.get("cpu_avx2_runtime")) and os.environ.get("SPARSEKERN_NM_GEMM") != "tile")


def _nm_key(x, weight=None, bias=None):
    """nm_linear: the batch bucket and, given the weight, (n, m, out, in), which the 2:4 GEMM
    backends depend on (without the weight they say so and pass), and whether the C++
    backend reads the pre-packed weight."""
    bucket = batch_bucket(_rows(x))
    if weight is None:
        return x, (bucket,)
    return x, (bucket, (weight.n, weight.m, weight.shape[0], weight.in_features), _uses_panels(x, weight, bucket))


def _conv_key(x, weight=None, *rest):
    """nm_conv2d: given the weight, whether the C++ backend gets the pre-packed weight. Passed
    whatever the output size; the kernel reads it when its GEMM runs (over 16 output pixels,
    nearly every convolution), as for nm_linear from 17 rows."""
    if weight is None:
        return x, ()
    return x, (_uses_panels(x, weight, -1),)


def _conv_note(backend: str, extra) -> str:
    if backend == "cpp" and extra and extra[0]:
        return ("; passes NMWeight.gemm_panels (the 2:4 weight pre-packed for the GEMM kernel, 6 bytes per kept "
                "value), read over 16 output pixels")
    return ""


def _nm_note(backend: str, extra) -> str:
    if backend == "cpp" and len(extra) > 2 and extra[2]:
        return "; reads NMWeight.gemm_panels (the 2:4 weight pre-packed for the GEMM kernel, 6 bytes per kept value)"
    return ""


# The CPU bitmask kernels read the column of each kept value (BitmaskWeight.column_index,
# 2 bytes per kept value) instead of the mask up to these densities, per batch bucket, with
# AVX-512. 4096x4096 fp32 streamed from memory (each call on another of 24-40 weights), 2
# threads, interleaved with the mask kernels, at 10% / 20% kept: 1 row 1.30x / 1.19x the
# mask kernel, 2 rows 2.0x / 1.00x, 4 rows 1.22x / 0.70x; 8 rows 2.06x / 1.44x, 16 rows
# 2.18x / 2.04x, 32 rows 2.33x / 1.65x (at 30% kept: 1.03x, 1.66x, 0.99x).
COLUMN_INDEX_MAX_DENSITY = {1: 0.2, 4: 0.1, 16: 0.2, 64: 0.2}  # batch bucket -> density
# Without AVX-512 the AVX2 kernels of 1-4 rows read it (gathers of x), against the AVX2 mask
# kernels (a permute per mask byte at 1 row, byte-table decode and gathers at 2-4). Same
# setup (SPARSEKERN_CPU_ISA=avx2), column index / mask kernel speed at 10%, 20%, 30%, 50%
# kept: 1 row 3.59x, 2.20x, 1.91x, 1.47x; 4 rows 1.90x, 1.60x, 1.39x, 1.44x. It costs 2 bytes
# per kept value (BitmaskWeight.derived_nbytes, reported by explain).
COLUMN_INDEX_MAX_DENSITY_AVX2 = {1: 0.5, 4: 0.5}


def _uses_column_index(x, weight, bucket: int) -> bool:
    """Whether bitmask_linear on the C++ backend passes weight.column_index() for this x.
    Reads the batch through its bucket (an int; under torch.compile the row count is
    symbolic, and the bucket is what the dispatch key guards on)."""
    if not (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and weight.in_features <= weight.COLUMN_INDEX_MAX_IN):
        return False
    if _extension.BUILD_INFO.get("cpu_avx512_runtime"):
        limits = COLUMN_INDEX_MAX_DENSITY
    elif _extension.BUILD_INFO.get("cpu_avx2_runtime"):
        limits = COLUMN_INDEX_MAX_DENSITY_AVX2
    else:
        return False
    return bucket in limits and weight.density <= limits[bucket]


def _bitmask_key(x, weight=None, bias=None):
    """bitmask_linear: the batch bucket and, given the weight, whether the column index is used."""
    bucket = batch_bucket(_rows(x))
    return x, (bucket, None if weight is None else _uses_column_index(x, weight, bucket))


def _bitmask_note(backend: str, extra) -> str:
    if backend == "cpp" and len(extra) > 1 and extra[1]:
        return "; reads BitmaskWeight.column_index (a 16-bit column per kept value) instead of the mask"
    return ""


def _block_key(x, weight=None, bias=None):
    return x, (batch_bucket(_rows(x)), None if weight is None else tuple(weight.block))


def _first(t, *rest):
    return t, ()


def _second(a, t, *rest):
    return t, ()


def _triton_block_limit(extra) -> str | None:
    from .triton.block_linear import SUPPORTED_BLOCKS

    block = extra[1]
    if block is None or (block[0] == block[1] and block[0] in SUPPORTED_BLOCKS):
        return None
    return f"Triton block_linear takes square blocks of {SUPPORTED_BLOCKS}, not {block}"


OPS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("nm_linear", reference.nm_linear, _nm_key, cuda=True, triton="nm_linear", semi_structured=True,
           note=_nm_note),
    OpSpec("nm24_pack_panels", reference.nm24_pack_panels, _first),
    # The CPU convolution; on a GPU sparse convolutions run as patches through nm_linear.
    OpSpec("nm_conv2d", reference.nm_conv2d, _conv_key, note=_conv_note),
    OpSpec("bitmask_linear", reference.bitmask_linear, _bitmask_key, cuda=True, triton="bitmask_linear",
           note=_bitmask_note),
    OpSpec("block_linear", reference.block_linear, _block_key, triton="block_linear",
           triton_limit=_triton_block_limit),
    OpSpec("masked_linear", reference.masked_linear, _linear_key, cuda=True, triton="masked_linear"),
    OpSpec("masked_linear_grad_input", reference.masked_linear_grad_input, _linear_key, cuda=True,
           triton="masked_linear"),
    # On CPU the reference (one BLAS GEMM and a mask) is the implementation.
    OpSpec("masked_linear_grad_weight", reference.masked_linear_grad_weight, _second, cpp=False,
           triton="masked_linear"),
    OpSpec("nm_compress", reference.nm_compress, _first),
    OpSpec("nm_decompress", reference.nm_decompress, _first, cuda=True),
    OpSpec("bitmask_compress", reference.bitmask_compress, _first),
    OpSpec("bitmask_decompress", reference.bitmask_decompress, _first, cuda=True),
    OpSpec("block_compress", reference.block_compress, _first),
    OpSpec("block_decompress", reference.block_decompress, _second),
    OpSpec("group_score", reference.group_score, _first, triton="scoring"),
    OpSpec("act_norm_accumulate", reference.act_norm_accumulate, _second, triton="scoring"),
    OpSpec("nm_score_compress", reference.nm_score_compress, _first, triton="scoring"),
    OpSpec("hessian_accumulate", reference.hessian_accumulate, _second),
)}

_override: str | None = None
_decisions: dict[tuple, Decision] = {}


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("cpp", "cuda", "triton", "reference") inside the block (None: automatic)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; one of {BACKENDS} or None")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def clear_decisions() -> None:
    """Forget cached backend decisions (after the extension or the environment changed)."""
    _decisions.clear()


def _implements(spec: OpSpec, backend: str) -> bool:
    return backend == "reference" or (backend == "cpp" and spec.cpp) or (backend == "cuda" and spec.cuda) or \
        (backend == "triton" and spec.triton is not None) or \
        (backend in ("cusparselt", "cutlass") and spec.semi_structured)


def _tuning_key(extra) -> tuple:
    """(batch bucket, (out, in) or None) of a dispatch key, for the measured-timings table;
    bucket None for ops whose key holds no batch bucket."""
    bucket = extra[0] if extra and isinstance(extra[0], int) and not isinstance(extra[0], bool) else None
    shape = extra[1] if len(extra) > 1 else None
    return bucket, (tuple(shape[2:]) if isinstance(shape, tuple) and len(shape) == 4 else None)


def _measured_against(spec: OpSpec, backend: str, device: torch.device, dtype: torch.dtype, extra) -> str | None:
    """Why the measured timings (sparsekern.tuning) pass over `backend` for this key, or None.
    A preference, not a capability: a backend forced with use_backend() is never passed over."""
    bucket, shape = _tuning_key(extra)
    if bucket is None or _override == backend:
        return None
    from . import tuning

    return tuning.verdict(spec.name, backend, torch.cuda.get_device_name(device), dtype, bucket, shape,
                          _ORDER["cuda"])


def _why_not(spec: OpSpec, backend: str, device: torch.device, dtype: torch.dtype, extra) -> str | None:
    """None when `backend` can run `spec` on these tensors, else the reason it cannot."""
    if backend == "reference":
        return None
    if not _implements(spec, backend):
        return f"{spec.name} has no {backend} kernel"
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} has no compiled kernel (the reference is the float64 oracle)"
    if backend in ("cusparselt", "cutlass"):
        if device.type != "cuda":
            return f"{backend} runs on CUDA tensors, not {device.type}"
        from . import semi_structured

        return semi_structured.why_not(backend, device, dtype, extra, _ORDER["cuda"], prefer=_override != backend)
    if backend == "cpp":
        if device.type != "cpu":
            return f"C++ kernels run on CPU tensors, not {device.type}"
        return None if _extension.cpu_kernels_available() else (_extension.LOAD_ERROR or "extension not loaded")
    if backend == "cuda":
        if device.type != "cuda":
            return f"CUDA kernels run on CUDA tensors, not {device.type}"
        if not _extension.LOADED:
            return _extension.LOAD_ERROR or "extension not loaded"
        if not _extension.BUILD_INFO.get("with_cuda"):
            return "extension built without CUDA"
        if not _extension.cuda_kernels_available(device):
            return (f"CUDA kernels built for sm_{_extension.cuda_archs()} do not run on compute capability "
                    f"{torch.cuda.get_device_capability(device)}")
        return _measured_against(spec, backend, device, dtype, extra)
    # triton
    if not _extension.triton_installed():
        return "Triton is not installed"
    from .triton import interpreting

    if device.type == "cpu" and not interpreting():
        return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for device type {device.type}"
    if spec.triton_limit is not None and (why := spec.triton_limit(extra)) is not None:
        return why
    return _measured_against(spec, backend, device, dtype, extra) if device.type == "cuda" else None


def _below_autograd_unless_needed(op: Callable) -> Callable:
    """Calls `op`, entering its (Python) autograd kernel only when a gradient can flow.

    The autograd kernel registered by torch.library costs ~6 us per call even when it
    just redispatches; skipping it when grad mode is off or no input requires grad does
    what it would do, for a third of a decode kernel's time. Under torch.compile the op
    is called as is (the compiler handles autograd)."""
    def call(*args):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return call


def _runner(spec: OpSpec, backend: str) -> Callable:
    if backend == "reference":
        return spec.reference
    if backend == "triton":
        _load_triton(spec.triton)
        op = getattr(torch.ops.sparsekern_triton, spec.name).default
    elif backend in ("cusparselt", "cutlass"):
        _load_semi_structured()
        op = getattr(getattr(torch.ops, f"sparsekern_{backend}"), spec.name).default
    else:
        op = getattr(torch.ops.sparsekern, spec.name).default
    return _below_autograd_unless_needed(op) if spec.name in _AUTOGRAD else op


def _select(spec: OpSpec, device: torch.device, dtype: torch.dtype, extra) -> Decision:
    forced, note = _override, ""
    if forced is not None and not _implements(spec, forced):
        forced, note = None, f"use_backend({_override!r}) does not apply: {spec.name} has no {_override} kernel; "
    if forced is not None:
        why = _why_not(spec, forced, device, dtype, extra)
        if why is not None:
            raise RuntimeError(f"{spec.name}: use_backend({forced!r}) cannot run here: {why}")
        return Decision(forced, "forced by use_backend()" + (spec.note(forced, extra) if spec.note else ""),
                        _runner(spec, forced))
    skipped = []
    for backend in _ORDER.get(device.type, ("reference",)):
        why = _why_not(spec, backend, device, dtype, extra)
        if why is None:
            reason = {"cpp": "compiled C++ kernel", "cuda": "compiled CUDA kernel for this GPU",
                      "cusparselt": "cuSPARSELt 2:4 GEMM on the sparse tensor cores",
                      "cutlass": "CUTLASS 2:4 GEMM on the sparse tensor cores",
                      "triton": "Triton kernel", "reference": "pure-torch reference"}[backend]
            if spec.note is not None:
                reason += spec.note(backend, extra)
            if skipped:
                reason += " (" + "; ".join(skipped) + ")"
            return Decision(backend, note + reason, _runner(spec, backend))
        if _implements(spec, backend):
            skipped.append(f"{backend}: {why}")
    raise AssertionError("unreachable: the reference always runs")


def _decide(spec: OpSpec, t: torch.Tensor, extra) -> Decision:
    key = (spec.name, t.device, t.dtype, extra, _override)
    d = _decisions.get(key)
    if d is None:
        d = _decisions[key] = _select(spec, t.device, t.dtype, extra)
    return d


def explain_backend(op: str, *args) -> tuple[str, str]:
    """(backend, reason) for `op` called with `args` (its public arguments; the leading ones
    are enough, e.g. explain_backend("nm_linear", x)). It is the decision the call uses."""
    spec = OPS.get(op)
    if spec is None:
        raise ValueError(f"explain_backend: unknown op {op!r}; one of {sorted(OPS)}")
    t, extra = spec.key(*args)
    d = _decide(spec, t, extra)
    return d.backend, d.reason


def backend_for(op: str, *args) -> str:
    """The backend that runs `op` on `args` (explain_backend without the reason)."""
    return explain_backend(op, *args)[0]


def _decision(op: str, key_args: tuple) -> tuple[Decision, tuple]:
    """The decision for `op` on these key arguments, and the key's extra part."""
    spec = OPS[op]
    t, extra = spec.key(*key_args)
    return _decide(spec, t, extra), extra


def _run(op: str, key_args: tuple, *args):
    return _decision(op, key_args)[0].run(*args)


# ------------------------------------------------------------------ argument checks
def _check_x(op: str, x, in_features: int, dtype: torch.dtype, device: torch.device, name: str = "x",
             size_name: str = "in_features") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: {name}.shape[-1] ({x.shape[-1] if x.dim() else 'scalar'}) must equal "
                         f"{size_name} ({in_features})")
    if x.dtype != dtype:
        raise TypeError(f"{op}: {name} dtype ({x.dtype}) must match the weight dtype ({dtype}); convert one of them")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the weight is on {device}")


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


def _check_format(op: str, weight, cls_name: str, fmt_op: str | None = None) -> None:
    """The kernels read formats without bounds checks: only validated ones get through
    (formats from from_dense are; others are validated here once, then flagged). fmt_op: the
    format's own op (weight.OP), when `op` is another op that reads it."""
    if getattr(weight, "OP", None) != (fmt_op or op):
        raise TypeError(f"{op}: weight must be a sparsekern.formats.{cls_name}, got {type(weight).__name__}")
    if not weight.is_validated:
        try:
            weight.validate()
        except ValueError as e:
            raise ValueError(f"{op}: weight is not a valid {cls_name}: {e}") from e


def _check_bitmask(op: str, bitmask, rows: int, cols: int, device) -> None:
    words = math.ceil(cols / 64)
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.int64:
        raise TypeError(f"{op}: bitmask must be an int64 tensor (sparsekern.patterns.pack_bitmask(mask))")
    if tuple(bitmask.shape) != (rows, words):
        raise ValueError(f"{op}: bitmask must have shape ({rows}, {words}), got {tuple(bitmask.shape)}")
    if bitmask.device != device:
        raise ValueError(f"{op}: bitmask is on {bitmask.device} but the weight is on {device}")


def _check_dense_weight(op: str, weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{op}: weight must be a 2-D floating tensor [out, in], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")


def _check_mask(op: str, mask, weight: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{op}: mask is on {mask.device} but weight is on {weight.device}")


def _check_score_inputs(op: str, weight, grad, act_norm) -> None:
    """One NaN policy for every backend: scores must be finite, or the selection is undefined."""
    _check_dense_weight(op, weight)
    if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != weight.shape):
        raise ValueError(f"{op}: grad must have the weight's shape {tuple(weight.shape)}")
    if act_norm is not None and (not isinstance(act_norm, torch.Tensor) or act_norm.shape != (weight.shape[1],)):
        raise ValueError(f"{op}: act_norm must have shape ({weight.shape[1]},) (one norm per input feature)")
    for name, t in (("grad", grad), ("act_norm", act_norm)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")


def _check_finite(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} has NaN or inf; scores must be finite")


# --------------------------------------------------------------------- linear ops
def nm_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W an NMWeight.

    x [..., in] (float32/bfloat16/float16/float64, the weight's dtype), weight NMWeight of
    shape [out, in], bias [out] or None -> y [..., out] in x's dtype, fp32 accumulation.
    Differentiable in x, weight.values and bias.
    """
    _check_format("nm_linear", weight, "NMWeight")
    _check_x("nm_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("nm_linear", bias, weight.shape[0], x)
    d, extra = _decision("nm_linear", (x, weight))
    panels = weight.gemm_panels() if d.backend == "cpp" and extra[2] else None
    return d.run(x, *weight.kernel_args(), bias, panels)


def bitmask_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BitmaskWeight (unstructured). Shapes, dtypes and
    gradients as nm_linear."""
    _check_format("bitmask_linear", weight, "BitmaskWeight")
    _check_x("bitmask_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("bitmask_linear", bias, weight.shape[0], x)
    d, extra = _decision("bitmask_linear", (x, weight))
    columns = weight.column_index() if d.backend == "cpp" and extra[1] else None
    return d.run(x, *weight.kernel_args(), bias, columns)


def block_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W a BlockWeight (BSR). Shapes, dtypes and gradients as nm_linear."""
    _check_format("block_linear", weight, "BlockWeight")
    _check_x("block_linear", x, weight.in_features, weight.dtype, weight.device)
    _check_bias("block_linear", bias, weight.shape[0], x)
    return _run("block_linear", (x, weight), x, *weight.kernel_args(), bias)


_MAX_GEOMETRY = 1 << 30  # csrc/common.h check_conv_geometry: keeps the C++ size arithmetic in range


def _pair(name: str, v, least: int, op: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
        raise TypeError(f"{op}: {name} must be an int or two ints, got {v!r}")
    if min(pair) < least or max(pair) > _MAX_GEOMETRY:
        raise ValueError(f"{op}: {name} must be between {least} and 2^30, got {v!r}")
    return pair


def nm_conv2d(x: torch.Tensor, weight, kernel_size, bias: torch.Tensor | None = None, stride=1, padding=0,
              dilation=1) -> torch.Tensor:
    """2-D convolution of x [N, C, H, W] with an NMWeight [out, kh*kw*C] (input channels
    fastest within each tap: patterns.as_2d of an [out, C, kh, kw] weight), bias [out] or None,
    zero padding -> [N, out, OH, OW] in x's dtype. The C++ kernel returns channels-last memory.
    Differentiable in x, weight.values and bias.
    """
    op = "nm_conv2d"
    _check_format(op, weight, "NMWeight", fmt_op="nm_linear")
    kh, kw = _pair("kernel_size", kernel_size, 1, op)
    stride, padding, dilation = (_pair("stride", stride, 1, op), _pair("padding", padding, 0, op),
                                 _pair("dilation", dilation, 1, op))
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
    _check_x(op, x.movedim(1, -1), channels, weight.dtype, weight.device, size_name="the weight's channels")
    for i, (size, k) in enumerate(zip(x.shape[2:], (kh, kw))):
        if size + 2 * padding[i] < dilation[i] * (k - 1) + 1:
            raise ValueError(f"{op}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                             f"dilated kernel")
    _check_bias(op, bias, weight.shape[0], x)
    shape = [weight.shape[0], channels, kh, kw]
    values, indices, n, m, _ = weight.kernel_args()
    d, extra = _decision(op, (x, weight))
    panels = weight.gemm_panels() if d.backend == "cpp" and extra[0] else None
    return d.run(x, values, indices, n, m, shape, list(stride), list(padding), list(dilation), bias, panels)


_LINEAR = {"nm_linear": nm_linear, "bitmask_linear": bitmask_linear, "block_linear": block_linear}


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for any sparsekern format: the op the format declares (weight.OP)."""
    fn = _LINEAR.get(getattr(weight, "OP", None))
    if fn is None:
        raise TypeError(f"sparse_linear: weight must be an NMWeight, BitmaskWeight or BlockWeight, got "
                        f"{type(weight).__name__}")
    return fn(x, weight, bias)


def _check_masked_weight(op: str, weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{op}: weight must be a 2-D floating tensor [out, in]")


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (W*M)^T + bias without materialising W*M (the training-time op).

    weight [out, in] dense, bitmask int64 [out, ceil(in/64)] (patterns.pack_bitmask of a
    bool mask). Differentiable in x, weight (gradient masked) and bias.
    """
    _check_masked_weight("masked_linear", weight)
    _check_x("masked_linear", x, weight.shape[1], weight.dtype, weight.device)
    _check_bitmask("masked_linear", bitmask, weight.shape[0], weight.shape[1], weight.device)
    _check_bias("masked_linear", bias, weight.shape[0], x)
    return _run("masked_linear", (x,), x, weight, bitmask, bias)


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """grad_out [..., out] @ (W*M) -> [..., in]: masked_linear's input gradient."""
    _check_masked_weight("masked_linear_grad_input", weight)
    _check_x("masked_linear_grad_input", grad_out, weight.shape[0], weight.dtype, weight.device, "grad_out",
             "out_features")
    _check_bitmask("masked_linear_grad_input", bitmask, weight.shape[0], weight.shape[1], weight.device)
    return _run("masked_linear_grad_input", (grad_out,), grad_out, weight, bitmask)


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
    _check_bitmask(op, bitmask, grad_out.shape[-1], x.shape[-1], x.device)
    return _run(op, (grad_out, x), grad_out, x, bitmask)


# ------------------------------------------------------- compress / decompress ops
def nm_compress(weight: torch.Tensor, mask: torch.Tensor | None, n: int, m: int):
    """weight [out, in] (+ bool mask keeping at most n of every m) -> (values [out, in*n/m],
    indices uint8); without a mask keeps the n largest |w| per group. See formats.NMWeight."""
    _check_dense_weight("nm_compress", weight)
    _check_mask("nm_compress", mask, weight)
    check_nm(n, m, "nm_compress")
    if weight.shape[1] % m:
        raise ValueError(f"nm_compress: in_features ({weight.shape[1]}) must be divisible by m = {m}")
    return _run("nm_compress", (weight,), weight, mask, n, m)


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """(values, indices) of an N:M weight -> the dense [out, in_features] weight."""
    return _run("nm_decompress", (values,), values, indices, n, m, in_features)


def nm24_pack_panels(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """A 2:4 weight (NMWeight's values [out, in/2] and indices) pre-packed for the CPU GEMM
    kernel: uint8 [patterns.nm24_panels_bytes(out, in)], layout in csrc/nm24_panels.h.
    NMWeight.gemm_panels() builds and keeps it; nm_linear passes it on its own."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.dtype not in KERNEL_DTYPES:
        raise ValueError("nm24_pack_panels: values must be a 2-D float32/bfloat16/float16 tensor [out, in/2]")
    if not isinstance(in_features, int) or in_features <= 0 or in_features % 4 or values.shape[1] != in_features // 2:
        raise ValueError(f"nm24_pack_panels: in_features must be a positive multiple of 4 with values.shape[1] == "
                         f"in_features // 2, got in_features={in_features!r} and values {list(values.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.uint8 or \
            tuple(indices.shape) != (values.shape[0], math.ceil(values.shape[1] / 4)):
        raise ValueError(f"nm24_pack_panels: indices must be uint8 [{values.shape[0]}, {math.ceil(values.shape[1] / 4)}]")
    if indices.device != values.device:
        raise ValueError(f"nm24_pack_panels: indices is on {indices.device} but values is on {values.device}")
    return _run("nm24_pack_panels", (values,), values, indices, in_features)


def bitmask_compress(weight: torch.Tensor, mask: torch.Tensor | None):
    """weight [out, in] (+ bool mask, default weight != 0) -> (values [nnz], bitmask int64,
    offsets int32); see formats.BitmaskWeight."""
    _check_dense_weight("bitmask_compress", weight)
    _check_mask("bitmask_compress", mask, weight)
    return _run("bitmask_compress", (weight,), weight, mask)


def bitmask_decompress(values, bitmask, offsets, in_features: int) -> torch.Tensor:
    """(values, bitmask, offsets) of a bitmask weight -> the dense [out, in_features] weight."""
    return _run("bitmask_decompress", (values,), values, bitmask, offsets, in_features)


def block_compress(weight: torch.Tensor, mask: torch.Tensor | None, block_rows: int, block_cols: int):
    """weight [out, in] -> (crow_indices, col_indices, values [nnzb, bh, bw]) (BSR)."""
    _check_dense_weight("block_compress", weight)
    _check_mask("block_compress", mask, weight)
    if not (block_rows > 0 and block_cols > 0 and weight.shape[0] % block_rows == 0
            and weight.shape[1] % block_cols == 0):
        raise ValueError(f"block_compress: block ({block_rows}, {block_cols}) must divide weight shape "
                         f"{tuple(weight.shape)}")
    return _run("block_compress", (weight,), weight, mask, block_rows, block_cols)


def block_decompress(crow_indices, col_indices, values, in_features: int) -> torch.Tensor:
    """BSR (crow_indices, col_indices, values) -> the dense [out, in_features] weight."""
    return _run("block_decompress", (crow_indices, values), crow_indices, col_indices, values, in_features)


# ------------------------------------------------------------- fused scoring ops
def group_score(weight: torch.Tensor, block_rows: int, block_cols: int, p: int = 1, *,
                grad: torch.Tensor | None = None, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Group reduction of the score e = |w| * |grad| * act_norm[col] in one pass.

    weight [rows, cols]; groups of (block_rows, block_cols) tiling it; p=1: sum(e),
    p=2: sqrt(sum(e^2)). Returns float32 [rows/block_rows, cols/block_cols]. Rows:
    (1, cols); columns: (rows, 1); N:M groups: (1, m); the layer: (rows, cols).
    """
    _check_score_inputs("group_score", weight, grad, act_norm)
    if p not in (1, 2):
        raise ValueError(f"group_score: p must be 1 (L1) or 2 (L2), got {p}")
    rows, cols = weight.shape
    if not (block_rows > 0 and block_cols > 0 and rows % block_rows == 0 and cols % block_cols == 0):
        raise ValueError(f"group_score: group shape ({block_rows}, {block_cols}) must divide weight shape "
                         f"{(rows, cols)}")
    return _run("group_score", (weight,), weight, grad, act_norm, block_rows, block_cols, p)


def _in_place(op: str, target: torch.Tensor, x: torch.Tensor) -> None:
    """Kernels accumulate into contiguous memory: a strided target gets a contiguous copy."""
    if target.is_contiguous():
        _run(op, (target, x), target, x)
    else:
        tmp = target.contiguous()
        _run(op, (tmp, x), tmp, x)
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
    _check_score_inputs("nm_score_compress", weight, grad, act_norm)
    check_nm(n, m, "nm_score_compress")
    if weight.shape[1] % m:
        raise ValueError(f"nm_score_compress: in_features ({weight.shape[1]}) must be divisible by m = {m}")
    _check_finite("nm_score_compress", weight=weight, grad=grad, act_norm=act_norm)
    return _run("nm_score_compress", (weight,), weight, grad, act_norm, n, m)


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


# ---------------------------------------------- fake kernels (one per op, all backends)
def _out_shape(x: torch.Tensor, out_features) -> list:
    return list(x.shape[:-1]) + [out_features]


def _nm_packed(weight, n, m):
    out, k = weight.shape
    kept = k // m * n
    return (weight.new_empty((out, kept)),
            weight.new_empty((out, math.ceil(kept * nm_index_bits(m) / 8)), dtype=torch.uint8))


def _fake_nm_linear(x, values, indices, n, m, in_features, bias, panels=None):
    torch._check(x.shape[-1] == in_features, lambda: "nm_linear: x.shape[-1] must equal in_features")
    torch._check(values.dtype == x.dtype, lambda: "nm_linear: values dtype must match x dtype")
    return x.new_empty(_out_shape(x, values.shape[0]))


def _fake_nm_conv2d(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias, panels=None):
    torch._check(x.dim() == 4 and x.shape[1] == weight_shape[1], lambda: "nm_conv2d: x must be [N, in, H, W]")
    oh, ow = (conv_output_size(*geo) for geo in zip(x.shape[2:], weight_shape[2:], stride, padding, dilation))
    return torch.empty((x.shape[0], weight_shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _fake_bitmask_linear(x, values, bitmask, offsets, in_features, bias, columns=None):
    torch._check(x.shape[-1] == in_features, lambda: "bitmask_linear: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, bitmask.shape[0]))


def _fake_block_linear(x, crow_indices, col_indices, values, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: "block_linear: x.shape[-1] must equal in_features")
    return x.new_empty(_out_shape(x, (crow_indices.shape[0] - 1) * values.shape[1]))


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


_FAKES: dict[str, Callable] = {
    "nm_linear": _fake_nm_linear,
    "nm24_pack_panels": lambda values, indices, in_features: values.new_empty(
        (nm24_panels_bytes(values.shape[0], in_features),), dtype=torch.uint8),
    "nm_conv2d": _fake_nm_conv2d,
    "bitmask_linear": _fake_bitmask_linear,
    "block_linear": _fake_block_linear,
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
    return gx, gv, None, None, None, None, _grad_bias(ctx, grad, 6), None


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
    return gx, gv, None, None, None, None, None, None, None, gb, None


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
    return gx, gv, None, None, None, _grad_bias(ctx, grad, 5), None


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


def _masked_setup(ctx, inputs, output):
    x, weight, bitmask, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None, bitmask)


def _masked_backward(ctx, grad):
    x, weight, bitmask = ctx.saved_tensors
    gx = masked_linear_grad_input(grad, weight, bitmask) if ctx.needs_input_grad[0] else None
    gw = masked_linear_grad_weight(grad, x, bitmask) if ctx.needs_input_grad[1] else None
    return gx, gw, None, _grad_bias(ctx, grad, 3)


_AUTOGRAD: dict[str, tuple[Callable, Callable]] = {
    "nm_linear": (_nm_backward, _sparse_setup(1, 5)),
    "nm_conv2d": (_nm_conv2d_backward, _nm_conv2d_setup),
    "bitmask_linear": (_bitmask_backward, _sparse_setup(1, 4)),
    "block_linear": (_block_backward, _sparse_setup(3, 4)),
    "masked_linear": (_masked_backward, _masked_setup),
}


def _register(namespace: str, names) -> None:
    """Registers the fake kernel and autograd of each op in `names` on `namespace::op`."""
    for name in names:
        qualname = f"{namespace}::{name}"
        if name in _FAKES:
            torch.library.register_fake(qualname)(_FAKES[name])
        if name in _AUTOGRAD:
            backward, setup = _AUTOGRAD[name]
            torch.library.register_autograd(qualname, backward, setup_context=setup)


_triton_loaded: set[str] = set()
_semi_structured_loaded = False


def _load_semi_structured() -> None:
    global _semi_structured_loaded
    if not _semi_structured_loaded:
        from . import semi_structured

        semi_structured.load()
        _register("sparsekern_cusparselt", ["nm_linear"])
        _register("sparsekern_cutlass", ["nm_linear"])
        _semi_structured_loaded = True


def _load_triton(family: str) -> None:
    if family in _triton_loaded:
        return
    from . import triton as sktriton

    sktriton.load(family)
    _register("sparsekern_triton", [s.name for s in OPS.values() if s.triton == family])
    _triton_loaded.add(family)


if _extension.LOADED:
    _register("sparsekern", [s.name for s in OPS.values() if s.cpp or s.cuda])
