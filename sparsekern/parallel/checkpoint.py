"""Sharded checkpoints through torch.distributed.checkpoint (DCP).

Save with DCP itself, from every rank:

    dcp.save(model.state_dict(), checkpoint_id=path)

A TPSparseLinear's state dict holds its shards as DTensors (sparsekern/parallel/layout.py),
so every rank writes its own shard and nothing is lost to DCP's de-duplication of
replicated tensors. Load with `load_checkpoint(model, path)`:

- into a model sharded the same way (same world size, same styles): each rank reads only
  its own shard of every compressed tensor;
- into a single process (a plain sparse model) or another world size: the shards are
  read whole and concatenated, then cut again for the destination (resharding).

The compressed tensors' sizes depend on the data (an unstructured layer keeps as many
values as its mask says), so the destination's own buffers cannot say how much to read:
load_checkpoint sizes them from the checkpoint's metadata. A plain `dcp.load` works only
into a model whose shards have exactly the saved sizes (the model that was saved).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..nn import SparseLinear
from .layout import unshard_state_dict
from .style import TPSparseLinear


def _own_keys(keys, prefix: str):
    return [k for k in keys if k.startswith(prefix + "weight_") and "." not in k[len(prefix):]]


def load_checkpoint(model: nn.Module, checkpoint_id, *, storage_reader=None, strict: bool = True) -> nn.Module:
    """Load a DCP checkpoint written from a (sharded or not) sparse model into `model`,
    sharded with sparsekern.parallel styles or not. Collective when `model` is sharded:
    every rank calls it. Returns the model."""
    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
    no_dist = not (dist.is_available() and dist.is_initialized())
    saved = reader.read_metadata().state_dict_metadata
    dest = model.state_dict()
    layers = {(name + "." if name else ""): mod for name, mod in model.named_modules()
              if isinstance(mod, SparseLinear)}
    layouts = {p + "weight_tp": torch.empty(saved[p + "weight_tp"].size, dtype=torch.int64)
               for p in layers if p + "weight_tp" in saved}
    if layouts:
        _load(layouts, checkpoint_id, _fresh(reader, storage_reader, checkpoint_id), no_dist)
    for prefix, mod in layers.items():
        for k in _own_keys(list(dest), prefix):
            del dest[k]
        layout = layouts.get(prefix + "weight_tp")
        same = isinstance(mod, TPSparseLinear) and layout is not None and \
            layout.tolist() == [mod.tp_dim, mod.tp_world]
        for k in _own_keys(saved, prefix):
            md = saved[k]
            if not hasattr(md, "size"):
                continue
            size, dtype = tuple(md.size), md.properties.dtype
            if same and k not in (prefix + "weight_meta", prefix + "weight_tp"):
                # this rank's row of a stack: DCP reads only that row
                dest[k] = DTensor.from_local(torch.zeros((1, size[1]), dtype=dtype, device=_device(mod)), mod.tp_mesh,
                                             [Shard(0)], run_check=False, shape=size, stride=(size[1], 1))
            elif isinstance(mod, TPSparseLinear) and k == prefix + "weight_dense" and layout is None \
                    and size[mod.tp_dim] % mod.tp_world == 0:
                local = list(size)
                local[mod.tp_dim] //= mod.tp_world
                dest[k] = DTensor.from_local(torch.zeros(local, dtype=dtype, device=_device(mod)), mod.tp_mesh,
                                             [Shard(mod.tp_dim)], run_check=False, shape=size,
                                             stride=torch.empty(size, device="meta").stride())
            else:
                dest[k] = torch.zeros(size, dtype=dtype)
    _load(dest, checkpoint_id, _fresh(reader, storage_reader, checkpoint_id), no_dist)
    # Plain sparse layers that received a stack of shards: one single-device weight.
    for p, m in layers.items():
        if not isinstance(m, TPSparseLinear) and p + "weight_tp" in dest:
            keys = _own_keys(list(dest), p)
            whole = unshard_state_dict({k[len(p):]: dest.pop(k) for k in keys})
            whole.pop("weight_tp_shapes", None)
            whole.pop("weight_tp", None)
            dest.update({p + k: v for k, v in whole.items()})
    model.load_state_dict(dest, strict=strict)
    return model


def _load(state_dict, checkpoint_id, reader, no_dist: bool) -> None:
    with warnings.catch_warnings():
        if no_dist:  # a single process is what the caller has: DCP need not say it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=reader, no_dist=no_dist)


def _device(mod) -> torch.device:
    return mod.weight_meta.device if mod.bias is None else mod.bias.device


def _fresh(reader, given, checkpoint_id):
    """A reader for the next dcp.load (FileSystemReader keeps per-load state)."""
    return given if given is not None else dcp.FileSystemReader(checkpoint_id)
