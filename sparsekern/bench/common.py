"""What every benchmark row records: the environment (versions, commit, device), timing
quantiles in one unit (milliseconds, converted here and nowhere else), and the JSON file
the rows are stored in.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess

import torch

from .. import __version__, _extension


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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str = "cpu") -> dict:
    """Date, commit, versions, threads, CPU (and GPU) names and the extension's build info;
    `device_name` is the GPU's name on CUDA, else the CPU's."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "sparsekern": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "build": _extension.BUILD_INFO,
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


def quantiles(samples_s: list[float]) -> dict:
    """Seconds -> {'median_ms', 'p20_ms', 'p80_ms'}."""
    qs = statistics.quantiles(samples_s, n=10, method="inclusive") if len(samples_s) > 1 else samples_s * 9
    return {"median_ms": statistics.median(samples_s) * 1e3, "p20_ms": qs[1] * 1e3, "p80_ms": qs[7] * 1e3}


def write_json(path: str, env: dict, rows: list[dict]) -> None:
    """{"environment": env, "rows": rows} to path (folders made as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
