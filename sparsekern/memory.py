"""Giving freed memory back to the operating system.

glibc's allocator keeps freed heap pages in the process after large temporary work (a
model's dense weights freed by sparsify, the dense weights built to measure a layer's
paths): the process's resident memory then stays near the dense model's although the
live tensors shrank. Measured on timm's ViT-B/16 after sparsify(model, "2:4"): live tensors
177 MB, resident 433 MB above the interpreter's; after malloc_trim, 189 MB.
`release_freed_memory` asks glibc to return those pages (malloc_trim); elsewhere it does
nothing.

The lowest layer: it imports nothing from sparsekern.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Returns freed heap pages to the operating system where the C library can (glibc's
    malloc_trim); True when it did. Live tensors are untouched."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
