"""Measured backend timings on GPUs: a table of median times per (op, GPU, dtype, batch bucket,
weight shape) and backend. The table only stores; sparsekern/dispatch_rules.py decides from it
(`measured_verdict`, `fastest_within` with its TUNING_NOISE margin).

Without measurements the static rules of sparsekern/dispatch_rules.py decide (the backend
order; large-batch buckets go to the 2:4 sparse tensor-core GEMMs). With them, a backend that
can run but measured slower than another one for the same key is passed over, and
explain_backend says so with both times ("measured: cuda 0.0123 ms, cusparselt 0.0410 ms").

Where timings come from: bench/bench_gpu_linear.py times every provider with CUDA events
around CUDA-graph replays on weights rotated beyond L2 and writes them with `--tuning-out`;
`load(path)` (or SPARSEKERN_TUNING=path in the environment) reads them, `record` adds rows
directly (tests inject timings that way). Host wall-clock time is never used.

Keys: op ("nm_linear"), device name as torch.cuda.get_device_name reports it, dtype name
("bfloat16"), batch bucket (sparsekern.ops.batch_bucket: 1, 4, 16, 64, 256 or -1 above),
weight shape (out, in) or None for "any shape" (a row for the exact shape wins over it).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

# (op, device name, dtype name, bucket, shape or None) -> {backend: median ms}
_TABLE: dict[tuple, dict[str, float]] = {}
_env_loaded = False


def _key(op: str, device_name: str, dtype, bucket: int, shape) -> tuple:
    dt = str(dtype).replace("torch.", "")
    return (op, device_name, dt, int(bucket), None if shape is None else (int(shape[0]), int(shape[1])))


def record(op: str, device_name: str, dtype, bucket: int, shape, medians_ms: dict[str, float]) -> None:
    """Adds (merges) the median times of backends for one key. shape: (out, in) or None."""
    for b, t in medians_ms.items():
        if not (isinstance(t, (int, float)) and t > 0):
            raise ValueError(f"tuning.record: median of {b!r} must be a positive number of ms, got {t!r}")
    _TABLE.setdefault(_key(op, device_name, dtype, bucket, shape), {}).update(
        {b: float(t) for b, t in medians_ms.items()})


def clear() -> None:
    """Forget every timing (the caller also calls sparsekern.ops.clear_decisions())."""
    global _env_loaded
    _TABLE.clear()
    _env_loaded = True  # an explicit clear also drops what SPARSEKERN_TUNING named


def rows() -> list[dict]:
    """The table as JSON-ready rows (what `save` writes)."""
    out = []
    for (op, dev, dt, bucket, shape), med in sorted(_TABLE.items(), key=repr):
        out.append({"op": op, "device": dev, "dtype": dt, "bucket": bucket,
                    "shape": None if shape is None else list(shape), "median_ms": dict(med)})
    return out


def save(path: str, extra_rows: Iterable[dict] = ()) -> None:
    with open(path, "w") as f:
        json.dump({"format": "sparsekern-tuning-1", "rows": rows() + list(extra_rows)}, f, indent=1)


def load(path: str) -> int:
    """Reads a file written by `save` (or bench_gpu_linear.py --tuning-out); returns rows read."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != "sparsekern-tuning-1":
        raise ValueError(f"tuning.load: {path} is not a sparsekern tuning file (format sparsekern-tuning-1)")
    n = 0
    for r in data.get("rows", []):
        record(r["op"], r["device"], r["dtype"], r["bucket"], r.get("shape"), r["median_ms"])
        n += 1
    return n


def _maybe_load_env() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        path = os.environ.get("SPARSEKERN_TUNING")
        if path:
            load(path)


def lookup(op: str, device_name: str, dtype, bucket: int, shape) -> dict[str, float] | None:
    """Medians for the key (the exact shape first, then the shape-free row), or None."""
    _maybe_load_env()
    for s in ((shape, None) if shape is not None else (None,)):
        med = _TABLE.get(_key(op, device_name, dtype, bucket, s))
        if med:
            return med
    return None
