"""sparsekern.memory: sparsify's temporaries leave no holes in glibc's heap, the malloc
settings it changes are restored to serving values, and a user's own malloc settings are
left alone. Each check runs in a fresh interpreter: the heap of the test process has a
history of its own."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sparsekern import memory

pytestmark = pytest.mark.skipif(memory._malloc_trim() is None, reason="glibc's malloc only")

_MALLINFO = """
import ctypes, json, sys
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
"""


def _run(body: str, env: dict | None = None) -> dict:
    code = _MALLINFO + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_SPARSIFY = """
import torch
from torch import nn
import sparsekern.memory as skm
from sparsekern.sparsify import sparsify
if {off}:
    skm._mallopt = lambda: None
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(768, 768) for _ in range(8)])
x = torch.randn(3, 768)
sparsify(model, "2:4", quantize="int8", show_progress=False)
print(json.dumps({{"free_mb": libc.mallinfo2().fordblks / 2**20,
                  "finite": bool(torch.isfinite(model(x)).all())}}))
"""


def test_sparsify_leaves_no_free_holes_in_the_heap():
    # Without large_blocks_mapped, the layers' temporaries land in the heap among the
    # compressed weights (glibc's mmap threshold rose when the dense weights were freed) and
    # leave about 15 MB free in it that malloc_trim cannot return; with it, a block of
    # 128 KiB or more is its own mapping, given back when freed.
    on = _run(_SPARSIFY.format(off=False))
    off = _run(_SPARSIFY.format(off=True))
    assert on["finite"] and off["finite"]
    assert off["free_mb"] > 8, off  # the holes this guards against appear without it
    assert on["free_mb"] < off["free_mb"] / 4, (on, off)


_THRESHOLDS = """
import torch
from sparsekern import memory
def mapped_mb():
    return libc.mallinfo2().hblkhd / 2**20
def alloc_mapped(n_bytes):
    before = mapped_mb()
    t = torch.empty(n_bytes, dtype=torch.uint8)
    grew = mapped_mb() - before > n_bytes / 2**20 / 2
    del t
    return grew
torch.empty(16 << 20, dtype=torch.uint8)  # a freed 16 MiB mapping: glibc's threshold rises to 16 MiB
seen = {"before": alloc_mapped(1 << 20)}
with memory.large_blocks_mapped():
    with memory.large_blocks_mapped():  # nested: the outer one restores
        seen["nested"] = alloc_mapped(1 << 20)
        memory.note_freed_block(8 << 20)  # as glibc would have: its threshold rises to 8 MiB
    seen["inside"] = alloc_mapped(1 << 20)
seen["after"] = alloc_mapped(1 << 20)
seen["after_big"] = alloc_mapped(12 << 20)
with memory.large_blocks_mapped():  # nothing freed: the threshold stays where it was
    pass
seen["after_again"] = alloc_mapped(2 << 20)
print(json.dumps(seen))
"""


def test_large_blocks_are_mapped_inside_and_after_as_glibc_would_have():
    seen = _run(_THRESHOLDS)
    assert seen == {"before": False, "nested": True, "inside": True, "after": False, "after_big": True,
                    "after_again": False}


def test_the_users_own_malloc_settings_are_left_alone():
    # The user fixed glibc's mmap threshold at 4 MiB: a block of 1 MiB stays in the heap
    # inside large_blocks_mapped too.
    seen = _run(_THRESHOLDS, env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304"})
    assert seen == {"before": False, "nested": False, "inside": False, "after": False, "after_big": True,
                    "after_again": False}
    seen = _run(_THRESHOLDS, env={"MALLOC_MMAP_THRESHOLD_": "4194304"})
    assert seen["inside"] is False and seen["nested"] is False
