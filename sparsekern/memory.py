"""Giving freed memory back to the operating system.

glibc's allocator keeps freed heap pages in the process after large temporary work (a
model's dense weights freed by sparsify, the dense weights built to measure a layer's
paths): the process's resident memory then stays near the dense model's although the
live tensors shrank. Measured on timm's ViT-B/16 after sparsify(model, "2:4"): live tensors
177 MB, resident 433 MB above the interpreter's; after malloc_trim, 189 MB.
`release_freed_memory` asks glibc to return those pages (malloc_trim); elsewhere it does
nothing.

What malloc_trim cannot undo are the free holes that sparsify's per-layer temporaries
(scores, masks, values before quantizing, a layer's dense copy built to measure it) leave
between blocks that live on (the compressed weights allocated among them). glibc serves a
block from the heap rather than its own mapping once it has freed a mapping of that size (its
mmap threshold rises with each free, up to 32 MiB), so after the model's dense weights are
freed every temporary of a sparsified layer lands in the heap. malloc_trim gives the holes'
pages back, but they stay part of the heap: the batches' transient tensors later land in
them, and after a free glibc gives back only the heap's top, so those pages stay resident.
Measured on timm's ViT-B/16, 2:4 int8 sparsified in the process (mallinfo2): about 130 MB of
the heap free after sparsify, 1 MB with `large_blocks_mapped` around it; the resident memory
this leaves is the memory suite's (docs/RESULTS.md). `large_blocks_mapped` makes glibc give
every block of at least SCRATCH_MMAP_THRESHOLD bytes its own mapping while sparsekern builds
or measures layers, so a freed temporary goes back to the operating system at once and
leaves no hole.

The lowest layer: it imports nothing from sparsekern.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # not glibc (musl has no malloc_trim)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Returns freed heap pages to the operating system where the C library can (glibc's
    malloc_trim); True when it did. Live tensors are untouched."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# While sparsekern builds or measures layers: glibc's own default (its threshold before any
# mapping was freed), so every tensor of 128 KiB or more is a mapping of its own.
SCRATCH_MMAP_THRESHOLD = 128 << 10
# After: what glibc's dynamic adjustment would have made of it. glibc raises its mmap
# threshold to the size of each mapped block freed (up to DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB
# on 64-bit) and its trim threshold (free bytes at the heap's top it keeps after a free) to
# twice that; setting either turns that adjustment off for the rest of the process. So on
# leaving, the mmap threshold is the largest block sparsekern said it freed within
# (note_freed_block: a layer's dense weight, which glibc would have had mapped), at least the
# last value set, and the trim threshold twice that. Left at 128 KiB, a batch's transients
# would be given back and faulted in again at every call (ViT-B 2:4 int8 at batch 4: about
# 30% slower, a probe); fixed at 32 MiB, the heap kept more of them than glibc would have
# (ViT-B 2:4 fp32: 265 MB resident after the batches against 222-237 MB, a memory run of
# 2026-12-08 that was not kept).
MAX_MMAP_THRESHOLD = 32 << 20
_serving_threshold = [SCRATCH_MMAP_THRESHOLD]
_freed_within = [0]
# The user's own malloc settings, which sparsekern leaves alone.
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_mapped_lock = threading.Lock()
_mapped_depth = [0]


@functools.lru_cache(maxsize=1)
def _mallopt():
    if any(v in os.environ for v in _USER_MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    fn = getattr(_libc(), "mallopt", None)
    if fn is None or _malloc_trim() is None:  # mallopt's parameters are glibc's; musl ignores them
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def note_freed_block(nbytes: int) -> None:
    """A block of `nbytes` that glibc would have had mapped is freed (a layer's dense weight)
    within large_blocks_mapped, or within the next one: the threshold left on leaving it is
    at least `nbytes`."""
    _freed_within[0] = max(_freed_within[0], int(nbytes))


@contextlib.contextmanager
def large_blocks_mapped():
    """Within: glibc maps every block of at least SCRATCH_MMAP_THRESHOLD bytes on its own
    (after giving the heap's free top back, malloc_trim), so the temporaries of building or
    measuring a layer are returned to the operating system when freed instead of leaving
    holes in the heap (see the module's docstring). On leaving the outermost one, the
    thresholds are those glibc's own adjustment would have reached (note_freed_block). Nests;
    thread-safe. Does nothing where the C library is not glibc or the user set glibc's malloc
    parameters (MALLOC_*_ or GLIBC_TUNABLES=glibc.malloc.*)."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    with _mapped_lock:
        _mapped_depth[0] += 1
        if _mapped_depth[0] == 1:
            mallopt(M_MMAP_THRESHOLD, SCRATCH_MMAP_THRESHOLD)
            # glibc serves a block from free heap before mapping one: the free top of the
            # heap goes back first, or the first temporaries would land there.
            release_freed_memory()
    try:
        yield
    finally:
        with _mapped_lock:
            _mapped_depth[0] -= 1
            if _mapped_depth[0] == 0:
                threshold = min(MAX_MMAP_THRESHOLD, max(_serving_threshold[0], _freed_within[0]))
                _serving_threshold[0], _freed_within[0] = threshold, 0
                mallopt(M_MMAP_THRESHOLD, threshold)
                mallopt(M_TRIM_THRESHOLD, 2 * threshold)
