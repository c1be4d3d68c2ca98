"""Calibration: which layers are prunable, running a batch through a model, and the
statistics data-aware scores need (input feature norms for wanda, gradients for taylor).

A batch is whatever the model's forward takes: a tensor, a tuple/list of positional
arguments, or a dict of keyword arguments (e.g. a tokenizer's output).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from .. import ops

PRUNABLE = (nn.Linear, nn.Conv2d)


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


def run_batch(model: nn.Module, batch):
    """model(**batch) for a dict, model(*batch) for a tuple or list, else model(batch)."""
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
        for batch in tqdm(batches, "calibration (activation norms)", disable=not show_progress, mininterval=1.0):
            run_batch(model, batch)
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
        for batch in tqdm(batches, "calibration (gradients)", disable=not show_progress, mininterval=1.0):
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
