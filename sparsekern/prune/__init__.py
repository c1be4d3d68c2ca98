"""Decide what to remove: scores, masks, calibration, and pruning functions that record
masks the way torch.nn.utils.prune does.

  scores.py       score(weight, method), group_score (fused L1/L2 group reductions),
                  layer_norms, METHODS, check_method
  masks.py        unstructured / global / N:M / block / channel masks, prune_count
  calibration.py  prunable_layers, run_batch, collect_activation_norms (wanda),
                  collect_gradients (taylor)
  functional.py   l1_prune, l2_prune, random_prune, taylor_prune, wanda_prune,
                  global_prune, nm_prune, block_prune, channel_prune, apply_mask,
                  remove, sparsity (torch.nn.utils.prune-compatible)

Everything public is re-exported here: `sparsekern.prune.nm_mask`,
`sparsekern.prune.l1_prune`, ... Masks are bool tensors of the weight's shape, True =
keep. Conv weights [out, in, kh, kw] are pruned in their 2-D view (`patterns.as_2d`):
N:M groups run along input channels at each kernel position (the layout sparse tensor
cores and TensorRT use).

This layer imports only patterns, reference and ops from sparsekern; reconstruction
(sparsekern.sparsegpt), the sparse modules and model surgery sit above it.
"""
from .calibration import PRUNABLE, collect_activation_norms, collect_gradients, prunable_layers, run_batch
from .functional import (apply_mask, block_prune, channel_prune, global_prune, l1_prune, l2_prune, nm_prune,
                         random_prune, remove, sparsity, taylor_prune, wanda_prune)
from .masks import block_mask, channel_mask, global_masks, nm_mask, prune_count, unstructured_mask
from .scores import METHODS, check_method, group_score, layer_norms, score

__all__ = [
    "METHODS", "check_method", "score", "group_score", "layer_norms",
    "prune_count", "unstructured_mask", "global_masks", "nm_mask", "block_mask", "channel_mask",
    "PRUNABLE", "prunable_layers", "run_batch", "collect_activation_norms", "collect_gradients",
    "apply_mask", "l1_prune", "l2_prune", "random_prune", "taylor_prune", "wanda_prune", "global_prune",
    "nm_prune", "block_prune", "channel_prune", "remove", "sparsity",
]
