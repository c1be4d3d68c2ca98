"""Masked fine-tuning under FSDP2 (`torch.distributed.fsdp.fully_shard`).

A trainable sparse module (`trainable=True`) needs nothing special under fully_shard:
FSDP2 shards its dense `weight` Parameter (Shard(0), rows) and leaves the packed mask
(`weight_mask_bits`, a buffer of 1 bit per weight) whole on every rank; each forward
all-gathers the weight and runs the masked-matmul op, whose weight gradient is masked, so
an optimizer whose update is zero for a zero gradient (SGD, Adam, AdamW, with or without
weight decay) keeps pruned weights at exactly zero. `apply_masks_` re-zeroes them for
updates that do not (a custom optimizer, noise, an edited or loaded weight), on plain or
FSDP2-sharded weights alike.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..nn import SPARSE_MODULES
from ..patterns import from_2d


def apply_masks_(model: nn.Module) -> int:
    """Zero every pruned weight of the model's trainable sparse modules, in place, on this
    rank's part of the weight (a plain tensor, or a DTensor sharded on dim 0 as FSDP2
    shards it). Returns the number of weights this rank set to zero that were not zero."""
    changed = 0
    for mod in model.modules():
        if not isinstance(mod, SPARSE_MODULES) or not mod.trainable:
            continue
        w = mod.weight
        keep = from_2d(mod.mask(), tuple(w.shape))
        if isinstance(w, DTensor):
            if w.placements != (Shard(0),):
                raise ValueError(f"apply_masks_: weight sharded as {w.placements}; expected (Shard(0),) (FSDP2)")
            local = w.to_local()
            # torch.chunk's split: the first ranks hold ceil(rows / world) rows each
            world, rank = w.device_mesh.size(), w.device_mesh.get_local_rank()
            rows = -(-w.shape[0] // world)
            keep = keep[rank * rows: rank * rows + local.shape[0]]
        else:
            local = w.data
        with torch.no_grad():
            changed += int(((local != 0) & ~keep).sum())
            local.mul_(keep.to(local.dtype))
    return changed
