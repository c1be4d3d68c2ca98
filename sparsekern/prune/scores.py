"""Per-element importance scores and their group reductions.

`score(weight, method, grad=, act_norm=, generator=)` (float32, the weight's shape; larger
means keep) with methods

  l1      |w|
  l2      w^2
  random  uniform noise from `generator` (reproducible)
  taylor  |w * g|, g the gradient accumulated over calibration batches
  wanda   |w| * ||x_j||_2, ||x_j|| the norm of input feature j over calibration batches

`group_score` sums a score per output row, input column, block, N:M group, Conv output
channel or whole layer with the L1 or L2 norm, in one fused pass (`ops.group_score`).

Conv weights [out, in, kh, kw] are scored in their 2-D view (`patterns.as_2d`: rows are
output channels, input channels fastest within each kernel position).
"""
from __future__ import annotations

import torch

from .. import ops
from ..patterns import as_2d, from_2d

METHODS = ("l1", "l2", "random", "taylor", "wanda")


def check_method(method: str, where: str = "method") -> None:
    """Raise ValueError unless `method` is one of METHODS."""
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _check_weight(where: str, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be floating point, got {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{where}: weight must have at least 2 dimensions [out, in, ...], got {tuple(weight.shape)}")


def _expand_act_norm(where: str, weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """act_norm per input feature (Linear) or per input channel (Conv) -> per column of as_2d."""
    if not isinstance(act_norm, torch.Tensor):
        raise TypeError(f"{where}: act_norm must be a tensor")
    cin = weight.shape[1]
    cols = weight[0].numel()
    if act_norm.numel() == cin:
        return act_norm.reshape(-1).float().repeat(cols // cin)
    if weight.dim() > 2 and act_norm.numel() == cols:  # per unfold column (C, kh, kw) order
        return as_2d(act_norm.reshape(1, *weight.shape[1:]))[0].float()
    raise ValueError(f"{where}: act_norm has {act_norm.numel()} entries; expected {cin} (one per input "
                     f"feature/channel){f' or {cols}' if weight.dim() > 2 else ''}")


def score(weight: torch.Tensor, method: str = "l1", *, grad: torch.Tensor | None = None,
          act_norm: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-element importance (float32, the weight's shape); larger means keep."""
    _check_weight("score", weight)
    check_method(method, "score")
    w = weight.detach()
    if method == "l1":
        return w.abs().float()
    if method == "l2":
        return w.float().square()
    if method == "random":
        return torch.rand(w.shape, generator=generator, device="cpu" if generator is None else generator.device
                          ).to(w.device)
    if method == "taylor":
        if grad is None:
            raise ValueError("score: method 'taylor' needs grad= (accumulated gradients, see collect_gradients)")
        if grad.shape != w.shape:
            raise ValueError(f"score: grad shape {tuple(grad.shape)} must equal weight shape {tuple(w.shape)}")
        return (w.float() * grad.float()).abs()
    if act_norm is None:
        raise ValueError("score: method 'wanda' needs act_norm= (input feature norms, see collect_activation_norms)")
    an = _expand_act_norm("score", w, act_norm.to(w.device))
    return from_2d(as_2d(w).abs().float() * an, w.shape)


# Named group tuples: name -> (tuple length, the (rows, cols) of one group from its ints).
_NAMED_GROUPS = {"nm": (2, lambda m: (1, int(m))), "block": (3, lambda bh, bw: (int(bh), int(bw)))}


def _group_shape(group, rows: int, cols: int) -> tuple[int, int]:
    if group in ("row", "channel"):
        return 1, cols
    if group == "column":
        return rows, 1
    if group == "layer":
        return rows, cols
    if isinstance(group, tuple) and group and group[0] in _NAMED_GROUPS:
        size, shape = _NAMED_GROUPS[group[0]]
        if len(group) == size:
            return shape(*group[1:])
    if isinstance(group, tuple) and len(group) == 2 and all(isinstance(g, int) for g in group):
        return group
    raise ValueError(f"group_score: unknown group {group!r}; use 'row', 'column', 'channel', 'layer', "
                     "('block', bh, bw) or ('nm', m)")


def group_score(weight: torch.Tensor, group, *, norm: str = "l1", method: str = "l1",
                grad: torch.Tensor | None = None, act_norm: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Reduce a score per group with the L1 or L2 norm, in one fused pass.

    group: "row" (output row / Conv output channel, also "channel"), "column" (input
    feature of the 2-D view), "layer" (one number), ("block", bh, bw) or (bh, bw), or
    ("nm", m) (groups of m input columns). Returns float32 of the grid of groups.
    """
    _check_weight("group_score", weight)
    check_method(method, "group_score")
    if norm not in ("l1", "l2"):
        raise ValueError(f"group_score: norm must be 'l1' or 'l2', got {norm!r}")
    w2 = as_2d(weight.detach())
    rows, cols = w2.shape
    br, bc = _group_shape(group, rows, cols)
    if rows % br or cols % bc:
        raise ValueError(f"group_score: group ({br}, {bc}) does not divide the weight's 2-D shape {(rows, cols)}")
    p = 1 if norm == "l1" else 2
    if method in ("l1", "l2"):  # |w|; "l2" squares elements, which the L2 group norm already does
        return ops.group_score(w2, br, bc, p)
    if method == "taylor":
        if grad is None:
            raise ValueError("group_score: method 'taylor' needs grad=")
        return ops.group_score(w2, br, bc, p, grad=as_2d(grad.detach()))
    if method == "wanda":
        if act_norm is None:
            raise ValueError("group_score: method 'wanda' needs act_norm=")
        return ops.group_score(w2, br, bc, p, act_norm=_expand_act_norm("group_score", weight, act_norm.to(w2.device)))
    return ops.group_score(score(w2, "random", generator=generator), br, bc, p)


def layer_norms(weight: torch.Tensor) -> dict[str, float]:
    """The layer's L1 and L2 weight norms (one fused pass each)."""
    return {"l1": float(group_score(weight, "layer", norm="l1")), "l2": float(group_score(weight, "layer", norm="l2"))}
