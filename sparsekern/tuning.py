"""Measured backend choice on GPUs: a table of median times per (op, GPU, dtype, batch bucket,
weight shape) and backend, read by sparsekern.ops' dispatch.

Without measurements the dispatcher's static rules decide (sparsekern/ops.py: the backend
order, sparsekern/semi_structured.py: large-batch buckets go to the 2:4 sparse tensor-core
GEMMs). With them, a backend that can run but measured slower than another one for the same
key is passed over, and explain_backend says so with both times ("measured: cuda 0.0123 ms,
cusparselt 0.0410 ms").

Where timings come from: bench/bench_gpu_linear.py times every provider with CUDA events
around CUDA-graph replays on weights rotated beyond L2 and writes them with `--tuning-out`;
`load(path)` (or SPARSEKERN_TUNING=path in the environment) reads them, `record` adds rows
directly (tests inject timings that way). Host wall-clock time is never used.

Keys: op ("nm_linear"), device name as torch.cuda.get_device_name reports it, dtype name
("bfloat16"), batch bucket (sparsekern.ops.batch_bucket: 1, 4, 16, 64, 256 or -1 above),
weight shape (out, in) or None for "any shape" (a row for the exact shape wins over it).
The choice (`choose`) is a pure function of the medians: the fastest, unless the first
backend in dispatch order is within `NOISE` of it (noise is not a reason to switch).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

NOISE = 0.03  # relative: two runs of one kernel on a lent H100 differ by about this much

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


def choose(medians_ms: dict[str, float], order: Iterable[str] = (), noise: float = NOISE) -> str:
    """The backend to run: the fastest median, except that the earliest backend of `order`
    within `noise` (relative) of the fastest keeps its place."""
    if not medians_ms:
        raise ValueError("tuning.choose: no timings")
    best = min(medians_ms, key=medians_ms.get)
    for b in order:
        if b in medians_ms and medians_ms[b] <= medians_ms[best] * (1 + noise):
            return b
    return best


def lookup(op: str, device_name: str, dtype, bucket: int, shape) -> dict[str, float] | None:
    """Medians for the key (the exact shape first, then the shape-free row), or None."""
    _maybe_load_env()
    for s in ((shape, None) if shape is not None else (None,)):
        med = _TABLE.get(_key(op, device_name, dtype, bucket, s))
        if med:
            return med
    return None


def verdict(op: str, backend: str, device_name: str, dtype, bucket: int, shape,
            order: Iterable[str] = ()) -> str | None:
    """None when the table has nothing against `backend` for this key (it was not measured,
    or it measured fastest); else the reason it is passed over, with the times."""
    med = lookup(op, device_name, dtype, bucket, shape)
    if not med or backend not in med:
        return None
    chosen = choose(med, order)
    if chosen == backend:
        return None
    times = ", ".join(f"{b} {t:.4f} ms" for b, t in sorted(med.items(), key=lambda kv: kv[1]))
    return f"measured slower on {device_name} for this batch bucket ({times})"


def prefers(op: str, backend: str, device_name: str, dtype, bucket: int, shape, order: Iterable[str] = ()) -> bool:
    """True when the table measured `backend` and chose it for this key."""
    med = lookup(op, device_name, dtype, bucket, shape)
    return bool(med) and backend in med and choose(med, order) == backend
