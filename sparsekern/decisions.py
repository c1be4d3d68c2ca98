"""The on-disk tuning cache: per-bucket path choices of sparse modules (sparsekern.nn) kept
across processes, so a second process's first call measures nothing.

Where: $SPARSEKERN_TUNING_CACHE if set (a folder; "off" or "0" disables the cache), else
$SPARSEKERN_CACHE (sparsekern's cache folder), else $XDG_CACHE_HOME/sparsekern, else
~/.cache/sparsekern. One JSON file per environment: the
file name is a hash of `environment(device)` (CPU model or GPU name, the ISA the kernels
run, torch threads, torch version, sparsekern version, the compiled extension's size and
modification time, the dispatch rules' source), and the file repeats the environment, so
a foreign file is recognised and ignored. Each entry is keyed by what the caller says makes
two layers' measurements interchangeable (sparsekern.nn: module type and geometry, format,
pattern, value precision, density, dtype, bias, policy and batch bucket) and holds the
chosen path, the reason, the measured times and when they were measured.

Writes are atomic (a temporary file in the same folder, then os.replace) and merge what
another process wrote meanwhile. A corrupt, foreign or unreadable file is ignored with one
warning, never an exception; a folder that cannot be written disables writing with one
warning. Nothing here measures: it only stores (sparsekern/dispatch_rules.py decides, nn
measures).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
import warnings

import torch

from . import _extension, dispatch_rules

FORMAT = "sparsekern-decisions-1"
ENV_VAR = "SPARSEKERN_TUNING_CACHE"
_OFF = ("off", "0", "false", "no")

# (folder, file name) -> {entry key: entry}; read once per process, updated by store()
_FILES: dict[tuple[str, str], dict[str, dict]] = {}
_WARNED: set = set()
_STATIC_ENV: dict = {}


def cache_dir() -> pathlib.Path | None:
    """The cache folder (not created until the first write), or None when disabled."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        if value.strip().lower() in _OFF:
            return None
        if value.strip():
            return pathlib.Path(value).expanduser()
    base = os.environ.get("SPARSEKERN_CACHE")  # sparsekern's cache folder (models.cache_dir reads it too)
    if base:
        return pathlib.Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "sparsekern"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _static_environment() -> dict:
    """The parts of the environment that cannot change within a process (computed once)."""
    if not _STATIC_ENV:
        # The package's face (sparsekern/__init__.py, imported before any module) holds the version.
        version = getattr(sys.modules.get(__package__), "__version__", "unknown")
        so = next(iter(pathlib.Path(__file__).parent.glob("_C.*")), None)
        try:
            st = so.stat() if so is not None else None
            kernels = f"{so.name} {st.st_size} bytes, modified {st.st_mtime_ns}" if st else "not built"
        except OSError:
            kernels = "unreadable"
        rules = hashlib.sha1(pathlib.Path(dispatch_rules.__file__).read_bytes()).hexdigest()[:12]
        isa = ",".join(k[4:-8] for k, v in sorted(_extension.BUILD_INFO.items())
                       if k.startswith("cpu_") and k.endswith("_runtime") and v)
        _STATIC_ENV.update({"cpu": cpu_model(), "isa": isa or "portable", "torch": torch.__version__,
                            "sparsekern": version, "kernels": kernels, "dispatch_rules": rules})
    return _STATIC_ENV


def environment(device: torch.device) -> dict:
    """What a measurement on `device` depends on beyond the layer (see the module docstring)."""
    env = dict(_static_environment())
    env["isa_forced"] = os.environ.get("SPARSEKERN_CPU_ISA", "")
    env["threads"] = torch.get_num_threads()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return env


def _file_of(env: dict) -> str:
    digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return f"paths-{digest}.json"


def _warn_once(tag, message: str) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(f"sparsekern tuning cache: {message}", RuntimeWarning, stacklevel=4)


def _read(path: pathlib.Path, env: dict) -> dict[str, dict]:
    """The entries of a cache file; {} (with one warning) when it is missing, corrupt or foreign."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        _warn_once(("read", str(path)), f"cannot read {path} ({e}); measuring instead")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if data.get("environment") != env:
            raise ValueError("written for another environment")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("no entries")
        good = {k: e for k, e in entries.items() if _valid_entry(e)}
    except (ValueError, TypeError) as e:
        _warn_once(("corrupt", str(path)), f"ignoring {path}: {e}")
        return {}
    return good


def _valid_entry(e) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("reason"), str)
            and isinstance(e.get("times_ms"), dict) and isinstance(e.get("measured_at"), (int, float))
            and all(isinstance(v, (int, float)) for v in e["times_ms"].values()))


def _entries(device: torch.device) -> tuple[pathlib.Path, dict, dict[str, dict]] | None:
    folder = cache_dir()
    if folder is None:
        return None
    env = environment(device)
    name = _file_of(env)
    entries = _FILES.get((str(folder), name))
    if entries is None:
        entries = _FILES[(str(folder), name)] = _read(folder / name, env)
    return folder / name, env, entries


def lookup(device: torch.device, key: str) -> dict | None:
    """The stored entry for `key` on `device` in this environment ({"path", "reason",
    "times_ms", "measured_at"}), or None (not stored, or the cache is disabled)."""
    found = _entries(device)
    return None if found is None else found[2].get(key)


def store(device: torch.device, key: str, path: str, reason: str, times_ms: dict[str, float]) -> float:
    """Records a measured choice in memory and on disk (atomically, merged with what the file
    holds now); returns its time stamp (seconds since the epoch). A folder that cannot be
    written warns once and keeps the choice in memory only."""
    stamp = time.time()
    found = _entries(device)
    if found is None:
        return stamp
    file, env, entries = found
    entries[key] = {"path": path, "reason": reason, "times_ms": {p: float(t) for p, t in times_ms.items()},
                    "measured_at": stamp}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(file, env), **entries}
        fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "environment": env, "entries": merged}, f, indent=0)
            os.replace(tmp, file)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        entries.update(merged)
    except OSError as e:
        _warn_once(("write", str(file.parent)), f"cannot write {file.parent} ({e}); choices kept in memory only")
    return stamp


def forget_loaded() -> None:
    """Drops what this process read from cache files (the next lookup reads them again)."""
    _FILES.clear()
    _WARNED.clear()
