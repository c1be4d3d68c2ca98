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
from sparsekern.bench.run import one_core_busy
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
    # The decode calls run with a worker the OS really parks (another process on its core), so
    # the calling thread takes over 2:4 chunks at random points: every product must still equal
    # one thread's, bit for bit, for every value precision.
    x, nm, bm = _products()
    want = x.double() @ nm.to_dense().double().t()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4000, 512, generator=gen)
    weights = [NMWeight.from_dense(w, 2, 4), NMWeight.from_dense(w, 2, 4).quantize("int8"),
               NMWeight.from_dense(w, 2, 4).quantize("int4", 128),
               BitmaskWeight.from_dense(w, torch.rand(4000, 512, generator=gen) < 0.3).quantize("int8")]
    xs = [torch.randn(b, 512, generator=gen) for b in (1, 3)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [ops.sparse_linear(xi, W) for W in weights for xi in xs]
        torch.set_num_threads(max(2, old))
        with one_core_busy():
            for _ in range(50):
                torch.testing.assert_close(ops.nm_linear(x, nm).double(), want, rtol=1e-4, atol=1e-4)
            for _ in range(200):  # a few chunks taken over (each worker's time slice ends somewhere)
                got = [ops.sparse_linear(xi, W) for W in weights for xi in xs]
                for i, (y, y1) in enumerate(zip(got, single)):
                    assert torch.equal(y, y1), i
    finally:
        torch.set_num_threads(old)


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


# Run in a child process: SPARSEKERN_POOL is read once per process. Each product is computed
# with one thread, then with two on the threads the mode picks (torch's OpenMP team, the pool,
# the calling thread alone (inline),
# or auto: the team while its workers join promptly), several times in a row (a team job right
# after a pool job and the reverse when auto switches); a chunk that raises reaches the caller.
_MODES_SCRIPT = r"""
import torch
from sparsekern import ops
from sparsekern.formats import BitmaskWeight, NMWeight
gen = torch.Generator().manual_seed(0)
cases = []
for rows in (3, 300):  # the row kernels and the weight-stationary GEMMs
    x = torch.randn(rows, 256, generator=gen)
    cases.append((x, NMWeight.from_dense(torch.randn(700, 256, generator=gen), 2, 4)))
    cases.append((x, BitmaskWeight.from_dense(torch.randn(700, 256, generator=gen),
                                              torch.rand(700, 256, generator=gen) < 0.2)))
cases.append((torch.randn(300, 256, generator=gen).bfloat16(),
              NMWeight.from_dense(torch.randn(700, 256, generator=gen).bfloat16(), 2, 4)))
run = lambda x, W: ops.nm_linear(x, W) if isinstance(W, NMWeight) else ops.bitmask_linear(x, W)
torch.set_num_threads(1)
want = [run(x, W) for x, W in cases]
torch.set_num_threads(2)
for _ in range(20):
    for (x, W), y in zip(cases, want):
        assert torch.equal(run(x, W), y), (tuple(x.shape), type(W).__name__, x.dtype)
W = NMWeight.from_dense(torch.randn(2000, 64, generator=gen), 2, 8)
bad = W.indices.clone()
bad[1999, 0] = 0xFF  # in-group index 15 >= m, in the last chunk
try:
    torch.ops.sparsekern.nm_decompress(W.values.float(), bad, 2, 8, 64)
    raise SystemExit("no error from the corrupt index")
except ValueError as e:
    assert "nm_decompress: indices hold an in-group index >= m" in str(e), e
assert torch.equal(torch.ops.sparsekern.nm_decompress(W.values, W.indices, 2, 8, 64), W.to_dense())
print("ok")
"""


@pytest.mark.parametrize("mode", ["auto", "omp", "pool", "inline", "OMP_WAIT_POLICY=PASSIVE"])
def test_same_results_and_errors_on_every_thread_mode(mode):
    # OMP_WAIT_POLICY=PASSIVE: libgomp's workers sleep after a region, and the pool runs every job
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_POOL", "OMP_WAIT_POLICY")}
    env.update({"OMP_WAIT_POLICY": "PASSIVE"} if "=" in mode else {"SPARSEKERN_POOL": mode})
    done = subprocess.run([sys.executable, "-c", _MODES_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# A pool worker that pauses 200 ms after claiming each decode-row chunk stands for one the OS
# parked there (another process on its core). The calling thread must take its chunks over
# rather than wait, return the same products as one thread, and the worker, finishing the
# abandoned chunks later into its own buffer, must not touch the outputs already returned.
# 2:4 weights (2-bit in-group indices: any bytes stay inside the row) and bitmask weights (a
# worker reads a checked copy of its rows' mask, offsets and columns: snapshot_bitmask_rows).
_TAKEOVER_SCRIPT = r"""
import time
import torch
from sparsekern import ops
from sparsekern.formats import BitmaskWeight, NMWeight
gen = torch.Generator().manual_seed(0)
w = torch.randn(8000, 1024, generator=gen)
mask = torch.rand(8000, 1024, generator=gen) < 0.3
nm = [NMWeight.from_dense(w, 2, 4), NMWeight.from_dense(w, 2, 4).quantize("int8"),
      NMWeight.from_dense(w, 2, 4).quantize("int4", 128)]
bitmask = [BitmaskWeight.from_dense(w, mask), BitmaskWeight.from_dense(w, mask).quantize("int8")]
xs = [torch.randn(b, 1024, generator=gen) for b in (1, 3)]
torch.set_num_threads(1)
want = {(i, j): ops.sparse_linear(x, W) for i, W in enumerate(nm + bitmask) for j, x in enumerate(xs)}
torch.set_num_threads(2)
def calls(weights, first):
    got, slowest, taken = [], 0.0, torch.ops.sparsekern.cpu_pool_takeovers()
    for i, W in enumerate(weights, first):
        for j, x in enumerate(xs):
            for _ in range(2):
                start = time.perf_counter()
                got.append(((i, j), ops.sparse_linear(x, W)))
                slowest = max(slowest, time.perf_counter() - start)
                time.sleep(0.21)  # the worker back from its pause, awake for the next call
    return got, slowest, torch.ops.sparsekern.cpu_pool_takeovers() - taken
got_nm, slowest_nm, taken_nm = calls(nm, 0)
got_bm, slowest_bm, taken_bm = calls(bitmask, len(nm))
time.sleep(0.5)  # the paused worker finishes every abandoned chunk
for key, y in got_nm + got_bm:
    assert torch.equal(y, want[key]), key
print("ok", taken_nm, round(slowest_nm, 4), taken_bm, round(slowest_bm, 4))
"""


def test_the_caller_takes_over_a_parked_workers_decode_chunks():
    env = {**os.environ, "SPARSEKERN_POOL": "pool", "SPARSEKERN_POOL_WORKER_PAUSE_US": "200000"}
    done = subprocess.run([sys.executable, "-c", _TAKEOVER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().startswith("ok"), done.stdout + done.stderr
    taken_nm, slowest_nm, taken_bm, slowest_bm = done.stdout.split()[-4:]
    # The worker joins calls (it is awake for most), and each chunk it claims is taken over: a
    # call that waited for it would last the 200 ms pause.
    assert int(taken_nm) > 0 and float(slowest_nm) < 0.1, done.stdout
    assert int(taken_bm) > 0 and float(slowest_bm) < 0.1, done.stdout


# After a bitmask chunk is taken over, the caller edits the weight's index tensors in place
# (offsets far past the values, every mask bit set, columns past K) before the paused worker
# starts its block: the worker's checked copy refuses them (snapshot_bitmask_rows), so it reads
# nothing outside the tensors; without the copy it read values 2^31 elements away (a crash).
_TAMPER_SCRIPT = r'''
import time
import torch
from sparsekern import ops
from sparsekern.formats import BitmaskWeight
gen = torch.Generator().manual_seed(0)
w = torch.randn(8000, 1024, generator=gen)
torch.set_num_threads(2)
x = torch.randn(1, 1024, generator=gen)
cases = []
for kept in (0.3, 0.05):
    mask = torch.rand(8000, 1024, generator=gen) < kept
    cases += [BitmaskWeight.from_dense(w, mask), BitmaskWeight.from_dense(w, mask).quantize("int8")]
edited = 0
for W in cases:
    for _ in range(20):
        taken = torch.ops.sparsekern.cpu_pool_takeovers()
        ops.sparse_linear(x, W)
        if torch.ops.sparsekern.cpu_pool_takeovers() > taken:
            break
        time.sleep(0.21)  # the worker back from its pause, awake for the next call
    else:
        raise SystemExit("no chunk was taken over in 20 calls")
    W.offsets.fill_(torch.iinfo(torch.int32).max)
    W.bitmask.fill_(-1)
    for name in W.tensor_names():
        t = getattr(W, name)
        if t is not None and t.dtype == torch.int16:  # a column index, where the format keeps one
            t.fill_(torch.iinfo(torch.int16).max)
    edited += 1
    time.sleep(0.5)  # the paused worker runs its abandoned block on what it reads now
print("ok", edited)
'''


def test_a_parked_bitmask_worker_reads_a_checked_copy_of_what_the_caller_edits():
    env = {**os.environ, "SPARSEKERN_POOL": "pool", "SPARSEKERN_POOL_WORKER_PAUSE_US": "200000"}
    done = subprocess.run([sys.executable, "-c", _TAMPER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().startswith("ok 4"), done.stdout + done.stderr


# After a takeover the parked worker still reads the weight and the input until it finishes
# its block: a resize_ that grew one of their storages would move the bytes and free the old
# ones under it. The job holds them not resizable until then (chunk_pool.cpp, pin): the resize
# raises a clear error, shrinking stays allowed, and the flag comes back afterwards.
_PIN_SCRIPT = r"""
import time
import torch
from sparsekern import ops
from sparsekern.formats import NMWeight
gen = torch.Generator().manual_seed(0)
W = NMWeight.from_dense(torch.randn(8000, 1024, generator=gen), 2, 4)
x = torch.randn(1, 1024, generator=gen)
torch.set_num_threads(2)
pinned = torch.ops.sparsekern.cpu_pool_pinned_storages
assert pinned() == 0
for _ in range(20):
    taken = torch.ops.sparsekern.cpu_pool_takeovers()
    want = ops.sparse_linear(x, W)
    if torch.ops.sparsekern.cpu_pool_takeovers() > taken:
        break
    time.sleep(0.21)  # the worker back from its pause, awake for the next call
else:
    raise SystemExit("no chunk was taken over in 20 calls")
assert pinned() > 0
n = W.values.numel()
try:
    W.values.resize_(1 << 26)  # grows: new bytes, the old ones freed under the worker
except RuntimeError as e:
    assert "not resizable" in str(e), e
else:
    raise SystemExit("resize_ grew a storage the parked worker reads")
# torch sets the new sizes before it checks the storage, so the failed call left W.values
# claiming 2^26 elements; a size within its bytes is allowed (nothing moves).
W.values.resize_(n - 8)
time.sleep(0.5)  # the paused worker finishes its abandoned block and drops the job
assert pinned() == 0, pinned()
W.values.resize_(1 << 20)  # resizable again
assert W.values.untyped_storage().nbytes() >= 1 << 20
print("ok")
"""


def test_a_storage_a_parked_worker_reads_cannot_grow_until_it_finishes():
    env = {**os.environ, "SPARSEKERN_POOL": "pool", "SPARSEKERN_POOL_WORKER_PAUSE_US": "200000"}
    done = subprocess.run([sys.executable, "-c", _PIN_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# libgomp's idle OpenMP worker spins after each of torch's parallel regions (a few ms of CPU
# with OMP_WAIT_POLICY unset). While the kernels judge the machine contended, a thread of theirs
# holds an idle OpenMP team that takes libgomp past the CPUs, and libgomp then cuts the spin to
# 100 iterations (csrc/cpu/contention.cpp). The child fixes the verdict (SPARSEKERN_CONTENTION),
# runs one sparse job (the kernels apply the verdict there), then small torch operators with
# pauses between them, and reports the CPU time of every thread but its own.
_SPIN_SCRIPT = r"""
import json, os, threading, time
import torch
from sparsekern import ops
from sparsekern.formats import NMWeight
torch.set_num_threads(len(os.sched_getaffinity(0)))
main = threading.get_native_id()
def other_threads_cpu_s():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
W = NMWeight.from_dense(torch.randn(4000, 512), 2, 4)
ops.nm_linear(torch.randn(3, 512), W)
a = torch.randn(512, 1024)
a.mul(2.0)
before = other_threads_cpu_s()
for _ in range(40):
    a.mul(2.0)  # one parallel region on torch's team
    time.sleep(0.01)
print(json.dumps({"cpu_s": other_threads_cpu_s() - before, "contention": list(torch.ops.sparsekern.cpu_contention())}))
"""


def _libgomp_child_env(**extra):
    if not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least two CPUs")
    with open("/proc/self/maps") as maps:
        if not any("libgomp" in line for line in maps):
            pytest.skip("torch's OpenMP runtime here is not libgomp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SPARSEKERN_POOL", "SPARSEKERN_CONTENTION")}
    env.update(extra)
    return env


def _child_json(script, env):
    import json

    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_contended_verdict_stops_libgomps_idle_workers_spinning():
    quiet = _child_json(_SPIN_SCRIPT, _libgomp_child_env(SPARSEKERN_CONTENTION="quiet"))
    busy = _child_json(_SPIN_SCRIPT, _libgomp_child_env(SPARSEKERN_CONTENTION="busy"))
    assert quiet["contention"] == [False, 0] and busy["contention"] == [True, 1], (quiet, busy)
    # spinning: milliseconds of CPU after each of the 40 regions; throttled: next to nothing
    assert quiet["cpu_s"] >= 0.05, quiet
    assert busy["cpu_s"] <= quiet["cpu_s"] / 4, (quiet, busy)


# The verdict itself, from a real other process: sparse jobs for a second while a process spins
# on one core (contended, the throttle engaged), then a second without it. The second's verdict
# is checked against the other processes' CPU share over its last half, computed here from the
# same counters (/proc/stat against getrusage): quiet where they used under a quarter of a CPU
# beyond what torch's threads leave, contended above three quarters (a machine busy with other
# work, as when this test runs beside another job, is contended).
_VERDICT_SCRIPT = r"""
import json, os, resource, time
import torch
from sparsekern import ops
from sparsekern.bench.run import one_core_busy
from sparsekern.formats import NMWeight
cpus = len(os.sched_getaffinity(0))
torch.set_num_threads(cpus)
W = NMWeight.from_dense(torch.randn(4000, 512), 2, 4)
x = torch.randn(3, 512)
tick = 1 / os.sysconf("SC_CLK_TCK")
def counters():
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:9]]
    u = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), (sum(v[:3]) + sum(v[5:8])) * tick, u.ru_utime + u.ru_stime
def jobs(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ops.nm_linear(x, W)
        time.sleep(0.002)
    return list(torch.ops.sparsekern.cpu_contention())
jobs(0.5)
with one_core_busy():
    busy = jobs(1.0)
jobs(0.5)
t0, machine0, self0 = counters()
quiet = jobs(0.5)
t1, machine1, self1 = counters()
others = ((machine1 - machine0) - (self1 - self0)) / (t1 - t0)  # in CPUs
print(json.dumps({"busy": busy, "quiet": quiet, "others_beyond_free": others - (cpus - torch.get_num_threads())}))
"""


def test_another_process_on_a_core_makes_the_machine_contended_until_it_ends():
    got = _child_json(_VERDICT_SCRIPT, _libgomp_child_env())
    assert got["busy"][0] is True and got["busy"][1] >= 1, got
    if got["others_beyond_free"] < 0.25:
        assert got["quiet"][0] is False and got["quiet"][1] == got["busy"][1], got
    elif got["others_beyond_free"] > 0.75:
        assert got["quiet"][0] is True, got
