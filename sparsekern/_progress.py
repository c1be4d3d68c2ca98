"""A dependency-free progress bar for long work (calibration, sweeps, benchmarks)."""
from __future__ import annotations

import sys
import time


class progress:
    """Wraps an iterable; prints `desc i/n [elapsed]` on stderr, one line rewritten.

    `enabled=False` makes it a plain pass-through (tests, library use in loops).
    """

    def __init__(self, iterable, desc: str = "", total: int | None = None, enabled: bool = True):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        try:
            self.total = total if total is not None else len(iterable)
        except TypeError:
            self.total = None

    def __iter__(self):
        start = time.perf_counter()
        i = 0
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self.enabled:
                tot = f"/{self.total}" if self.total else ""
                sys.stderr.write(f"\r{self.desc} {i}{tot} [{time.perf_counter() - start:.1f}s]")
                sys.stderr.flush()
        if self.enabled and i:
            sys.stderr.write("\n")
