"""Pruning functions that act on a model the way torch.nn.utils.prune does.

Each acts on every Linear/Conv2d of a model, or on the one submodule called `name`, and
records its mask through torch.nn.utils.prune (`weight_orig`, `weight_mask` and a forward
pre-hook), so fine-tuning keeps the zeros with any optimizer and
`torch.nn.utils.prune.remove` still applies. Pruning a layer again combines the masks:
zeros already made stay zeros.

For one-shot pruning with weight reconstruction, see
`sparsekern.sparsegpt.sparsegpt_prune_model`; to remove channels physically,
`sparsekern.simplify.prune_channels`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .calibration import prunable_layers
from .masks import block_mask, channel_mask, global_masks, nm_mask, unstructured_mask
from .scores import check_method, score


def apply_mask(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Record `mask` on module.weight the way torch.nn.utils.prune does (weight_orig,
    weight_mask, forward pre-hook); an existing mask is combined with it."""
    if mask.shape != module.weight.shape:
        raise ValueError(f"apply_mask: mask shape {tuple(mask.shape)} must equal weight shape "
                         f"{tuple(module.weight.shape)}")
    if hasattr(module, "weight_mask"):
        mask = mask & module.weight_mask.bool()
        torch_prune.remove(module, "weight")
    return torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device))


def _layer_score(lname, mod, method, grads, act_norms, generator):
    kw = {}
    if method == "taylor":
        if not grads or lname not in grads:
            raise ValueError(f"method 'taylor' needs grads= with an entry for layer {lname!r} (collect_gradients)")
        kw["grad"] = grads[lname]
    if method == "wanda":
        if not act_norms or lname not in act_norms:
            raise ValueError(f"method 'wanda' needs act_norms= with an entry for layer {lname!r} "
                             "(collect_activation_norms)")
        kw["act_norm"] = act_norms[lname]
    s = score(mod.weight.detach(), method, generator=generator, **kw)
    if hasattr(mod, "weight_mask"):  # already pruned elements stay pruned: lowest score
        s = s.masked_fill(~mod.weight_mask.bool(), 0.0)
    return s


def _prune_layers(where, model, name, method, mask_fn, grads=None, act_norms=None, generator=None):
    check_method(method, where)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    layers = prunable_layers(model, name)
    if not layers:
        raise ValueError(f"{where}: the model has no nn.Linear or nn.Conv2d layers")
    for lname, mod in layers:
        try:
            mask = mask_fn(_layer_score(lname, mod, method, grads, act_norms, generator))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: layer {lname!r}: {e}") from None
        apply_mask(mod, mask)
    return model


def l1_prune(model: nn.Module, name: str | None = None, amount=0.5):
    """Unstructured magnitude (|w|) pruning of each Linear/Conv2d (or the one named)."""
    return _prune_layers("l1_prune", model, name, "l1", lambda s: unstructured_mask(s, amount))


def l2_prune(model: nn.Module, name: str | None = None, amount=0.5):
    """Unstructured pruning by w^2 (same ranking as l1 per layer; differs under global_prune)."""
    return _prune_layers("l2_prune", model, name, "l2", lambda s: unstructured_mask(s, amount))


def random_prune(model: nn.Module, name: str | None = None, amount=0.5, prune_fn: Callable | None = None,
                 generator: torch.Generator | None = None):
    """Random unstructured pruning; with `prune_fn`, that function is applied instead
    (prune_fn(model, name=name, amount=amount))."""
    if prune_fn is not None:
        return prune_fn(model, name=name, amount=amount)
    return _prune_layers("random_prune", model, name, "random", lambda s: unstructured_mask(s, amount),
                         generator=generator)


def taylor_prune(model: nn.Module, name: str | None = None, amount=0.5, *, grads: dict):
    """Unstructured pruning by |w * g| (grads from collect_gradients)."""
    return _prune_layers("taylor_prune", model, name, "taylor", lambda s: unstructured_mask(s, amount), grads=grads)


def wanda_prune(model: nn.Module, name: str | None = None, amount=0.5, *, act_norms: dict):
    """Unstructured pruning by |w| * ||x_j|| (act_norms from collect_activation_norms)."""
    return _prune_layers("wanda_prune", model, name, "wanda", lambda s: unstructured_mask(s, amount),
                         act_norms=act_norms)


def global_prune(model: nn.Module, amount=0.5, method: str = "l1", *, grads=None, act_norms=None,
                 generator=None):
    """One threshold over all Linear/Conv2d scores together: layers lose different amounts."""
    check_method(method, "global_prune")
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("global_prune: the model has no nn.Linear or nn.Conv2d layers")
    scores = {n: _layer_score(n, m, method, grads, act_norms, generator) for n, m in layers}
    masks = global_masks(scores, amount)
    for n, m in layers:
        apply_mask(m, masks[n])
    return model


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, method: str = "l1", name: str | None = None, *,
             grads=None, act_norms=None, generator=None):
    """N:M pruning along the input dimension (Conv: input channels per kernel position)."""
    return _prune_layers("nm_prune", model, name, method, lambda s: nm_mask(s, n, m), grads, act_norms, generator)


def block_prune(model: nn.Module, block: tuple[int, int] = (32, 32), amount=0.5, method: str = "l1",
                name: str | None = None, norm: str = "l1", *, grads=None, act_norms=None, generator=None):
    """Remove the (bh x bw) blocks with the smallest group norm of the score."""
    return _prune_layers("block_prune", model, name, method, lambda s: block_mask(s, block, amount, norm),
                         grads, act_norms, generator)


def channel_prune(model: nn.Module, amount=0.5, method: str = "l2", name: str | None = None, norm: str = "l2", *,
                  grads=None, act_norms=None, generator=None):
    """Mask whole output channels (rows) with the smallest group norm. To remove them
    physically, use sparsekern.simplify.prune_channels."""
    score_method = "l1" if method == "l2" else method  # the L2 group norm of |w| is the l2 channel score
    return _prune_layers("channel_prune", model, name, score_method, lambda s: channel_mask(s, amount, norm),
                         grads, act_norms, generator)


def remove(model: nn.Module) -> nn.Module:
    """Make every recorded mask permanent (torch.nn.utils.prune.remove on each layer)."""
    for _, mod in prunable_layers(model):
        if hasattr(mod, "weight_mask"):
            torch_prune.remove(mod, "weight")
    return model


def sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights per Linear/Conv2d layer and overall ("total")."""
    out, zeros, total = {}, 0, 0
    for n, m in prunable_layers(model):
        z = int((m.weight == 0).sum())
        out[n] = z / m.weight.numel()
        zeros += z
        total += m.weight.numel()
    out["total"] = zeros / total if total else 0.0
    return out
