"""Sparse modules: SparseLinear and SparseConv2d.

A sparse module stores its weight compressed (an NMWeight, BitmaskWeight or BlockWeight
as buffers named `weight_<tensor>` plus an int64 `weight_meta`, validated when built or
loaded) and keeps it whatever it runs. In eval mode each input takes one of the PATHS,
chosen per batch bucket (rows of x; images x output pixels for a convolution) under the
module's Policy: by default the paths are measured on the real input the first time a
bucket is seen and the fastest is cached, and shared with every identical layer once a
second one confirmed it (`choose_path`, `measure_paths`, `Policy.share`), so a layer is
not slower than its dense original at a batch where a faster path exists. `explain()`
shows the choice per bucket; Policy("dense") stores a plain dense weight instead.

Training: `from_dense(..., trainable=True)` keeps a dense `weight` Parameter plus the
packed bitmask of its mask (`weight_mask_bits`). In training mode the forward is the
masked-matmul op (gradients to the weight masked, to the input exact), so any optimizer
fine-tunes it and the zeros stay zero; in eval mode it runs a compressed copy rebuilt
whenever the weight changed. `freeze()` drops the dense weight for good.

Layouts of the compressed tensors: sparsekern/formats.py.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
import sys
import time
import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn

from . import _extension, decisions, dispatch_rules, kinds, memory, ops, precisions, prune
from .patterns import as_2d, conv_output_size, from_2d, pack_bitmask, unpack_bitmask


# ---------------------------------------------------------- per-batch-bucket paths
# How a sparse module can run an input (the kernel backend of "sparse" is ops' choice):
#   "sparse"      the compressed weight through its op (direct kernel at small batch; the
#                 C++ op decompresses tiles into a GEMM at large batch), keeping the layouts
#                 derived for the kernel within Policy.derived_budget
#   "sparse_kept" the same op with its derived layouts kept between calls beyond the budget
#                 (NMWeight.gemm_panels: 1.4x an fp32 2:4 weight), a candidate under
#                 Policy(never_slower=True) where the budget would drop one: packing the
#                 panels per call costs more than the 2:4 GEMM saves at tens of rows
#   "decompress"  the whole weight decompressed, then the dense op (dense work, no extra memory
#                 kept; pays one decompression per call)
#   "dense_copy"  a dense copy kept next to the compressed weight, rebuilt from it when it
#                 changes (a candidate for layers whose dense weight is at most
#                 Policy.dense_copy_max_bytes, for any layer under Policy(dense_copy=True): memory
#                 traded for speed, explain says how much)
PATHS = ("sparse", "sparse_kept", "decompress", "dense_copy")
# choose_path's preference among paths within the measurement noise of the fastest: the one
# that keeps the least memory (the compressed weight alone, then a per-call dense weight,
# then the derived layouts, then a whole dense copy).
PATHS_BY_MEMORY = ("sparse", "decompress", "sparse_kept", "dense_copy")
assert sorted(PATHS_BY_MEMORY) == sorted(PATHS)

# Where a per-bucket choice came from (PathChoice.source; PathChoice.shared says whether an
# identical layer in this process made it).
SOURCES = {"measured": "measured in this process", "cache": "read from the tuning cache"}


class PathChoice(NamedTuple):
    path: str
    reason: str
    times_ms: dict
    shared: bool = False  # True: taken from an identical layer's measurement (Policy.share)
    source: str = "measured"  # a key of SOURCES
    measured_at: float | None = None  # seconds since the epoch (time.time()) of the measurement
    start: bool | str | None = None  # how each timed call started: a key of STARTS (Policy.cold, resolved)
    layers: int = 1  # identical layers whose measurements it joins (each path's fastest call over them)


# How measure_paths starts each timed call (Policy.cold once resolved, _SparseMixin._measure_start).
STARTS = {True: "weights from memory", "llc": "weights from the last-level cache", False: "weights warm"}


class Policy:
    """How sparse modules choose how to run.

    backend: "auto" (per batch bucket, measure the paths the first time a bucket is seen
    and run the fastest), "sparse" (always the compressed weight's op), "dense" (store and
    run a plain dense weight). dense_copy: also keep a dense copy of each weight (more
    memory) so "auto" may run it where it is faster. reps: timed calls per path. cold:
    True: start each timed call with the layer's weights out of the caches (CPU: its weight
    tensors evicted; GPU: L2 flushed), so a layer is measured as it runs inside a model whose
    weights stream from memory, not hot in cache (measure_paths). False: warm, as measured
    alone. "auto" (default): True, except in a model whose weights (model_footprint) fit in
    dispatch_rules.WARM_MODEL_LLC_FRACTION of the last-level cache (note_model_footprint,
    which sparsify, tune, freeze and load call): there each call starts with the weights in
    that cache (CPU: a buffer twice the L2 written first; GPU: as warm), as they are between
    two forwards of such a model. A small model measured from memory chose kernels that win
    from memory and lose in cache (the digits MLP of the demo, 0.50-0.99x dense). share: a
    choice is measured on the first two of identical layers in the process (same module type
    and geometry, format, pattern, density to 1%, dtype, device, bias and policy), each path
    counted at its fastest call over both, and reused by the others: a transformer's 4 x 7
    linears are measured as 3 shapes, so each measurement can afford more repetitions, one
    noisy sample no longer flips one layer of many, and one layer's transient measurement no
    longer decides for all (_SharedChoice).
    dense_copy_max_bytes: a layer whose dense weight is at most this many bytes also measures
    the "dense_copy" path, and keeps the copy where it wins a batch bucket (small layers, where
    a kernel call's fixed cost can exceed the work; dispatch_rules.DENSE_COPY_MAX_BYTES); None:
    only under dense_copy=True. never_slower: where the compressed weight's own path loses
    to the dense product in a bucket (by more than the measurement's noise), a layer may keep
    more memory to stop losing: its derived layouts beyond derived_budget ("sparse_kept"), or
    else a dense copy whatever its size ("dense_copy"; explain reports the bytes kept); where
    it does not lose, nothing more is kept. False: a layer keeps only the compressed
    weight (and the derived layouts within the budget; small layers' dense copies as
    dense_copy_max_bytes says), and a losing large layer decompresses per call.
    cache: read and write the on-disk tuning cache
    (sparsekern.decisions), so a choice measured once on this machine is not measured again
    in another process.
    derived_budget: the bytes of layouts derived from the compressed weight for a kernel
    (NMWeight.gemm_panels: 6 bytes per kept value; BitmaskWeight.column_index: 2) that a
    layer keeps between calls, as a fraction of its stored weight's bytes. Above it the
    layout is built for the call and dropped, so the compressed weight stays the one
    resident layout: the 2:4 panels (1.4x an fp32 2:4 weight's bytes) are packed per call
    (measured 5-15% slower at 128-788 rows than kept, bench/results/cpu-gemm-20261128e),
    the bitmask column index (under 0.5x at fp32) stays. None keeps every derived layout
    (fastest, most memory).
    """

    def __init__(self, backend: str = "auto", dense_copy: bool = False, reps: int = 5, cold: bool | str = "auto",
                 share: bool = True, derived_budget: float | None = 0.5,
                 dense_copy_max_bytes: int | None = dispatch_rules.DENSE_COPY_MAX_BYTES, cache: bool = True,
                 never_slower: bool = True):
        if backend not in ("auto", "sparse", "dense"):
            raise ValueError(f"Policy: backend must be 'auto', 'sparse' or 'dense', got {backend!r}")
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ValueError(f"Policy: reps must be a positive int, got {reps!r}")
        if not (isinstance(cold, bool) or (isinstance(cold, str) and cold == "auto")):
            raise ValueError(f"Policy: cold must be True, False or 'auto', got {cold!r}")
        self.backend, self.dense_copy, self.reps, self.cold = backend, bool(dense_copy), reps, cold
        self.share = bool(share)
        if derived_budget is not None and (isinstance(derived_budget, bool) or
                                           not isinstance(derived_budget, (int, float)) or derived_budget < 0):
            raise ValueError(f"Policy: derived_budget must be a fraction >= 0 or None, got {derived_budget!r}")
        self.derived_budget = None if derived_budget is None else float(derived_budget)
        if dense_copy_max_bytes is not None and (isinstance(dense_copy_max_bytes, bool) or
                                                 not isinstance(dense_copy_max_bytes, int) or dense_copy_max_bytes < 0):
            raise ValueError(f"Policy: dense_copy_max_bytes must be an int >= 0 or None, got {dense_copy_max_bytes!r}")
        self.dense_copy_max_bytes, self.cache = dense_copy_max_bytes, bool(cache)
        if not isinstance(never_slower, bool):
            raise ValueError(f"Policy: never_slower must be True or False, got {never_slower!r}")
        self.never_slower = never_slower

    def __repr__(self) -> str:
        return (f"Policy({self.backend!r}, dense_copy={self.dense_copy}, reps={self.reps}, cold={self.cold!r}, "
                f"share={self.share}, derived_budget={self.derived_budget}, "
                f"dense_copy_max_bytes={self.dense_copy_max_bytes}, cache={self.cache}, "
                f"never_slower={self.never_slower})")


DEFAULT_POLICY = Policy()


def choose_path(times_ms: dict[str, float], rows: int, noise: float = dispatch_rules.PATH_NOISE) -> PathChoice:
    """The fastest path by measured time (measure_paths), except that the first of
    PATHS_BY_MEMORY within `noise` (relative) of the fastest is taken: "sparse" keeps only
    the compressed bytes, and a path that keeps more must win by more than the noise. Keeping
    the derived layouts ("sparse_kept") is for a layer whose "sparse" loses to the dense
    product: where "sparse" is within the noise of the best dense path, it runs (a pure
    function of the measurements, tested with injected timings). The reason gives sparse's
    speed against the best dense path."""
    if not times_ms:
        raise ValueError("choose_path: no timings")
    # A path whose measurement alone is known to flatter it is charged its handicap (see
    # dispatch_rules.PATH_HANDICAP); the reason shows the times as measured.
    charged = {p: t * (1 + dispatch_rules.PATH_HANDICAP.get(p, 0.0)) for p, t in times_ms.items()}
    dense_ref = [charged[p] for p in ("decompress", "dense_copy") if p in charged]
    if "sparse_kept" in charged and "sparse" in charged and dense_ref and \
            charged["sparse"] <= min(dense_ref) * (1 + noise):
        # not slower than dense already: more memory would buy speed the policy did not ask for
        charged.pop("sparse_kept")
    best = min(charged, key=charged.get)
    best = next(p for p in PATHS_BY_MEMORY + (best,) if p in charged and charged[p] <= charged[best] * (1 + noise))
    dense = [times_ms[p] for p in times_ms if p in ("decompress", "dense_copy")]  # as measured, not charged
    parts = ", ".join(f"{p} {t:.3f} ms" + (f" (charged +{dispatch_rules.PATH_HANDICAP[p]:.0%})"
                                            if dispatch_rules.PATH_HANDICAP.get(p) else "")
                      for p, t in sorted(times_ms.items(), key=lambda kv: kv[1]))
    ratio = f"sparse {min(dense) / times_ms['sparse']:.2f}x dense; " if dense and "sparse" in times_ms else ""
    return PathChoice(best, f"{rows} rows: {ratio}{parts}", dict(times_ms))


class _SharedChoice:
    """A per-bucket choice shared between identical layers (Policy.share). A choice measured
    on one layer is confirmed on the next identical layer, which measures too: each path then
    counts its fastest call over both, and every layer that ran the first choice runs the
    joined one. One measurement alone decided for all of them before, and a transient slowdown
    of one path during it (a chunk-pool episode, a preemption) sent every identical layer the
    wrong way: in bench/results/cpu-models-20261207j one slow measurement of the Llama's q_proj
    at prefill put its 16 attention projections on their dense copies. Later layers share the
    confirmed choice without measuring. A choice read from the tuning cache needs no
    confirmation."""

    __slots__ = ("choice", "adopters")

    def __init__(self, choice: PathChoice):
        self.choice = choice
        self.adopters: list = []  # weak references to the layers running `choice`

    @property
    def confirmed(self) -> bool:
        """Measured on two identical layers, or read from the tuning cache."""
        return self.choice.layers > 1 or self.choice.source == "cache"


# Choices shared between identical layers (Policy.share), keyed by _SparseMixin._share_key.
_SHARED_CHOICES: dict[tuple, _SharedChoice] = {}


def join_measurements(first: PathChoice, second: PathChoice, rows: int) -> PathChoice:
    """The choice from two identical layers' measurements of a bucket: each path's fastest
    time over both (a path measured on one only keeps its time), chosen as choose_path
    chooses."""
    times = dict(first.times_ms)
    for p, t in second.times_ms.items():
        times[p] = min(t, times.get(p, t))
    joined = choose_path(times, rows)
    return joined._replace(layers=first.layers + second.layers)


# How many per-bucket measurements (measure_paths calls) this process made: a choice read
# from the tuning cache or shared by an identical layer makes none.
_MEASUREMENTS = [0]


def measurement_count() -> int:
    """Per-bucket path measurements made in this process so far (tests assert that a process
    reading the tuning cache makes none)."""
    return _MEASUREMENTS[0]


def clear_shared_choices() -> None:
    """Forgets every shared per-bucket choice (modules keep the ones they already made)."""
    _SHARED_CHOICES.clear()


@functools.lru_cache(maxsize=None)
def _cpu_cache_bytes(level: int) -> int | None:
    """The size of cpu0's unified or data cache of this level (sysfs), or None if unknown.
    Read once per process: every measurement's cache flush or push asks for it."""
    for index in range(5):
        try:
            base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
            with open(f"{base}/level") as f:
                if int(f.read()) != level:
                    continue
            with open(f"{base}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{base}/size") as f:
                text = f.read().strip()
            return int(text[:-1]) << (20 if text.endswith("M") else 10) if text[-1] in "KM" else int(text)
        except (OSError, ValueError):
            continue
    return None


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return _cpu_cache_bytes(3) or _cpu_cache_bytes(2) or 32 << 20


def _push_to_llc(device: torch.device) -> None:
    """Moves what the last call read out of a CPU's private caches into the shared last-level
    cache, by writing a buffer twice the L2 (1 MiB if unknown) first: the weights of a layer
    in a model that fits the last-level cache come from there (Policy(cold="auto"))."""
    key = ("llc", device)
    buf = _FLUSH.get(key)
    if buf is None:
        l2 = _cpu_cache_bytes(2) if _cpu_cache_bytes(3) else None
        buf = _FLUSH[key] = torch.zeros(2 * (l2 or 1 << 20) // 4, device=device)
    buf.add_(1.0)


_FLUSH: dict = {}


FLUSH_CAP_BYTES = 64 << 20


def _flush_cache(device: torch.device) -> None:
    """Evicts weights from the last-level cache by writing a buffer twice its size, capped at
    FLUSH_CAP_BYTES: some hosts report a socket-wide L3 of hundreds of MiB shared by many
    guests, and writing that much before every timed call would make a measurement take
    seconds per layer."""
    buf = _FLUSH.get(device)
    if buf is None:
        size = min(2 * _last_level_cache_bytes(device), FLUSH_CAP_BYTES)
        buf = _FLUSH[device] = torch.zeros(size // 4, device=device)
    buf.add_(1.0)


def _evict_op():
    return getattr(getattr(torch.ops, "sparsekern", None), "cpu_evict_from_cache", None)


def measure_paths(runners: dict, device: torch.device, reps: int, cold: bool | str, evict=None) -> dict[str, float]:
    """Fastest of `reps` timed calls of each runner, in milliseconds: called round-robin
    (interleaved) after a warm-up, each timed call preceded by a cold start when `cold` is
    True, by a start from the last-level cache when it is "llc" (CPU: _push_to_llc; a GPU's
    L2 is its last level, so there it is warm), warm when False. The
    fastest, not the median: the work is the same every call, so a slower call measures
    something else (another process on a shared machine; the measurement is taken once, in
    the middle of a user's run), and a burst of it must not decide a layer's path.

    The cold start on a CPU, given `evict()` (the tensors the paths read as weights): those
    tensors' cache lines evicted (sparsekern.cpu_evict_from_cache), so the weight comes from
    memory as in a model larger than the cache, while the code, the input and the threads stay
    as warm as between two layers. A flush buffer written before the call evicts all of them
    too, and charges each path its own cold start, the sparse path's most (the figures:
    dispatch_rules.EVIDENCE["PATH_COLD_START"]). Elsewhere (a GPU, no `evict`) the flush buffer."""
    times = {p: [] for p in runners}
    cuda = device.type == "cuda"
    evict_op = _evict_op() if evict is not None and device.type == "cpu" else None
    with torch.no_grad():
        # The warm-up builds what only measuring needs (a dense copy, layouts another path
        # packs) and first calls' temporaries: each its own mapping, given back when freed
        # (sparsekern/memory.py). The timed calls allocate as the model's calls do.
        with memory.large_blocks_mapped():
            for fn in runners.values():
                fn()
        rounds, start = 0, time.perf_counter()
        # At least `reps` rounds; more, up to PATH_MAX_REPS, while they take less than
        # PATH_MIN_MEASURE_MS per path: the fastest of 5 calls of 0.1 ms still varies by tens of
        # percent on a shared CPU (a worker's wake-up, a preemption), and small layers can
        # afford more calls.
        while rounds < reps or (rounds < dispatch_rules.PATH_MAX_REPS and (time.perf_counter() - start) * 1e3
                                < dispatch_rules.PATH_MIN_MEASURE_MS * len(runners)):
            rounds += 1
            for p, fn in runners.items():
                if cold == "llc":
                    if not cuda:
                        _push_to_llc(device)
                elif cold and evict_op is not None:
                    evict_op([t for t in evict() if t.device.type == "cpu"])
                elif cold:
                    _flush_cache(device)
                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[p].append(begin.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    fn()
                    times[p].append((time.perf_counter() - t) * 1e3)
    return {p: min(ts) for p, ts in times.items()}


# ------------------------------------------------------- layers a sparse module replaces
def is_conv1d(module) -> bool:
    """True for transformers' Conv1D (GPT-2 and its family): a Linear that stores its weight
    [in, out] and computes x @ W + b. Recognised without importing transformers (a model that
    holds one has imported it)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def linear_of(module: nn.Module) -> nn.Linear:
    """An nn.Linear that computes what `module` computes: an nn.Linear itself; for a
    transformers Conv1D, a new nn.Linear over its weight transposed (a copy, same device,
    dtype and training mode; a torch.nn.utils.prune `weight_mask` comes along transposed)."""
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise TypeError(f"linear_of: expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")
    w = module.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if module.bias is not None:
            lin.bias.copy_(module.bias.detach())
    if hasattr(module, "weight_mask"):
        lin.register_buffer("weight_mask", module.weight_mask.t().contiguous())
    return lin.train(module.training)


def sparse_shell(layer: nn.Module, pattern: str, block: tuple[int, int] = (32, 32)) -> "SparseLinear | SparseConv2d":
    """An empty sparse module in `layer`'s place: its geometry, bias, device and dtype, for
    `pattern`, holding no weight yet (load_state_dict adopts the compressed tensors and checks
    them). `layer`: nn.Linear, transformers' Conv1D (the shell is transposed=True) or
    nn.Conv2d (settings SparseConv2d does not cover raise ValueError); TypeError otherwise."""
    w = layer.weight
    kind, params = kinds.parse(pattern, "sparse_shell")
    block = kinds.KINDS[kind].block_of(params, block) or block
    if isinstance(layer, nn.Conv2d):
        SparseConv2d.check_supported(layer, "dense")
        return SparseConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.bias is not None, pattern, block, device=w.device, dtype=w.dtype)
    if is_conv1d(layer):
        shell = SparseLinear(w.shape[0], w.shape[1], layer.bias is not None, pattern, block, device=w.device,
                             dtype=w.dtype)
        shell.transposed = True
        return shell
    if isinstance(layer, nn.Linear):
        return SparseLinear(layer.in_features, layer.out_features, layer.bias is not None, pattern, block,
                            device=w.device, dtype=w.dtype)
    raise TypeError(f"sparse_shell: a {type(layer).__name__} has no sparse counterpart "
                    "(nn.Linear, transformers' Conv1D and nn.Conv2d do)")


# ---------------------------------------------------------------------------- modules
class _StraightThrough(torch.autograd.Function):
    """Forward: `quantized` (the weight as stored); backward: the gradient passes to
    `weight` unchanged (the straight-through estimator of quantization-aware training)."""

    @staticmethod
    def forward(ctx, weight, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SparseMixin:
    """State shared by SparseLinear and SparseConv2d: compressed buffers, backend, modes."""

    pattern: str
    backend: str
    reason: str

    def _set_format(self, fmt) -> None:
        self.bucket_choices: dict[int, PathChoice] = {}
        self.__dict__.pop("_dense_copy", None)
        self._forget_calls()
        for name in list(self._buffers):
            if name.startswith("weight_") and name != "weight_mask_bits":
                del self._buffers[name]
        if isinstance(fmt, torch.Tensor):  # dense with zeros in place
            self.register_buffer("weight_dense", fmt)
        else:
            for k, t in fmt.tensors().items():
                if k != "meta":
                    self.register_buffer("weight_" + k, t)
        self.register_buffer("weight_meta", kinds.meta_of(fmt))
        # Python ints mirror the meta buffer so forward never reads a tensor (torch.compile).
        self._meta_ints = self.weight_meta.tolist()

    def weight_format(self):
        """The compressed weight (format object over this module's buffers), or the dense
        weight tensor when the backend is dense."""
        cls = kinds.KIND_OF_CODE[self._meta_ints[0]].format
        if cls is None:
            return self.weight_dense
        tensors = {k: self._buffers["weight_" + k] for k in cls.tensor_names_of(self._meta_ints[1:])}
        if torch.compiler.is_compiling():
            return cls.from_tensors(tensors, validate=False, meta_ints=self._meta_ints[1:])
        # One format object per set of buffers (they are replaced, never mutated, by .to(),
        # load_state_dict and freeze), so a decode step does not rebuild it. Validated when
        # built or loaded (_load_from_state_dict), so not again here.
        key = tuple(map(id, tensors.values()))
        cached = self.__dict__.get("_format_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_format_cache"] = (
                key, cls.from_tensors(tensors, validate=False, meta_ints=self._meta_ints[1:]))
        return self._budgeted(cached[1])

    def _budgeted(self, f):
        """f with this module's derived budget set (formats.set_derived_budget), so the
        ops do not build a derived layout the module would drop after the call."""
        if not isinstance(f, torch.Tensor):
            f.set_derived_budget(self._derived_budget())
        return f

    def _derived_budget(self) -> float | None:
        """The derived layouts this layer keeps, as a fraction of its compressed bytes: the
        policy's derived_budget, or no limit once a batch bucket chose "sparse_kept"."""
        if any(c.path == "sparse_kept" for c in self.bucket_choices.values()):
            return None
        return getattr(self, "_policy", DEFAULT_POLICY).derived_budget

    # ------------------------------------------------ the per-input-shape call cache
    # An eval forward that already ran an input shape runs it again through one cached call
    # (_KeptCall): the kernel with its arguments bound (ops.sparse_linear_call: checked and
    # decided once) or F.linear on the kept dense copy. Before each use it checks what the
    # formats' safety rests on (the version counters of the weight's tensors, as
    # is_validated does: an in-place edit sends the call back through ops, which validates
    # again and raises on bad indices) and the input's dtype and device; the shape is the key.
    # Replacing a weight tensor or the bias, .to() and loading a state dict forget the calls.
    def _forget_calls(self) -> None:
        self.__dict__["_calls"] = {}

    def __setattr__(self, name, value):
        if name.startswith("weight") or name == "bias":
            self.__dict__["_calls"] = {}
        super().__setattr__(name, value)

    def register_buffer(self, name, tensor, persistent: bool = True):
        self.__dict__["_calls"] = {}
        return super().register_buffer(name, tensor, persistent)

    def _apply(self, fn, recurse=True):
        self.__dict__["_calls"] = {}
        return super()._apply(fn, recurse)

    def _keep_call(self, x: torch.Tensor, path: str, f) -> None:
        """Caches the call that ran `x` on `path` for x's shape (see above), where one can be:
        eager mode, no gradient wanted, a weight whose in-place edits are seen (no inference
        tensors), and a call that holds nothing beyond the format's tensors and the derived
        layouts its budget keeps."""
        if torch.compiler.is_compiling() or path == "decompress" or isinstance(f, torch.Tensor):
            return
        bias = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return
        tensors = tuple(getattr(f, n) for n in f.tensor_names())
        if any(t.is_inference() for t in tensors):
            return
        if path == "sparse" and self.__dict__.get("_derived_dropped"):
            return  # its derived layout is built per call and dropped (Policy.derived_budget)
        call = self._call_to_keep(x, path, f, bias, tensors)
        if call is None:
            return
        calls = self.__dict__.setdefault("_calls", {})
        if len(calls) >= MAX_KEPT_CALLS:
            calls.clear()
        calls[x.shape] = _KeptCall(call, x.dtype, x.device, tensors, _versions(tensors), bias is not None)

    def _call_to_keep(self, x, path: str, f, bias, tensors):
        """call(x, bias) running `path` for inputs of x's shape, or None (SparseLinear, SparseConv2d)."""
        return None

    def _kept_call(self, x: torch.Tensor):
        """The cached call for x (see _keep_call) when it may run now, else None."""
        if torch.compiler.is_compiling():
            return None  # a traced graph runs the checked path (its guards are the checks)
        kept = self.__dict__.get("_calls")
        kept = kept.get(x.shape) if kept else None
        return kept if kept is not None and _kept_call_fresh(kept, x, self._parameters.get("bias")) else None

    @property
    def trainable(self) -> bool:
        return "weight" in self._parameters and self._parameters["weight"] is not None

    def mask(self) -> torch.Tensor:
        """bool mask of the weight's 2-D view (True = kept)."""
        if self.trainable:
            return unpack_bitmask(self.weight_mask_bits, self.weight_mask_bits.shape[1] * 64)[
                :, : self._in2d]
        f = self.weight_format()
        return as_2d(f != 0) if isinstance(f, torch.Tensor) else f.mask()

    def kept_fraction(self) -> float:
        """The share of the weight's 2-D view that the mask keeps, counted (no float copy of
        the mask); NaN for an empty weight."""
        mask = self.mask()
        return float(mask.count_nonzero()) / mask.numel() if mask.numel() else float("nan")

    def _take_bias(self, bias: torch.Tensor | None, device, dtype) -> None:
        """Gives a module built on the meta device its bias, copied to `device` / `dtype`. The
        classmethods that compress a given weight build the module there: the constructor's
        placeholder weight (a dense zeros tensor) would be allocated and filled only to be
        replaced by the real one."""
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(device, dtype, copy=True))

    def dense_weight_2d(self) -> torch.Tensor:
        if self.trainable:
            return self.weight * self.mask().to(self.weight.dtype)
        f = self.weight_format()
        return as_2d(f) if isinstance(f, torch.Tensor) else f.to_dense()

    def _adopt_format(self, fmt, policy: Policy) -> None:
        """Stores `fmt` (a format object, or a masked dense tensor for pattern 'dense'), or a
        plain dense weight under Policy("dense"); forgets per-bucket choices."""
        self._policy = policy
        if isinstance(fmt, torch.Tensor) or policy.backend == "dense":
            self._set_format(fmt if isinstance(fmt, torch.Tensor) else fmt.to_dense())
            self.backend = "dense"
            self.reason = "pattern 'dense'" if isinstance(fmt, torch.Tensor) else "forced by Policy('dense')"
            return
        self._set_format(fmt)
        self.backend = self._sparse_backend(fmt, 1)
        self.reason = ("forced by Policy('sparse')" if policy.backend == "sparse" else
                       "per batch bucket: the fastest path, measured the first time a bucket is seen")

    def quantize_values(self, precision: str | None, group_size: int = 128):
        """Stores the kept values in `precision` ("int8", "int4" with group_size; None: float
        again), round to nearest on the current values (quantize after pruning; for joint
        quantization prune with sparsify(method="sparsegpt", quantize=...)). In place;
        returns self. A trainable layer quantizes its eval copy (its training weight stays
        float)."""
        where = f"{type(self).__name__}.quantize_values"
        self._set_quantize(precision, group_size, where)
        if self.trainable:
            self.__dict__.pop("_packed_version", None)
            return self
        f = self.weight_format()
        if isinstance(f, torch.Tensor):
            raise ValueError(f"{where}: this layer holds a dense weight (pattern 'dense' or Policy('dense')); "
                             "quantize a dense layer with torch.ao.quantization.quantize_dynamic")
        prec, group = self._quantize
        self._adopt_format(f.dequantized().quantize(prec, group), getattr(self, "_policy", DEFAULT_POLICY))
        return self

    def freeze(self, policy: Policy | None = None):
        """Drop the dense training weight; keep only the compressed (or chosen) weight."""
        if self.trainable:
            w2d, mask = self.weight.detach(), self.mask()
            pattern = kinds.parse(self.pattern)
            pattern.entry.check_mask(mask, pattern.params, self.pattern)  # set_mask may have left another
            del self._parameters["weight"]
            del self._buffers["weight_mask_bits"]
            self._adopt_format(self._build_format(w2d, mask), policy or DEFAULT_POLICY)
        return self

    def set_mask(self, mask: torch.Tensor, weight: torch.Tensor | None = None):
        """Replaces a trainable layer's mask (bool, the weight's 2-D shape [out, in2d]; True =
        kept) and, when given, its weight values first; the weight is zeroed where the mask
        drops it. Gradual pruning moves through masks that need not fit the pattern yet (a
        2:4 layer starts dense); freeze() refuses one that does not. Returns self."""
        where = f"{type(self).__name__}.set_mask"
        if not self.trainable:
            raise ValueError(f"{where}: the layer is not trainable (build it with trainable=True)")
        shape = tuple(self.weight.shape)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"{where}: mask must be a bool tensor of shape {shape}")
        with torch.no_grad():
            if weight is not None:
                if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
                    raise ValueError(f"{where}: weight must be a tensor of shape {shape}")
                self.weight.copy_(weight)
            self.weight.mul_(mask.to(self.weight.device))
            self.weight_mask_bits = pack_bitmask(mask.to(self.weight.device))
        self.__dict__.pop("_packed_version", None)
        return self

    def training_weight(self) -> torch.Tensor:
        """The weight a trainable layer's training forward multiplies: its Parameter, or, for a
        layer that stores quantized values (quantize="int8"/"int4"), the values its compressed
        copy will hold (the format built from the masked weight, dequantized) with a
        straight-through gradient: quantization-aware training, so the trained weights are
        those that land on the grid."""
        name = self.__dict__.get("_quantize", (None, 0))[0]
        if name is None or not self.mask_fits_pattern():
            return self.weight  # float until gradual pruning has reached the pattern
        with torch.no_grad():
            prec = precisions.precision(name)
            if not prec.grouped:
                # One scale per output row over the row's kept values, in every format: the
                # masked weight's round trip is what the format would hold, bit for bit
                # (pruned zeros do not move a row's max), without building it each step.
                on_grid = prec.round_trip(as_2d(self.weight.detach()) * self.mask().to(self.weight.dtype))
            else:  # int4's groups run along the format's kept values: the format decides them
                on_grid = as_2d(self._build_format(self.weight.detach(), self.mask()).to_dense())
            on_grid = on_grid.reshape(self.weight.shape).to(self.weight.dtype)
        return _StraightThrough.apply(self.weight, on_grid)

    def _training_rounds_activations(self, device) -> bool:
        """Whether the training forward rounds x per row to int8 (straight through): where the
        compressed layer this trains into will (ops.rounds_activations), so quantization-aware
        training sees the activations inference multiplies, and freeze keeps the output."""
        precision = self.__dict__.get("_quantize", (None, 0))[0]
        if precision is None or not self.mask_fits_pattern() or isinstance(self, SparseConv2d):
            return False
        fmt_cls = kinds.parse(self.pattern).entry.format
        return fmt_cls is not None and ops.rounds_activations(fmt_cls.op_name(quantized=True), device)

    def mask_fits_pattern(self) -> bool:
        """Whether a trainable layer's mask fits its pattern (gradual pruning moves through
        masks that do not yet); True for a frozen layer."""
        if not self.trainable:
            return True
        bits = self.weight_mask_bits
        key = (bits.data_ptr(), bits._version)
        cached = self.__dict__.get("_fits_cache")
        if cached is None or cached[0] != key:
            pattern = kinds.parse(self.pattern)
            try:
                pattern.entry.check_mask(self.mask(), pattern.params, self.pattern)
                fits = True
            except ValueError:
                fits = False
            cached = self.__dict__["_fits_cache"] = (key, fits)
        return cached[1]

    def _build_format(self, w2d: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor | None = None):
        """The pattern's format object for a 2-D weight and mask (a masked dense tensor for
        pattern 'dense')."""
        precision, group_size = self.__dict__.get("_quantize", (None, 0))
        return kinds.compress(w2d, self.pattern, mask, self._block, precision, group_size, scales)

    def _set_quantize(self, quantize: str | None, group_size: int, where: str) -> None:
        """The precision this module stores its kept values in when it builds a format
        (sparsekern/precisions.py); group_size applies to int4 only."""
        prec = precisions.precision(quantize, where)
        group = prec.check_group_size(group_size if prec.grouped else 0, where)
        self.__dict__["_quantize"] = (None if prec.name == "fp" else prec.name, group)

    def _sparse_backend(self, fmt, batch: int) -> str:
        """The backend the format's op runs for `batch` rows of input on this layer."""
        x = torch.empty(batch, self._in2d, device=fmt.device, dtype=fmt.dtype)
        return ops.backend_for(fmt.OP, x, fmt)

    def _packed(self):
        """Compressed copy for eval mode of a trainable module, rebuilt when the weight changed."""
        version = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device,
                   self.weight_mask_bits.data_ptr(), self.weight_mask_bits._version)
        if getattr(self, "_packed_version", None) != version:
            # A mask gradual pruning has not brought to the pattern yet: the masked dense weight.
            self._packed_fmt = self._build_format(self.weight.detach(), self.mask()) if self.mask_fits_pattern() \
                else self.weight.detach() * self.mask().to(self.weight.dtype)
            self._packed_version = version
        return self._budgeted(self._packed_fmt)

    def _linear2d(self, x2: torch.Tensor, bias):
        """x2 [..., in2d] through the weight on its sparse op, whatever the mode (the
        training op for a trainable module in training mode)."""
        if self.trainable and self.training:
            if self._training_rounds_activations(x2.device):
                x2 = precisions.round_activation_rows(x2)  # as the compressed layer's kernels will
            weight = self.training_weight()
            if torch.is_autocast_enabled(x2.device.type):
                # Mixed precision, as autocast runs F.linear: the operands in the autocast
                # dtype, cast differentiably, so the fp32 parameter gets an fp32 gradient.
                x2, weight, bias = _autocast_operands(x2.device.type, x2, weight, bias)
            return ops.masked_linear(x2, weight, self.weight_mask_bits, bias)
        f = self._packed() if self.trainable else self.weight_format()
        if isinstance(f, torch.Tensor):
            return torch.nn.functional.linear(x2, f, bias)
        return self._within_budget(f, ops.sparse_linear(x2, f, bias))

    def _within_budget(self, f, out):
        """Drops f's derived layouts when they exceed this layer's derived budget
        (_derived_budget): ones built before the budget was lowered (_budgeted keeps the ops
        from building a layout over it); returns `out`."""
        budget = self._derived_budget()
        dropped = False
        if budget is not None and not torch.compiler.is_compiling():
            derived = f.derived_nbytes  # 0 for most layers: no need to count the stored bytes
            if derived and derived > budget * f.nbytes:
                f.release_derived()
                dropped = True
        self.__dict__["_derived_dropped"] = dropped  # read by _keep_call right after this call
        return out

    def _sparse_call(self, path: str, f, call):
        """call() (the op on the compressed weight) on path "sparse" or "sparse_kept". Once a
        bucket runs "sparse_kept" both are the same call with every derived layout kept. While
        the paths are measured, "sparse" runs within the policy's budget (the kernel that reads
        the compressed tensors) and "sparse_kept" with its layouts built once and kept, and
        neither drops what the other built."""
        f.set_derived_budget(None if path == "sparse_kept" else self._derived_budget())
        out = call()
        return out if self.__dict__.get("_measuring", False) else self._within_budget(f, out)

    def _dense_weight(self, path: str, f) -> torch.Tensor:
        """The dense [out, in2d] weight for path "decompress" (made now) or "dense_copy"
        (made once and kept; made again when the compressed weight, the source of truth, was
        replaced or edited in place)."""
        if path == "decompress":
            return f.to_dense()
        stamps = _versions(tuple(getattr(f, n) for n in f.tensor_names()))
        copy = self.__dict__.get("_dense_copy")
        if copy is None or copy[0] is not f or copy[2] != stamps or stamps is None:
            copy = self.__dict__["_dense_copy"] = (f, f.to_dense(), stamps)
        return copy[1]

    def _dense_nbytes(self, f) -> int:
        return math.prod(f.shape) * f.dtype.itemsize

    def _path_for(self, rows: int, runners, keeping_changes_call=None) -> str:
        """How to run an input of `rows` rows in eval mode: "sparse" unless Policy("auto")
        measured another path faster for this batch bucket. `runners()` gives the candidate
        forwards on this very input; they are timed once per bucket (see measure_paths).
        keeping_changes_call(): whether the op would read a derived layout the budget drops
        for this input (ops.keeping_derived_changes_call; None: it may)."""
        policy = getattr(self, "_policy", DEFAULT_POLICY)
        if policy.backend != "auto" or self.trainable:
            return "sparse"
        bucket = ops.batch_bucket(rows)
        choice = self.bucket_choices.get(bucket)
        if choice is None:
            if torch.compiler.is_compiling():
                return "sparse"  # measured eagerly only; a compiled graph keeps the kernel
            f = self.weight_format()
            start = self._measure_start(policy, f.device)
            key = self._share_key(f, bucket, policy, start)
            allowed = self._paths_allowed(f, policy, keeping_changes_call)
            shared = _SHARED_CHOICES.get(key) if policy.share else None
            stored = decisions.lookup(f.device, repr(key)) if policy.cache and shared is None else None
            if shared is not None and shared.confirmed:
                choice = shared.choice._replace(shared=True)
            elif stored is not None and stored["path"] in allowed:
                choice = PathChoice(stored["path"], stored["reason"], dict(stored["times_ms"]), source="cache",
                                    measured_at=stored["measured_at"])
            else:
                candidates = {p: fn for p, fn in runners().items() if p in allowed}
                _MEASUREMENTS[0] += 1
                self.__dict__["_measuring"] = True
                try:
                    # the dense copy the warm-up may build and free (sparsekern/memory.py)
                    memory.note_freed_block(self._dense_nbytes(f))
                    choice = choose_path(measure_paths(candidates, f.device, policy.reps, start,
                                                       evict=lambda: self._weight_tensors(f)), rows)
                finally:
                    self.__dict__["_measuring"] = False
                del candidates
                if shared is not None:  # the second identical layer: confirms the first's choice
                    choice = join_measurements(shared.choice, choice, rows)
                if choice.path == "sparse_kept" and not f.derived_nbytes:
                    # Nothing derived to keep at this input (a kernel that packs no layout
                    # here): the same call as "sparse", named so.
                    choice = choice._replace(path="sparse")
                # Buffers used only to measure (the cache-flush buffer, the dense weights of the
                # other paths) are not kept: the next measurement allocates its flush buffer again.
                _FLUSH.clear()
                memory.release_freed_memory()
                stamp = decisions.store(f.device, repr(key), choice.path, choice.reason, choice.times_ms) \
                    if policy.cache else time.time()
                choice = choice._replace(measured_at=stamp)
            choice = choice._replace(start=start)
            if policy.share:
                if shared is None:
                    shared = _SHARED_CHOICES[key] = _SharedChoice(choice)
                elif not shared.confirmed:
                    shared.choice = choice  # joined: layers > 1
                    for ref in shared.adopters:  # the layers that ran the first choice run this one
                        layer = ref()
                        if layer is not None and layer is not self:
                            layer._adopt_choice(bucket, choice)
                    shared.adopters.clear()  # later layers share the confirmed choice
                if not shared.confirmed:
                    shared.adopters.append(weakref.ref(self))
            self.bucket_choices[bucket] = choice
            self._settle_layouts(f, policy)
        return choice.path

    def _settle_layouts(self, f, policy: Policy) -> None:
        """After a bucket's choice: keeps the layouts the chosen paths run and drops the ones
        built only to measure the others."""
        # The budget this bucket's choice leaves (the runners set their own): layouts built
        # only to measure "sparse_kept" go unless a bucket keeps them.
        if not isinstance(f, torch.Tensor):
            self._within_budget(self._budgeted(f), None)
        if not isinstance(f, torch.Tensor) and all(c.path not in ("sparse", "sparse_kept")
                                                   for c in self.bucket_choices.values()):
            # The sparse path lost in every bucket seen so far: indexes built to measure it
            # (NMWeight.gemm_panels, BitmaskWeight.column_index) are not kept.
            f.release_derived()
        if not policy.dense_copy and all(c.path != "dense_copy" for c in self.bucket_choices.values()):
            self.__dict__.pop("_dense_copy", None)  # made to measure it; no bucket runs it

    def _adopt_choice(self, bucket: int, choice: PathChoice) -> None:
        """Runs `choice` for `bucket` from now on (an identical layer joined its measurement to
        this layer's): where the path changes, the calls kept for the old one are dropped, and a
        layout the new path reads is built at its first call."""
        before = self.bucket_choices.get(bucket)
        self.bucket_choices[bucket] = choice
        if before is None or before.path != choice.path:
            self.__dict__.pop("_calls", None)
            self._settle_layouts(self.weight_format(), getattr(self, "_policy", DEFAULT_POLICY))

    def _weight_tensors(self, f) -> list[torch.Tensor]:
        """What the paths read as weights: the compressed tensors, their derived layouts, the
        kept dense copy and the bias (measure_paths evicts them before each timed call)."""
        tensors = [f] if isinstance(f, torch.Tensor) else [getattr(f, n) for n in f.tensor_names()]
        if not isinstance(f, torch.Tensor):
            tensors += f.derived_tensors()
        copy = self.__dict__.get("_dense_copy")
        if copy is not None:
            tensors.append(copy[1])
        if self.bias is not None:
            tensors.append(self.bias)
        return [t.detach() for t in tensors if t is not None]

    def _paths_allowed(self, f, policy: Policy, keeping_changes_call=None) -> set[str]:
        """The PATHS measured for a new bucket under `policy`: "sparse"; "sparse_kept" under
        never_slower where the budget drops a derived layout that the op would read here (and
        no bucket keeps them yet); "dense_copy" where a copy is allowed, else "decompress" (the
        same dense product plus a decompression per call, which could only win by the
        measurement's noise)."""
        allowed = {"sparse"}
        if policy.never_slower and self._derived_budget() is not None and f.budget_drops_derived() and \
                (keeping_changes_call is None or keeping_changes_call()):
            allowed.add("sparse_kept")
        allowed.add("dense_copy" if policy.never_slower or self._dense_copy_allowed(f, policy) else "decompress")
        return allowed

    def _dense_copy_allowed(self, f, policy: Policy) -> bool:
        """Whether "dense_copy" is a candidate path: any layer under Policy(dense_copy=True),
        else one whose dense weight is at most policy.dense_copy_max_bytes."""
        return policy.dense_copy or (policy.dense_copy_max_bytes is not None and
                                     self._dense_nbytes(f) <= policy.dense_copy_max_bytes)

    def _geometry(self) -> tuple:
        return (self._dense_shape(),)

    def _measure_start(self, policy: Policy, device: torch.device) -> bool | str:
        """How this layer's timed calls start (a key of STARTS): Policy.cold, with "auto"
        resolved from the model footprint note_model_footprint left on the layer (none: a
        layer on its own, measured from memory as before)."""
        if policy.cold != "auto":
            return policy.cold
        footprint = self.__dict__.get("_model_footprint")
        if footprint is not None and \
                footprint <= dispatch_rules.WARM_MODEL_LLC_FRACTION * _last_level_cache_bytes(device):
            return "llc"
        return True

    def _share_key(self, f, bucket: int, policy: Policy, start: bool | str) -> tuple:
        """What makes two layers' measurements interchangeable (see Policy.share)."""
        return (type(self).__name__, self._geometry(), kinds.kind_of(f).name, f.pattern, f.value_precision.name, round(float(f.density), 2), f.dtype,
                str(f.device), self.bias is not None, policy.dense_copy, start, policy.reps,
                policy.derived_budget, policy.dense_copy_max_bytes, policy.never_slower, bucket)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Compressed buffers change size with the data: adopt the saved tensors, check them.
        meta_key = prefix + "weight_meta"
        if meta_key in state_dict and not self.trainable:
            saved = state_dict[meta_key]
            # Any layer can hold a dense weight (Policy("dense")); a compressed one must be
            # of this layer's pattern kind.
            entry = kinds.KIND_OF_CODE.get(int(saved.reshape(-1)[0])) if saved.numel() else None
            if entry is None or (entry.format is not None and entry.name != kinds.parse(self.pattern).kind):
                kind = entry.name if entry is not None else None
                errors.append(f"{type(self).__name__} {prefix[:-1] or '<root>'}: state dict holds a weight of kind '{kind}' "
                              f"but this layer's pattern is {self.pattern!r}")
                return
            names = [k for k in state_dict if k.startswith(prefix + "weight_") and k != prefix + "weight_mask_bits"]
            dev = self._device()
            if local_metadata.get("assign_to_params_buffers", False) or dev is None or dev.type == "meta":
                # load_state_dict(assign=True), or a layer built on the meta device (structure
                # only): the saved tensors become the buffers where they are.
                new = {k[len(prefix):]: state_dict[k].detach() for k in names}
            else:
                new = {k[len(prefix):]: state_dict[k].detach().clone().to(dev) for k in names}
            # Validate before adopting anything: a corrupt or hostile file leaves the layer as it was.
            try:
                meta_ints = [int(v) for v in new["weight_meta"].reshape(-1).tolist()]
                cls = kinds.kind_of_code(meta_ints[0]).format
                if cls is None:
                    dense = new["weight_dense"]
                    if tuple(dense.shape) != self._dense_shape() or not dense.is_floating_point():
                        raise ValueError(f"weight_dense is {tuple(dense.shape)} {dense.dtype}, this layer needs a "
                                         f"floating {self._dense_shape()}")
                    f = dense
                else:
                    f = cls.from_tensors({n: new["weight_" + n] for n in cls.tensor_names_of(meta_ints[1:])},
                                         meta_ints=meta_ints[1:])
                    if tuple(f.shape) != (self._dense_shape()[0], self._in2d):
                        raise ValueError(f"the weight has shape {tuple(f.shape)}, this layer needs "
                                         f"{(self._dense_shape()[0], self._in2d)}")
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
                errors.append(f"{type(self).__name__} {prefix[:-1] or '<root>'}: corrupt or mismatched compressed "
                              f"weight: {type(e).__name__}: {e}")
                return
            for k in list(self._buffers):
                if k.startswith("weight_") and k != "weight_mask_bits":
                    del self._buffers[k]
            for k, t in new.items():
                self.register_buffer(k, t)
            self._meta_ints = meta_ints
            self.bucket_choices = {}
            self.__dict__.pop("_dense_copy", None)
            self._forget_calls()
            self.backend = "dense" if cls is None else self._sparse_backend(f, 1)
            self.reason = "loaded from a state dict"
            if cls is not None and f.quantized:
                self.__dict__["_quantize"] = (f.precision, f.group_size)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def take_pattern_of_weight(self):
        """Spells this layer's `pattern` as its stored weight does (a shell built from a saved
        weight_meta, which records the kind, learns the block shape from the tensors); returns
        self."""
        f = None if self.trainable else self.weight_format()
        if f is not None and not isinstance(f, torch.Tensor):
            kind, params = kinds.parse(f.pattern)
            self.pattern, self._block = f.pattern, kinds.KINDS[kind].block_of(params, self._block) or self._block
        return self

    def _device(self) -> torch.device | None:
        """Where this layer's tensors live: its bias, else its stored weight (weight_meta is
        an index, not a place)."""
        if self.bias is not None:
            return self.bias.device
        for k, t in itertools.chain(self._parameters.items(), self._buffers.items()):
            if t is not None and k != "weight_meta":
                return t.device
        return None

    def _init_weight(self, w2d, mask, trainable, policy, value_scales=None):
        pattern = kinds.parse(self.pattern)
        pattern.entry.check_mask(mask, pattern.params, self.pattern)
        if trainable:
            for name in list(self._buffers):
                if name.startswith("weight_"):
                    del self._buffers[name]
            self.weight = nn.Parameter((w2d * mask).clone().reshape(self._weight_shape()))
            self.register_buffer("weight_mask_bits", pack_bitmask(mask))
            self.backend, self.reason = "masked", "trainable: masked_linear in training mode"
        else:
            self._adopt_format(self._build_format(w2d.detach(), mask, value_scales), policy or DEFAULT_POLICY)

    def held_nbytes(self) -> int:
        """Bytes this module keeps beside its parameters and buffers: indexes derived from the
        compressed weight for a kernel (BitmaskWeight.column_index, NMWeight.gemm_panels) and
        the dense copy of Policy(dense_copy=True). Both are built on first use, so this grows
        as new batch buckets run; they are never saved. A trainable module also holds the
        compressed copy its eval mode runs (built at its first eval call)."""
        if self.trainable:
            f = self.__dict__.get("_packed_fmt")
            if isinstance(f, torch.Tensor):  # a masked dense weight (a gradual-pruning mask)
                return f.numel() * f.element_size()
            return 0 if f is None else f.nbytes + f.derived_nbytes
        f = self.weight_format()
        return (0 if isinstance(f, torch.Tensor) else f.derived_nbytes) + self._dense_copy_nbytes()

    def _dense_copy_nbytes(self) -> int:
        """Bytes of the kept dense copy (Policy(dense_copy=True)); 0 without one."""
        dense = self.__dict__.get("_dense_copy", (None, None))[1]
        return 0 if dense is None else dense.numel() * dense.element_size()

    def weight_nbytes(self) -> int:
        """Bytes the weight is stored in: the compressed format's, the dense weight's under the
        dense backend, or a trainable layer's dense weight plus its packed mask (derived
        indexes and dense copies are held_nbytes())."""
        if self.trainable:
            bits = self.weight_mask_bits
            return self.weight.numel() * self.weight.element_size() + bits.numel() * bits.element_size()
        f = self.weight_format()
        return f.numel() * f.element_size() if isinstance(f, torch.Tensor) else f.nbytes

    def describe(self) -> str:
        """Pattern, density, bytes, the kernel backend and the path chosen per batch bucket."""
        if self.trainable:
            density = self.kept_fraction()
            return f"pattern={self.pattern}, density={density:.3f}, backend=masked (training), " \
                   f"bytes={self.weight_nbytes()}"
        f = self.weight_format()
        nbytes = self.weight_nbytes()
        if isinstance(f, torch.Tensor):  # a meta tensor has no values to count
            density = float("nan") if f.is_meta else float((f != 0).float().mean())
        else:
            density = f.density
        values = "" if isinstance(f, torch.Tensor) or not f.quantized else \
            f", values={f.precision}" + (f" (group {f.group_size})" if f.group_size else "")
        text = f"pattern={self.pattern}, density={density:.3f}{values}, backend={self.backend}, compressed_bytes={nbytes}"
        budget = getattr(self, "_policy", DEFAULT_POLICY).derived_budget
        if not isinstance(f, torch.Tensor) and (f.derived_nbytes or budget is not None):
            # BitmaskWeight.column_index, NMWeight.gemm_panels: kept up to the policy's budget
            limit = "unlimited" if budget is None else int(budget * f.nbytes)
            beyond = "; kept beyond it: a bucket runs sparse_kept" if budget is not None and \
                self._derived_budget() is None else ""
            text += f", derived_index_bytes={f.derived_nbytes} (budget {limit}{beyond})"
        if self._dense_copy_nbytes():
            # The copy is derived from the compressed weight (rebuilt when it changes), never saved.
            text += (f", dense_copy_bytes={self._dense_copy_nbytes()} (a dense copy kept beside the compressed "
                     f"weight for the buckets that run it)")
        if self.bucket_choices:
            text += ", paths={" + "; ".join(
                f"rows<={b if b > 0 else 'inf'}: {c.path} ({c.reason}; {_source_text(c)})"
                for b, c in sorted(
                    self.bucket_choices.items(), key=lambda kv: kv[0] if kv[0] > 0 else float("inf"))) + "}"
        return text


def _source_text(choice: PathChoice) -> str:
    """Where a per-bucket choice came from and when it was measured (explain's words)."""
    when = "" if choice.measured_at is None else \
        time.strftime(" %Y-%m-%d %H:%M:%S UTC", time.gmtime(choice.measured_at))
    start = f", {STARTS[choice.start]}" if choice.start in STARTS else ""
    if choice.source == "cache":
        text = f"read from the tuning cache, measured{when}{start}"
        return text + ("; shared with an identical layer" if choice.shared else "")
    joined = f" (each path's fastest call over {choice.layers} identical layers)" if choice.layers > 1 else ""
    if choice.shared:
        return f"shared: measured on an identical layer{',' + when if when else ''}{joined}{start}"
    return (f"measured now,{when}" if when else "measured now") + joined + start


_version_of = operator.attrgetter("_version")


def _versions(tensors: tuple) -> tuple | None:
    """The in-place version counters of `tensors` (None when one is an inference tensor,
    whose edits are not counted)."""
    try:
        return tuple(map(_version_of, tensors))
    except RuntimeError:
        return None


# At most this many input shapes keep a cached call per layer (a model fed many sequence
# lengths starts over instead of growing).
MAX_KEPT_CALLS = 64


class _KeptCall(NamedTuple):
    call: Callable  # call(x, bias) -> y
    dtype: torch.dtype
    device: torch.device
    tensors: tuple  # the weight's tensors, whose version counters ...
    versions: tuple  # ... were these when the call was made
    has_bias: bool


def _kept_call_fresh_py(kept: _KeptCall, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """May `kept` run x now: x's dtype and device, no weight tensor edited in place since the
    call was made, and no gradient wanted. The shape is the cache's key."""
    if x.dtype is not kept.dtype or x.device != kept.device or _versions(kept.tensors) != kept.versions:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (kept.has_bias and bias.requires_grad)))


# The same check in one C call where the extension is built (csrc/kept_call_check.cpp): in
# Python it costs about 1 us a layer.
_kept_call_fresh = _extension.kept_call_check(_KeptCall._fields) or _kept_call_fresh_py


# The kept dense paths as closures: a call through a closure costs about 0.3 us less than
# through a NamedTuple's __call__, which on a small layer is a tenth of its fixed cost.
def _dense_call(weight: torch.Tensor, round_rows: bool = False) -> Callable:
    """F.linear on a kept dense copy, as a call(x, bias); round_rows: a quantized weight's x
    rounded as its integer kernels round it."""
    linear = torch.nn.functional.linear
    if round_rows:
        return lambda x, bias: linear(precisions.round_activation_rows(x), weight, bias)
    return lambda x, bias: linear(x, weight, bias)


def _dense_conv_call(weight: torch.Tensor, stride: tuple, padding: tuple, dilation: tuple) -> Callable:
    """F.conv2d on a kept dense copy, as a call(x, bias)."""
    conv2d = torch.nn.functional.conv2d
    return lambda x, bias: conv2d(x, weight, bias, stride, padding, dilation)


def _autocast_operands(device_type: str, *tensors):
    """The floating tensors (fp32, fp16, bf16; not fp64, as autocast leaves it) cast to the
    autocast dtype of device_type; None stays None."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                 else t for t in tensors)


class SparseLinear(_SparseMixin, nn.Module):
    """nn.Linear with a compressed weight. Build with `SparseLinear.from_dense(linear, ...)`.

    `transposed` is True when the layer it replaced was transformers' Conv1D, which stores
    its weight [in, out]: the compressed weight is [out, in] as for any Linear, to_dense()
    gives an nn.Linear, and sparsekern.dense_state_dict gives the weight back as Conv1D
    stores it. Not saved in the state dict: sparsekern.load reads it off the layer it
    replaces."""

    transposed = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 block: tuple[int, int] = (32, 32), device=None, dtype=None):
        super().__init__()
        kinds.parse(pattern, "SparseLinear")
        self.in_features, self.out_features, self.pattern, self._block = in_features, out_features, pattern, block
        self._in2d = in_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # An empty placeholder of the right pattern; from_dense or load_state_dict fills it.
        self._set_format(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.backend, self.reason = "dense", "not built from a weight yet"

    @classmethod
    def from_format(cls, weight, bias: torch.Tensor | None = None, policy: Policy | None = None) -> "SparseLinear":
        """A SparseLinear over an already compressed weight (NMWeight, BitmaskWeight or
        BlockWeight of shape [out, in]), e.g. one shard of a larger layer."""
        if not isinstance(weight, kinds.FORMATS):
            raise TypeError(f"SparseLinear.from_format: weight must be a sparsekern format, got {type(weight).__name__}")
        weight.validate()
        out, k = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out,)):
            raise ValueError(f"SparseLinear.from_format: bias must have shape ({out},)")
        kind, params = kinds.parse(weight.pattern)
        block = kinds.KINDS[kind].block_of(params, (32, 32)) or (32, 32)
        mod = cls(k, out, bias is not None, weight.pattern, block, device="meta", dtype=weight.dtype)
        mod._take_bias(bias, weight.device, weight.dtype)
        if weight.quantized:
            mod.__dict__["_quantize"] = (weight.precision, weight.group_size)
        mod._adopt_format(weight, policy or DEFAULT_POLICY)
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", mask: torch.Tensor | None = None,
                   method: str = "l1", sparsity: float | None = None, block: tuple[int, int] = (32, 32),
                   trainable: bool = False, policy: Policy | None = None, grad=None, act_norm=None,
                   quantize: str | None = None, group_size: int = 128,
                   value_scales: torch.Tensor | None = None) -> "SparseLinear":
        """Prune (unless `mask` is given) and compress `linear`'s weight; quantize: the kept
        values' precision (None, "int8", "int4" with group_size 32/64/128); value_scales:
        fixed scales for them (as sparsegpt_prune_model(quantize=...) chose them).
        `linear` may also be transformers' Conv1D (a mask is then given in its [in, out]
        layout; the result is transposed=True)."""
        transposed = is_conv1d(linear)
        if transposed:
            linear = linear_of(linear)
            mask = None if mask is None else mask.t().contiguous()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear or transformers' Conv1D, "
                            f"got {type(linear).__name__}")
        where = "SparseLinear.from_dense"
        kind, params = kinds.parse(pattern, where)
        w = linear.weight.detach()
        if mask is None:
            if hasattr(linear, "weight_mask"):
                mask = linear.weight_mask.bool()
            else:
                scores = prune.score(w, method, grad=grad, act_norm=act_norm)
                mask = kinds.KINDS[kind].mask(scores, params, sparsity, block, where)
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"SparseLinear.from_dense: mask must be bool of shape {tuple(w.shape)}")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, pattern, block,
                  device="meta", dtype=w.dtype)  # _init_weight below sets the weight (_take_bias)
        mod._set_quantize(quantize, group_size, where)
        mod._take_bias(linear.bias, w.device, w.dtype)
        mod._init_weight(w, mask, trainable, policy, value_scales)
        mod.transposed = transposed
        return mod

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def _dense_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept_call(x)
        if kept is not None:
            return kept.call(x, self._parameters["bias"] if kept.has_bias else None)
        if self.trainable or self.backend == "dense":
            return self._linear2d(x, self.bias)
        f = self.weight_format()
        rows = x.numel() // self.in_features if self.in_features else 0
        path = self._path_for(rows, lambda: {p: (lambda p=p: self._linear_path(p, x, f)) for p in PATHS},
                              lambda: ops.keeping_derived_changes_call(f.OP, x, f))
        y = self._linear_path(path, x, f)
        self._keep_call(x, path, f)
        return y

    def _linear_path(self, path: str, x: torch.Tensor, f) -> torch.Tensor:
        if path in ("sparse", "sparse_kept"):
            return self._sparse_call(path, f, lambda: ops.sparse_linear(x, f, self.bias))
        # a quantized weight's x rounded as its integer kernels round it, so every path agrees
        return _dense_call(self._dense_weight(path, f), ops.rounds_activations(f, x.device))(x, self.bias)

    def _call_to_keep(self, x, path: str, f, bias, tensors):
        if path == "dense_copy":
            return _dense_call(self._dense_weight(path, f), ops.rounds_activations(f, x.device))
        call = ops.sparse_linear_call(x, f, bias)
        # The derived layouts a "sparse_kept" layer keeps are built from the tensors whose
        # versions the kept call checks, so it may hold them too.
        held = {id(t) for t in tensors} | ({id(t) for t in f.derived_tensors()} if self._derived_budget() is None
                                           else set())
        if any(isinstance(a, torch.Tensor) and id(a) not in held for a in call.before_bias):
            return None  # e.g. a quantized block weight's values dequantized for the call
        return call.no_grad  # _kept_call runs it only where no gradient is wanted

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the zeros in place (also for a transposed layer: it computes
        what the Conv1D did)."""
        w = self.dense_weight_2d()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        conv1d = ", replaces a Conv1D (weight [in, out])" if self.transposed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{conv1d}, {self.describe()}"


class SparseConv2d(_SparseMixin, nn.Module):
    """nn.Conv2d with a compressed weight, run as im2col + the sparse linear kernels.

    The weight's 2-D view is [out, kh*kw*in] with input channels fastest, so N:M groups
    run along input channels at each kernel position. groups must be 1 and padding_mode
    'zeros' (other settings are refused at from_dense; sparsify leaves them dense).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 pattern: str = "2:4", block=(32, 32), device=None, dtype=None):
        super().__init__()
        kinds.parse(pattern, "SparseConv2d")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride), pair(padding),
                                                                       pair(dilation))
        self.pattern, self._block = pattern, block
        self._in2d = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self._set_format(torch.zeros(out_channels, self._in2d, device=device, dtype=dtype))
        self.backend, self.reason = "dense", "not built from a weight yet"

    @staticmethod
    def check_supported(conv: nn.Conv2d, pattern: str, block: tuple[int, int] = (32, 32)) -> None:
        """Raises ValueError (TypeError for a non-Conv2d) when `conv` cannot become a
        SparseConv2d of `pattern`: conv settings the kernels do not cover, or a weight
        whose 2-D view cannot hold the pattern (kinds.Kind.check_shape)."""
        where = "SparseConv2d.from_dense"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{where}: groups={conv.groups} (grouped/depthwise convolution) is not supported")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{where}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise ValueError(f"{where}: padding={conv.padding!r} strings are not supported; give ints")
        kind, params = kinds.parse(pattern, where)
        in2d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        kinds.KINDS[kind].check_shape(conv.out_channels, in2d, params, block, where, channels=conv.in_channels)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, pattern: str = "2:4", mask: torch.Tensor | None = None, method: str = "l1",
                   sparsity: float | None = None, block=(32, 32), trainable: bool = False,
                   policy: Policy | None = None, grad=None, act_norm=None, quantize: str | None = None,
                   group_size: int = 128, value_scales: torch.Tensor | None = None) -> "SparseConv2d":
        """Prune (unless `mask` is given) and compress `conv`'s weight; quantize as for
        SparseLinear.from_dense."""
        where = "SparseConv2d.from_dense"
        cls.check_supported(conv, pattern, block)
        kind, params = kinds.parse(pattern, where)
        w = conv.weight.detach()
        if mask is None:
            if hasattr(conv, "weight_mask"):
                mask = conv.weight_mask.bool()
            else:
                mask = kinds.KINDS[kind].mask(prune.score(w, method, grad=grad, act_norm=act_norm), params, sparsity,
                                              block, where)
        elif mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"SparseConv2d.from_dense: mask must be bool of shape {tuple(w.shape)}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, pattern, block, device="meta", dtype=w.dtype)  # see _take_bias
        mod._set_quantize(quantize, group_size, where)
        mod._take_bias(conv.bias, w.device, w.dtype)
        w2d, m2d = as_2d(w), as_2d(mask)
        mod._init_weight(w2d, m2d, trainable, policy, value_scales)
        return mod

    def _weight_shape(self):
        return (self.out_channels, self._in2d)

    def _geometry(self) -> tuple:
        return (self._dense_shape(), self.stride, self.padding, self.dilation)

    def _dense_shape(self) -> tuple:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept_call(x)  # keyed by x's whole shape: channels checked when it was kept
        if kept is not None:
            return kept.call(x, self._parameters["bias"] if kept.has_bias else None)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.trainable and self.training:
            # Masked fine-tuning: the dense convolution of W*M (autograd masks the weight's
            # gradient through the product), which is what oneDNN/cuDNN run fastest.
            w4 = self._to4d(self.training_weight() * self.mask().to(self.weight.dtype))
            return self._dense_conv(x, w4)
        f = None if self.trainable else self.weight_format()
        if isinstance(f, torch.Tensor):  # backend "dense": the original convolution
            return self._dense_conv(x, f)
        if self.trainable:  # eval mode of a trainable module: its compressed copy
            g = self._packed()
            if isinstance(g, torch.Tensor):
                return self._conv(x, lambda cols: torch.nn.functional.linear(cols, g, self.bias))
            g = g.dequantized()  # exact products, as the training forward and _conv_path
            return self._conv(x, lambda cols: ops.sparse_linear(cols, g, self.bias))
        # The bucket counts rows of the im2col matrix: images x output pixels.
        rows = x.shape[0] * math.prod(self._out_hw(x.shape[2], x.shape[3]))
        path = self._path_for(rows, lambda: {p: (lambda p=p: self._conv_path(p, x, f)) for p in PATHS},
                              self._conv_keeping_changes_call(x, f))
        y = self._conv_path(path, x, f)
        self._keep_call(x, path, f)
        return y

    def _call_to_keep(self, x, path: str, f, bias, tensors):
        # The dense copy's convolution; the sparse path (patches, then the op) is not cached.
        if path != "dense_copy":
            return None
        # A channels-last view of the kept [out, kh*kw*in] copy (no second copy), the layout
        # sparsify gives the dense convolutions it keeps on the CPU.
        kh, kw = self.kernel_size
        w4 = self._dense_weight(path, f).view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        return _dense_conv_call(w4, self.stride, self.padding, self.dilation)

    def _conv_path(self, path: str, x: torch.Tensor, f) -> torch.Tensor:
        if path in ("sparse", "sparse_kept"):
            if f.OP == "nm_linear" and ops.backend_for("nm_conv2d", x, f) == "cpp":
                # The C++ convolution gathers its patches from the channels-last input itself.
                return self._sparse_call(path, f, lambda: ops.nm_conv2d(x, f, self.kernel_size, self.bias,
                                                                        self.stride, self.padding, self.dilation))
            if f.quantized:
                # Convolutions multiply x exactly on every path (the dense ones run F.conv2d),
                # so integer values are dequantized per call rather than run by the quantized
                # linear ops, whose integer kernels would round each patch row
                # (ops.rounds_activations).
                g = f.dequantized()
                return self._conv(x, lambda cols: ops.sparse_linear(cols, g, self.bias))
            return self._sparse_call(path, f, lambda: self._conv(x, lambda cols: ops.sparse_linear(cols, f, self.bias)))
        return self._dense_conv(x, self._to4d(self._dense_weight(path, f)))

    def _conv_keeping_changes_call(self, x: torch.Tensor, f):
        """keeping_changes_call for _path_for: the C++ 2:4 convolution's (nm_conv2d) decision;
        None (it may) for the im2col paths, whose rows are known only once the patches are."""
        if f.OP == "nm_linear" and ops.backend_for("nm_conv2d", x, f) == "cpp":
            return lambda: ops.keeping_derived_changes_call("nm_conv2d", x, f, self.kernel_size, self.bias,
                                                            self.stride, self.padding, self.dilation)
        return None

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return tuple(conv_output_size(size, *geo) for size, *geo in
                     zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))

    def _to4d(self, w2d: torch.Tensor) -> torch.Tensor:
        return from_2d(w2d, (self.out_channels, self.in_channels, *self.kernel_size))

    def _dense_conv(self, x, w4):
        return torch.nn.functional.conv2d(x, w4, self.bias, self.stride, self.padding, self.dilation)

    def _set_format(self, fmt) -> None:
        # A dense weight is kept in nn.Conv2d's own layout so the dense path is the plain conv.
        if isinstance(fmt, torch.Tensor) and fmt.dim() == 2:
            fmt = self._to4d(fmt)
        super()._set_format(fmt)

    def _conv(self, x: torch.Tensor, linear2d) -> torch.Tensor:
        """The convolution as one matrix product over channels-last patches: rows are
        (image, output pixel), columns (kh, kw, C) with C fastest, the weight's 2-D layout.
        A 1x1 convolution of a channels-last input needs no copy at all (its patches are the
        input itself), and any other is one strided copy of the padded channels-last input
        (no unfold + permute). The result is returned channels-last, so the next layer gets
        its input in the layout it reads without a copy."""
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = self._out_hw(h, w)
        xl = x.permute(0, 2, 3, 1)  # [N, H, W, C]: a view, contiguous when x is channels-last
        if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
            cols = (xl if (sh, sw) == (1, 1) else xl[:, ::sh, ::sw, :]).reshape(-1, c)
        else:
            if ph or pw:
                xl = torch.nn.functional.pad(xl, (0, 0, pw, pw, ph, ph))
            xl = xl.contiguous()
            s_n, s_h, s_w, s_c = xl.stride()
            patches = xl.as_strided((n, oh, ow, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
            cols = patches.reshape(-1, self._in2d)
        y = linear2d(cols)
        return y.reshape(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def to_dense(self) -> nn.Conv2d:
        w = from_2d(self.dense_weight_2d(), (self.out_channels, self.in_channels, *self.kernel_size))
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {self.describe()}")


SPARSE_MODULES = (SparseLinear, SparseConv2d)


def model_weight_bytes(model: nn.Module) -> int:
    """The bytes of weights a forward of `model` reads: every parameter and buffer once (a
    sparse layer's compressed tensors, the dense layers, norms), torch's dynamic int8 Linear
    layers at one byte per weight, and no embedding tables (a forward reads only the rows it
    looks up)."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    seen: set[int] = set()
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for m in model.modules():
        if hasattr(m, "_packed_params") and isinstance(getattr(m, "in_features", None), int):
            total += m.in_features * m.out_features  # torch.ao dynamic int8 Linear: packed, not a parameter
    return total


def model_footprint(model: nn.Module) -> int:
    """The most bytes of weights a forward of `model` can read: model_weight_bytes, with each
    sparse layer counted at the larger of what it holds and its dense weight (a layer may
    choose to run a dense copy, Policy.never_slower), so a model said to fit a cache fits it
    whatever its layers choose."""
    total = model_weight_bytes(model)
    for m in model.modules():  # each module once, whatever paths reach it
        if isinstance(m, SPARSE_MODULES) and not m.trainable:
            held = sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
            total += max(0, m._dense_nbytes(m.weight_format()) - held)
    return total


def note_model_footprint(model: nn.Module) -> int:
    """Tells every sparse layer of `model` the most bytes of weights the model reads per
    forward (model_footprint), from which Policy(cold="auto") decides how the layer's
    paths are measured: from the last-level cache where the model fits in
    dispatch_rules.WARM_MODEL_LLC_FRACTION of it, else from memory. Choices already made
    stay. sparsify, tune, freeze and load call it; call it again after changing a model by
    hand. Returns the bytes."""
    total = model_footprint(model)
    for m in model.modules():
        if isinstance(m, SPARSE_MODULES):
            m.__dict__["_model_footprint"] = total
    return total
