"""Pruning a model that is already tensor-parallel (shard, then prune).

Two orders give the same sharded sparse model, shard for shard:

1. prune, then shard (the usual one): `sparsekern.sparsify(model, ...)` on the whole
   model, then `parallelize_module(model, mesh, plan)` with sparsekern.parallel styles.
   Every method works (l1, l2, random, wanda, taylor, sparsegpt).
2. shard, then prune: `parallelize_module(dense_model, mesh, plan)` with torch's (or
   sparsekern's) styles, then `sparsify_sharded(model, pattern, ...)`. For each
   nn.Linear whose weight is a DTensor sharded over a 1-D mesh (Shard(0): column-wise,
   Shard(1): row-wise), it gathers the full weight (one layer at a time), scores and
   masks it exactly as `sparsekern.sparsify` would, compresses it, and keeps this rank's
   shard in place (the layer becomes a TPSparseLinear; the hooks parallelize_module put
   on it keep moving its activations). Methods that need only the weight: l1, l2 and
   random (random draws from each rank's RNG, so seed every rank alike).
   Calibration methods (wanda, taylor, sparsegpt) need activations the sharded model
   does not hold whole: prune first (order 1).

Not supported: pruning a model under FSDP2 (`fully_shard`): sparsify with
trainable=True first, then fully_shard (docs/PARALLEL.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..nn import Policy
from ..sparsify import set_module, sparsify
from .style import shard_sparse_linear

WEIGHT_ONLY_METHODS = ("l1", "l2", "random")


def _shadow(name: str, linear: nn.Linear) -> nn.Module:
    """A model holding only `linear` at the dotted `name`, so sparsify sees the real name."""
    root = mod = nn.Module()
    parts = name.split(".")
    for p in parts[:-1]:
        child = nn.Module()
        mod.add_module(p, child)
        mod = child
    mod.add_module(parts[-1], linear)
    return root


def sparsify_sharded(model: nn.Module, pattern: str = "2:4", method: str = "l1", sparsity: float | None = None,
                     include=None, exclude=None, min_features: int = 128, block: tuple[int, int] = (32, 32),
                     policy: Policy | None = None):
    """sparsekern.sparsify for a model whose nn.Linear layers may be tensor-parallel (module
    docstring). Plain layers are pruned as sparsify prunes them; sharded ones from their
    gathered full weight, then re-sharded on the dimension they were sharded on. Every
    rank must call it. Returns (model, report) like sparsify."""
    if method not in WEIGHT_ONLY_METHODS:
        raise ValueError(f"sparsify_sharded: method {method!r} needs calibration through the whole model; prune "
                         f"before sharding (sparsekern.sparsify, then parallelize_module), or use one of "
                         f"{WEIGHT_ONLY_METHODS}")
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("sparsify_sharded: the model is under FSDP2 (fully_shard); sparsify with trainable=True "
                         "before fully_shard")
    report = []
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        w, b = mod.weight, mod.bias
        sharded = isinstance(w, DTensor)
        if sharded and (w.device_mesh.ndim != 1 or w.placements not in ((Shard(0),), (Shard(1),))):
            raise ValueError(f"sparsify_sharded: layer {name!r} has a weight laid out as {w.placements} on a "
                             f"{w.device_mesh.ndim}-D mesh; only Shard(0) (column-wise) or Shard(1) (row-wise) "
                             "on a 1-D mesh is supported")
        full = nn.Linear(mod.in_features, mod.out_features, b is not None, device=_local(w).device,
                         dtype=w.dtype)
        with torch.no_grad():
            full.weight.copy_(w.full_tensor() if sharded else w)
            if b is not None:
                full.bias.copy_(b.full_tensor() if isinstance(b, DTensor) else b)
        full.train(mod.training)
        shadow = _shadow(name, full)
        _, rows = sparsify(shadow, pattern, method, sparsity, include=include, exclude=exclude,
                           min_features=min_features, block=block, policy=Policy("sparse") if sharded else policy,
                           show_progress=False)
        report.extend(rows)
        new = shadow.get_submodule(name)
        if new is full:  # left dense
            continue
        if not sharded:
            set_module(model, name, new)
            continue
        dim = w.placements[0].dim
        shard_sparse_linear(mod, w.device_mesh, dim, src_data_rank=None, policy=policy, source=new,
                            style="sparsify_sharded", name=name)
        rows[-1]["backend"], rows[-1]["reason"] = mod.backend, f"shard {mod.tp_rank}/{mod.tp_world}: {mod.reason}"
    return model, report


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t
