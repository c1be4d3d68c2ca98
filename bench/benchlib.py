"""Shared benchmark helpers: environment record, timing, units, tables, JSON rows.

Every row names op, provider, pattern, density, dtype, shape, batch, device, versions
and commit, and gives the median with 20th/80th percentiles in milliseconds (one unit
for every file, converted here and nowhere else) plus achieved GB/s.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

import sparsekern


def commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL, cwd=os.path.dirname(__file__)).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=os.path.dirname(__file__),
                                stderr=subprocess.DEVNULL) != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "sparsekern": sparsekern.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "build": sparsekern._extension.BUILD_INFO,
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quantiles(samples_s: list[float]) -> dict:
    """Seconds -> {'median_ms', 'p20_ms', 'p80_ms'}."""
    qs = statistics.quantiles(samples_s, n=10, method="inclusive") if len(samples_s) > 1 else samples_s * 9
    return {"median_ms": statistics.median(samples_s) * 1e3, "p20_ms": qs[1] * 1e3, "p80_ms": qs[7] * 1e3}


def time_rotating_cpu(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """fns: name -> list of zero-argument callables (one per rotated weight copy).

    Providers are interleaved: each repetition times one pass of every provider over
    all its copies, so slow drifts of the machine hit all providers alike. Returns
    seconds per call for each pass.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + reps):
        for name, calls in fns.items():
            t0 = time.perf_counter()
            for c in calls:
                c()
            dt = (time.perf_counter() - t0) / len(calls)
            if rep >= warmup:
                samples[name].append(dt)
    return samples


def progress(i: int, total: int, what: str) -> None:
    print(f"\r[{i}/{total}] {what:<60}", end="" if i < total else "\n", flush=True)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, env: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
