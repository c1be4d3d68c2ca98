"""Simplify structure for real: drop whole layers and channels, fold BatchNorm, and
choose per-layer sparsity.

- `layer_importance(model, loss_fn, data)`: sum of |g| per layer and per block.
- `remove_layers(model, names, example_input)`: shape-preserving blocks become Identity.
- `prune_channels(model, amount, example_input)`: removes output channels of Linear/Conv2d
  and the matching inputs of their consumers (BatchNorm included); the result computes
  exactly what the original computes when those channels are cut at the consumers'
  inputs (`channel_cut_reference`). Channels tied by residual additions or concatenation
  are left alone and reported.
- `fold_batchnorm(model)`: Conv/Linear followed by BatchNorm (eval) becomes one layer.
- `sensitivity`, `allocate`, `sweep`: per-layer sparsity from measured accuracy drops.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Callable, Iterable

import torch
from torch import fx, nn

from . import prune
from ._progress import progress


# ------------------------------------------------------------------ layer importance
def layer_importance(model: nn.Module, loss_fn: Callable, data: Iterable, show_progress: bool = True
                     ) -> dict[str, float]:
    """Sum of |gradient| over each module's parameters (layers and the blocks holding
    them), accumulated over the batches; loss_fn(model, batch) -> scalar loss."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in params.items()}
    acc = {n: 0.0 for n in params}
    count = 0
    try:
        for batch in progress(data, "layer importance", enabled=show_progress):
            for p in params.values():
                p.grad = None
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += float(p.grad.abs().sum())
            count += 1
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    if count == 0:
        raise ValueError("layer_importance: data is empty")
    out: dict[str, float] = {}
    for mname, _ in model.named_modules():
        prefix = mname + "." if mname else ""
        total = sum(v for n, v in acc.items() if n.startswith(prefix))
        if any(n.startswith(prefix) for n in acc):
            out[mname or "<model>"] = total
    return out


# ---------------------------------------------------------------------- remove layers
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def remove_layers(model: nn.Module, names: list[str], example_input) -> nn.Module:
    """Replace each named block with nn.Identity; a block whose output shape differs from
    its input shape (or that takes several inputs) is refused with a clear error."""
    mods = dict(model.named_modules())
    for n in names:
        if n not in mods or n == "":
            raise ValueError(f"remove_layers: no submodule named {n!r}")
    seen: dict[str, tuple] = {}
    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs, output))  # returns None: the output is not replaced
        return hook

    hooks = [mods[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            prune._run_batch(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        if n not in seen:
            raise ValueError(f"remove_layers: layer {n!r} is not called by the model's forward")
        inputs, out = seen[n]
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            raise ValueError(f"remove_layers: layer {n!r} does not map one tensor to one tensor")
        if inputs[0].shape != out.shape:
            raise ValueError(f"remove_layers: layer {n!r} changes the shape {tuple(inputs[0].shape)} -> "
                             f"{tuple(out.shape)}; only shape-preserving blocks can be removed")
    for n in names:
        _set_module(model, n, nn.Identity())
    return model


# ---------------------------------------------------------------------- channel pruning
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish, nn.ELU,
                 nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                   torch.tanh, torch.sigmoid, torch.nn.functional.dropout, torch.nn.functional.max_pool2d,
                   torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


def _channel_plan(model: nn.Module, example_input):
    """For each Linear/Conv2d producer: (bns, consumers, spatial) or a reason it is tied."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot analyse it
        raise ValueError(f"prune_channels: the model cannot be traced with torch.fx ({type(e).__name__}: {e})")
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    ShapeProp(gm).propagate(*args)
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    plans, tied = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], prune.PRUNABLE):
            continue
        prod = mods[node.target]
        if isinstance(prod, nn.Conv2d) and prod.groups != 1:
            tied[node.target] = "grouped convolution"
            continue
        if calls[node.target] != 1:
            tied[node.target] = "module called more than once"
            continue
        bns, consumers, reason = [], [], None
        stack = [(u, 1) for u in node.users]
        while stack and reason is None:
            u, sp = stack.pop()
            tgt = mods.get(u.target) if u.op == "call_module" else None
            if u.op == "call_module" and isinstance(tgt, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if calls[u.target] != 1:
                    reason = "shared BatchNorm"
                bns.append(u.target)
                stack += [(v, sp) for v in u.users]
            elif u.op == "call_module" and isinstance(tgt, prune.PRUNABLE):
                if isinstance(tgt, nn.Conv2d) and tgt.groups != 1:
                    reason = f"consumer {u.target} is a grouped convolution"
                elif calls[u.target] != 1:
                    reason = f"consumer {u.target} is called more than once"
                consumers.append((u.target, sp))
            elif (u.op == "call_module" and isinstance(tgt, _PASS_MODULES)) or \
                    (u.op == "call_function" and u.target in _PASS_FUNCTIONS) or \
                    (u.op == "call_method" and u.target in _PASS_METHODS):
                stack += [(v, sp) for v in u.users]
            elif (u.op == "call_function" and u.target is torch.flatten) or \
                    (u.op == "call_method" and u.target == "flatten"):
                shape = u.args[0].meta["tensor_meta"].shape
                start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                if start != 1 or len(shape) < 3:
                    reason = f"flatten from dim {start}"
                else:
                    stack += [(v, sp * math.prod(shape[2:])) for v in u.users]
            else:
                what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
                reason = f"its output reaches {u.op} {what!r} (residual add, concat or output)"
        if reason is None and not consumers:
            reason = "no Linear/Conv2d consumes its output"
        if reason:
            tied[node.target] = reason
        else:
            plans[node.target] = (bns, consumers)
    return plans, tied


def _keep_channels(weight: torch.Tensor, amount, norm: str, round_to: int) -> torch.Tensor:
    out = weight.shape[0]
    n_prune = prune._n_prune(amount, out, "prune_channels")
    keep = max(1, out - n_prune)
    if round_to > 1:
        keep = min(out, math.ceil(keep / round_to) * round_to)
    g = prune.group_score(weight, "row", norm=norm).reshape(-1)
    return torch.sort(torch.topk(g, keep).indices).values


def channel_cut_reference(model: nn.Module, kept: dict[str, torch.Tensor], example_input) -> nn.Module:
    """A copy of `model` (before prune_channels) whose consumers ignore the removed
    channels (their input weights zeroed): what prune_channels' result must compute."""
    ref = copy.deepcopy(model)
    plans, _ = _channel_plan(ref, example_input)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for prod, idx in kept.items():
            out = mods[prod].weight.shape[0]
            drop = torch.ones(out, dtype=torch.bool)
            drop[idx] = False
            for cname, sp in plans[prod][1]:
                c = mods[cname]
                cols = drop.repeat_interleave(sp)
                c.weight[:, cols.to(c.weight.device)] = 0
    return ref


def prune_channels(model: nn.Module, amount, example_input, method: str = "l2", round_to: int = 8,
                   exclude: Iterable[str] = ()) -> dict:
    """Physically remove the `amount` weakest output channels (L1 or L2 group norm of
    each row, `method` "l1"/"l2") of every Linear/Conv2d whose channels feed only other
    Linear/Conv2d layers (through BatchNorm, activations, pooling, dropout, flatten).
    Kept counts are rounded up to a multiple of `round_to` (GPU-friendly). Modifies the
    model in place and returns {"kept": {layer: kept indices}, "skipped": {layer: why},
    "report": rows}."""
    if method not in ("l1", "l2"):
        raise ValueError(f"prune_channels: method must be 'l1' or 'l2', got {method!r}")
    prune._n_prune(amount, 1 if isinstance(amount, float) else max(1, amount), "prune_channels")
    plans, tied = _channel_plan(model, example_input)
    mods = dict(model.named_modules())
    kept, report = {}, []
    for prod, (bns, consumers) in plans.items():
        if prod in exclude:
            tied[prod] = "excluded"
            continue
        kept[prod] = _keep_channels(mods[prod].weight.detach(), amount, method, round_to)
    with torch.no_grad():
        for prod, idx in kept.items():
            p = mods[prod]
            before = p.weight.shape[0]
            dev = p.weight.device
            idx_d = idx.to(dev)
            p.weight = nn.Parameter(p.weight[idx_d].clone())
            if p.bias is not None:
                p.bias = nn.Parameter(p.bias[idx_d].clone())
            if isinstance(p, nn.Linear):
                p.out_features = len(idx)
            else:
                p.out_channels = len(idx)
            for bn_name in plans[prod][0]:
                bn = mods[bn_name]
                for attr in ("weight", "bias"):
                    if getattr(bn, attr) is not None:
                        setattr(bn, attr, nn.Parameter(getattr(bn, attr)[idx_d].clone()))
                for attr in ("running_mean", "running_var"):
                    if getattr(bn, attr) is not None:
                        setattr(bn, attr, getattr(bn, attr)[idx_d].clone())
                bn.num_features = len(idx)
            for cname, sp in plans[prod][1]:
                c = mods[cname]
                cols = (idx.repeat_interleave(sp) * sp + torch.arange(sp).repeat(len(idx))).to(dev)
                c.weight = nn.Parameter(c.weight[:, cols].clone())
                if isinstance(c, nn.Linear):
                    c.in_features = c.weight.shape[1]
                else:
                    c.in_channels = c.weight.shape[1]
            report.append({"layer": prod, "channels_before": before, "channels_after": len(idx)})
    for prod, why in tied.items():
        report.append({"layer": prod, "channels_before": mods[prod].weight.shape[0],
                       "channels_after": mods[prod].weight.shape[0], "skipped": why})
    return {"kept": kept, "skipped": tied, "report": report}


# ---------------------------------------------------------------------- fold batchnorm
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        w = layer.weight
        layer.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
        b = layer.bias if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        new_b = (b * scale + shift).to(w.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b)
        else:
            layer.bias.copy_(new_b)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear (whose output nothing
    else uses) into that layer, and replace the BatchNorm with nn.Identity. The model
    must be in eval mode (folding uses the running statistics). Returns the folded
    (layer, batchnorm) pairs. Uses torch.fx; untraceable models fall back to adjacent
    children of nn.Sequential containers."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    if any(m.training for m in bns):
        raise ValueError("fold_batchnorm: BatchNorm is in training mode; call model.eval() first")
    pairs = []
    try:
        gm = fx.symbolic_trace(model)
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(mods[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
                src = node.args[0]
                if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods[src.target], prune.PRUNABLE)
                        and len(src.users) == 1):
                    pairs.append((src.target, node.target))
    except Exception:  # noqa: BLE001 - not traceable: look at Sequential neighbours only
        for pname, parent in model.named_modules():
            if isinstance(parent, nn.Sequential):
                kids = list(parent.named_children())
                for (a, ma), (b, mb) in zip(kids, kids[1:]):
                    if isinstance(ma, prune.PRUNABLE) and isinstance(mb, (nn.BatchNorm1d, nn.BatchNorm2d)):
                        pre = pname + "." if pname else ""
                        pairs.append((pre + a, pre + b))
    mods = dict(model.named_modules())
    for lname, bname in pairs:
        _fold(mods[lname], mods[bname])
        _set_module(model, bname, nn.Identity())
    return pairs


# --------------------------------------------------------------- per-layer sparsity
def _layer_mask(weight, method, s):
    sc = prune.score(weight, "l1" if method in ("l1", "l2") else method)
    return prune.unstructured_mask(sc, s)


def sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], sparsities=(0.3, 0.5, 0.7, 0.9),
                method: str = "l1", layers: list[str] | None = None, show_progress: bool = True) -> dict:
    """Metric (eval_fn(model), higher is better) when each layer alone is pruned to each
    sparsity; every layer is restored afterwards. Returns {"baseline", "sparsities",
    "layers": {name: {"params", "metric": {sparsity: value}}}}."""
    if method not in ("l1", "l2", "random"):
        raise ValueError(f"sensitivity: method must be l1, l2 or random, got {method!r}")
    for s in sparsities:
        prune._n_prune(float(s), 1, "sensitivity")
    targets = prune.prunable_layers(model) if layers is None else [(n, model.get_submodule(n)) for n in layers]
    result = {"baseline": float(eval_fn(model)), "sparsities": [float(s) for s in sparsities], "method": method,
              "layers": {}}
    work = [(n, m, s) for n, m in targets for s in sparsities]
    for name, mod, s in progress(work, "sensitivity", enabled=show_progress):
        w = mod.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(_layer_mask(saved, method, float(s)).to(w.dtype))
        try:
            val = float(eval_fn(model))
        finally:
            with torch.no_grad():
                w.copy_(saved)
        entry = result["layers"].setdefault(name, {"params": w.numel(), "metric": {}})
        entry["metric"][float(s)] = val
    return result


def allocate(sens: dict, target_sparsity: float) -> dict[str, float]:
    """Per-layer sparsities (from the measured grid) whose parameter-weighted mean reaches
    `target_sparsity`, greedily taking the step with the smallest metric drop per pruned
    parameter."""
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
          method: str = "l1", out_dir: str | None = None, show_progress: bool = True) -> list[dict]:
    """Prune copies of the model to each amount and measure: the "which pruning rate"
    answer as rows (amount, metric, sparsity, nonzero params, dense and bitmask bytes);
    with out_dir, also sweep.json, sweep.md (table) and sweep.png (plot, if matplotlib)."""
    rows = []
    for amount in progress(list(amounts), "sweep", enabled=show_progress):
        m = copy.deepcopy(model)
        if amount > 0:
            prune.global_prune(m, float(amount), method)
            prune.remove(m)
        layers = prune.prunable_layers(m)
        nnz = sum(int((l.weight != 0).sum()) for _, l in layers)
        total = sum(l.weight.numel() for _, l in layers)
        elt = layers[0][1].weight.element_size() if layers else 4
        rows.append({"amount": float(amount), "metric": float(eval_fn(m)), "sparsity": 1 - nnz / max(total, 1),
                     "nonzero_params": nnz, "dense_bytes": total * elt,
                     "bitmask_bytes": nnz * elt + math.ceil(total / 8)})
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sweep.json"), "w") as f:
            json.dump({"method": method, "rows": rows}, f, indent=1)
        with open(os.path.join(out_dir, "sweep.md"), "w") as f:
            f.write(format_table(rows) + "\n")
        plot_sweep(rows, os.path.join(out_dir, "sweep.png"))
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| amount | metric | sparsity | nonzero params | dense bytes | bitmask bytes |\n|---|---|---|---|---|---|"
    body = [f"| {r['amount']:.2f} | {r['metric']:.4f} | {r['sparsity']:.3f} | {r['nonzero_params']} | "
            f"{r['dense_bytes']} | {r['bitmask_bytes']} |" for r in rows]
    return "\n".join([head] + body)


def plot_sweep(rows: list[dict], path: str) -> bool:
    """Metric against sparsity; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["sparsity"] for r in rows], [r["metric"] for r in rows], "o-")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_sensitivity(sens: dict) -> str:
    """Markdown table: one row per layer, one column per sparsity (metric drop from baseline)."""
    sps = sens["sparsities"]
    head = "| layer | params | " + " | ".join(f"drop @ {s:.0%}" for s in sps) + " |"
    lines = [head, "|" + "---|" * (len(sps) + 2)]
    for name, v in sens["layers"].items():
        drops = " | ".join(f"{sens['baseline'] - v['metric'][s]:.4f}" for s in sps)
        lines.append(f"| {name} | {v['params']} | {drops} |")
    return "\n".join(lines)


def plot_sensitivity(sens: dict, path: str) -> bool:
    """One line per layer: metric against that layer's sparsity; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in sens["layers"].items():
        xs = [0.0] + sens["sparsities"]
        ax.plot(xs, [sens["baseline"]] + [v["metric"][s] for s in sens["sparsities"]], "o-", label=name)
    ax.set_xlabel("sparsity of the layer alone")
    ax.set_ylabel("metric")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
