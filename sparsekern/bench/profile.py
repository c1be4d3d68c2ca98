"""Where a model's time goes, and how close its layers run to the machine's roofs.

The models suite calls `workload_profile` once per variant and workload, after the timed
rounds (it does not perturb them), and stores the result in the row; `roofs` is measured
once per run into the environment. Together they answer, for a goal that is missed, the
questions the issue asks: bytes per second against the copy bandwidth, FLOP rate against
the peak, and the profile.

- Categories of time (torch.profiler, one profiled call, outermost operator of each kind):
  "sparse" - sparsekern's operators (the sparse kernels, and decompress where a layer
  decompresses; a BLAS call a C++ operator makes inside counts with it; not the pure-torch
  reference backend, whose torch operators count as what they are),
  "gemm" - dense linear and convolution operators (aten::linear, addmm, mm, convolution,
  ..., and torch's quantized linears), "attention" - scaled-dot-product attention, bmm,
  softmax, and "other" - the rest of the call's wall time: norms, activations, copies,
  Python. The profiler's own overhead lands in all of them, most in "other" on calls made
  of many small operators (decode), so read shares, and rates from the unprofiled median.
  CPU only: the suite profiles CPU runs (on a GPU the operators' host time is not where the
  time goes).
- Weight bytes and multiply-adds (forward hooks on every Linear, Conv2d and sparse module,
  one more call): per layer call, the bytes its weight stores (a sparse format's `nbytes`,
  derived indexes such as pre-packed panels not counted) and its multiply-adds, dense
  (output elements x the weight's columns) and kept (x the weight's density). Embedding
  lookups and attention's own products are not counted.
"""
from __future__ import annotations

import time

import torch
from torch import nn

CATEGORIES = ("sparse", "gemm", "attention", "other")
# aten::matmul is not here: attention's products go through it (to bmm, which counts as
# attention); a linear layer's matmul is inside aten::linear.
# torch's quantized linears count here too: the int8 peers' layers (torch's dynamic int8,
# torchao's int4 weight-only), and the layers a quantized variant leaves dense
# (quantize_dense=True: the Llama lm_head).
_GEMM = ("aten::linear", "aten::addmm", "aten::mm", "aten::conv2d", "aten::convolution",
         "aten::_convolution", "aten::mkldnn_convolution", "aten::conv1d", "aten::addmv", "aten::mv",
         "quantized::linear_dynamic", "quantized::linear", "quantized::linear_dynamic_fp16",
         "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm", "aten::_weight_int4pack_mm_for_cpu")
_ATTENTION = ("aten::scaled_dot_product_attention", "aten::bmm", "aten::baddbmm", "aten::softmax",
              "aten::_softmax", "aten::_safe_softmax")


def _category(name: str) -> str | None:
    if name.startswith("sparsekern"):  # sparsekern::, and the GEMM libraries' sparsekern_cusparselt::, ...
        return "sparse"
    if name in _ATTENTION or name.startswith("aten::_scaled_dot_product"):
        return "attention"
    if name in _GEMM:
        return "gemm"
    return None


def time_shares(run, calls: int = 1) -> dict:
    """Profile `calls` calls of run() (torch.profiler, CPU): the share of their wall time
    spent in each of CATEGORIES (see the module docstring) and the profiled ms per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            run()
        wall_us = (time.perf_counter() - t) * 1e6
    spent = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.events():
        cat = _category(ev.name)
        if cat is None:
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:  # count only the outermost operator of a category
            if _category(parent.name) is not None:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            spent[cat] += ev.cpu_time_total
    spent["other"] = max(0.0, wall_us - sum(spent[c] for c in CATEGORIES if c != "other"))
    total = sum(spent.values()) or 1.0
    return {**{f"share_{c}": spent[c] / total for c in CATEGORIES}, "profiled_ms": wall_us / 1e3 / calls}


def _weight_cost(mod: nn.Module) -> tuple[int, int, float] | None:
    """(stored weight bytes, weight columns per output element, kept fraction) of a layer
    whose multiply-adds are counted, else None."""
    from ..nn import SPARSE_MODULES

    if isinstance(mod, SPARSE_MODULES):
        if mod.trainable:  # the dense weight and its mask (masked_linear in training, a packed copy in eval)
            return mod.weight_nbytes(), mod.weight[0].numel(), mod.kept_fraction()
        fmt = mod.weight_format()
        if isinstance(fmt, torch.Tensor):  # dense backend (masked dense weight): every multiply-add runs
            return mod.weight_nbytes(), fmt[0].numel(), 1.0
        return mod.weight_nbytes(), fmt.shape[1], float(fmt.density)
    if isinstance(mod, torch.ao.nn.quantized.Linear):  # torch's int8 Linear (sparsify(quantize_dense=True))
        from ..models import quantized_linear_bytes

        return quantized_linear_bytes(mod, bias=False), mod.in_features, 1.0
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = mod.weight
        return w.numel() * w.element_size(), w[0].numel(), 1.0
    return None


def layer_costs(model: nn.Module, run, cost_of=None) -> dict:
    """One call of run() with forward hooks on every Linear, ConvNd and sparse module:
    weight bytes read (each layer call reads its stored weight once), dense and kept
    multiply-adds, layer calls. cost_of(module) -> (weight bytes, weight columns, kept
    fraction) or None for a module that is not a layer (default: these modules' own;
    sparsekern.bench.peers passes one that also reads torch's quantized Linear)."""
    costs = {"weight_bytes": 0, "dense_macs": 0, "kept_macs": 0, "layer_calls": 0}
    handles = []

    def hook(mod, _inp, out, cost):
        nbytes, cols, kept = cost
        macs = out.numel() * cols
        costs["weight_bytes"] += nbytes
        costs["dense_macs"] += macs
        costs["kept_macs"] += macs * kept
        costs["layer_calls"] += 1

    for mod in model.modules():
        cost = (cost_of or _weight_cost)(mod)
        if cost is not None:
            handles.append(mod.register_forward_hook(lambda m, i, o, c=cost: hook(m, i, o, c)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    costs["kept_macs"] = int(round(costs["kept_macs"]))
    return costs


def workload_profile(model: nn.Module, run, median_ms: float) -> dict:
    """The row fields of one workload of one variant: time shares (`time_shares`), layer
    costs (`layer_costs`) and the rates they give at the unprofiled median: weight bytes
    per second over the whole call (`weight_gb_per_s`), and the kept multiply-adds as FLOPs
    per second of the time in the layers' operators ("sparse" + "gemm"; `layer_gflop_per_s`)."""
    shares = time_shares(run)
    costs = layer_costs(model, run)
    s = median_ms * 1e-3
    layer_s = s * (shares["share_sparse"] + shares["share_gemm"])
    return {**shares, **costs, "weight_gb_per_s": costs["weight_bytes"] / s / 1e9,
            "layer_gflop_per_s": 2 * costs["kept_macs"] / layer_s / 1e9 if layer_s > 0 else None}


def roofs(device: str, threads: int) -> dict:
    """The compute roofs of this run's machine, measured: the FMA peak (sparsekern's probe,
    every intra-op thread running independent multiply-adds on the widest vector the
    kernels use; best of 5) and dense torch's GEMM (torch.mm 2048^3 fp32, best of 5: MKL on
    the CPU, cuBLAS on a GPU). GFLOP/s; the peak is None when the extension is not built
    or on a GPU."""
    out = {"fma_peak_gflops": None, "fma_lanes": None}
    if device == "cpu" and hasattr(torch.ops.sparsekern, "cpu_fma_probe"):
        best = 0.0
        for _ in range(5):
            seconds, flops, lanes = torch.ops.sparsekern.cpu_fma_probe(20_000_000)
            best = max(best, flops / seconds / 1e9)
        out.update(fma_peak_gflops=best, fma_lanes=lanes)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    out["gemm_gflops"] = 2 * 2048**3 / best / 1e9
    out["roof_threads"] = threads
    return out
