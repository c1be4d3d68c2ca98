"""Simplify structure for real (model surgery): drop whole layers and channels, fold
BatchNorm.

- `layer_importance(model, loss_fn, data)`: sum of |g| per layer and per block.
- `remove_layers(model, names, example_input)`: shape-preserving blocks become Identity.
- `prune_channels(model, amount, example_input)`: removes output channels of Linear/Conv2d
  and the matching inputs of their consumers (BatchNorm included); the result computes
  exactly what the original computes when those channels are cut at the consumers'
  inputs (`channel_cut_reference`). Channels are followed through BatchNorm, activations,
  pooling, nn.Flatten/flatten and flattening views (`_channel_plan`); channels tied by
  residual additions, concatenation or anything else are left alone and reported.
- `fold_batchnorm(model)`: Conv/Linear followed by BatchNorm (eval) becomes one layer.

Per-layer sparsity from measured metric drops (sensitivity, allocate, sweep) is in
sparsekern.selection; tables and plots in sparsekern.reporting. This module uses prune
(layers, scores, amounts) and sparsify.set_module from sparsekern.
"""
from __future__ import annotations

import copy
import math
import operator
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
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# elementwise: the output has the input's shape and element i depends on element i only
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish, nn.ELU,
                 nn.Mish, nn.Hardsigmoid, nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
                   torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.leaky_relu,
                   torch.nn.functional.elu, torch.nn.functional.mish, torch.tanh, torch.sigmoid,
                   torch.nn.functional.dropout}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
# pooling over the last two dimensions: channels pass when they are not among those two
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
                   torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d}
# reductions over explicit dimensions (x.mean((2, 3)) as a global pool)
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_REDUCE_METHODS = {"mean", "sum", "amax"}
# subclasses of Linear/Conv2d/BatchNorm that compute what their torch base computes (BatchNormAct2d
# then applies its `drop` and `act` children, checked to be elementwise): traced as one module
_SAME_AS_BASE = {"timm.layers.linear.Linear", "timm.layers.norm_act.BatchNormAct2d"}


def _known_subclass(m: nn.Module) -> bool:
    name = f"{type(m).__module__}.{type(m).__qualname__}"
    return name in _SAME_AS_BASE and all(isinstance(c, _PASS_MODULES) for c in m.children())


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the subclasses in _SAME_AS_BASE kept as modules (timm's
    Linear head and BatchNormAct2d), so their weights can be cut like torch's."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or _known_subclass(m)


def _trace(model: nn.Module, example_input) -> fx.GraphModule:
    """The model traced (sharing its modules), each tensor node with its shape
    (node.meta["tensor_meta"]). Shapes are found in eval mode, so tracing never changes
    BatchNorm statistics; the modules' modes are restored."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot analyse it
        raise ValueError(f"prune_channels: the model cannot be traced with torch.fx ({type(e).__name__}: {e})")
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        for m, t in modes:
            m.training = t
    return gm


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dims(d, ndim: int) -> list[int] | None:
    """Normalized dimension list of an int/tuple/list argument; None when not literal ints."""
    ds = list(d) if isinstance(d, (tuple, list)) else [d]
    if not ds or not all(isinstance(x, int) for x in ds):
        return None
    return [x % ndim for x in ds]


def _only_input(u: fx.Node, src: fx.Node) -> bool:
    """src is u's first argument and nowhere else among its arguments."""
    seen = []
    fx.node.map_arg((u.args[1:], u.kwargs), lambda n: seen.append(n) or n)
    return bool(u.args) and u.args[0] is src and src not in seen


def _metadata_read(u: fx.Node, cdim: int, ndim: int) -> str | None:
    """For x.size(...), x.shape, x.dim(): None when it reads no channel count (a harmless
    user), else why it is not."""
    if u.op == "call_method" and u.target == "dim" or \
            u.op == "call_function" and u.target is getattr and u.args[1] in ("ndim", "dtype", "device"):
        return None
    whole = (u.op == "call_method" and u.target == "size" and _arg(u, 1, "dim", None) is None) or \
        (u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
    if u.op == "call_method" and u.target == "size" and not whole:
        d = _dims(_arg(u, 1, "dim", None), ndim)
        return None if d is not None and cdim not in d else "its channel count is read (size of the channel dim)"
    if whole:
        for v in u.users:
            if not (v.op == "call_function" and v.target is operator.getitem and isinstance(v.args[1], int)
                    and v.args[1] % ndim != cdim):
                return "its shape is read as a whole or at the channel dim"
        return None
    return "not a metadata read"


def _follow(u: fx.Node, src: fx.Node, cdim: int, sp: int):
    """Where the channels of src (at dimension cdim, each a block of sp consecutive
    entries) are in u's output: (cdim, sp), or a str saying why they cannot be followed."""
    shape, out = _shape(src), _shape(u)
    if shape is None or out is None:
        return f"{u.op} {u.target!r} does not map a tensor to a tensor"
    ndim = len(shape)
    if u.op == "call_function" and u.target is torch.flatten or u.op == "call_method" and u.target == "flatten" \
            or u.op == "call_module" and isinstance(u.meta.get("_sk_module"), nn.Flatten):
        if u.op == "call_module":
            m = u.meta["_sk_module"]
            start, end = m.start_dim, m.end_dim
        else:
            start, end = _arg(u, 1, "start_dim", 0), _arg(u, 2, "end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int):
            return "flatten with computed dimensions"
        start, end = start % ndim, end % ndim
        if end < start or start == end:
            return (cdim, sp)
        if cdim < start:
            return (cdim, sp)
        if cdim > end:
            return (cdim - (end - start), sp)
        if cdim != start:
            return f"flatten from dim {start} mixes the channels (channel dim {cdim})"
        return (cdim, sp * math.prod(shape[start + 1:end + 1]))
    if (u.op == "call_method" and u.target in ("view", "reshape")) or \
            (u.op == "call_function" and u.target is torch.reshape):
        sizes = list(u.args[1:]) if u.op == "call_method" else [_arg(u, 1, "shape", None)]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        if len(out) == cdim + 1 and len(sizes) == cdim + 1 and isinstance(sizes[cdim], int) and sizes[cdim] == -1 \
                and out[:cdim] == shape[:cdim]:
            return (cdim, sp * math.prod(shape[cdim + 1:]))
        return (f"{u.target if u.op == 'call_method' else 'reshape'} to {tuple(out)} with sizes "
                f"{[s if isinstance(s, int) else '?' for s in sizes]}: only a flatten from the channel dim "
                f"({cdim}) with -1 there follows the channels")
    if (u.op == "call_module" and isinstance(u.meta.get("_sk_module"), _POOL_MODULES)) or \
            (u.op == "call_function" and u.target in _POOL_FUNCTIONS):
        return (cdim, sp) if cdim < ndim - 2 else "pooling over the channel dim"
    if (u.op == "call_function" and u.target in _REDUCE_FUNCTIONS) or \
            (u.op == "call_method" and u.target in _REDUCE_METHODS):
        dims = _dims(_arg(u, 1, "dim", None), ndim)
        keep = _arg(u, 2, "keepdim", False)
        if dims is None or not isinstance(keep, bool) or cdim in dims:
            return "a reduction over the channel dim (or over every dim)"
        return (cdim if keep else cdim - sum(d < cdim for d in set(dims)), sp)
    if (u.op == "call_method" and u.target == "squeeze") or (u.op == "call_function" and u.target is torch.squeeze):
        dims = _dims(_arg(u, 1, "dim", None), ndim)
        if dims is None or cdim in dims:
            return "squeeze without a dim, or of the channel dim (one kept channel would vanish)"
        return (cdim - sum(d < cdim and shape[d] == 1 for d in set(dims)), sp)
    if (u.op == "call_module" and isinstance(u.meta.get("_sk_module"), _PASS_MODULES)) or \
            (u.op == "call_function" and u.target in _PASS_FUNCTIONS) or \
            (u.op == "call_method" and u.target in _PASS_METHODS):
        return (cdim, sp) if out == shape else f"{u.target!r} changes the shape"
    what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
    return f"its output reaches {u.op} {what!r} (residual add, concat or output)"


def _channel_plan(model: nn.Module, example_input):
    """For each Linear/Conv2d producer: (batchnorms, consumers), each a list of (name, sp)
    where sp is how many consecutive inputs of that layer each output channel of the
    producer became (a flatten of H x W makes H*W); or the reason it is tied.

    The channels are followed from the producer's output (dim 1 of a Conv2d, the last dim
    of a Linear) through BatchNorm (channels at dim 1), elementwise activations and
    dropout, 2-D pooling and reductions over other dims, squeeze of other dims, flatten
    (function, method or nn.Flatten) and view/reshape that flatten from the channel dim
    with -1 there (x.view(x.size(0), -1)), and reads of the shape at other dims. A
    Linear consumer must take them in its last dim, a Conv2d consumer at dim 1 unflattened."""
    gm = _trace(model, example_input)
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            node.meta["_sk_module"] = mods[node.target]
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
        out = _shape(node)
        if out is None:
            tied[node.target] = "no output shape"
            continue
        nout = prod.weight.shape[0]
        bns, consumers, reason = [], [], None
        stack = [(u, node, len(out) - (3 if isinstance(prod, nn.Conv2d) else 1), 1) for u in node.users]
        while stack and reason is None:
            u, src, cdim, sp = stack.pop()
            shape = _shape(src)
            tgt = mods.get(u.target) if u.op == "call_module" else None
            if shape is None or not _only_input(u, src):
                reason = f"its output reaches {u.op} {getattr(u.target, '__name__', u.target)!r} " \
                         f"(residual add, concat or output)"
            elif (meta := _metadata_read(u, cdim, len(shape))) != "not a metadata read":
                reason = meta  # None for x.size(0), x.shape[0]: unchanged by the surgery
            elif isinstance(tgt, _BATCHNORMS) and (type(tgt).forward in (nn.BatchNorm1d.forward,
                                                                         nn.BatchNorm2d.forward)
                                                   or _known_subclass(tgt)):
                if calls[u.target] != 1:
                    reason = "shared BatchNorm"
                elif cdim != 1 or tgt.num_features != nout * sp:
                    reason = f"BatchNorm {u.target} does not normalize its channels at dim 1"
                bns.append((u.target, sp))
                stack += [(v, u, cdim, sp) for v in u.users]
            elif isinstance(tgt, PRUNABLE):
                if isinstance(tgt, nn.Conv2d) and tgt.groups != 1:
                    reason = f"consumer {u.target} is a grouped convolution"
                elif calls[u.target] != 1:
                    reason = f"consumer {u.target} is called more than once"
                elif isinstance(tgt, nn.Conv2d) and (sp != 1 or cdim != len(shape) - 3):
                    reason = f"consumer {u.target} does not take the channels as its input channels"
                elif isinstance(tgt, nn.Linear) and cdim != len(shape) - 1:
                    reason = f"consumer {u.target} does not take the channels in its last dim"
                elif tgt.weight.shape[1] != nout * sp:
                    reason = f"consumer {u.target} has {tgt.weight.shape[1]} inputs, not {nout} x {sp}"
                consumers.append((u.target, sp))
            else:
                nxt = _follow(u, src, cdim, sp)
                if isinstance(nxt, str):
                    reason = nxt
                else:
                    stack += [(v, u, *nxt) for v in u.users]
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


def _columns(idx: torch.Tensor, sp: int) -> torch.Tensor:
    """The inputs of a consumer that kept channels idx feed, each channel a block of sp."""
    return idx.repeat_interleave(sp) * sp + torch.arange(sp).repeat(len(idx))


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
    Linear/Conv2d layers (through BatchNorm, activations, pooling, dropout, nn.Flatten,
    flatten and view/reshape from the channel dim: see _channel_plan).
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
            for bn_name, sp in plans[prod][0]:
                bn, cols = mods[bn_name], _columns(idx, sp).to(dev)
                for attr in ("weight", "bias"):
                    if getattr(bn, attr) is not None:
                        setattr(bn, attr, nn.Parameter(getattr(bn, attr)[cols].clone()))
                for attr in ("running_mean", "running_var"):
                    if getattr(bn, attr) is not None:
                        setattr(bn, attr, getattr(bn, attr)[cols].clone())
                bn.num_features = len(cols)
            for cname, sp in plans[prod][1]:
                c = mods[cname]
                cols = _columns(idx, sp).to(dev)
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
