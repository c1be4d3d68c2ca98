"""The dispatch engine: a decision per (op, device, dtype, typed key, forced backend), made once
and cached. `explain_backend` reads the very decision the call uses, so what it says is what runs."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from .. import dispatch_rules as rules
from .backends import BACKENDS
from .table import OPS, OpSpec

_override: str | None = None
_decisions: dict[tuple, "Decision"] = {}


class Decision(NamedTuple):
    backend: str
    reason: str
    run: Callable  # the shared schema's op on this backend
    cpu_run: Callable | None = None  # the CPU-only op (with the C++ kernel's own arguments), cpp only


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend ("cpp", "cuda", "triton", "reference", ...) inside the block (None: automatic)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; one of {tuple(BACKENDS)} or None")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def clear_decisions() -> None:
    """Forget cached backend decisions (after the extension or the environment changed)."""
    _decisions.clear()


def _note(spec: OpSpec, backend: str, key) -> str:
    return spec.note(backend, key) if spec.note is not None else ""


def _decision(spec: OpSpec, name: str, reason: str) -> Decision:
    backend = BACKENDS[name]
    return Decision(name, reason, backend.run(spec), backend.cpu_run(spec))


def _select(spec: OpSpec, device: torch.device, dtype: torch.dtype, key) -> Decision:
    forced, note = _override, ""
    if forced is not None and not BACKENDS[forced].implements(spec):
        forced, note = None, f"use_backend({_override!r}) does not apply: {spec.name} has no {_override} kernel; "
    if forced is not None:
        why = BACKENDS[forced].why_not(spec, key, device, dtype)
        if why is not None:
            raise RuntimeError(f"{spec.name}: use_backend({forced!r}) cannot run here: {why}")
        return _decision(spec, forced, "forced by use_backend()" + _note(spec, forced, key))
    skipped = []
    for name in rules.BACKEND_ORDER.get(device.type, ("reference",)):
        backend = BACKENDS[name]
        why = backend.why_not(spec, key, device, dtype)
        if why is None:
            why = backend.prefers_not(spec, key, device, dtype)
        if why is None:
            reason = backend.label + _note(spec, name, key)
            if skipped:
                reason += " (" + "; ".join(skipped) + ")"
            return _decision(spec, name, note + reason)
        if backend.implements(spec):
            skipped.append(f"{name}: {why}")
    raise AssertionError("unreachable: the reference always runs")


def decide(op: str, key_args: tuple) -> tuple[Decision, tuple]:
    """The decision for `op` on these key arguments, and the op's typed key."""
    spec = OPS[op]
    t, key = spec.key(*key_args)
    cache_key = (op, t.device, t.dtype, key, _override)
    d = _decisions.get(cache_key)
    if d is None:
        d = _decisions[cache_key] = _select(spec, t.device, t.dtype, key)
    return d, key


def run(op: str, key_args: tuple, *args):
    return decide(op, key_args)[0].run(*args)


def explain_backend(op: str, *args) -> tuple[str, str]:
    """(backend, reason) for `op` called with `args` (its public arguments; the leading ones
    are enough, e.g. explain_backend("nm_linear", x)). It is the decision the call uses."""
    if op not in OPS:
        raise ValueError(f"explain_backend: unknown op {op!r}; one of {sorted(OPS)}")
    d, _ = decide(op, args)
    return d.backend, d.reason


def backend_for(op: str, *args) -> str:
    """The backend that runs `op` on `args` (explain_backend without the reason)."""
    return explain_backend(op, *args)[0]
