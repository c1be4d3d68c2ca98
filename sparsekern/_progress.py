"""Transition shim for sparsekern/sparsify.py only: the progress bar is tqdm now (delete
this file once sparsify.py calls tqdm directly)."""
from tqdm import tqdm


def progress(iterable, desc: str = "", total: int | None = None, enabled: bool = True):
    return tqdm(iterable, desc, total=total, disable=not enabled, mininterval=1.0)
