"""Decide what to remove: scores, group reductions, masks, and pruning functions that
record masks the way torch.nn.utils.prune does.

Scores (same shape as the weight, float32): `score(weight, method, grad=, act_norm=,
generator=)` with methods

  l1      |w|
  l2      w^2
  random  uniform noise from `generator` (reproducible)
  taylor  |w * g|, g the gradient accumulated over calibration batches
  wanda   |w| * ||x_j||_2, ||x_j|| the norm of input feature j over calibration batches

Group reductions (`group_score`) sum a score per output row, input column, block, N:M
group, Conv output channel or whole layer, with L1 or L2, in one fused pass
(`ops.group_norm`). Masks are bool tensors of the weight's shape, True = keep, and go
straight into `sparsekern.formats.*.from_dense(weight, mask=...)`.

Conv weights [out, in, kh, kw]: rows are output channels; N:M groups run along input
channels at each kernel position (the layout sparse tensor cores and TensorRT use).

Pruning functions (`l1_prune`, `nm_prune`, `global_prune`, ...) act on a model, on every
Linear/Conv2d or on one named submodule, and install `weight_orig`, `weight_mask` and the
forward pre-hook through `torch.nn.utils.prune`, so fine-tuning keeps the zeros with any
optimizer and `torch.nn.utils.prune.remove` still applies.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import ops, reference
from ._progress import progress

METHODS = ("l1", "l2", "random", "taylor", "wanda")
PRUNABLE = (nn.Linear, nn.Conv2d)


# ---------------------------------------------------------------------------- checks
def _check_weight(where: str, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be floating point, got {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{where}: weight must have at least 2 dimensions [out, in, ...], got {tuple(weight.shape)}")


def _check_method(where: str, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _n_prune(amount, total: int, where: str) -> int:
    """Number of elements to remove for `amount` (fraction in [0, 1] or a count)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{where}: amount must be a fraction in [0, 1] or an int count, got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0 or math.isnan(amount):
            raise ValueError(f"{where}: amount must be in [0, 1] as a fraction, got {amount}")
        return int(round(amount * total))
    if not 0 <= amount <= total:
        raise ValueError(f"{where}: amount {amount} is a count larger than the {total} elements (or negative)")
    return amount


def _as_2d(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] -> [out, kh*kw*in] with input channels fastest (N:M layout)."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1)


def _from_2d(t2: torch.Tensor, shape) -> torch.Tensor:
    if len(shape) == 2:
        return t2
    out, cin, *k = shape
    return t2.reshape(out, *k, cin).permute(0, len(shape) - 1, *range(1, len(shape) - 1)).contiguous()


def _expand_act_norm(where: str, weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """act_norm per input feature (Linear) or per input channel (Conv) -> per column of _as_2d."""
    if not isinstance(act_norm, torch.Tensor):
        raise TypeError(f"{where}: act_norm must be a tensor")
    cin = weight.shape[1]
    cols = weight[0].numel()
    if act_norm.numel() == cin:
        return act_norm.reshape(-1).float().repeat(cols // cin)
    if weight.dim() > 2 and act_norm.numel() == cols:  # per unfold column (C, kh, kw) order
        return _as_2d(act_norm.reshape(1, *weight.shape[1:]))[0].float()
    raise ValueError(f"{where}: act_norm has {act_norm.numel()} entries; expected {cin} (one per input "
                     f"feature/channel){f' or {cols}' if weight.dim() > 2 else ''}")


# ---------------------------------------------------------------------------- scores
def score(weight: torch.Tensor, method: str = "l1", *, grad: torch.Tensor | None = None,
          act_norm: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-element importance (float32, the weight's shape); larger means keep."""
    _check_weight("score", weight)
    _check_method("score", method)
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
    return _from_2d(_as_2d(w).abs().float() * an, w.shape)


def l1_score(weight): return score(weight, "l1")  # noqa: E704
def l2_score(weight): return score(weight, "l2")  # noqa: E704
def random_score(weight, generator=None): return score(weight, "random", generator=generator)  # noqa: E704
def taylor_score(weight, grad): return score(weight, "taylor", grad=grad)  # noqa: E704
def wanda_score(weight, act_norm): return score(weight, "wanda", act_norm=act_norm)  # noqa: E704


def group_score(weight: torch.Tensor, group, *, norm: str = "l1", method: str = "l1",
                grad: torch.Tensor | None = None, act_norm: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Reduce a score per group with the L1 or L2 norm, in one fused pass.

    group: "row" (output row / Conv output channel, also "channel"), "column" (input
    feature of the 2-D view), "layer" (one number), ("block", bh, bw) or (bh, bw), or
    ("nm", m) (groups of m input columns). Returns float32 of the grid of groups.
    """
    _check_weight("group_score", weight)
    _check_method("group_score", method)
    if norm not in ("l1", "l2"):
        raise ValueError(f"group_score: norm must be 'l1' or 'l2', got {norm!r}")
    w2 = _as_2d(weight.detach())
    rows, cols = w2.shape
    if group in ("row", "channel"):
        br, bc = 1, cols
    elif group == "column":
        br, bc = rows, 1
    elif group == "layer":
        br, bc = rows, cols
    elif isinstance(group, tuple) and len(group) == 2 and group[0] == "nm":
        br, bc = 1, int(group[1])
    elif isinstance(group, tuple) and len(group) == 3 and group[0] == "block":
        br, bc = int(group[1]), int(group[2])
    elif isinstance(group, tuple) and len(group) == 2 and all(isinstance(g, int) for g in group):
        br, bc = group
    else:
        raise ValueError(f"group_score: unknown group {group!r}; use 'row', 'column', 'channel', 'layer', "
                         "('block', bh, bw) or ('nm', m)")
    if rows % br or cols % bc:
        raise ValueError(f"group_score: group ({br}, {bc}) does not divide the weight's 2-D shape {(rows, cols)}")
    p = 1 if norm == "l1" else 2
    if method in ("l1", "l2"):  # |w|; "l2" squares elements, which the L2 group norm already does
        return ops.group_norm(w2, br, bc, p)
    if method == "taylor":
        if grad is None:
            raise ValueError("group_score: method 'taylor' needs grad=")
        return ops.group_norm(w2, br, bc, p, grad=_as_2d(grad.detach()))
    if method == "wanda":
        if act_norm is None:
            raise ValueError("group_score: method 'wanda' needs act_norm=")
        return ops.group_norm(w2, br, bc, p, act_norm=_expand_act_norm("group_score", weight, act_norm.to(w2.device)))
    return ops.group_norm(score(w2, "random", generator=generator), br, bc, p)


def layer_norms(weight: torch.Tensor) -> dict[str, float]:
    """The layer's L1 and L2 weight norms (one fused pass each)."""
    return {"l1": float(group_score(weight, "layer", norm="l1")), "l2": float(group_score(weight, "layer", norm="l2"))}


# ----------------------------------------------------------------------------- masks
def unstructured_mask(scores: torch.Tensor, amount) -> torch.Tensor:
    """Keep all but the `amount` lowest-scoring elements (fraction or count)."""
    k = _n_prune(amount, scores.numel(), "unstructured_mask")
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
    k = _n_prune(amount, flat.numel(), "global_masks")
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
    from .formats import NMWeight

    NMWeight.check_nm(n, m, "nm_mask")
    s2 = _as_2d(scores)
    if s2.shape[1] % m:
        raise ValueError(f"nm_mask: the input dimension ({s2.shape[1]}) is not divisible by m = {m}"
                         + (" (for Conv, in_channels must be divisible by m)" if scores.dim() > 2 else ""))
    return _from_2d(reference.nm_mask(s2, n, m), scores.shape)


def block_mask(weight_or_scores: torch.Tensor, block: tuple[int, int], amount, norm: str = "l1") -> torch.Tensor:
    """Keep the blocks (bh x bw of the 2-D view) with the largest group norm."""
    s2 = _as_2d(weight_or_scores)
    bh, bw = block
    g = group_score(s2, ("block", bh, bw), norm=norm)
    keep = unstructured_mask(g, _n_prune(amount, g.numel(), "block_mask"))
    m2 = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return _from_2d(m2, weight_or_scores.shape)


def channel_mask(weight_or_scores: torch.Tensor, amount, norm: str = "l2") -> torch.Tensor:
    """Keep the output channels (rows) with the largest group norm; whole rows."""
    g = group_score(weight_or_scores, "row", norm=norm).reshape(-1)
    keep = unstructured_mask(g, _n_prune(amount, g.numel(), "channel_mask"))
    return keep.reshape(-1, *([1] * (weight_or_scores.dim() - 1))).expand(weight_or_scores.shape).clone()


# ----------------------------------------------------------------------- calibration
def prunable_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv2d, or just the submodule called `name`."""
    if name is not None:
        mods = dict(model.named_modules())
        if name not in mods:
            raise ValueError(f"no submodule named {name!r}; Linear/Conv2d layers are: "
                             f"{', '.join(n for n, m in model.named_modules() if isinstance(m, PRUNABLE))}")
        if not isinstance(mods[name], PRUNABLE):
            raise TypeError(f"submodule {name!r} is a {type(mods[name]).__name__}, not nn.Linear or nn.Conv2d")
        return [(name, mods[name])]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def _run_batch(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def collect_activation_norms(model: nn.Module, batches: Iterable, name: str | None = None,
                             show_progress: bool = True) -> dict[str, torch.Tensor]:
    """||x_j||_2 of every input feature (Linear) or input channel (Conv2d) over all
    calibration batches, for `wanda`. Accumulated with the fused act_norm_accumulate op."""
    layers = prunable_layers(model, name)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for lname, mod in layers:
        def hook(m, inputs, lname=lname):
            x = inputs[0].detach()
            if isinstance(m, nn.Conv2d):
                x = x.transpose(1, -1)  # channels last: [N, W, H, C]
            if lname not in sums:
                sums[lname] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            ops.act_norm_accumulate(sums[lname], x)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for batch in progress(batches, "calibration (activation norms)", enabled=show_progress):
            _run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("collect_activation_norms: no batch reached the layers (empty calibration data?)")
    return {k: v.sqrt().float() for k, v in sums.items()}


def collect_gradients(model: nn.Module, loss_fn: Callable, batches: Iterable, name: str | None = None,
                      show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Gradients of every Linear/Conv2d weight summed over the batches, for `taylor`.

    loss_fn(model, batch) -> scalar loss. The model's existing .grad values are left as
    they were."""
    layers = prunable_layers(model, name)
    params = {n: (m.weight_orig if hasattr(m, "weight_orig") else m.weight) for n, m in layers}
    saved = {n: p.grad for n, p in params.items()}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        count = 0
        for batch in progress(batches, "calibration (gradients)", enabled=show_progress):
            for p in params.values():
                p.grad = None
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.float()
            count += 1
        if count == 0:
            raise ValueError("collect_gradients: calibration data is empty")
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    return acc


# ------------------------------------------------------------------ pruning functions
def _current_weight(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach()


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
    s = score(_current_weight(mod), method, generator=generator, **kw)
    if hasattr(mod, "weight_mask"):  # already pruned elements stay pruned: lowest score
        s = s.masked_fill(~mod.weight_mask.bool(), 0.0)
    return s


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


def _prune_layers(where, model, name, method, mask_fn, grads=None, act_norms=None, generator=None):
    _check_method(where, method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    layers = prunable_layers(model, name)
    if not layers:
        raise ValueError(f"{where}: the model has no nn.Linear or nn.Conv2d layers")
    for lname, mod in layers:
        try:
            mask = mask_fn(_layer_score(lname, mod, method, grads, act_norms, generator), mod)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: layer {lname!r}: {e}") from None
        apply_mask(mod, mask)
    return model


def l1_prune(model: nn.Module, name: str | None = None, amount=0.5):
    """Unstructured magnitude (|w|) pruning of each Linear/Conv2d (or the one named)."""
    return _prune_layers("l1_prune", model, name, "l1", lambda s, m: unstructured_mask(s, amount))


def l2_prune(model: nn.Module, name: str | None = None, amount=0.5):
    """Unstructured pruning by w^2 (same ranking as l1 per layer; differs under global_prune)."""
    return _prune_layers("l2_prune", model, name, "l2", lambda s, m: unstructured_mask(s, amount))


def random_prune(model: nn.Module, name: str | None = None, amount=0.5, prune_fn: Callable | None = None,
                 generator: torch.Generator | None = None):
    """Random unstructured pruning; with `prune_fn`, that function is applied instead
    (prune_fn(model, name=name, amount=amount))."""
    if prune_fn is not None:
        return prune_fn(model, name=name, amount=amount)
    return _prune_layers("random_prune", model, name, "random", lambda s, m: unstructured_mask(s, amount),
                         generator=generator)


def taylor_prune(model, name=None, amount=0.5, *, grads):
    return _prune_layers("taylor_prune", model, name, "taylor", lambda s, m: unstructured_mask(s, amount), grads=grads)


def wanda_prune(model, name=None, amount=0.5, *, act_norms):
    return _prune_layers("wanda_prune", model, name, "wanda", lambda s, m: unstructured_mask(s, amount),
                         act_norms=act_norms)


def global_prune(model: nn.Module, amount=0.5, method: str = "l1", *, grads=None, act_norms=None,
                 generator=None):
    """One threshold over all Linear/Conv2d scores together: layers lose different amounts."""
    _check_method("global_prune", method)
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("global_prune: the model has no nn.Linear or nn.Conv2d layers")
    scores = {n: _layer_score(n, m, method, grads, act_norms, generator) for n, m in layers}
    masks = global_masks(scores, amount)
    for n, m in layers:
        apply_mask(m, masks[n])
    return model


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, method: str = "l1", name: str | None = None, *,
             grads=None, act_norms=None, generator=None, calibration=None):
    """N:M pruning along the input dimension (Conv: input channels per kernel position).
    method="sparsegpt" (with calibration=) also updates the kept weights to compensate."""
    if method == "sparsegpt":
        return sparsegpt_prune(model, calibration, f"{n}:{m}", layers=None if name is None else [name])
    return _prune_layers("nm_prune", model, name, method, lambda s, mod: nm_mask(s, n, m), grads, act_norms, generator)


def block_prune(model: nn.Module, block: tuple[int, int] = (32, 32), amount=0.5, method: str = "l1",
                name: str | None = None, norm: str = "l1", *, grads=None, act_norms=None, generator=None,
                calibration=None):
    """Remove the (bh x bw) blocks with the smallest group norm of the score
    (method="sparsegpt" with calibration=: chosen and compensated by SparseGPT)."""
    if method == "sparsegpt":
        return sparsegpt_prune(model, calibration, f"block{block[0]}x{block[1]}", amount,
                               layers=None if name is None else [name])
    return _prune_layers("block_prune", model, name, method, lambda s, mod: block_mask(s, block, amount, norm),
                         grads, act_norms, generator)


def channel_prune(model: nn.Module, amount=0.5, method: str = "l2", name: str | None = None, norm: str = "l2", *,
                  grads=None, act_norms=None, generator=None):
    """Mask whole output channels (rows) with the smallest group norm. To remove them
    physically, use sparsekern.simplify.prune_channels."""
    score_method = "l1" if method == "l2" else method  # the L2 group norm of |w| is the l2 channel score
    return _prune_layers("channel_prune", model, name, score_method, lambda s, mod: channel_mask(s, amount, norm),
                         grads, act_norms, generator)


def sparsegpt_prune(model: nn.Module, calibration, pattern: str = "unstructured", amount: float = 0.5,
                    layers: list[str] | None = None, show_progress: bool = True) -> nn.Module:
    """SparseGPT one-shot pruning with sequential calibration (sparsekern.sparsegpt): masks
    recorded like torch.nn.utils.prune, kept weights updated to compensate."""
    from .sparsegpt import sparsegpt_prune_model

    if calibration is None:
        raise ValueError("sparsegpt_prune: calibration= (batches of inputs) is required")
    sparsegpt_prune_model(model, calibration, pattern, amount, layers=layers, show_progress=show_progress)
    return model


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
