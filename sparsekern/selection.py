"""Choose how much to prune where, from measurements: per-layer sensitivity, a per-layer
sparsity allocation that reaches a target, and a sweep over global pruning amounts.

`eval_fn(model) -> float` is any metric where higher is better (accuracy, negative loss,
similarity to the dense model's outputs). Results are plain dicts and lists;
sparsekern.reporting turns them into tables and plots, and the allocation goes straight
into `sparsegpt_prune_model(..., sparsity=alloc)` or a loop of `prune.l1_prune(model,
name, amount)`.

Uses only sparsekern.prune (layers, scores, masks, global pruning).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .prune import global_prune, prunable_layers, prune_count, remove, score, unstructured_mask

SENSITIVITY_METHODS = ("l1", "l2", "random")


def sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], sparsities=(0.3, 0.5, 0.7, 0.9),
                method: str = "l1", layers: list[str] | None = None, show_progress: bool = True) -> dict:
    """Metric (eval_fn(model), higher is better) when each layer alone is pruned to each
    sparsity (unstructured, by `method`: l1, l2 or random); every layer is restored
    afterwards. Returns {"baseline", "sparsities", "method", "layers": {name: {"params",
    "metric": {sparsity: value}}}}."""
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity: method must be l1, l2 or random, got {method!r}")
    for s in sparsities:
        prune_count(float(s), 1, "sensitivity")
    targets = prunable_layers(model) if layers is None else [(n, model.get_submodule(n)) for n in layers]
    result = {"baseline": float(eval_fn(model)), "sparsities": [float(s) for s in sparsities], "method": method,
              "layers": {}}
    work = [(n, m, s) for n, m in targets for s in sparsities]
    for name, mod, s in tqdm(work, "sensitivity", disable=not show_progress, mininterval=1.0):
        w = mod.weight
        saved = w.detach().clone()
        # l1 and l2 rank elements alike within one layer
        mask = unstructured_mask(score(saved, "random" if method == "random" else "l1"), float(s))
        with torch.no_grad():
            w.mul_(mask.to(w.dtype))
        try:
            val = float(eval_fn(model))
        finally:
            with torch.no_grad():
                w.copy_(saved)
        entry = result["layers"].setdefault(name, {"params": w.numel(), "metric": {}})
        entry["metric"][float(s)] = val
    return result


def allocate(sens: dict, target_sparsity: float) -> dict[str, float]:
    """Per-layer sparsities (from the measured grid of `sensitivity`) whose
    parameter-weighted mean reaches `target_sparsity`, greedily taking the step with the
    smallest metric drop per pruned parameter."""
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"allocate: target_sparsity must be in [0, 1], got {target_sparsity}")
    layers = sens["layers"]
    grid = [0.0] + sorted(sens["sparsities"])
    total = sum(v["params"] for v in layers.values())
    if max(grid) < target_sparsity:
        raise ValueError(f"allocate: target {target_sparsity} exceeds the largest measured sparsity {max(grid)}")
    level = {n: 0 for n in layers}

    def metric(n, i):
        return sens["baseline"] if i == 0 else layers[n]["metric"][grid[i]]

    def reached():
        return sum(grid[level[n]] * layers[n]["params"] for n in layers) / total >= target_sparsity - 1e-12

    while not reached():
        best, best_cost = None, None
        for n in layers:
            i = level[n]
            if i + 1 >= len(grid):
                continue
            cost = (metric(n, i) - metric(n, i + 1)) / ((grid[i + 1] - grid[i]) * layers[n]["params"])
            if best_cost is None or cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        level[best] += 1
    return {n: grid[i] for n, i in level.items()}


def sweep(model: nn.Module, eval_fn: Callable[[nn.Module], float], amounts=(0.0, 0.3, 0.5, 0.7, 0.9),
          method: str = "l1", show_progress: bool = True) -> list[dict]:
    """Prune copies of the model globally (`prune.global_prune`) to each amount and
    measure: the "which pruning rate" answer as rows (amount, metric, sparsity, nonzero
    params, dense and bitmask bytes). `reporting.write_sweep` stores them with a table
    and a plot."""
    rows = []
    for amount in tqdm(list(amounts), "sweep", disable=not show_progress, mininterval=1.0):
        m = copy.deepcopy(model)
        if amount > 0:
            global_prune(m, float(amount), method)
            remove(m)
        layers = prunable_layers(m)
        nnz = sum(int((l.weight != 0).sum()) for _, l in layers)
        total = sum(l.weight.numel() for _, l in layers)
        elt = layers[0][1].weight.element_size() if layers else 4
        rows.append({"amount": float(amount), "metric": float(eval_fn(m)), "sparsity": 1 - nnz / max(total, 1),
                     "nonzero_params": nnz, "dense_bytes": total * elt,
                     "bitmask_bytes": nnz * elt + math.ceil(total / 8)})
    return rows
