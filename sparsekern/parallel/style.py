"""Tensor-parallel styles for sparse modules, applied by torch's own `parallelize_module`.

    from torch.distributed.tensor.parallel import parallelize_module
    from sparsekern.parallel import ColwiseParallel, RowwiseParallel

    parallelize_module(model, mesh, {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                     "mlp.down_proj": RowwiseParallel()})

On a SparseLinear the styles shard the compressed weight: column-wise splits the output
rows, row-wise the input columns (at boundaries that keep N:M groups, 64-column bitmask
words and blocks whole). The module becomes a `TPSparseLinear` in place (as FSDP2's
`fully_shard` swaps a module's class): each rank holds its shard as plain local tensors
and runs the same sparse kernels on them; activations move through DTensor, exactly as
torch's styles move them (inputs replicated in and sharded out, or sharded in and
all-reduced out; `input_layouts`, `output_layouts`, `use_local_output` as torch's).
On an nn.Linear (or nn.Embedding) the styles are torch's styles, so one plan serves a
partly sparse model.

`parallelize_module(..., src_data_rank=0)` (torch's default) makes rank 0's weights the
truth: rank 0 cuts every shard and scatters them; `src_data_rank=None` lets each rank cut
its own shard from its own copy.
"""
from __future__ import annotations

import fnmatch
import gc
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor import parallel as tp

from .. import kinds, ops
from ..nn import DEFAULT_POLICY, Policy, SparseConv2d, SparseLinear
from . import layout

_STYLE_DIM = {"ColwiseParallel": 0, "RowwiseParallel": 1}


# ------------------------------------------------------------------------ the module
class TPSparseLinear(SparseLinear):
    """A SparseLinear holding one tensor-parallel shard of its compressed weight.

    It is a SparseLinear over the shard (in_features / out_features are the shard's; the
    layer's are global_in_features / global_out_features) plus: tp_dim (0: output rows,
    column-wise; 1: input columns, row-wise), tp_mesh, tp_rank, tp_world. Its forward
    takes a DTensor (or a local tensor already laid out as the style wants: replicated
    for column-wise, the rank's input columns for row-wise) and returns a DTensor:
    Shard(-1) column-wise, Partial row-wise (rank 0 adds the bias once). The style's
    hooks turn it into the layout the plan asked for.

    `state_dict()` presents the shards as DTensors (layout: sparsekern/parallel/layout.py),
    so `torch.distributed.checkpoint` saves every rank's shard; `load_state_dict` takes
    that layout (same or another world size), or a single-device state dict, and keeps
    this rank's shard. Loading is collective: every rank of the mesh must call it.
    """

    tp_dim: int
    tp_rank: int
    tp_world: int
    global_in_features: int
    global_out_features: int

    def forward(self, x):
        if isinstance(x, DTensor):
            want = Replicate() if self.tp_dim == 0 else Shard(x.dim() - 1)
            if x.placements != (want,):
                x = x.redistribute(placements=[want])
            x = x.to_local()
        f = self.weight_format()
        bias = self.bias if self.tp_dim == 0 or self.tp_rank == 0 else None
        y = nn.functional.linear(x, f, bias) if isinstance(f, torch.Tensor) else ops.sparse_linear(x, f, bias)
        return DTensor.from_local(y, self.tp_mesh, [Shard(y.dim() - 1) if self.tp_dim == 0 else Partial()],
                                  run_check=False)

    def extra_repr(self) -> str:
        style = "colwise" if self.tp_dim == 0 else "rowwise"
        return (f"{super().extra_repr()}, tp={style} shard {self.tp_rank}/{self.tp_world} of "
                f"[{self.global_out_features}, {self.global_in_features}]")

    # ---------------------------------------------------------------- state dict
    # Every state-dict key is also an attribute (torch.distributed.checkpoint.state_dict
    # resolves keys with getattr).
    @property
    def weight_tp(self) -> torch.Tensor:
        """int64 (dim, world): how the state dict's stacks are laid out."""
        return torch.tensor([self.tp_dim, self.tp_world], dtype=torch.int64)

    @property
    def weight_tp_shapes(self) -> torch.Tensor:
        """int64 [4*T]: this rank's shape row of the state dict (layout.shape_row)."""
        f = self.weight_format()
        return torch.zeros(0, dtype=torch.int64) if isinstance(f, torch.Tensor) else layout.shape_row(f)

    def global_meta(self) -> torch.Tensor:
        """The whole layer's weight_meta (kind code, the format's ints with the layer's
        in_features), as a single-device module of this layer stores it."""
        f = self.weight_format()
        if isinstance(f, torch.Tensor):
            return self.weight_meta.detach().clone()
        ints = kinds.meta_of(f).tolist()
        return torch.tensor(ints[:-1] + [self.global_in_features], dtype=torch.int64)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        mesh, world = self.tp_mesh, self.tp_world
        if self.bias is not None:
            b = self.bias if keep_vars else self.bias.detach()
            destination[prefix + "bias"] = DTensor.from_local(b, mesh, [Shard(0) if self.tp_dim == 0 else Replicate()],
                                                              run_check=False)
        f = self.weight_format()
        if isinstance(f, torch.Tensor):  # dense backend: torch's own layout of a sharded weight
            destination[prefix + "weight_dense"] = DTensor.from_local(f.detach(), mesh, [Shard(self.tp_dim)],
                                                                      run_check=False)
            destination[prefix + "weight_meta"] = self.weight_meta.detach().clone()
            return
        for name, length in zip(f.TENSOR_NAMES, self.tp_lengths):
            row = layout.flat_padded(getattr(f, name).detach(), length)
            destination[prefix + "weight_" + name] = DTensor.from_local(
                row, mesh, [Shard(0)], run_check=False, shape=(world, length), stride=(length, 1))
        shapes = self.weight_tp_shapes.to(f.device)[None]
        destination[prefix + "weight_tp_shapes"] = DTensor.from_local(
            shapes, mesh, [Shard(0)], run_check=False, shape=(world, shapes.shape[1]), stride=(shapes.shape[1], 1))
        destination[prefix + "weight_tp"] = self.weight_tp
        destination[prefix + "weight_meta"] = self.global_meta()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        need = ["weight_meta"] + (["bias"] if self.bias is not None else [])
        absent = [k for k in need if k not in own]
        if absent:
            missing_keys.extend(prefix + k for k in absent)
            return
        try:
            shard, bias = self._shard_from_state(own)
        except (ValueError, TypeError, KeyError) as e:
            error_msgs.append(f"TPSparseLinear {prefix[:-1] or '<root>'}: {e}")
            return
        used = {"weight_meta", "weight_tp", "weight_tp_shapes", "weight_dense"} | {
            "weight_" + n for n in getattr(shard, "TENSOR_NAMES", ())} | ({"bias"} if self.bias is not None else set())
        if strict:
            unexpected_keys.extend(prefix + k for k in own if k not in used)
        device = self.weight_meta.device if self.bias is None else self.bias.device
        _install_shard(self, shard.to(device), None if bias is None else bias.to(device), Policy("sparse"),
                       self.pattern)

    def _shard_from_state(self, sd: dict):
        """(this rank's shard, its bias) from a state dict in any layout we write or read."""
        dim, rank, world = self.tp_dim, self.tp_rank, self.tp_world
        bias = sd.get("bias") if self.bias is not None else None
        if bias is not None:
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
            if bias.shape != (self.global_out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.global_out_features},)")
            bias = layout.cut_bias(bias.detach(), dim, rank, world)
        meta = sd["weight_meta"]
        cls = layout.format_class(meta)
        if cls is None:  # a dense weight (torch's layout)
            w = sd["weight_dense"]
            if isinstance(w, DTensor) and w.placements == (Shard(dim),) and w.device_mesh.size() == world:
                return w.to_local().detach().clone(), bias
            w = w.full_tensor() if isinstance(w, DTensor) else w
            self._check_global_shape(tuple(w.shape))
            return layout.cut(w.detach(), dim, rank, world), bias
        meta_ints = [int(v) for v in meta.tolist()[1:]]
        if "weight_tp" in sd:
            saved_dim, saved_world = (int(v) for v in sd["weight_tp"].tolist())
            stacks = [sd["weight_" + n] for n in cls.TENSOR_NAMES] + [sd["weight_tp_shapes"]]
            if (saved_dim, saved_world) == (dim, world) and all(isinstance(t, DTensor) for t in stacks):
                rows = {n: t.to_local()[0] for n, t in zip(cls.TENSOR_NAMES, stacks)}
                shard = layout.unflatten(cls, rows, stacks[-1].to_local()[0], layout.local_meta(meta_ints, dim, world))
                self._check_global_shape(_global_shape(shard, dim, world))
                return shard, bias
            full_sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sd.items()
                       if k.startswith("weight_")}
            full = layout.unstack(full_sd)
        else:  # a single-device state dict
            full = cls.from_tensors({n: sd["weight_" + n] for n in cls.TENSOR_NAMES}, meta_ints=meta_ints)
        self._check_global_shape(tuple(full.shape))
        return layout.cut(full, dim, rank, world), bias

    def _check_global_shape(self, shape) -> None:
        if tuple(shape) != (self.global_out_features, self.global_in_features):
            raise ValueError(f"state dict holds a weight of shape {tuple(shape)}, this layer is "
                             f"[{self.global_out_features}, {self.global_in_features}]")


def _global_shape(shard, dim: int, world: int) -> tuple[int, int]:
    out, k = shard.shape
    return (out * world, k) if dim == 0 else (out, k * world)


# ----------------------------------------------------------------- sharding a module
def _adopt_state(target: nn.Module, source: nn.Module) -> None:
    """Move `source`'s parameters, buffers and attributes onto `target` in place, keeping
    target's hooks and training flag (what nn.Module itself keeps in its __dict__), so
    hooks that parallelize_module installed on `target` keep working."""
    own = set(nn.Module().__dict__) - {"_parameters", "_buffers", "_non_persistent_buffers_set"}
    for k, v in source.__dict__.items():
        if k not in own:
            target.__dict__[k] = v


def _local_module(shard, bias, policy: Policy, pattern: str) -> SparseLinear:
    """A SparseLinear over one shard (a format object, or a dense tensor with zeros in place)."""
    if isinstance(shard, torch.Tensor):
        lin = nn.Linear(shard.shape[1], shard.shape[0], bias is not None, device=shard.device, dtype=shard.dtype)
        with torch.no_grad():
            lin.weight.copy_(shard)
            if bias is not None:
                lin.bias.copy_(bias)
        mod = SparseLinear.from_dense(lin, "dense")
        mod.pattern = pattern  # the layer's pattern; its backend is dense
        return mod
    return SparseLinear.from_format(shard, bias, policy)


def _lengths(module: TPSparseLinear) -> list[int]:
    """The largest numel of each compressed tensor across the ranks (state-dict rows)."""
    f = module.weight_format()
    if isinstance(f, torch.Tensor):
        return []
    n = torch.tensor([getattr(f, k).numel() for k in f.TENSOR_NAMES], dtype=torch.int64, device=_comm_device(module))
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=module.tp_mesh.get_group())
    return n.tolist()


def _comm_device(module) -> torch.device:
    return torch.device(module.tp_mesh.device_type, torch.cuda.current_device()) \
        if module.tp_mesh.device_type == "cuda" else torch.device(module.tp_mesh.device_type)


def _install_shard(module: TPSparseLinear, shard, bias, policy: Policy, pattern: str) -> None:
    """Make `module` hold `shard` (and `bias`) in place of whatever it held."""
    _adopt_state(module, _local_module(shard, bias, policy, pattern))
    module.tp_lengths = _lengths(module)
    if module.backend != "dense":
        # Every rank runs the shard's sparse op on every batch (no per-rank path choice).
        module.reason = f"tensor-parallel shard {module.tp_rank}/{module.tp_world}: its sparse op on every batch"


def shard_sparse_linear(module: SparseLinear, mesh, dim: int, *, src_data_rank: int | None = 0,
                        policy: Policy | None = None, source: SparseLinear | None = None,
                        style: str = "parallelize", name: str | None = None) -> TPSparseLinear:
    """Turn `module` (in place) into a TPSparseLinear holding this rank's shard along `dim`
    (0: output rows, 1: input columns) of `source` (default: the module itself). What the
    styles' `_apply` does; also used to shard a layer pruned from a gathered weight."""
    source = module if source is None else source
    check_shardable(source, mesh.size(), dim, style, name or (lambda: _layer_name(module)), mesh=mesh)
    group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    full = source.weight_format()
    bias = None if source.bias is None else source.bias.detach()
    if src_data_rank is None or full.device.type == "meta":  # meta: placeholders, nothing to send
        shard, shard_bias = layout.cut(full, dim, rank, world), layout.cut_bias(bias, dim, rank, world)
    else:
        device = full.device
        parts = None
        if rank == src_data_rank:
            parts = [_to_cpu((layout.cut(full, dim, r, world), layout.cut_bias(bias, dim, r, world)))
                     for r in range(world)]
        got = [None]
        dist.scatter_object_list(got, parts, src=dist.get_global_rank(group, src_data_rank), group=group)
        shard, shard_bias = (t if t is None else t.to(device) for t in got[0])
    pattern = source.pattern
    out_g, in_g = source.out_features, source.in_features
    training = module.training
    module.__class__ = TPSparseLinear
    module.tp_mesh, module.tp_dim, module.tp_rank, module.tp_world = mesh, dim, rank, world
    module.global_out_features, module.global_in_features = out_g, in_g
    _install_shard(module, shard, shard_bias, policy or DEFAULT_POLICY, pattern)
    module.train(training)
    return module


def _to_cpu(pair):
    return tuple(None if t is None else t.to("cpu") for t in pair)


# -------------------------------------------------------------------------- checks
def check_shardable(module, world: int, dim: int, style: str, name, mesh=None) -> None:
    """Raise a clear error, naming the layer, when `module` cannot be sharded along `dim`
    (0: output rows, 1: input columns) over `world` ranks. `name` is the layer's name, or
    a callable giving it (only called when there is an error to report)."""
    problem = _problem(module, world, dim, mesh)
    if problem is not None:
        exc, msg = problem
        raise exc(f"{style} on layer {name() if callable(name) else name!r}: {msg}")


def _problem(module, world: int, dim: int, mesh):
    """(exception type, message) saying why `module` cannot be sharded, or None."""
    if mesh is not None and mesh.ndim != 1:
        return ValueError, f"tensor parallelism needs a 1-D device mesh, got {mesh.ndim}-D (slice it: mesh['tp'])"
    if isinstance(module, SparseConv2d):
        return NotImplementedError, ("SparseConv2d cannot be sharded (tensor parallelism covers SparseLinear, "
                                     "nn.Linear and nn.Embedding)")
    if isinstance(module, TPSparseLinear):
        return ValueError, "the layer is already sharded"
    if not isinstance(module, SparseLinear):
        return TypeError, f"expected a SparseLinear, got {type(module).__name__}"
    if module.trainable:
        return ValueError, ("the layer is trainable (masked fine-tuning); call freeze() first -- tensor parallelism "
                            "shards the compressed inference weight (fine-tune under FSDP2, docs/PARALLEL.md)")
    out, k = module.out_features, module.in_features
    f = module.weight_format()
    # The stored weight says what a cut must keep whole (a dense-backend layer: nothing).
    entry = kinds.kind_of(f)
    params = {} if isinstance(f, torch.Tensor) else kinds.parse(f.pattern).params
    block = entry.block_of(params, None)
    words = dict(m=params.get("m"), bh=block[0] if block else 0, bw=block[1] if block else 0)
    if dim == 0:
        if out % world:
            return ValueError, (f"out_features={out} is not divisible by the world size {world} (column-wise "
                                "sharding gives every rank the same number of output rows)")
        step = entry.shard_step(0, params, block)
        if (out // world) % step:
            return ValueError, (f"{out // world} output rows per rank ({out} / {world}) would cut "
                                f"{entry.shard_what.format(**words)}")
        return None
    if k % world:
        return ValueError, (f"in_features={k} is not divisible by the world size {world} (row-wise sharding "
                            "gives every rank the same number of input columns)")
    step = entry.shard_step(1, params, block)
    if (k // world) % step:
        return ValueError, (f"{k // world} input columns per rank ({k} / {world}) would cut "
                            f"{entry.shard_what.format(**words)}; in_features / world size must be a multiple of {step}")
    return None


def _layer_name(module: nn.Module) -> str:
    """The module's dotted name in the model that holds it (found through the garbage
    collector: a style sees only the module); '<root>' for a module nobody holds."""
    parts, m = [], module
    for _ in range(64):
        parent = next(((o, n) for o in gc.get_objects() if isinstance(o, nn.Module)
                       for n, c in o.named_children() if c is m), None)
        if parent is None:
            break
        m = parent[0]
        parts.append(parent[1])
    return ".".join(reversed(parts)) or "<root>"


def check_plan(model: nn.Module, plan: dict, world_size: int) -> list[str]:
    """Check a parallelize plan against a model before anything is sharded: every sparse
    layer a sparsekern style names must split evenly over `world_size` ranks at legal
    boundaries, and no torch style may name a sparse layer. Raises a ValueError naming
    the layer; returns the names of the sparse layers the plan shards."""
    names = dict(model.named_modules())
    sharded = []
    for key, style in plan.items():
        tokens = key.split(".") if key else []
        for name, mod in names.items():
            parts = name.split(".") if name else []
            # parallelize_module's matching: one fnmatch pattern per dotted component
            if len(parts) != len(tokens) or not all(fnmatch.fnmatch(a, b) for a, b in zip(parts, tokens)):
                continue
            if not isinstance(mod, (SparseLinear, SparseConv2d)):
                continue
            sname = type(style).__name__
            if not isinstance(style, (ColwiseParallel, RowwiseParallel)):
                raise ValueError(f"{sname} on layer {name!r}: torch's styles cannot shard a {type(mod).__name__}; "
                                 f"use sparsekern.parallel.{sname}")
            check_shardable(mod, world_size, _STYLE_DIM[sname], sname, name)
            sharded.append(name)
    return sharded


# --------------------------------------------------------------------------- styles
def _register_hooks(module: nn.Module, mesh, input_fn, output_fn) -> None:
    """What torch's distribute_module does with input_fn / output_fn (without replicating
    the module's tensors: a shard is a local tensor, not a replica)."""
    module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, mesh))
    module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, mesh))


class _SparseStyle:
    """What ColwiseParallel and RowwiseParallel add to torch's styles: a `policy` for the
    shards, and sparse modules sharded along `SHARD_DIM` (0: output rows, 1: input columns)
    with torch's own input/output hooks; other modules go to torch's style unchanged."""

    SHARD_DIM = 0

    def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output: bool = True,
                 policy: Policy | None = None):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts,
                         use_local_output=use_local_output)
        self.policy = policy

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, (SparseLinear, SparseConv2d)):
            return super()._apply(module, device_mesh)
        shard_sparse_linear(module, device_mesh, self.SHARD_DIM, src_data_rank=self.src_data_rank,
                            policy=self.policy, style=type(self).__name__)
        if self.SHARD_DIM == 1:
            self.desired_input_layouts = (Shard(-1),)
        _register_hooks(module, device_mesh,
                        partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                        partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))
        return module


class ColwiseParallel(_SparseStyle, tp.ColwiseParallel):
    """torch's ColwiseParallel, extended to SparseLinear: each rank keeps the compressed
    shard of output rows [r*out/W, (r+1)*out/W) and its bias. Input replicated (by default),
    output sharded on the last dimension. `policy` (sparsekern.nn.Policy): a shard keeps
    its compressed weight and runs its sparse op on every batch, or, under
    Policy("dense"), a dense weight (torch's layout)."""

    SHARD_DIM = 0


class RowwiseParallel(_SparseStyle, tp.RowwiseParallel):
    """torch's RowwiseParallel, extended to SparseLinear: each rank keeps the compressed
    shard of input columns [r*in/W, (r+1)*in/W) (cut at whole N:M groups, 64-column
    bitmask words, blocks) and the whole bias, added once after the reduction. Input
    sharded on the last dimension (by default), output all-reduced (replicated)."""

    SHARD_DIM = 1
