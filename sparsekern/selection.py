"""Choose how much to prune where, from measurements: per-layer sensitivity, a per-layer
sparsity allocation that reaches a target (from sensitivity, or outlier-weighted: OWL), and a
sweep over global pruning amounts.

`eval_fn(model) -> float` is any metric where higher is better (accuracy, negative loss,
similarity to the dense model's outputs). Results are plain dicts and lists;
sparsekern.reporting turns them into tables and plots, and the allocation goes straight
into `sparsify(model, "unstructured", ..., sparsity=alloc)`,
`sparsegpt_prune_model(..., sparsity=alloc)` or a loop of `prune.l1_prune(model, name, amount)`.

Uses only sparsekern.prune (layers, scores, masks, global pruning).
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .prune import (collect_activation_norms, global_prune, prunable_layers, prune_count, remove, score,
                    unstructured_mask)

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


# ------------------------------------------------------------ outlier-weighted allocation
def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to the first numbered component
    ("encoder.layer.3.attention.self.query" -> "encoder.layer.3", "blocks.0.1" -> "blocks.0"),
    or the name itself when no component is a number (a layer outside the repeated blocks is a
    group of its own)."""
    parts = name.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if first is None else ".".join(parts[:first + 1])


def outlier_ratios(model: nn.Module, calibration, m: float = 5.0, layers: list[str] | None = None,
                   group: str | Callable[[str], str] = "block", show_progress: bool = True) -> dict[str, dict]:
    """OWL's layer outlier distribution: per group of layers, the fraction of the wanda
    scores A = |W_ij| * ||x_j|| (input feature norms over `calibration`, the dense model's)
    above `m` times the mean of A over the group's layers taken together.

    group: "block" (block_of: one ratio per transformer block, as OWL computes it), "layer"
    (one per layer), or a callable name -> group key. layers: the layers to score (default
    every nn.Linear / nn.Conv2d). Returns {group: {"outlier_ratio", "params", "layers"}}."""
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ValueError(f"outlier_ratios: m must be a positive number, got {m!r}")
    key = _group_key(group, "outlier_ratios")
    targets = prunable_layers(model) if layers is None else [prunable_layers(model, n)[0] for n in layers]
    if not targets:
        raise ValueError("outlier_ratios: no nn.Linear / nn.Conv2d layer to score")
    norms = collect_activation_norms(model, calibration, show_progress=show_progress)
    scores: dict[str, list[torch.Tensor]] = {}
    members: dict[str, list[str]] = {}
    for name, mod in targets:
        if name not in norms:
            raise ValueError(f"outlier_ratios: no calibration batch reached layer {name!r}")
        g = key(name)
        scores.setdefault(g, []).append(score(mod.weight, "wanda", act_norm=norms[name]).double())
        members.setdefault(g, []).append(name)
    out = {}
    for g, parts in scores.items():
        total = sum(p.numel() for p in parts)
        threshold = m * sum(float(p.sum()) for p in parts) / total
        above = sum(int((p > threshold).sum()) for p in parts)
        out[g] = {"outlier_ratio": above / total, "params": total, "layers": members[g]}
    return out


def owl_sparsities(ratios: dict[str, float], params: dict[str, int], target_sparsity: float,
                   lam: float = 0.08) -> dict[str, float]:
    """Per-group sparsities from outlier ratios: an affine, decreasing function of the ratio
    (more outliers, lower sparsity) within target ± lam, whose mean weighted by `params`
    is target_sparsity.

    OWL (Yin et al. 2024, luuyin/OWL) min-max scales the ratios to [0, 2 lam] and subtracts
    their plain mean: the same shape, but one side can reach up to 2 lam from the target
    when the ratios are skewed, and the mean is the target only for groups of equal size.
    Here, with u the min-max scaled ratio and u_bar its parameter-weighted mean,
    s = target - lam * (u - u_bar) / max(u_bar, 1 - u_bar): the farthest group sits exactly
    lam from the target, the bound holds, and the parameter-weighted mean is the target.
    Equal ratios give the target everywhere."""
    if set(ratios) != set(params) or not ratios:
        raise ValueError("owl_sparsities: ratios and params must name the same, non-empty set of groups")
    for g, r in ratios.items():
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r >= 0):
            raise ValueError(f"owl_sparsities: ratios[{g!r}] must be a finite number >= 0, got {r!r}")
        if not (isinstance(params[g], int) and params[g] > 0):
            raise ValueError(f"owl_sparsities: params[{g!r}] must be a positive int, got {params[g]!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"owl_sparsities: lam must be a number >= 0, got {lam!r}")
    if not (isinstance(target_sparsity, (int, float)) and lam <= target_sparsity and target_sparsity + lam < 1):
        raise ValueError(f"owl_sparsities: target_sparsity ± lam must lie in [0, 1), got target_sparsity="
                         f"{target_sparsity!r}, lam={lam!r}")
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi == lo:
        return {g: float(target_sparsity) for g in ratios}
    u = {g: (r - lo) / (hi - lo) for g, r in ratios.items()}
    total = sum(params.values())
    u_bar = sum(u[g] * params[g] for g in u) / total
    spread = max(u_bar, 1 - u_bar)
    return {g: float(target_sparsity - lam * (u[g] - u_bar) / spread) for g in u}


def owl_allocation(model: nn.Module, calibration, target_sparsity: float, lam: float = 0.08, m: float = 5.0,
                   layers: list[str] | None = None, group: str | Callable[[str], str] = "block",
                   show_progress: bool = True) -> dict[str, float]:
    """Outlier-weighted layer sparsities for unstructured pruning (OWL): {layer name:
    sparsity}, every layer of a group at its group's sparsity (outlier_ratios, then
    owl_sparsities), the mean over the layers weighted by their parameters equal to
    target_sparsity. OWL's settings for LLaMA at 70%: m=5, lam=0.08. Give the result to
    sparsify(model, "unstructured", method, sparsity=alloc, ...) with the same layers; layers
    sparsify leaves dense (too small, excluded) then move the model's mean off the target."""
    stats = outlier_ratios(model, calibration, m, layers, group, show_progress)
    per_group = owl_sparsities({g: v["outlier_ratio"] for g, v in stats.items()},
                               {g: v["params"] for g, v in stats.items()}, target_sparsity, lam)
    return {name: per_group[g] for g, v in stats.items() for name in v["layers"]}


def _group_key(group, op: str) -> Callable[[str], str]:
    if callable(group):
        return group
    # OWL's groups: a transformer block's layers together (its paper's unit), or each layer alone
    groupings = {"block": block_of, "layer": lambda name: name}
    if isinstance(group, str) and group in groupings:
        return groupings[group]
    raise ValueError(f"{op}: group must be 'block', 'layer' or a callable name -> group, got {group!r}")
