"""Masks from scores: bool tensors of the weight's shape, True = keep, ready for
`sparsekern.formats.*.from_dense(weight, mask=...)` or `functional.apply_mask`.

`amount` is what to remove: a fraction in [0, 1] (float) or a count (int), checked and
converted by `prune_count`.
"""
from __future__ import annotations

import math

import torch

from .. import reference
from ..patterns import as_2d, check_nm, from_2d
from .scores import group_score


def prune_count(amount, total: int, where: str = "amount") -> int:
    """How many of `total` elements to remove for `amount` (a fraction in [0, 1] or an
    int count); raises TypeError / ValueError naming `where` otherwise."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{where}: amount must be a fraction in [0, 1] or an int count, got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0 or math.isnan(amount):
            raise ValueError(f"{where}: amount must be in [0, 1] as a fraction, got {amount}")
        return int(round(amount * total))
    if not 0 <= amount <= total:
        raise ValueError(f"{where}: amount {amount} is a count larger than the {total} elements (or negative)")
    return amount


def unstructured_mask(scores: torch.Tensor, amount) -> torch.Tensor:
    """Keep all but the `amount` lowest-scoring elements (fraction or count)."""
    k = prune_count(amount, scores.numel(), "unstructured_mask")
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = False
    return mask


def global_masks(scores: dict[str, torch.Tensor], amount) -> dict[str, torch.Tensor]:
    """One threshold over all the given layers' scores: prunes `amount` of their total."""
    if not scores:
        raise ValueError("global_masks: no layers given")
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    k = prune_count(amount, flat.numel(), "global_masks")
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive inputs (Conv: input channels at
    each kernel position)."""
    check_nm(n, m, "nm_mask")
    s2 = as_2d(scores)
    if s2.shape[1] % m:
        raise ValueError(f"nm_mask: the input dimension ({s2.shape[1]}) is not divisible by m = {m}"
                         + (" (for Conv, in_channels must be divisible by m)" if scores.dim() > 2 else ""))
    return from_2d(reference.nm_mask(s2, n, m), scores.shape)


def block_mask(weight_or_scores: torch.Tensor, block: tuple[int, int], amount, norm: str = "l1") -> torch.Tensor:
    """Keep the blocks (bh x bw of the 2-D view) with the largest group norm."""
    s2 = as_2d(weight_or_scores)
    bh, bw = block
    g = group_score(s2, ("block", bh, bw), norm=norm)
    keep = unstructured_mask(g, prune_count(amount, g.numel(), "block_mask"))
    m2 = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return from_2d(m2, weight_or_scores.shape)


def channel_mask(weight_or_scores: torch.Tensor, amount, norm: str = "l2") -> torch.Tensor:
    """Keep the output channels (rows) with the largest group norm; whole rows."""
    g = group_score(weight_or_scores, "row", norm=norm).reshape(-1)
    keep = unstructured_mask(g, prune_count(amount, g.numel(), "channel_mask"))
    return keep.reshape(-1, *([1] * (weight_or_scores.dim() - 1))).expand(weight_or_scores.shape).clone()
