"""The CPU kernels' chunk pool (parallel_chunks, csrc/cpu/chunk_pool.cpp): results do not depend
on the thread count or on another process holding a core, and an error raised inside a chunk on
any thread reaches the caller. (A forked child is not tested: with 2 threads it hangs in libgomp
before it reaches these kernels, with the old at::parallel_for loops as with the pool.)"""
import os
import subprocess
import sys

import pytest
import torch

from sparsekern import _extension, ops
from sparsekern.formats import BitmaskWeight, NMWeight

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="sparsekern._C is not built")


def _products():
    gen = torch.Generator().manual_seed(0)
    nm = NMWeight.from_dense(torch.randn(700, 256, generator=gen), 2, 4)
    bm = BitmaskWeight.from_dense(torch.randn(700, 256, generator=gen), torch.rand(700, 256, generator=gen) < 0.2)
    x = torch.randn(3, 256, generator=gen)
    return x, nm, bm


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_threads(threads):
    x, nm, bm = _products()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = ops.nm_linear(x, nm), ops.bitmask_linear(x, bm)
        torch.set_num_threads(threads)
        for _ in range(20):  # many jobs in a row: epochs advance, workers sleep and wake
            assert torch.equal(ops.nm_linear(x, nm), want[0])
            assert torch.equal(ops.bitmask_linear(x, bm), want[1])
    finally:
        torch.set_num_threads(old)


def test_results_hold_with_one_core_busy():
    x, nm, bm = _products()
    want = x.double() @ nm.to_dense().double().t()
    core = sorted(os.sched_getaffinity(0))[-1]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\n"
                                "while True:\n    pass"])
    try:
        for _ in range(50):
            torch.testing.assert_close(ops.nm_linear(x, nm).double(), want, rtol=1e-4, atol=1e-4)
    finally:
        spinner.kill()
        spinner.wait()


def test_an_error_in_a_chunk_reaches_the_caller():
    # nm_decompress checks every 4-bit index inside its row loop (on the pool): a corrupt one in
    # the last rows (a worker's chunk or the caller's) raises here, and the pool runs on after it.
    W = NMWeight.from_dense(torch.randn(2000, 64), 2, 8)
    for row in (0, 1999):
        bad = W.indices.clone()
        bad[row, 0] = 0xFF  # in-group index 15 >= m
        with pytest.raises(ValueError, match="nm_decompress: indices hold an in-group index >= m"):
            torch.ops.sparsekern.nm_decompress(W.values.float(), bad, 2, 8, 64)
    torch.testing.assert_close(torch.ops.sparsekern.nm_decompress(W.values, W.indices, 2, 8, 64), W.to_dense())
