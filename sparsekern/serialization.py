"""Saved sparse models back in one call: `load(model, path_or_state_dict)`, and what a
Hugging Face config.json records about a sparse model (docs/SAVING.md).

A sparse module's state dict is self-describing: `weight_meta` holds the kind code and the
format's ints (precision included), and `weight_<tensor>` the compressed tensors
(sparsekern/formats.py). `load` walks the checkpoint's `weight_meta` keys, puts an empty
sparse module of the saved pattern in place of each dense layer there (nn.Linear,
transformers' Conv1D, nn.Conv2d: `nn.sparse_shell`), then loads every tensor through
load_state_dict, which adopts the compressed tensors at their saved size and validates them.
Nothing is pruned again.

Hugging Face: the model-level calls (sparsify, quantize_values, from_torch_prune, load)
record in `model.config.quantization_config` what was done per layer (pattern, values,
group size), the way torchao's TorchAoConfig and compressed-tensors record theirs, so
save_pretrained writes it into config.json. `load(ModelClass, folder)` builds the model from
that config and loads it. transformers' own from_pretrained would initialise the pruned
layers afresh (their `weight` is not in the file); while sparsekern is imported it refuses
instead, with a message that names sparsekern.load (`register_with_transformers`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from . import kinds
from .nn import SPARSE_MODULES, note_model_footprint, sparse_shell

QUANT_METHOD = "sparsekern"  # quantization_config.quant_method of a sparse model's config.json
FORMAT_VERSION = 1

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _mistake_message(what: str) -> str:
    return (f"{what} holds sparsekern compressed layers (config.json: quantization_config.quant_method="
            f"'{QUANT_METHOD}'); transformers' from_pretrained would initialise them afresh. Load it with "
            "sparsekern.load(ModelClass, path), e.g. sparsekern.load(transformers.AutoModelForCausalLM, path) "
            "(docs/SAVING.md)")


# ------------------------------------------------------------------ what a config records
def layer_record(model: nn.Module) -> dict[str, dict]:
    """Per sparse layer: its pattern, how its values are stored ("int8", "int4" with
    group_size, or the float dtype), and whether it replaced a transformers Conv1D."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, SPARSE_MODULES):
            continue
        row = {"type": type(mod).__name__, "pattern": mod.pattern}
        if mod.trainable:
            row["values"] = "trainable (dense weight and mask; freeze() stores it compressed)"
        else:
            f = mod.weight_format()
            row["pattern"] = kinds.pattern_of_meta(mod.weight_meta)
            if isinstance(f, torch.Tensor) or not f.quantized:
                row["values"] = str(f.dtype).replace("torch.", "")
            else:
                row["values"] = f.precision
                if f.group_size:
                    row["group_size"] = int(f.group_size)
        if getattr(mod, "transposed", False):
            row["replaces"] = "Conv1D"
        out[name] = row
    return out


def hf_configs(model: nn.Module):
    """The (module, config) of every Hugging Face model in `model` (a PreTrainedModel holds
    a `config` that writes config.json)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_json_string") and hasattr(cfg, "to_dict"):
            yield m, cfg


def record_in_config(model: nn.Module) -> dict | None:
    """Writes the layer record into `model.config.quantization_config` (a Hugging Face
    model: save_pretrained then puts it in config.json) and returns it; None for a model
    without a config, or one whose quantization_config comes from another method (left as
    it is). A model with no sparse layer left loses its record."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        return None
    register_with_transformers()
    cfg = model.config
    current = getattr(cfg, "quantization_config", None)
    ours = isinstance(current, dict) and current.get("quant_method") == QUANT_METHOD
    if current is not None and not ours:
        return None
    layers = layer_record(model)
    if not layers:
        if ours:
            del cfg.quantization_config
        return None
    cfg.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                               "load_with": "sparsekern.load(ModelClass, path)", "layers": layers}
    return cfg.quantization_config


_REGISTERED = False


def register_with_transformers() -> bool:
    """Makes transformers' from_pretrained refuse a folder whose config.json says
    quant_method 'sparsekern', with a message naming sparsekern.load, instead of loading the
    dense layers and initialising the compressed ones afresh. Done on import when
    transformers is already imported, and whenever sparsekern touches a Hugging Face model;
    a process that never imports sparsekern gets transformers' warning ("Unknown quantization
    type, got sparsekern") and fresh layers. Returns whether the hook is in place (False
    where transformers is missing or its quantizer registry differs)."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except Exception:  # transformers missing, or another version's layout
        return False
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        class SparsekernConfig(QuantizationConfigMixin):
            """A sparsekern record in config.json (read by sparsekern.load, not by transformers)."""

            def __init__(self, **record):
                self.__dict__.update(record)
                self.quant_method = QUANT_METHOD

            def to_dict(self):
                return dict(self.__dict__)

        register_quantization_config(QUANT_METHOD)(SparsekernConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        class SparsekernRefusal(HfQuantizer):
            """Refuses from_pretrained of a sparse checkpoint: sparsekern.load loads it."""

            requires_calibration = False

            def validate_environment(self, *args, **kwargs):
                raise ValueError(_mistake_message("This checkpoint"))

            def is_serializable(self, *args, **kwargs):
                return True

            @property
            def is_trainable(self):
                return False

        register_quantizer(QUANT_METHOD)(SparsekernRefusal)
    _REGISTERED = True
    return True


# ------------------------------------------------------------------------------ reading
def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a state dict itself; a .safetensors file; a torch.save
    file (read with weights_only=True); or a folder as save_pretrained writes it (one file
    or shards with their index)."""
    if isinstance(source, Mapping):
        return _with_metadata(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        for name in HF_WEIGHT_FILES:
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"sparsekern.load: no weights in {source!s} (looked for {', '.join(HF_WEIGHT_FILES)})")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) or _is_dynamic_int8_entry(k, v)
                                              for k, v in sd.items()):
        raise ValueError(f"sparsekern.load: {source!s} does not hold a state dict (a mapping of names to tensors); "
                         "give the state dict itself, e.g. sparsekern.load(model, checkpoint['model'])")
    return _with_metadata(sd)


def _with_metadata(sd: Mapping) -> dict:
    """A copy of the state dict `sd` that keeps its `_metadata` (the modules' state-dict
    versions, which torch's quantized modules read when they load)."""
    out = OrderedDict(sd)
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


# ------------------------------------------------------------------ torch's dynamic int8 Linear
# sparsify(quantize_dense=True) leaves the layers it does not prune as torch's dynamic int8
# Linear (torch.ao.nn.quantized.dynamic.Linear, what quantize_dynamic makes). Its state dict
# holds, beside scale and zero_point, these two entries, which are not tensors.
_PACKED = "._packed_params._packed_params"
_PACKED_DTYPE = "._packed_params.dtype"


def _is_dynamic_int8_entry(key: str, value) -> bool:
    return (key.endswith(_PACKED) and isinstance(value, tuple)) or \
        (key.endswith(_PACKED_DTYPE) and isinstance(value, torch.dtype))


def dynamic_int8_linear(linear: nn.Linear) -> nn.Module:
    """torch's dynamic int8 Linear of `linear` (int8 weights with one scale, activations
    quantized per call; the x86 engine's kernels), as quantize_dynamic converts it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        out = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]
    return out.train(linear.training)


def is_dynamic_int8_linear(mod: nn.Module) -> bool:
    """Whether `mod` is torch's dynamic int8 Linear (what dynamic_int8_linear makes)."""
    return isinstance(mod, torch.ao.nn.quantized.dynamic.Linear)


def _swap_in_dynamic_int8(model: nn.Module, sd: dict) -> None:
    """torch's dynamic int8 Linear (empty, to be loaded) in place of every nn.Linear the
    checkpoint holds as one."""
    import warnings

    modules = dict(model.named_modules(remove_duplicate=False))
    for key, value in sd.items():
        if not (key.endswith(_PACKED) and isinstance(value, tuple)):
            continue
        name = key[: -len(_PACKED)]
        layer = modules.get(name)
        if type(layer) is not nn.Linear:
            continue  # already converted, or an unexpected key: load_state_dict reports it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shell = torch.ao.nn.quantized.dynamic.Linear(layer.in_features, layer.out_features,
                                                         bias_=layer.bias is not None, dtype=torch.qint8)
        for alias, mod in modules.items():
            if mod is layer:
                model.set_submodule(alias, shell.train(layer.training))
        # A state dict without torch's versions (a plain dict): the layout this torch writes.
        meta = getattr(sd, "_metadata", None)
        if meta is None and isinstance(sd, OrderedDict):
            meta = sd._metadata = OrderedDict()
        if meta is not None:
            for sub, mod in shell.named_modules(prefix=name):
                meta.setdefault(sub, {}).setdefault("version", type(mod)._version)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of a parameter or buffer shared under several names (tied weights, a
    module reached by two paths) -> all of its names."""
    by_id: dict[int, list[str]] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                by_id.setdefault(id(t), []).append(f"{prefix}.{k}" if prefix else k)
    return {n: names for names in by_id.values() if len(names) > 1 for n in names}


def _swap_in_shells(model: nn.Module, sd: dict) -> list[str]:
    """An empty sparse module of the saved pattern in place of every dense layer the
    checkpoint holds compressed; returns their names."""
    modules = dict(model.named_modules(remove_duplicate=False))
    swapped = []
    for key in sd:
        if not key.endswith("weight_meta"):
            continue
        name = key[: -len("weight_meta")].rstrip(".")
        layer = modules.get(name)
        if layer is None:
            continue  # an unexpected key: load_state_dict reports it
        if isinstance(layer, SPARSE_MODULES):
            continue
        try:
            pattern = kinds.pattern_of_meta(sd[key])
            shell = sparse_shell(layer, pattern)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sparsekern.load: {name!r} is saved compressed but the model has a "
                             f"{type(layer).__name__} there: {e}") from None
        shell.train(layer.training)
        if not name:
            raise ValueError(f"sparsekern.load: the checkpoint holds the model itself compressed; load it into a "
                             f"{type(shell).__name__} (or a container holding the {type(layer).__name__})")
        for alias, mod in modules.items():  # every path to this layer gets the shell
            if mod is layer:
                model.set_submodule(alias, shell)
        swapped.append(name)
    return swapped


def load(model, source, strict: bool = True):
    """Loads a saved sparse model in one call, without pruning again.

    model: the model as built before sparsify (dense nn.Linear / transformers Conv1D /
    nn.Conv2d where the checkpoint holds sparse layers; already sparse modules are fine
    too), on any device, also the meta device (structure only: the saved tensors are
    assigned). Or a Hugging Face model class (LlamaForCausalLM, AutoModelForCausalLM, ...):
    the model is built from `source`'s config.json, then loaded (eval mode).
    source: a state dict, a .safetensors file, a torch.save file (weights_only=True) or a
    save_pretrained folder.
    Every layer the checkpoint holds compressed (a `<layer>.weight_meta` key) becomes a
    SparseLinear / SparseConv2d of the saved pattern and precision; the compressed tensors
    are adopted at their saved size and validated (a corrupt file raises and names the
    layer). An nn.Linear saved as torch's dynamic int8 Linear (sparsify(quantize_dense=True);
    a state dict or torch.save file: safetensors holds tensors only) becomes one again. strict: raise on keys the model lacks or misses (a tied weight saved once
    counts as present). Returns the model.
    """
    if isinstance(model, type):
        return _load_pretrained(model, source, strict)
    sd = read_state_dict(source)
    trainable = [k for k in sd if k.endswith("weight_mask_bits")]
    if trainable:
        raise ValueError(f"sparsekern.load: {trainable[0][:-len('.weight_mask_bits')]!r} was saved trainable (a dense "
                         "weight and its mask, no pattern recorded); freeze() the sparse layers before saving, or "
                         "sparsify(..., trainable=True) the model again and call load_state_dict")
    shells = _swap_in_shells(model, sd)
    _swap_in_dynamic_int8(model, sd)
    aliases = _aliases(model)
    assign = any(t.is_meta for t in _tensors(model))
    result = model.load_state_dict(sd, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not any(a in sd for a in aliases.get(k, ()))]
    if assign:  # tied weights: a name that was not in the file takes its twin's new tensor
        for k in result.missing_keys:
            twin = next((a for a in aliases.get(k, ()) if a in sd), None)
            if twin is not None:
                _set_tensor(model, k, _get_tensor(model, twin))
    if strict and (missing or result.unexpected_keys):
        hint = ""
        if any(k.endswith("weight_meta") for k in result.unexpected_keys):
            hint = " (compressed layers where the model has no layer of that name: is it the same architecture?)"
        raise RuntimeError(f"sparsekern.load: the checkpoint does not fit the model{hint}: missing "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                           f"{result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''} "
                           f"({len(result.unexpected_keys)})")
    for name in shells:
        model.get_submodule(name).take_pattern_of_weight()
    left = [n for n, t in _named_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"sparsekern.load: still on the meta device after loading (not in the checkpoint): "
                           f"{left[:8]}{' ...' if len(left) > 8 else ''}; build the model on a device, or give "
                           "those tensors values (to_empty() and initialise them) before loading")
    record_in_config(model)
    note_model_footprint(model)
    return model


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _tensors(model: nn.Module):
    return (t for _, t in _named_tensors(model))


def _get_tensor(model: nn.Module, name: str):
    prefix, _, leaf = name.rpartition(".")
    mod = model.get_submodule(prefix)
    return mod._parameters[leaf] if leaf in mod._parameters else mod._buffers[leaf]


def _set_tensor(model: nn.Module, name: str, t) -> None:
    prefix, _, leaf = name.rpartition(".")
    mod = model.get_submodule(prefix)
    if leaf in mod._parameters:
        mod._parameters[leaf] = t
    else:
        mod._buffers[leaf] = t


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _load_pretrained(model_cls, folder, strict: bool):
    """load(ModelClass, folder): the model built from the folder's config.json (its dtype),
    then loaded; eval mode, as from_pretrained returns it."""
    import transformers

    register_with_transformers()
    config = transformers.AutoConfig.from_pretrained(folder)
    record = getattr(config, "quantization_config", None)
    if isinstance(record, dict) and record.get("quant_method") == QUANT_METHOD:
        del config.quantization_config  # built dense; load() puts the sparse layers in and records them again
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    with _default_dtype(dtype):
        model = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    with contextlib.suppress(Exception):  # generation settings, when the folder has them
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    load(model, folder, strict)
    saved = (record or {}).get("layers", {}) if isinstance(record, dict) else {}
    now = layer_record(model)
    lost = sorted(set(saved) - set(now))
    if lost:
        raise RuntimeError(f"sparsekern.load: config.json records sparse layers the weights do not hold: {lost[:8]}")
    return model.eval()


if "transformers" in sys.modules:  # a from_pretrained in this process refuses a sparse folder
    register_with_transformers()
