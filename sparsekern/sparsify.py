"""Model-level swap: sparsify(model), from_torch_prune(model), explain(model), and loading a
sparse state dict into a dense model."""
from __future__ import annotations

import contextlib
import fnmatch
import itertools
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from . import kinds, memory, precisions, prune, serialization
from .nn import SPARSE_MODULES, Policy, SparseConv2d, SparseLinear, is_conv1d, linear_of, note_model_footprint, sparse_shell
from .patterns import as_2d


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` (as in named_modules()) with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@memory.large_blocks_mapped()  # the layers' temporaries leave no heap holes (sparsekern/memory.py)
def sparsify(model: nn.Module, pattern: str = "2:4", method: str = "l1", sparsity: float | dict | None = None,
             calibration: Iterable | None = None, loss_fn: Callable | None = None, include=None, exclude=None,
             min_features: int = 128, block: tuple[int, int] = (32, 32), trainable: bool = False,
             policy: Policy | None = None, show_progress: bool = True, channels_last: bool | None = None,
             quantize: str | None = None, group_size: int = 128, untie: bool = False, quantize_dense: bool = False):
    """Score, mask and swap every eligible nn.Linear / nn.Conv2d (and transformers' Conv1D,
    GPT-2's layers, whose weight is stored [in, out]) for a sparse module, in place.

    pattern: "2:4" / "N:M", "unstructured" (with sparsity), "block" (with sparsity, block).
    sparsity: the fraction to remove, or {layer name: fraction} per layer (an allocation from
    sparsekern.selection: owl_allocation, allocate); layers the dict leaves out, or gives 0,
    stay dense.
    method: l1, l2, random, taylor (calibration + loss_fn(model, batch)), wanda (calibration),
    sparsegpt (calibration; prunes with reconstruction, layer by layer, see sparsekern.sparsegpt).
    include / exclude: fnmatch patterns on module names. Layers with fewer than
    `min_features` inputs or outputs, and Conv settings the kernels do not cover, stay
    dense and are listed. Layers already carrying a torch.nn.utils.prune mask keep it.
    channels_last: lay out the weights of the nn.Conv2d layers on the CPU that stay dense
    channels-last (in place, values unchanged; their state_dict() still gives contiguous
    weights, so checkpoints, safetensors included, are as before). None (default): when
    some convolution on the CPU became a SparseConv2d, whose C++ kernel returns
    channels-last output: torch runs a convolution channels-last when its input or its
    weight is, and converts the other one at every call, so mixed layouts cost a copy per
    call (input copies inside dense convolutions, in the 2:4 ResNet-50's profile); with
    every weight channels-last the activations stay so from the first convolution on, and
    dense oneDNN convolutions run faster so on the CPU anyway. Those rows of the report
    carry "layout": "channels_last". True: always; False: never.
    quantize: store the kept values as "int8" (one scale per output row) or "int4" (one
    scale per group_size = 32/64/128 kept values of a row; N:M patterns only), or None
    (the weight's dtype). With method="sparsegpt" the kept weights are quantized inside
    the sweep (joint: the reconstruction compensates the rounding too); otherwise after
    pruning. Layouts: sparsekern/precisions.py.
    quantize_dense: with quantize="int8" or "int4", the nn.Linear layers on the CPU that stay
    dense (excluded, too small, a shape the pattern does not fit; not a tied weight, whose tie
    would break) become torch's dynamic int8 Linear (what quantize_dynamic makes: int8
    weights, activations quantized per call), so the whole model is compressed, as a
    language model's lm_head must be for decode to stream fewer bytes than torch int8's
    one-liner. Their report rows say "values": "int8 (torch dynamic)". sparsekern.load
    restores them from a state dict or a torch.save file (not safetensors: torch's packed
    weights are not plain tensors).
    untie: a layer whose weight is tied to another module's (a language model's lm_head and
    its embedding) stays dense by default, so the tie holds; untie=True prunes it on its own
    (the other module keeps the dense weight) and sets a Hugging Face config's
    tie_word_embeddings to False, so tie_weights() leaves it alone. A layer reached by several
    paths (one module object) is swapped once, under all of them.
    A model on the meta device (no values yet) is refused: load its weights first, or load a
    saved sparse model into it with sparsekern.load.
    Returns (model, report): one row per module that holds a weight, in model order:
    "sparse" (pattern, density, bytes before/after, backend and why), "dense" (a float
    weight left as it is, and why: too small, excluded, tied, not a layer sparsify swaps,
    ...) or "skipped" (no float weight to prune: already quantized, on the meta device,
    already sparse). A Hugging Face model records the sparse layers in
    config.quantization_config, so save_pretrained writes them to config.json and
    sparsekern.load(ModelClass, folder) loads the model back (docs/SAVING.md).
    """
    kind, params = kinds.parse(pattern, "sparsify")
    entry = kinds.KINDS[kind]
    if method != "sparsegpt":
        prune.check_method(method, "sparsify")
    prec = precisions.precision(quantize, "sparsify")
    group_size = prec.check_group_size(group_size if prec.grouped else 0, "sparsify")
    quantize = None if prec.name == "fp" else prec.name
    if prec.grouped and not (entry.format is not None and entry.format.ROW_VALUES):
        raise ValueError(f"sparsify: quantize={quantize!r} needs an N:M pattern (groups of kept values along a row), "
                         f"got {pattern!r}; use quantize='int8'")
    if quantize_dense and quantize is None:
        raise ValueError("sparsify: quantize_dense=True converts the layers left dense to int8 alongside quantized "
                         "sparse ones; give quantize='int8' or 'int4' too")
    if quantize is not None and entry.format is None:
        raise ValueError("sparsify: pattern 'dense' keeps float weights; for a dense int8 model use "
                         "torch.ao.quantization.quantize_dynamic")
    if entry.needs_sparsity and sparsity is None:
        raise ValueError(f"sparsify: pattern {pattern!r} needs sparsity= (fraction to remove)")
    per_layer = sparsity if isinstance(sparsity, dict) else None
    if per_layer is not None:
        _check_per_layer_sparsity(model, per_layer, entry.needs_sparsity, pattern)
    elif sparsity is not None:
        prune.prune_count(float(sparsity), 1, "sparsify")
    if method in ("wanda", "taylor", "sparsegpt") and calibration is None:
        raise ValueError(f"sparsify: method {method!r} needs calibration= (an iterable of batches)")
    if method == "taylor" and loss_fn is None:
        raise ValueError("sparsify: method 'taylor' needs loss_fn=(model, batch) -> loss")
    candidates, report = [], []
    walk = _walk(model, include, exclude, untie)
    for name, mod, row, reason in walk:
        report.append(row)
        if reason is not None:
            row.update(status="dense" if row.pop("float", True) else "skipped", reason=reason)
            continue
        if per_layer is not None and not per_layer.get(name, 0):
            row.update(status="dense", reason="no sparsity for this layer in sparsity= (a dict)")
            continue
        out, inp = _out_in(mod)
        if min(out, inp) < min_features:
            row.update(status="dense", reason=f"smaller than min_features={min_features}")
            continue
        try:
            if isinstance(mod, nn.Conv2d):
                SparseConv2d.check_supported(mod, pattern, block)
            else:
                entry.check_shape(out, inp, params, block, "sparsify")
        except (ValueError, TypeError) as e:
            row.update(status="dense", reason=str(e))
            continue
        candidates.append((name, mod, row))
    meta = [r["layer"] for r in report if r.pop("on_meta", False)]
    if meta and not candidates:
        raise ValueError(f"sparsify: the model's weights are on the meta device ({len(meta)} layers, e.g. "
                         f"{meta[0]!r}): built without values (torch.device('meta'), init_empty_weights), there is "
                         "nothing to prune. Load the weights first (from_pretrained, or to_empty() and "
                         "load_state_dict), then sparsify; to load a saved sparse model into it, use "
                         "sparsekern.load(model, path)")
    # transformers' Conv1D (weight [in, out]) becomes the nn.Linear it computes, so scores,
    # calibration and SparseGPT see one kind of layer; the sparse module records the transpose.
    conv1d = set()
    for i, (name, mod, row) in enumerate(candidates):
        if is_conv1d(mod):
            lin = linear_of(mod)
            for alias in row.get("shared_with", []) + [name]:
                set_module(model, alias, lin)
            candidates[i] = (name, lin, row)
            conv1d.add(name)
    grads = norms = None
    value_scales: dict = {}
    if method == "wanda":
        norms = prune.collect_activation_norms(model, calibration, show_progress=show_progress)
    if method == "taylor":
        grads = prune.collect_gradients(model, loss_fn, calibration, show_progress=show_progress)
    if method == "sparsegpt":
        from .sparsegpt import sparsegpt_prune_model

        sparsegpt_prune_model(model, calibration, pattern, 0.5 if sparsity is None else sparsity,  # dict: per layer
                              layers=[n for n, _, _ in candidates], block=block, show_progress=show_progress,
                              quantize=quantize, group_size=group_size, scales_out=value_scales)

    for name, mod, row in tqdm(candidates, "sparsify", disable=not show_progress, mininterval=1.0):
        cls = SparseConv2d if isinstance(mod, nn.Conv2d) else SparseLinear
        dense_bytes = mod.weight.numel() * mod.weight.element_size()
        new = cls.from_dense(mod, pattern, method=method, block=block, trainable=trainable,
                             sparsity=per_layer[name] if per_layer is not None else sparsity,
                             policy=policy, grad=None if grads is None else grads[name],
                             act_norm=None if norms is None else norms[name], quantize=quantize,
                             group_size=group_size, value_scales=value_scales.get(name))
        memory.note_freed_block(dense_bytes)  # the dense weight, once the model lets go of it
        new.train(mod.training)
        if name in conv1d:
            new.transposed = True
        for alias in row.get("shared_with", []) + [name]:  # one compressed weight for every path to it
            set_module(model, alias, new)
        row.update(status="sparse", pattern=pattern, values=quantize or str(mod.weight.dtype).replace("torch.", ""),
                   density=new.kept_fraction(), bytes_before=dense_bytes,
                   bytes_after=new.weight_nbytes(), backend=new.backend, reason=new.reason)
    if quantize_dense:
        _dense_linears_int8(model, report)
    if channels_last is None:
        # (a trainable module holds its weight as a Parameter, a frozen one as buffers)
        channels_last = any(isinstance(m, SparseConv2d) and
                            next(itertools.chain(m.parameters(), m.buffers())).device.type == "cpu"
                            for m in model.modules())
    if channels_last:
        _dense_convs_channels_last(model, report)
    memory.release_freed_memory()  # the dense weights just freed (sparsekern/memory.py)
    _sparse_layers_changed(model)
    return model, report


SWAPPED = "nn.Linear, nn.Conv2d and transformers' Conv1D"


def _sparse_layers_changed(model: nn.Module) -> None:
    """What every function here that swaps or rewrites sparse layers does last: record them in
    a Hugging Face config (save_pretrained writes it to config.json), and tell each layer the
    model's footprint, from which it decides how to measure its paths (Policy(cold="auto"))."""
    serialization.record_in_config(model)
    note_model_footprint(model)


def _dense_linears_int8(model: nn.Module, report: list[dict]) -> None:
    """sparsify(quantize_dense=True): each report row "dense" that is a float32 nn.Linear on
    the CPU, not tied, becomes torch's dynamic int8 Linear (every path to it)."""
    for row in report:
        if row.get("status") != "dense" or "tied" in row.get("reason", ""):
            continue
        name = row["layer"]
        mod = model.get_submodule(name)
        if type(mod) is not nn.Linear:
            continue
        if mod.weight.device.type != "cpu" or mod.weight.dtype != torch.float32:
            row["reason"] += (f"; not converted to int8 (quantize_dense): torch's dynamic int8 runs float32 "
                              f"layers on the CPU, this one is {mod.weight.dtype} on {mod.weight.device.type}")
            continue
        new = serialization.dynamic_int8_linear(mod)
        for alias in row.get("shared_with", []) + [name]:
            set_module(model, alias, new)
        row.update(values="int8 (torch dynamic)", bytes_before=mod.weight.numel() * mod.weight.element_size(),
                   bytes_after=mod.weight.numel() + (0 if mod.bias is None else mod.bias.numel() * 4),
                   reason=row["reason"] + "; int8 through torch's dynamic quantization (quantize_dense=True)")


def _check_per_layer_sparsity(model: nn.Module, per_layer: dict, needs_sparsity: bool, pattern: str) -> None:
    """A {layer name: sparsity} dict: for a pattern that takes a sparsity, names of the
    model's modules, fractions in [0, 1)."""
    if not needs_sparsity:
        raise ValueError(f"sparsify: a per-layer sparsity dict needs a pattern that takes a sparsity (unstructured, "
                         f"block), got pattern {pattern!r}")
    modules = dict(model.named_modules())
    unknown = [n for n in per_layer if n not in modules]
    if unknown:
        raise ValueError(f"sparsify: sparsity= names no module of the model: {unknown[:5]}")
    for name, value in per_layer.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"sparsify: sparsity[{name!r}] must be a number, got {value!r}")
        prune.prune_count(float(value), 1, f"sparsify (sparsity[{name!r}])")


def _out_in(mod: nn.Module) -> tuple[int, int]:
    """(outputs, inputs per output) of a layer sparsify swaps."""
    w = mod.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(mod) else (w.shape[0], w[0].numel())


def _quantized(mod: nn.Module) -> str | None:
    """Why `mod` holds no float weight sparsify could prune (torch.ao quantized modules,
    integer or quantized weight tensors, e.g. bitsandbytes' Int8Params), or None."""
    try:
        w = getattr(mod, "weight", None)
    except Exception:
        w = None
    if callable(w) and not isinstance(w, torch.Tensor):  # torch.ao quantized modules: weight() unpacks
        with contextlib.suppress(Exception):
            w = w()
    where = type(mod).__module__
    if ".quantized" in where or (isinstance(w, torch.Tensor) and (w.is_quantized or not w.is_floating_point())):
        dtype = str(w.dtype).replace("torch.", "") if isinstance(w, torch.Tensor) else "?"
        return (f"already quantized ({where}.{type(mod).__name__}, weight {dtype}): sparsify prunes float weights; "
                "run it on the float model, with quantize='int8' (or 'int4') to store the kept values quantized")
    return None


def _walk(model: nn.Module, include, exclude, untie: bool):
    """(name, module, report row, reason it stays as it is or None) for every module of
    `model` that holds a weight, once per module (a module reached by several paths lists
    them in row["shared_with"]); tied weights are kept dense unless `untie`."""
    paths: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}  # parameter -> (its names, its modules)
    for name, mod in model.named_modules(remove_duplicate=False):
        for k, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{k}" if name else k, mod))
    # nn.MultiheadAttention reads out_proj.weight directly, so its projection must stay nn.Linear.
    mha_children = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}
    for name, mod in model.named_modules():
        try:
            holds = next(mod.parameters(recurse=False), None) is not None or hasattr(mod, "weight")
        except Exception:  # a `weight` property that raises: the module holds one all the same
            holds = True
        if not holds:
            continue
        row = {"layer": name, "type": type(mod).__name__}
        if len(paths[id(mod)]) > 1:
            row["shared_with"] = [p for p in paths[id(mod)] if p != name]
        if isinstance(mod, SPARSE_MODULES):
            yield name, mod, {**row, "float": False}, f"already sparse ({mod.pattern})"
            continue
        reason = _quantized(mod)
        if reason is not None:
            yield name, mod, {**row, "float": False}, reason
            continue
        linear_like = isinstance(mod, prune.PRUNABLE) or is_conv1d(mod)
        if not linear_like:
            yield name, mod, row, f"not a layer sparsify swaps ({SWAPPED} are)"
            continue
        if not isinstance(mod.weight, torch.Tensor):
            yield name, mod, {**row, "float": False}, "no weight tensor (weight is None)"
            continue
        if mod.weight.is_meta:
            yield name, mod, {**row, "float": False, "on_meta": True}, (
                "weight on the meta device (not loaded): load the weights, then sparsify; sparsekern.load "
                "loads a saved sparse model into it")
            continue
        if include is not None and not _matches(name, include):
            yield name, mod, row, "not matched by include="
            continue
        if _matches(name, exclude):
            yield name, mod, row, "excluded"
            continue
        if name in mha_children:
            yield name, mod, row, "nn.MultiheadAttention reads its weight directly"
            continue
        tied = [n for n, m in owners.get(id(mod.weight), []) if m is not mod]
        if tied:
            if not untie:
                yield name, mod, row, (f"weight tied to {', '.join(tied)}: kept dense so the tie holds "
                                       "(sparsify(..., untie=True) prunes it on its own and unties)")
                continue
            row["tied"] = f"untied from {', '.join(tied)} (they keep the dense weight)"
            for _, cfg in serialization.hf_configs(model):
                if getattr(cfg, "tie_word_embeddings", False):  # else tie_weights() would tie them again
                    cfg.tie_word_embeddings = False
                    row["tied"] += "; config.tie_word_embeddings set to False"
        yield name, mod, row, None


def _dense_convs_channels_last(model: nn.Module, report: list[dict]) -> None:
    """Every nn.Conv2d's weight on the CPU stored channels-last, in place: the Parameter object
    stays, so optimizers and hooks holding it still do; its report row gets "layout":
    "channels_last". Each such module's state_dict() gives its weight contiguous again
    (`_contiguous_conv_weight`), so a checkpoint is what it was before (safetensors refuses
    non-contiguous tensors) and loads into either layout."""
    rows = {r["layer"]: r for r in report}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Conv2d or mod.weight is None or mod.weight.device.type != "cpu":
            continue
        mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
        if not getattr(mod, "_sparsekern_contiguous_state", False):
            mod._register_state_dict_hook(_contiguous_conv_weight)
            mod._sparsekern_contiguous_state = True
        if name in rows:
            rows[name]["layout"] = "channels_last"


def _contiguous_conv_weight(module, state_dict, prefix, local_metadata):
    """state_dict hook of the convolutions _dense_convs_channels_last laid out channels-last:
    their saved weight is contiguous (a copy), as before the layout changed."""
    key = prefix + "weight"
    t = state_dict.get(key)
    if isinstance(t, torch.Tensor) and not t.is_contiguous():
        state_dict[key] = t.contiguous()


def from_torch_prune(model: nn.Module, policy: Policy | None = None, trainable: bool = False):
    """Swap every Linear/Conv2d carrying a torch.nn.utils.prune mask (weight_mask, also
    set by sparsekern.prune) for a sparse module: N:M when the mask is N:M, block when it
    is block-structured, bitmask otherwise. Returns (model, report)."""
    report = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, prune.PRUNABLE) or not hasattr(mod, "weight_mask"):
            continue
        mask = mod.weight_mask.bool()
        m2d = as_2d(mask)
        pattern = kinds.detect_pattern(m2d)
        if isinstance(mod, nn.Conv2d):
            try:
                SparseConv2d.check_supported(mod, pattern)
            except ValueError as e:
                try:
                    SparseConv2d.check_supported(mod, "unstructured")
                    pattern = "unstructured"
                except ValueError:
                    report.append({"layer": name, "status": "dense", "reason": str(e)})
                    continue
        cls = SparseConv2d if isinstance(mod, nn.Conv2d) else SparseLinear
        kind, params = kinds.parse(pattern)
        sparsity = 1.0 - float(mask.float().mean())
        new = cls.from_dense(mod, pattern, mask=mask, sparsity=sparsity,
                             block=kinds.KINDS[kind].block_of(params, (32, 32)) or (32, 32),
                             trainable=trainable, policy=policy)
        new.train(mod.training)
        set_module(model, name, new)
        report.append({"layer": name, "status": "sparse", "pattern": pattern, "density": 1 - sparsity,
                       "backend": new.backend, "reason": new.reason})
    _sparse_layers_changed(model)
    return model, report


@memory.large_blocks_mapped()  # the layers' temporaries leave no heap holes (sparsekern/memory.py)
def quantize_values(model: nn.Module, precision: str | None, group_size: int = 128) -> nn.Module:
    """Stores the kept values of every sparse layer in `precision` ("int8": a scale per output
    row; "int4": a scale per group_size kept values of a row, N:M layers only; None: float),
    round to nearest, after pruning. In place; returns the model. Joint quantization, where
    SparseGPT compensates the rounding too, is sparsify(..., method="sparsegpt",
    quantize=...)."""
    for mod in model.modules():
        if isinstance(mod, SPARSE_MODULES):
            memory.note_freed_block(mod.weight_nbytes())  # the float values it replaces
            mod.quantize_values(precision, group_size)
    memory.release_freed_memory()
    _sparse_layers_changed(model)
    return model


def tune(model: nn.Module, example_inputs, show_progress: bool = True) -> str:
    """Makes every sparse layer's per-batch-bucket path choice ahead of time and stores it in
    the on-disk tuning cache (sparsekern.decisions), so later processes on this machine read
    it instead of measuring at their first call of each batch size.

    example_inputs: one input of the model (a tensor, a tuple of positional arguments or a
    dict of keyword arguments) or a list of them, one per batch size to prepare. Runs the
    model on each in eval mode without gradients (a choice already in the cache is read, not
    measured again) and restores its training mode. Returns explain(model)."""
    inputs = list(example_inputs) if isinstance(example_inputs, list) else [example_inputs]
    if not inputs:
        raise ValueError("tune: example_inputs is empty; give an input of the model (or a list of them)")
    layers = [m for m in model.modules() if isinstance(m, SPARSE_MODULES)]
    bar = tqdm(total=len(layers) * len(inputs), desc="sparsekern.tune", unit="layer", disable=not show_progress)

    def count(*_) -> None:  # returns None: a forward hook's return value would replace the output
        if bar.n < bar.total:
            bar.update(1)

    note_model_footprint(model)
    hooks = [m.register_forward_hook(count) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inp in inputs:
                if isinstance(inp, dict):
                    model(**inp)
                elif isinstance(inp, tuple):
                    model(*inp)
                else:
                    model(inp)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
        model.train(was_training)
    return explain(model)


@memory.large_blocks_mapped()  # the layers' temporaries leave no heap holes (sparsekern/memory.py)
def freeze(model: nn.Module, policy: Policy | None = None) -> nn.Module:
    """Converts every trainable sparse layer (sparsify(..., trainable=True), after
    fine-tuning or sparsekern.recover) to its compressed inference module, in place: the
    dense training weight is dropped and the masked weight compressed in the layer's pattern
    and value precision (SparseLinear.freeze), so the model computes what the trained model
    computes in eval mode. Returns the model."""
    for mod in model.modules():
        if isinstance(mod, SPARSE_MODULES) and mod.trainable:
            memory.note_freed_block(mod.weight.numel() * mod.weight.element_size())  # the dense training weight
            mod.freeze(policy)
    memory.release_freed_memory()
    _sparse_layers_changed(model)
    return model


def explain(model: nn.Module) -> str:
    """One line per sparse layer: pattern, density, backend and why it was chosen (per batch
    bucket: the path, its measured times, whether it was measured now, shared by an identical
    layer or read from the tuning cache, and when it was measured); and one per layer that
    runs torch's dynamic int8 (sparsify(quantize_dense=True))."""
    lines = []
    for name, mod in model.named_modules():
        if isinstance(mod, SPARSE_MODULES):
            lines.append(f"{name}: {type(mod).__name__} {mod.describe()} -- {mod.reason}")
        elif serialization.is_dynamic_int8_linear(mod):
            lines.append(f"{name}: torch dynamic int8 Linear in_features={mod.in_features}, "
                         f"out_features={mod.out_features}, values=int8 (one scale per tensor), "
                         f"bytes={mod.in_features * mod.out_features} -- a layer left dense, "
                         f"quantized by torch (quantize_dense=True): torch's quantized::linear_dynamic")
    return "\n".join(lines) if lines else "no sparse layers"


def dense_state_dict(sparse_model_or_state: nn.Module | dict, template: nn.Module | None = None) -> dict:
    """A state dict a dense model of the same architecture loads: every sparse layer's
    weight decompressed (zeros in place, Conv weights back to [out, in, kh, kw]).

    Give the sparse model, or a sparse state dict plus a dense `template` model (whose
    layer shapes say how to lay out each weight)."""
    if isinstance(sparse_model_or_state, nn.Module):
        out = {}
        for name, mod in sparse_model_or_state.named_modules():
            if isinstance(mod, SPARSE_MODULES):
                prefix = name + "." if name else ""
                dense = mod.to_dense()
                # A layer that replaced transformers' Conv1D gives its weight as Conv1D stores it.
                out[prefix + "weight"] = dense.weight.detach().t() if getattr(mod, "transposed", False) else \
                    dense.weight.detach()
                if dense.bias is not None:
                    out[prefix + "bias"] = dense.bias.detach()
            elif serialization.is_dynamic_int8_linear(mod):  # quantize_dense: its int8 weight, dequantized
                prefix = name + "." if name else ""
                weight, bias = mod._weight_bias()
                out[prefix + "weight"] = weight.dequantize()
                if bias is not None:
                    out[prefix + "bias"] = bias.detach()
        dynamic = tuple(n + "." for n, m in sparse_model_or_state.named_modules()
                        if serialization.is_dynamic_int8_linear(m))
        for k, v in sparse_model_or_state.state_dict().items():
            if not k.split(".")[-1].startswith("weight_") and not k.startswith(dynamic):
                out.setdefault(k, v)
        return out
    if template is None:
        raise ValueError("dense_state_dict: a state dict needs template= (a dense model of the same architecture)")
    sd = sparse_model_or_state
    out = {k: v for k, v in sd.items() if not k.split(".")[-1].startswith("weight_")}
    mods = dict(template.named_modules())
    for k, meta in sd.items():
        if not k.endswith("weight_meta"):
            continue
        prefix = k[: -len("weight_meta")]
        layer = mods[prefix[:-1]]
        probe = sparse_shell(layer, kinds.pattern_of_meta(meta))
        sub = {kk[len(prefix):]: v for kk, v in sd.items() if kk.startswith(prefix) and "." not in kk[len(prefix):]}
        probe.load_state_dict(sub)
        dense = probe.to_dense()
        out[prefix + "weight"] = dense.weight.detach().t() if getattr(probe, "transposed", False) else \
            dense.weight.detach()
    return out
