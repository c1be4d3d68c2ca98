"""What a user runs instead of sparsekern, built from the same fp32 model and measured in the
same run: the peers of the models suite, the quality suite and the demo.

`PEERS` is the registry (name -> Peer), in the order tables show them:

- "dense channels-last": the fp32 model with its convolutions' weights channels-last
  (`model.to(memory_format=torch.channels_last)`), the dense layout a CPU user can pick, and
  the one sparsify() gives the dense convolutions of a model it swaps (the models suite times
  it as its own variant of the same name, so builds no peer for it);
- "dense bf16": `copy.deepcopy(model).to(torch.bfloat16)`, inputs cast to bf16;
- "dense bf16 channels-last": the same with `memory_format=torch.channels_last` (what a CPU
  user picks for a convolutional network);
- "torch int8 dynamic": `torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  dtype=torch.qint8)` on the fp32 model, the x86 engine where torch has it (CPU only: torch
  has no CUDA kernel for it);
- "torchao int8 weight-only", "torchao int4 weight-only": torchao's `quantize_` with
  `Int8WeightOnlyConfig()` and `Int4WeightOnlyConfig(group_size=128)` on the bf16 model
  (on a CPU with torchao 0.15+, `PrototypeInt4WeightOnlyConfig(group_size=128)`, where its
  CPU int4 kernel now lives), where torchao is importable and runs on the device;
- "torch 2:4 semi-structured": the bf16 model with every eligible nn.Linear weight pruned
  2:4 by magnitude and converted with `torch.sparse.to_sparse_semi_structured` (CUDA only).

`build(peer, model, device)` returns the peer model and the fp32 model its output is checked
against (the dense model itself, or for the 2:4 peer the dense model with the same masks),
or raises `Unavailable` with the reason (not installed, not on this device, converts too
little of this model): callers write that as a skipped row ("error" and "skipped": True),
never a crash. A peer whose layers hold no weight of this model (channels-last on a model
without convolutions) is `NotApplicable`: no row at all.

`check` compares every workload of a peer with its fp32 reference (relative error of the
outputs, float64) against the peer's loose tolerance (`Peer.rel_tol`), before it is timed:
it catches a peer that computes something else (relative error near 1), not a quality bar
(the quality suite measures quality). The measured error goes into the row.

`layer_costs` counts the weight bytes and multiply-adds of a peer's layers per call, packed
quantized weights as stored (sparsekern.bench.profile.layer_costs counts nn.Linear and
ConvNd by element size, which for a quantized module or a tensor-subclass weight is not
what is read); `add_peer_ratios` gives every timed row of a model its ratio against each
peer of the same run (`speedup_vs_<peer>`, e.g. speedup_vs_dense_bf16).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from typing import Callable

import torch
from torch import nn

from .. import models
from ..reporting import ratio_text
from . import profile
from .common import int8_dynamic, rel_err

# A peer that converts less than this share of a model's layer weights (nn.Linear and
# convolutions) is not what a user would run instead: quantize_dynamic on ResNet-50 converts
# only its classifier (8% of the weights). Its row says so instead of a timing.
MIN_SHARE = 0.5
# For a layout peer (channels-last) a tenth is enough: a convolution reuses each weight at every
# pixel, so its share of the time is far above its share of the weights (the digits CNN: 30%
# of the weights, most of the time). A ViT's patch convolution (under 1%) stays below.
MIN_SHARE_LAYOUT = 0.1
# torchao's int4 weight-only group size (along the input dimension).
INT4_GROUP = 128


class Unavailable(RuntimeError):
    """The peer cannot run here (package, device, model): a skipped row says why."""


class NotApplicable(Unavailable):
    """The peer converts nothing in this model (no row at all)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """One thing a user runs instead: `name` (the row's variant), `what` (the one-liner),
    `precision` (of weights and activations), `dtype` (of the activations: inputs are cast
    to it), `devices` it runs on, `rel_tol` (loose bound on the relative error of its output
    against the fp32 reference), `make(model, opts)` -> (peer model, fp32 reference model or
    None for the dense model itself), given a copy of the fp32 model it may change;
    `converts(model)` -> the layer modules it changes (for the share of weights it
    covers); `package`: a module that must be importable; `build_fails_unavailable`: an
    exception while building means it does not run on this device (a third-party package's
    kernels), not a bug; `gemm_profiled`: profile.time_shares counts its layer operators
    as "gemm" (torch's dense linear and convolution), so the layer GFLOP/s of its rows mean
    something; `pattern`: the sparsity pattern of its weights ("dense", or "2:4");
    `layout_of`: the peer (or "dense", the fp32 model itself) it only lays out differently
    (same values, same quality: the quality suite leaves it out); `cast_only`: the peer is
    the model cast to `dtype`, nothing else (a model already in that dtype is its own such
    peer); `kernels`: what runs its layers (the rows' `paths` for a peer)."""
    name: str
    what: str
    precision: str
    dtype: torch.dtype
    devices: tuple[str, ...]
    rel_tol: float
    make: Callable[[nn.Module, dict], tuple[nn.Module, nn.Module | None]]
    converts: Callable[[nn.Module, dict], list[nn.Module]]
    package: str | None = None
    build_fails_unavailable: bool = False
    gemm_profiled: bool = True
    pattern: str = "dense"
    layout_of: str | None = None
    cast_only: bool = False
    kernels: str = ""

    def cast(self, x):
        """A floating input tensor cast to the peer's activation dtype (others unchanged)."""
        return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def slug(name: str) -> str:
    """A peer name as a field suffix: "dense bf16" -> "dense_bf16"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------- builders
def _layers(model: nn.Module, kinds) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kinds)]


def _linears(model, opts):
    """Every nn.Linear: what the quantization one-liners convert (lm_head included)."""
    return _layers(model, (nn.Linear,))


def _pruned_linears(model, opts):
    """The nn.Linear layers a pruning peer prunes: all but those named in opts["exclude"]
    (the layers sparsekern's variants leave dense, e.g. lm_head)."""
    ex = set(opts.get("exclude") or ())
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in ex]


def _convs(model, opts):
    return _layers(model, (nn.Conv2d,))


def _all(model, opts):
    return _layers(model, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _bf16(model, opts):
    return model.to(torch.bfloat16), None


def _channels_last(model, opts):
    return model.to(memory_format=torch.channels_last), None


def _bf16_channels_last(model, opts):
    return model.to(torch.bfloat16, memory_format=torch.channels_last), None


def _int8_dynamic(model, opts):
    return int8_dynamic(model), None


def _torchao(config):
    def make(model, opts):
        import torchao.quantization as tq

        model = model.to(torch.bfloat16)
        cfg = config(tq, opts)
        tq.quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and _fits_torchao(cfg, m))
        return model, None
    return make


def _fits_torchao(cfg, m: nn.Linear) -> bool:
    return "Int4" not in type(cfg).__name__ or m.in_features % INT4_GROUP == 0


def _int8_weight_only(tq, opts):
    return tq.Int8WeightOnlyConfig()


def _int4_weight_only(tq, opts):
    if opts["device"] == "cpu":
        # torchao 0.15+ keeps its CPU int4 weight-only path (Int4OpaqueTensor: the kernel
        # _weight_int4pack_mm_for_cpu) in a prototype config; Int4WeightOnlyConfig there
        # packs for GPUs only (0.18 refuses int4_packing_format="opaque").
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError:
            pass
        else:
            return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP)
    # torchao 0.13-0.14: the packing format per device ("opaque": the CPU kernel;
    # "tile_packed_to_4d": the CUDA tinygemm kernel); older releases take a layout instead.
    fmt = "opaque" if opts["device"] == "cpu" else "tile_packed_to_4d"
    try:
        return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format=fmt)
    except TypeError:
        if opts["device"] == "cpu":
            from torchao.dtypes import Int4CPULayout

            return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP, layout=Int4CPULayout())
        return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP)


def _semi_structured_eligible(model, opts):
    # CUTLASS/cuSPARSELt 2:4 in bf16: both weight dimensions multiples of 64 (torch checks 32x64)
    return [m for m in _pruned_linears(model, opts) if m.out_features % 64 == 0 and m.in_features % 64 == 0]


def _semi_structured(model, opts):
    from torch.sparse import to_sparse_semi_structured

    names = {id(m) for m in _semi_structured_eligible(model, opts)}
    with torch.no_grad():
        for m in model.modules():
            if id(m) in names:  # 2:4 by magnitude along the input dimension
                w = m.weight
                g = w.view(w.shape[0], -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                w.mul_(keep.view_as(w))
    ref = copy.deepcopy(model)  # the fp32 model with the same masks: what the peer is checked against
    model = model.to(torch.bfloat16)  # in place: the same modules
    for m in model.modules():
        if id(m) in names:
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    return model, ref


# Tolerances (relative error of a model's output against the fp32 model, float64): a bound
# that a peer computing something else (error near 1) fails and an honest one passes with room.
# Seen on this project's models (random weights, CPU): bf16 0.004-0.013 (HF Llama quick and
# full, timm ViT-B/16, ResNet-50, MiniLM); int8 dynamic (per-tensor int8 activations) 0.02-0.13,
# and 0.25 on the quick ViT (112 px, depth 4); int8 weight-only adds per-row int8 weights to
# bf16; int4 groups of 128 several times that. The 2:4 peer is checked against the same masks.
PEERS: dict[str, Peer] = {p.name: p for p in [
    # fp32 as the model, so no error beyond the summation order of another convolution kernel
    Peer("dense channels-last", "model.to(memory_format=torch.channels_last)",
         "fp32 weights and activations, convolutions channels-last", torch.float32, ("cpu", "cuda"), 1e-4,
         _channels_last, _convs, layout_of="dense",
         kernels="torch's fp32 linear, channels-last fp32 convolution (oneDNN on a CPU, cuDNN on a GPU)"),
    Peer("dense bf16", "copy.deepcopy(model).to(torch.bfloat16)", "bf16 weights and activations",
         torch.bfloat16, ("cpu", "cuda"), 0.05, _bf16, _all, cast_only=True,
         kernels="torch's bf16 linear and convolution (oneDNN/MKL on a CPU, cuBLAS/cuDNN on a GPU)"),
    Peer("dense bf16 channels-last", "model.to(torch.bfloat16, memory_format=torch.channels_last)",
         "bf16 weights and activations, convolutions channels-last", torch.bfloat16, ("cpu", "cuda"), 0.05,
         _bf16_channels_last, _convs, layout_of="dense bf16", cast_only=True,
         kernels="torch's bf16 linear, channels-last bf16 convolution (oneDNN on a CPU, cuDNN on a GPU)"),
    Peer("torch int8 dynamic", "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)"
         " (x86 engine)", "int8 weights (per tensor), int8 activations quantized per call; fp32 elsewhere",
         torch.float32, ("cpu",), 0.5, _int8_dynamic, _linears,
         kernels="torch's quantized::linear_dynamic (x86 engine: fbgemm, oneDNN)"),
    # torchao 0.18 dequantizes its int8 weight-only weights with elementwise operators before a
    # bf16 aten::mm (no layer GFLOP/s: the profile's gemm share would hold the mm alone).
    Peer("torchao int8 weight-only", "torchao.quantization.quantize_(model.to(torch.bfloat16), "
         "Int8WeightOnlyConfig())", "int8 weights (per row), bf16 activations", torch.bfloat16, ("cpu", "cuda"),
         0.15, _torchao(_int8_weight_only), _linears, package="torchao", build_fails_unavailable=True,
         gemm_profiled=False, kernels="torchao's int8 weight-only linear (on a CPU: torch._weight_int8pack_mm, "
                                     "or in torchao 0.18 the weight dequantized into a bf16 mm)"),
    Peer("torchao int4 weight-only", "torchao.quantization.quantize_(model.to(torch.bfloat16), "
         f"Int4WeightOnlyConfig(group_size={INT4_GROUP}))", f"int4 weights (groups of {INT4_GROUP}), bf16 activations",
         torch.bfloat16, ("cpu", "cuda"), 0.5, _torchao(_int4_weight_only),
         lambda m, o: [x for x in _linears(m, o) if x.in_features % INT4_GROUP == 0], package="torchao",
         build_fails_unavailable=True,
         kernels="torchao's int4 weight-only linear (_weight_int4pack_mm_for_cpu; tinygemm on a GPU)"),
    Peer("torch 2:4 semi-structured", "torch.sparse.to_sparse_semi_structured on each nn.Linear weight of the bf16 "
         "model, pruned 2:4 by magnitude", "bf16, 2:4 sparse weights (cuSPARSELt or CUTLASS)", torch.bfloat16,
         ("cuda",), 0.05, _semi_structured, _semi_structured_eligible, build_fails_unavailable=True,
         gemm_profiled=False, pattern="2:4", kernels="torch's semi-structured 2:4 linear (cuSPARSELt or CUTLASS)"),
]}


def names(quality: bool = False) -> list[str]:
    """The peers' names, in table order; quality=True: those whose quality differs (not a
    layout of another)."""
    return [n for n, p in PEERS.items() if not (quality and p.layout_of)]


def _weight_numel(mods) -> int:
    return sum(m.weight.numel() for m in mods)


def share(peer: Peer, model: nn.Module, opts: dict | None = None) -> float:
    """The share of the model's layer weights (nn.Linear and convolutions) the peer changes."""
    total = _weight_numel(_all(model, {}))
    return _weight_numel(peer.converts(model, opts or {})) / total if total else 0.0


def build(peer: Peer | str, model: nn.Module, device: str, exclude=()) -> tuple[nn.Module, nn.Module]:
    """(peer model in eval mode, the model it is checked against) from `model` (not
    changed; fp32, or bf16 where the demo's GPU decoder is: then the reference is that bf16
    model, and the peers that need fp32 or are that model do not run); `exclude`: layer
    names a pruning peer leaves dense (those sparsekern's variants leave dense, e.g.
    lm_head; the quantization peers convert every nn.Linear, as their one-liners do).
    Raises Unavailable (why it cannot run here) or NotApplicable (it converts nothing of
    this model)."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    opts = {"device": device, "exclude": list(exclude)}
    if peer.package:
        try:
            __import__(peer.package)
        except ImportError as e:
            raise Unavailable(f"{peer.package} is not installed here ({e}); pip install {peer.package}") \
                from None
    if device not in peer.devices:
        raise Unavailable(f"runs on {' and '.join(peer.devices)} only; this run is on {device}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32 and peer.cast_only and peer.dtype == dtype:
        raise Unavailable(f"the model is already {str(dtype).replace('torch.', '')}: the baseline is this peer")
    if dtype != torch.float32 and peer.dtype == torch.float32:
        raise Unavailable(f"needs an fp32 model; this one is {str(dtype).replace('torch.', '')}")
    s = share(peer, model, opts)
    if s == 0:
        raise NotApplicable("changes no layer of this model")
    if s < (MIN_SHARE_LAYOUT if peer.layout_of else MIN_SHARE):
        raise Unavailable(f"changes only {s:.0%} of this model's layer weights (nn.Linear and "
                          "convolutions): not what a user would run instead")
    try:
        m, ref = peer.make(copy.deepcopy(model), opts)
    except Exception as e:  # noqa: BLE001
        if peer.build_fails_unavailable:  # e.g. torchao without kernels for this device, a GPU without 2:4
            raise Unavailable(f"does not build here: {type(e).__name__}: {e}"[:400]) from None
        raise
    return m.eval(), (model if ref is None else ref.eval())


def fields(peer: Peer | str) -> dict:
    """The row fields that say which peer a row is: `peer` (its name, the same as the row's
    variant or method), `precision`, `peer_what` (the one-liner), `paths` (the kernels that
    run its layers, where sparsekern's rows say how their layers ran)."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    return {"peer": peer.name, "precision": peer.precision, "peer_what": peer.what, "paths": peer.kernels}


def skipped_row(peer: Peer | str, reason: str | Exception, common: dict | None = None) -> dict:
    """The row of a peer that did not run here: `common`, its fields, `error` (why) and
    skipped=True."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    return {**(common or {}), **fields(peer), "error": str(reason)[:400], "skipped": True}


# ------------------------------------------------------------------------------- checks
def outputs(make_workloads, model: nn.Module) -> list[torch.Tensor]:
    """Each workload's output of `model` (the reference a peer is compared with)."""
    return [wl.run() for wl in make_workloads(model)]


def check(make_workloads, peer_model: nn.Module, ref_outs: list[torch.Tensor], peer: Peer | str,
          what: str) -> dict:
    """Every workload of the peer model against the fp32 reference outputs (`outputs` of the
    model `build` returned beside it): the worst relative error (float64) must be within the
    peer's tolerance, else RuntimeError (not timed). Returns {"rel_err", "tolerance",
    "reference", "first_call_s"} (the peer's first call of each workload, in seconds)."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    worst, first = 0.0, []
    for wl, ref in zip(make_workloads(peer_model), ref_outs):
        t = time.perf_counter()
        y = wl.run()
        first.append(time.perf_counter() - t)
        err = rel_err(y.float(), ref)
        if not err <= peer.rel_tol:
            raise RuntimeError(f"{what} {wl.metric}: relative error {err:.2e} against the fp32 model exceeds the "
                               f"{peer.name} tolerance {peer.rel_tol:.2g}; not timing it")
        worst = max(worst, err)
    ref_dtype = "fp32" if ref_outs and ref_outs[0].dtype == torch.float32 else "bf16"
    return {"rel_err": worst, "tolerance": peer.rel_tol, "first_call_s": first,
            "reference": f"{ref_dtype} dense" + (", same 2:4 masks" if peer.pattern != "dense" else "")}


# --------------------------------------------------------------------------- layer costs
def _quantized_linear():
    try:
        from torch.ao.nn.quantized import Linear
        return Linear
    except ImportError:  # pragma: no cover - torch without torch.ao
        return ()


def _layer_cost(mod: nn.Module) -> tuple[int, int] | None:
    """(weight bytes as stored, weight columns per output element) of a layer whose
    multiply-adds count, else None."""
    qlin = _quantized_linear()
    if qlin and isinstance(mod, qlin):  # dynamic quantized Linear: the packed int8 weight, its scales
        return models.quantized_linear_bytes(mod, bias=False), mod.in_features
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = mod.weight
        cols = mod.in_features if isinstance(mod, nn.Linear) else w[0].numel()
        return models.tensor_bytes(w), cols
    return None


def layer_costs(model: nn.Module, run) -> dict:
    """One call of run() with forward hooks on every nn.Linear, ConvNd and torch quantized
    Linear: the weight bytes read (each layer call reads its stored weight once, bias not
    counted, as profile.layer_costs: packed int8 values and scales, a tensor subclass's
    inner tensors), multiply-adds (output
    elements x weight columns; dense and kept are the same except for a 2:4 peer, whose kept
    ones are half) and layer calls. The fields of profile.layer_costs."""
    def cost_of(mod):
        c = _layer_cost(mod)
        if c is None:
            return None
        w = getattr(mod, "weight", None)
        kept = 0.5 if isinstance(w, torch.Tensor) and type(w).__name__.startswith("SparseSemiStructured") else 1.0
        return (*c, kept)

    return profile.layer_costs(model, run, cost_of)


def profile_fields(peer: Peer | str, model: nn.Module, run, median_ms: float, prof: dict) -> dict:
    """A peer row's profile: `prof` (profile.workload_profile's time shares) with the layer
    costs of `layer_costs` and the weight GB/s they give at the median; the layer GFLOP/s
    only where the profile counts the peer's layer operators as "gemm" (else None, and
    `profile_note` says why)."""
    peer = PEERS[peer] if isinstance(peer, str) else peer
    costs = layer_costs(model, run)
    s = median_ms * 1e-3
    out = {**prof, **costs, "weight_gb_per_s": costs["weight_bytes"] / s / 1e9}
    if not peer.gemm_profiled:
        out["layer_gflop_per_s"] = None
        out["profile_note"] = (f"{peer.name}'s layer operators are not in the profile's gemm category "
                               "(they count as other): no layer GFLOP/s")
    elif "share_gemm" in prof:
        layer_s = s * (prof.get("share_sparse", 0) + prof["share_gemm"])
        out["layer_gflop_per_s"] = 2 * costs["kept_macs"] / layer_s / 1e9 if layer_s > 0 else None
    return out


# -------------------------------------------------------------------------------- ratios
def add_peer_ratios(rows: list[dict], group=("model", "metric", "load"), name: str = "variant") -> None:
    """In place: every timed row (with median_ms) gets `speedup_vs_<slug(peer)>` = the peer's
    median / this median, for each peer row (a row with `peer`) timed in the same group
    (same model, workload and load — quiet or one core busy: the same interleaved loop). The
    ratios against fp32 dense stay in `speedup`."""
    timed = [r for r in rows if "median_ms" in r]
    for r in timed:
        for p in timed:
            if p.get("peer") and p is not r and all(p.get(k) == r.get(k) for k in group) and p[name] == p["peer"]:
                r[f"speedup_vs_{slug(p['peer'])}"] = p["median_ms"] / r["median_ms"]


def ratios_text(row: dict) -> str:
    """A row's ratios against the peers of its loop, for tables: "0.86x dense bf16; 0.51x
    torch int8 dynamic" (the peers in registry order; not against itself)."""
    return "; ".join(f"{ratio_text(row[f'speedup_vs_{slug(n)}'])} {n}" for n in PEERS
                     if isinstance(row.get(f"speedup_vs_{slug(n)}"), (int, float)))
