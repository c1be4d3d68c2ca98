"""Simplify structure for real (model surgery): drop whole layers and channels, fold
BatchNorm.

- `layer_importance(model, loss_fn, data)`: sum of |g| per layer and per block.
- `remove_layers(model, names, example_input)`: shape-preserving blocks become Identity.
- `prune_channels(model, amount, example_input)`: removes output channels of Linear/Conv2d
  and the matching inputs of their consumers (BatchNorm included); the result computes
  exactly what the original computes when those channels are cut at the consumers'
  inputs (`channel_cut_reference`). Channels tied by residual additions or concatenation
  are left alone and reported.
- `fold_batchnorm(model)`: Conv/Linear followed by BatchNorm (eval) becomes one layer.

Per-layer sparsity from measured metric drops (sensitivity, allocate, sweep) is in
sparsekern.selection; tables and plots in sparsekern.reporting. This module uses prune
(layers, scores, amounts) and sparsify.set_module from sparsekern.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
from torch import fx, nn
from tqdm import tqdm

from .prune import PRUNABLE, group_score, prune_count, run_batch
from .sparsify import set_module


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
        for batch in tqdm(data, "layer importance", disable=not show_progress, mininterval=1.0):
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
            run_batch(model, example_input)
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
        set_module(model, n, nn.Identity())
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
        if node.op != "call_module" or not isinstance(mods[node.target], PRUNABLE):
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
            elif u.op == "call_module" and isinstance(tgt, PRUNABLE):
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
    n_prune = prune_count(amount, out, "prune_channels")
    keep = max(1, out - n_prune)
    if round_to > 1:
        keep = min(out, math.ceil(keep / round_to) * round_to)
    g = group_score(weight, "row", norm=norm).reshape(-1)
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
    prune_count(amount, 1 if isinstance(amount, float) else max(1, amount), "prune_channels")
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
                if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods[src.target], PRUNABLE)
                        and len(src.users) == 1):
                    pairs.append((src.target, node.target))
    except Exception:  # noqa: BLE001 - not traceable: look at Sequential neighbours only
        for pname, parent in model.named_modules():
            if isinstance(parent, nn.Sequential):
                kids = list(parent.named_children())
                for (a, ma), (b, mb) in zip(kids, kids[1:]):
                    if isinstance(ma, PRUNABLE) and isinstance(mb, (nn.BatchNorm1d, nn.BatchNorm2d)):
                        pre = pname + "." if pname else ""
                        pairs.append((pre + a, pre + b))
    mods = dict(model.named_modules())
    for lname, bname in pairs:
        _fold(mods[lname], mods[bname])
        set_module(model, bname, nn.Identity())
    return pairs
