"""Argument checks of the public ops: the same exceptions, naming the op and the argument,
whatever backend then runs. Public, so the layers above (formats, prune) check with the same
words instead of copies."""
from __future__ import annotations

import math

import torch

def check_x(op: str, x, in_features: int, dtype: torch.dtype, device: torch.device, name: str = "x",
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


def check_bias(op: str, bias, out_features: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias dtype ({bias.dtype}) must match x dtype ({x.dtype})")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def check_format(op: str, weight, cls_name: str, fmt_op: str | None = None) -> None:
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


def check_bitmask(op: str, bitmask, rows: int, cols: int, device) -> None:
    words = math.ceil(cols / 64)
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.int64:
        raise TypeError(f"{op}: bitmask must be an int64 tensor (sparsekern.patterns.pack_bitmask(mask))")
    if tuple(bitmask.shape) != (rows, words):
        raise ValueError(f"{op}: bitmask must have shape ({rows}, {words}), got {tuple(bitmask.shape)}")
    if bitmask.device != device:
        raise ValueError(f"{op}: bitmask is on {bitmask.device} but the weight is on {device}")


def check_dense_weight(op: str, weight) -> None:
    """A dense weight: a tensor (TypeError), 2-D (ValueError), floating (TypeError)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a 2-D floating tensor [out, in], got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D floating tensor [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight must be a 2-D floating tensor [out, in], got {weight.dtype}")


def check_mask(op: str, mask, weight: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{op}: mask is on {mask.device} but weight is on {weight.device}")


def check_score_inputs(op: str, weight, grad, act_norm) -> None:
    """One NaN policy for every backend: scores must be finite, or the selection is undefined."""
    check_dense_weight(op, weight)
    if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != weight.shape):
        raise ValueError(f"{op}: grad must have the weight's shape {tuple(weight.shape)}")
    if act_norm is not None and (not isinstance(act_norm, torch.Tensor) or act_norm.shape != (weight.shape[1],)):
        raise ValueError(f"{op}: act_norm must have shape ({weight.shape[1]},) (one norm per input feature)")
    for name, t in (("grad", grad), ("act_norm", act_norm)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")


def check_finite(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} has NaN or inf; scores must be finite")


MAX_GEOMETRY = 1 << 30  # csrc/common.h check_conv_geometry: keeps the C++ size arithmetic in range


def check_pair(name: str, v, least: int, op: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
        raise TypeError(f"{op}: {name} must be an int or two ints, got {v!r}")
    if min(pair) < least or max(pair) > MAX_GEOMETRY:
        raise ValueError(f"{op}: {name} must be between {least} and 2^30, got {v!r}")
    return pair


def check_masked_weight(op: str, weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{op}: weight must be a 2-D floating tensor [out, in]")
