"""What every benchmark row records, and how every benchmark times: the environment
(versions, commit, device, machine load), timing quantiles in one unit (milliseconds,
converted here and nowhere else), the interleaved timing loop with its noise floor, and
the JSON file the rows are stored in.

Timing you can trust (used by the suite, the scripts in bench/ and the demo):

- `interleaved(calls, rounds)`: every variant is called once per round, in an order shuffled
  each round (seeded), so machine noise, frequency changes, warm-up and whatever ran just
  before land on all variants alike (a fixed or rotated order always puts the same
  predecessor before a variant: the second dense run would always follow the first).
  One sample per variant per round.
- The baseline (dense) is timed twice in the same loop, as two variants ("dense" and
  "dense (again)"): their difference is the noise floor of that run.
- `compare(samples, baseline, again)`: median and p20/p80 of each variant, the speed-up
  over the baseline (ratio of medians) with p20/p80 of the per-round paired ratios, the
  noise floor, and a verdict: "faster", "slower" or "no difference" -- a ratio is no
  difference when it is within the noise floor (at least NOISE_MIN) of 1, or when the
  per-round ratios' p20-p80 range contains 1.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time

import torch

from .. import _extension
from ..decisions import cpu_model
from ..reporting import ratio_number


def version() -> str:
    """The installed sparsekern's version (its package metadata, which setup.py takes from
    sparsekern.__version__; read here rather than imported from the package face, a higher
    layer), or "unknown" for a source tree that was never installed."""
    try:
        return importlib.metadata.version("sparsekern")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def commit() -> str:
    """The git commit of the sparsekern source (with -dirty), or "unknown" outside a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL, cwd=here).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=here, stderr=subprocess.DEVNULL) != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    return cpu_model()


def environment(device: str = "cpu") -> dict:
    """Date, commit, versions, threads, CPU (and GPU) names and the extension's build info;
    `device_name` is the GPU's name on CUDA, else the CPU's."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "sparsekern": version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "build": _extension.BUILD_INFO,
        "machine": machine(),
        # The instruction sets in use when a run pins them (None: each library's own choice):
        # the kernels' (SPARSEKERN_CPU_ISA=avx2|generic) and MKL's (MKL_ENABLE_INSTRUCTIONS).
        "SPARSEKERN_CPU_ISA": os.environ.get("SPARSEKERN_CPU_ISA"),
        "MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        # libgomp's idle workers spin (unset, ACTIVE) or sleep (PASSIVE); it decides how a
        # busy machine's other process shares the cores (docs/DISPATCH.md), and with PASSIVE the
        # kernels run every job on their own pool. SPARSEKERN_POOL pins the pool's mode.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "SPARSEKERN_POOL": os.environ.get("SPARSEKERN_POOL"),
        # Fixes the kernels' verdict of a contended machine (csrc/cpu/contention.cpp).
        "SPARSEKERN_CONTENTION": os.environ.get("SPARSEKERN_CONTENTION"),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    env["device_name"] = env.get("gpu") or env["cpu"]
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def machine() -> dict:
    """Host, logical CPUs and load averages (1, 5, 15 min) now: on a shared machine the load
    says how much other work ran beside the benchmark."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "loadavg": load}


def pick_threads(arg: str | int | None = "auto") -> tuple[int, str]:
    """Intra-op threads for a run: an int as given, or "auto": torch's default, except on a
    machine already busier than its CPUs (1-minute load average above the CPU count), where
    1 thread: threads of one op wait for each other at every parallel region, and when the
    others' CPUs are taken that waiting makes small ops 10-100x slower and timings useless.
    Returns (threads, why); sets torch.set_num_threads."""
    default = torch.get_num_threads()
    if arg in (None, "auto"):
        load = machine()["loadavg"]
        cpus = os.cpu_count() or 1
        if load and default > 1 and load[0] > cpus:
            n, why = 1, (f"auto: 1 thread, the machine is busy (load average {load[0]:.1f} on {cpus} CPUs; "
                         f"--threads {default} to use torch's default)")
        else:
            n, why = default, f"auto: torch's default ({default})"
    else:
        n = int(arg)
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {arg!r}")
        why = "as given"
    torch.set_num_threads(n)
    return n, why


def quantiles(samples_s: list[float]) -> dict:
    """Seconds -> {'median_ms', 'p20_ms', 'p80_ms'}."""
    qs = statistics.quantiles(samples_s, n=10, method="inclusive") if len(samples_s) > 1 else samples_s * 9
    return {"median_ms": statistics.median(samples_s) * 1e3, "p20_ms": qs[1] * 1e3, "p80_ms": qs[7] * 1e3}


def write_json(path: str, env: dict, rows: list[dict]) -> None:
    """{"environment": env, "rows": rows} to path (folders made as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)


def ratio_text(r: dict) -> str:
    """A compared row (compare()) as the bench scripts' console columns: x dense, the per-round
    p20-p80, the noise floor and the verdict; the numbers as reporting.ratio_number writes
    every speed-up (reporting.ratio_text is the one-cell form the tables use)."""
    floor = r.get("noise_floor")
    rng = f"{ratio_number(r['speedup_p20'])}-{ratio_number(r['speedup_p80'])}"
    return (f"{ratio_number(r['speedup']):>7} {rng:>14} {'' if floor is None else f'{floor:.1%}':>6} "
            f"{r['verdict']}")


def write_progress(path: str | None, env: dict, rows: list[dict]) -> None:
    """write_json with the load average at the time, when there is a path: called after every
    case, a run cut short keeps what it measured."""
    if path:
        env["loadavg_end"] = list(os.getloadavg())
        write_json(path, env, rows)


# ------------------------------------------------------------------- interleaved timing
NOISE_MIN = 0.02  # a ratio within 2% of 1 is never called a difference (also nn.choose_path's tie)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(calls: dict, rounds: int, device: str = "cpu", warmup: bool = True,
                seed: int = 0, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed round-robin.

    calls: name -> a callable, or a list of callables (e.g. the same op over rotated weight
    copies): one sample is one pass over the list, divided by its length. Each round calls
    every variant once, in an order shuffled each round (random.Random(seed)); with `warmup`
    every variant is called once, untimed, first. On CUDA the device is synchronized around
    each sample. `clock` reads seconds (time.thread_time counts only the calling thread's
    CPU time: on a shared machine, single-threaded CPU runs without the time spent waiting
    for a core)."""
    names = list(calls)
    fns = {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in calls.items()}
    if warmup:
        for k in names:
            fns[k][0]()
    out = {k: [] for k in names}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for k in order:
            _sync(device)
            t = clock()
            for f in fns[k]:
                f()
            _sync(device)
            out[k].append((clock() - t) / len(fns[k]))
    return out


def verdict(speedup: float, p20: float, p80: float, noise_floor: float) -> str:
    """"faster", "slower" or "no difference" (within max(noise_floor, NOISE_MIN) of 1, or
    the per-round ratios' p20-p80 range contains 1)."""
    if abs(speedup - 1) <= max(noise_floor, NOISE_MIN) or p20 <= 1 <= p80:
        return "no difference"
    return "faster" if speedup > 1 else "slower"


def compare(samples: dict[str, list[float]], baseline: str, again: str | None = None) -> dict[str, dict]:
    """Per variant: quantiles (ms), `speedup` (baseline median / variant median; >1 is
    faster), `speedup_p20`/`speedup_p80` (of the per-round ratios baseline_i / variant_i,
    paired by round), `noise_floor` (|1 - baseline/again| of the medians; None without
    `again`) and `verdict` ("baseline" for the baseline itself). `rounds` is the number of
    samples."""
    med = {k: statistics.median(v) for k, v in samples.items()}
    floor = abs(1 - med[baseline] / med[again]) if again else None
    out = {}
    for k, v in samples.items():
        ratios = [b / x for b, x in zip(samples[baseline], v) if x > 0]
        rq = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else ratios * 9
        sp = med[baseline] / med[k]
        out[k] = {**quantiles(v), "rounds": len(v), "speedup": sp, "speedup_p20": rq[1], "speedup_p80": rq[7],
                  "noise_floor": floor,
                  "verdict": "baseline" if k == baseline else verdict(sp, rq[1], rq[7], floor or 0.0)}
    return out


def time_variants(calls: dict, rounds: int, baseline: str, again: str | None = None, device: str = "cpu",
                  warmup: bool = True) -> dict[str, dict]:
    """interleaved() then compare(): the whole measurement of one comparison."""
    return compare(interleaved(calls, rounds, device, warmup), baseline, again)


# ------------------------------------------------------------------ how layers ran
def path_summary(model: torch.nn.Module, rows: int | None = None) -> str:
    """How a model's sparse layers run, per batch bucket, from the choices they made
    (nn's per-bucket paths), e.g. "24 layers, backend cpp; rows<=1: sparse 24;
    rows<=256: decompress 20, sparse 4"; with `rows`, only the bucket of that many rows.
    "dense weight" counts layers that keep a dense weight (Policy("dense"), pattern "dense")."""
    from collections import Counter, defaultdict

    from ..nn import SPARSE_MODULES
    from ..ops import batch_bucket

    only = None if rows is None else batch_bucket(rows)

    layers, backends, dense = 0, Counter(), 0
    buckets: dict[int, Counter] = defaultdict(Counter)
    for mod in model.modules():
        if not isinstance(mod, SPARSE_MODULES):
            continue
        layers += 1
        if mod.backend == "dense":
            dense += 1
            continue
        backends[mod.backend] += 1
        for bucket, choice in mod.bucket_choices.items():
            if only is None or bucket == only:
                buckets[bucket][choice.path] += 1
    if not layers:
        return "no sparse layers"
    parts = [f"{layers} layers, backend " + ", ".join(f"{b} {n}" if len(backends) > 1 else b
                                                       for b, n in backends.most_common())]
    if dense:
        parts[0] += f" ({dense} dense weight)"
    for bucket in sorted(buckets, key=lambda b: b if b > 0 else float("inf")):
        parts.append(f"rows<={bucket if bucket > 0 else 'inf'}: " +
                     ", ".join(f"{p} {n}" for p, n in buckets[bucket].most_common()))
    return "; ".join(parts)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out is not finite)."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype, torch_err: float) -> float:
    """The test suite's rule for a result against the fp64 reference: at most 2x the error
    of torch's own dense computation in that dtype, and in fp32 at least 1e-5 relative
    (the op tests' fp32 bound)."""
    return max(2 * torch_err, 1e-5) if dtype == torch.float32 else 2 * torch_err + 1e-6


def sparse_layer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the sparse layers store, bytes their dense weights would take)."""
    from ..nn import SPARSE_MODULES

    stored = dense = 0
    for mod in model.modules():
        if isinstance(mod, SPARSE_MODULES) and not mod.trainable:
            f = mod.weight_format()
            stored += mod.weight_nbytes()
            if isinstance(f, torch.Tensor):  # a dense weight (Policy("dense"), pattern "dense")
                dense += f.numel() * f.element_size()
            else:  # a format: shape is the weight's 2-D view [out, in]
                dense += f.shape[0] * f.shape[1] * f.dtype.itemsize
    return stored, dense


# ------------------------------------------------------------ model-level comparisons
def stores_integer_values(model: torch.nn.Module) -> bool:
    """Whether any sparse layer of model keeps its values as integers (int8, int4)."""
    from ..nn import SPARSE_MODULES

    for mod in model.modules():
        if isinstance(mod, SPARSE_MODULES) and not mod.trainable:
            f = mod.weight_format()
            if not isinstance(f, torch.Tensor) and f.value_precision.qmax:  # an integer grid
                return True
    return False


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """torch's one-line int8 dynamic quantization of model's nn.Linear layers, on the x86
    engine where it exists (what a user of an x86 CPU sets: fbgemm + onednn)."""
    import warnings

    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def check_model(make_workloads, base: torch.nn.Module, model: torch.nn.Module, dense_state: dict | None,
                what: str, activations_quantized: bool | None = None) -> dict:
    """Every workload of `model` (a sparse variant of `base`, or base itself) against the
    fp64 masked dense reference: a float64 copy of `base` holding `dense_state` (the
    variant's weights decompressed, zeros in place), with the test suite's tolerance
    (`tolerance`: 2x the error of torch's own masked dense model in the model's dtype, in
    fp32 at least 1e-5). make_workloads(model) -> list of models.Workload. The variant's
    first call of each workload is timed and returned (`first_call_s`): it is where sparse
    layers measure their paths for that batch bucket. Raises when the variant is off.
    activations_quantized: the variant's int8 kernels may quantize activations per row (the
    2:4 int8 dot-product GEMM does), so the bound is also at least 2x the error of torch's
    int8 dynamic quantization of the same weights (int8_dynamic on the reference model).
    None: whether any sparse layer of `model` stores integer values.
    Returns {"rel_err", "torch_rel_err", "tolerance", "first_call_s"}."""
    import copy

    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    if activations_quantized is None:
        activations_quantized = stores_integer_values(model)
    first_s, outs = [], []
    for wl in make_workloads(model):
        t = time.perf_counter()
        outs.append(wl.run())
        first_s.append(time.perf_counter() - t)
    ref = copy.deepcopy(base)
    if dense_state is not None:
        ref.load_state_dict(dense_state)
    torch_outs = [wl.run() for wl in make_workloads(ref)]
    int8_outs = ([wl.run() for wl in make_workloads(int8_dynamic(copy.deepcopy(ref).float()))]
                 if activations_quantized else [None] * len(torch_outs))
    ref.double()
    worst = (0.0, 0.0, 0.0)
    for y, torch_out, int8_out, wl64 in zip(outs, torch_outs, int8_outs, make_workloads(ref)):
        r64 = wl64.run()
        torch_err = rel_err(torch_out, r64)
        if int8_out is not None:
            torch_err = max(torch_err, rel_err(int8_out, r64))
        err, tol = rel_err(y, r64), tolerance(dtype, torch_err)
        if not err <= tol:
            raise RuntimeError(f"{what} {wl64.metric}: relative error {err:.2e} against the fp64 masked dense "
                               f"reference exceeds {tol:.1e} (2x torch's own {torch_err:.1e}"
                               f"{', int8 dynamic included' if int8_out is not None else ''}); not timing it")
        worst = max(worst, (err, torch_err, tol))
    del ref
    return {"rel_err": worst[0], "torch_rel_err": worst[1], "tolerance": worst[2], "first_call_s": first_s}


def time_workloads(loads: dict[str, list], rounds: int, device: str = "cpu", baseline: str = "dense",
                   again: str = "dense (again)", min_sample_s: float = 0.05) -> list[dict[str, dict]]:
    """loads: variant -> its workloads (models.Workload, the same jobs in the same order for
    every variant). Per workload, all variants and the baseline a second time (`again`, the
    noise floor) timed interleaved, `rounds` rounds (warm them first); compare()'s result
    per workload, plus `calls_per_sample`: a job shorter than `min_sample_s` is called
    several times per sample (one scheduler time slice lost in a 1 ms sample would be a
    large error), the times reported per call."""
    out = []
    for i in range(len(loads[baseline])):
        fn = loads[baseline][i].run
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        inner = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t, 1e-6)))
        calls = {baseline: [fn] * inner, again: [fn] * inner}
        calls.update({v: [wls[i].run] * inner for v, wls in loads.items() if v != baseline})
        res = time_variants(calls, rounds, baseline, again, device, warmup=False)
        for r in res.values():
            r["calls_per_sample"] = inner
        out.append(res)
    return out
