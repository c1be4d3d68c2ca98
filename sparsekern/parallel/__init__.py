"""Model parallelism for sparse models on torch.distributed (docs/PARALLEL.md).

- Tensor parallelism: `ColwiseParallel` and `RowwiseParallel`, accepted by torch's
  `torch.distributed.tensor.parallel.parallelize_module`, shard the compressed weight of
  a SparseLinear (and are torch's styles on nn.Linear / nn.Embedding). `check_plan`
  checks a plan before anything is sharded.
- Checkpoints: a sharded model's `state_dict()` goes to `torch.distributed.checkpoint`
  as it is; `load_checkpoint` loads one into a sharded model (each rank reads its shard)
  or a single process (resharding); `unshard_state_dict` turns a gathered sharded state
  dict into a single-device one.
- Pruning a sharded model: `sparsify_sharded` scores and masks the full weight of each
  tensor-parallel nn.Linear, so shard-then-prune equals prune-then-shard.
- Masked fine-tuning under FSDP2: trainable sparse modules work under `fully_shard` as
  they are; `apply_masks_` re-zeroes pruned weights (plain or sharded) after any update.

This package sits above the sparse modules and sparsify; nothing in sparsekern imports it.
"""
from .checkpoint import load_checkpoint
from .fsdp import apply_masks_
from .layout import unshard_state_dict
from .sparsify import sparsify_sharded
from .style import ColwiseParallel, RowwiseParallel, TPSparseLinear, check_plan, shard_sparse_linear

__all__ = ["ColwiseParallel", "RowwiseParallel", "TPSparseLinear", "check_plan", "shard_sparse_linear",
           "load_checkpoint", "unshard_state_dict", "sparsify_sharded", "apply_masks_"]
