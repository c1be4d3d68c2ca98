"""How a sharded compressed weight is cut, and how its shards travel in a state dict.

Cuts. ColwiseParallel gives rank r of W ranks the output rows [r*out/W, (r+1)*out/W);
RowwiseParallel gives it the input columns [r*in/W, (r+1)*in/W). The formats cut only at
legal boundaries (sparsekern.formats: `slice_rows`, `slice_cols`): whole N:M groups,
whole 64-column bitmask words, whole blocks.

State-dict layout of a sharded layer (what `TPSparseLinear.state_dict()` returns, so what
`torch.distributed.checkpoint` saves). The shards of a compressed weight are not pieces
of the single-device tensors (a row-wise shard's bitmask values interleave with the
other ranks' row by row; offsets and crow_indices are rebased), so each tensor is saved
as a stack of the ranks' shards:

  weight_<t>          DTensor [W, L_t], Shard(0), t in the format's TENSOR_NAMES: row r
                      is rank r's tensor t flattened and zero-padded to L_t (the largest
                      shard), so every rank writes and reads only its own row.
  weight_tp_shapes    DTensor int64 [W, 4*T], Shard(0): row r holds (ndim, d0, d1, d2)
                      of each of rank r's T tensors, to undo the flattening.
  weight_tp           int64 [2]: (dim, W); dim 0 = output rows (column-wise), 1 = input
                      columns (row-wise).
  weight_meta         int64: the whole layer's meta (kind code, then the format's ints,
                      with the whole layer's in_features), as in a single-device module.
  bias                DTensor [out]: Shard(0) column-wise, Replicate row-wise (as torch's
                      own styles lay out an nn.Linear bias).

A layer whose backend is dense saves `weight_dense` as a DTensor [out, in] sharded on its
dimension, exactly as torch's styles save an nn.Linear weight.

`unstack` turns a gathered stack back into the single-device format (the shards
concatenated: `cat_rows` / `cat_cols`), which is how a single process (or another world
size) loads a sharded checkpoint.
"""
from __future__ import annotations

import torch

from .. import kinds


def cut(weight, dim: int, rank: int, world: int):
    """Rank `rank`'s shard of a format object (or a dense tensor) along `dim`."""
    size = weight.shape[dim]
    a, b = rank * size // world, (rank + 1) * size // world
    if isinstance(weight, torch.Tensor):
        return (weight[a:b] if dim == 0 else weight[:, a:b]).contiguous()
    return weight.slice_rows(a, b) if dim == 0 else weight.slice_cols(a, b)


def cut_bias(bias, dim: int, rank: int, world: int):
    if bias is None or dim == 1:
        return bias
    n = bias.shape[0] // world
    return bias[rank * n:(rank + 1) * n].contiguous()


def join(shards, dim: int):
    """Inverse of `cut` over all ranks' shards (in rank order)."""
    if isinstance(shards[0], torch.Tensor):
        return torch.cat(shards, dim)
    cls = type(shards[0])
    return cls.cat_rows(shards) if dim == 0 else cls.cat_cols(shards)


def local_meta(meta_ints: list[int], dim: int, world: int) -> list[int]:
    """A shard's format ints from the whole layer's (in_features is the last int of every
    format's meta; a row-wise shard holds in_features / world of it)."""
    return meta_ints[:-1] + [meta_ints[-1] // world if dim == 1 else meta_ints[-1]]


def format_class(meta: torch.Tensor):
    return kinds.kind_of_code(int(meta[0])).format


def shape_row(fmt) -> torch.Tensor:
    """(ndim, d0, d1, d2) of each of the format's tensors, int64 [4*T]."""
    row = []
    for name in fmt.TENSOR_NAMES:
        t = getattr(fmt, name)
        row += [t.dim(), *t.shape, *([0] * (3 - t.dim()))]
    return torch.tensor(row, dtype=torch.int64)


def flat_padded(t: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(1, length, dtype=t.dtype, device=t.device)
    out[0, : t.numel()] = t.reshape(-1)
    return out


def unflatten(cls, rows: dict, shapes: torch.Tensor, meta_ints: list[int], validate: bool = True):
    """A format object from one rank's stacked rows (1-D padded tensors) and shape row."""
    shapes = shapes.tolist()
    d = {}
    for i, name in enumerate(cls.TENSOR_NAMES):
        ndim, *dims = shapes[4 * i: 4 * i + 4]
        shape = dims[:ndim]
        n = 1
        for s in shape:
            n *= s
        d[name] = rows[name][:n].reshape(shape).clone()
    return cls.from_tensors(d, validate=validate, meta_ints=meta_ints)


def unstack(sd: dict, prefix: str = ""):
    """The single-device format object of a layer saved as a stack (module docstring)
    from `sd`, a state dict holding that layer's whole (gathered) stacks as plain tensors."""
    meta = sd[prefix + "weight_meta"]
    cls = format_class(meta)
    dim, world = (int(v) for v in sd[prefix + "weight_tp"].tolist())
    meta_ints = [int(v) for v in meta.tolist()[1:]]
    shapes = sd[prefix + "weight_tp_shapes"]
    if shapes.shape[0] != world:
        raise ValueError(f"{prefix}weight_tp_shapes has {shapes.shape[0]} rows for {world} ranks")
    shards = [unflatten(cls, {n: sd[prefix + "weight_" + n][r] for n in cls.TENSOR_NAMES}, shapes[r],
                        local_meta(meta_ints, dim, world)) for r in range(world)]
    return join(shards, dim)


def unshard_state_dict(state_dict: dict) -> dict:
    """A single-device sparse state dict from a gathered sharded one: every layer saved as
    a stack of shards (plain tensors, e.g. from `get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True))` or a DCP load into plain tensors)
    becomes the tensors of one SparseLinear. Other entries are returned as they are."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("weight_tp")]:
        prefix = key[: -len("weight_tp")]
        fmt = unstack(state_dict, prefix)
        for k in [k for k in out if k.startswith(prefix + "weight_") and "." not in k[len(prefix):]]:
            del out[k]
        for name in fmt.TENSOR_NAMES:
            out[prefix + "weight_" + name] = getattr(fmt, name)
        out[prefix + "weight_meta"] = state_dict[prefix + "weight_meta"].clone()
    return out
