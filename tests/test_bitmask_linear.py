"""bitmask_linear: compiled kernels (CPU, CUDA) and reference against fp64."""
import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close
from linear_cases import DTYPES, SHAPES, assert_even_rows_ignore_odd_neighbours, lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.formats import BitmaskWeight


@pytest.mark.parametrize("device,backend", pairs("bitmask_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,o", SHAPES + [((4,), 1100, 9), ((9,), 513, 5)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bitmask_linear_matches_fp64(device, backend, dtype, lead, k, o, density, with_bias, poison):
    w = torch.randn(o, k, device=device, dtype=dtype)
    W = BitmaskWeight.from_dense(w, torch.rand(o, k, device=device) < density)
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype) if with_bias else None
    with running(backend, "bitmask_linear", x, W):
        y = ops.bitmask_linear(x, W, bias)
    dense = W.to_dense()
    ref = ref64(x, dense, bias)
    what = f"bitmask_linear {density} {device} {dtype} x{tuple(x.shape)} w{tuple(w.shape)}"
    if density == 0.0 and not with_bias:
        assert torch.equal(y, torch.zeros_like(y)), what
        return
    assert_linear_close(y, ref, dtype, lowp_torch_linear(x, dense, bias), what)


def test_gradients_for_x():
    w = torch.randn(12, 70)
    W = BitmaskWeight.from_dense(w, torch.rand(12, 70) < 0.4)
    x = torch.randn(3, 70, requires_grad=True)
    ops.bitmask_linear(x, W).sum().backward()
    torch.testing.assert_close(x.grad, W.to_dense().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    W = BitmaskWeight.from_dense(torch.randn(8, 100), torch.rand(8, 100) < 0.5)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        ops.bitmask_linear(torch.randn(2, 64), W)
    with pytest.raises(TypeError, match="x dtype"):
        ops.bitmask_linear(torch.randn(2, 100, dtype=torch.bfloat16), W)
    with pytest.raises(TypeError, match="BitmaskWeight"):
        ops.bitmask_linear(torch.randn(2, 100), W.to_dense())
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bitmask_linear(torch.randn(2, 100), W, torch.randn(100))


# ---- the column index (BitmaskWeight.column_index), read by the AVX-512 CPU kernel ----------
def _avx512() -> bool:
    import sparsekern

    return bool(sparsekern._extension.BUILD_INFO.get("cpu_avx512_runtime"))


def _avx2() -> bool:
    import sparsekern

    return bool(sparsekern._extension.BUILD_INFO.get("cpu_avx2_runtime"))


def test_column_index_is_each_kept_values_column():
    mask = torch.rand(13, 300) < 0.2
    W = BitmaskWeight.from_dense(torch.randn(13, 300), mask)
    cols = W.column_index()
    assert cols.dtype == torch.int16 and cols.shape == W.values.shape
    torch.testing.assert_close(cols.long(), mask.nonzero()[:, 1])
    assert W.column_index() is cols  # cached
    assert W.derived_nbytes == 2 * W.values.numel() and W.nbytes == W.to("cpu").nbytes  # counted apart
    assert W.is_validated  # a derived cache, not a field
    W.bitmask.zero_()  # an in-place edit of the mask rebuilds it
    assert W.column_index().numel() == 0


def test_column_index_refuses_wide_rows():
    W = BitmaskWeight.from_dense(torch.zeros(1, 40000), torch.zeros(1, 40000, dtype=torch.bool))
    with pytest.raises(ValueError, match="32768 in_features"):
        W.column_index()


# (rows, density, whether the AVX-512 kernels read the column index, whether the AVX2 ones do)
@pytest.mark.parametrize("rows,density,expect,expect_avx2", [
    (1, 0.1, True, True), (4, 0.05, True, True), (4, 0.15, False, True), (8, 0.1, True, False),
    (40, 0.1, True, False), (70, 0.1, False, False), (1, 0.3, False, True), (4, 0.45, False, True),
    (1, 0.6, False, False), (16, 0.3, False, False)])
def test_dispatch_says_when_the_column_index_runs(rows, density, expect, expect_avx2):
    W = BitmaskWeight.from_dense(torch.randn(64, 1000), torch.rand(64, 1000) < density)
    x = torch.randn(rows, 1000)
    backend, why = ops.explain_backend("bitmask_linear", x, W)
    if backend != "cpp":
        pytest.skip(f"the C++ kernels do not run here ({why})")
    uses = expect if _avx512() else expect_avx2 and _avx2()
    assert ("column_index" in why) == uses, why
    y = ops.bitmask_linear(x, W)
    assert (W.derived_nbytes > 0) == uses  # built only when the kernel reads it
    torch.testing.assert_close(y.double(), x.double() @ W.to_dense().double().t(), rtol=1e-5, atol=1e-5)


def test_column_index_gradients_match_the_mask_kernel():
    W = BitmaskWeight.from_dense(torch.randn(20, 130), torch.rand(20, 130) < 0.08)
    W.values.requires_grad_(True)
    x = torch.randn(1, 130, requires_grad=True)
    ops.bitmask_linear(x, W).sum().backward()
    torch.testing.assert_close(x.grad, W.to_dense().detach().sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.values.grad, x.detach()[0, W.column_index().long()], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", [p for p in pairs("bitmask_linear") if p.id == "cpu-cpp"])
def test_raw_op_checks_columns(device, backend):
    # The column index reaches only the CPU-only op bitmask_linear_cpu (no other backend sees it).
    W = BitmaskWeight.from_dense(torch.randn(6, 70, device=device), torch.rand(6, 70, device=device) < 0.2)
    x = torch.randn(1, 70, device=device)
    op = torch.ops.sparsekern.bitmask_linear_cpu
    args = (x, W.values, W.bitmask, W.offsets, 70, None)
    with pytest.raises(TypeError, match="columns must be Short"):
        op(*args, W.column_index().long())
    with pytest.raises(ValueError, match="columns must be 1-D"):
        op(*args, W.column_index()[:-1] if W.values.numel() else torch.zeros(1, dtype=torch.int16, device=device))
    torch.testing.assert_close(op(*args, W.column_index()), torch.ops.sparsekern.bitmask_linear(*args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", [p for p in pairs("bitmask_linear") if p.id == "cpu-cpp"])
def test_raw_op_refuses_bits_past_in_features(device, backend):
    # Formats refuse them; the raw op must too (they would unmask x past its end).
    W = BitmaskWeight.from_dense(torch.randn(6, 70), torch.rand(6, 70) < 0.5)
    bm = W.bitmask.clone()
    bm[2, -1] |= 1 << 10  # column 74 of 70
    with pytest.raises(ValueError, match="beyond in_features"):
        torch.ops.sparsekern.bitmask_linear(torch.randn(1, 70), W.values, bm, W.offsets, 70, None)


def test_module_reports_the_column_index_bytes():
    from sparsekern.nn import SparseLinear

    layer = SparseLinear.from_dense(torch.nn.Linear(300, 40), pattern="unstructured", sparsity=0.9).eval()
    f = layer.weight_format()
    assert "derived_index_bytes=0 " in layer.describe()  # nothing built yet
    x = torch.randn(1, 300)
    with torch.no_grad():
        layer(x)
        uses = "column_index" in ops.explain_backend("bitmask_linear", x, f)[1]
        ops.bitmask_linear(x, f)  # the sparse path, whichever path the layer chose
    assert (f.derived_nbytes > 0) == uses
    text = layer.describe()
    if uses:
        assert f"derived_index_bytes={2 * f.values.numel()}" in text, text
    else:
        assert "derived_index_bytes=0 " in text, text


@pytest.mark.parametrize("device,backend", [p for p in pairs("bitmask_linear") if p.id == "cpu-cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 40])
def test_rows_never_see_their_neighbours_values(device, backend, dtype, batch):
    # The AVX-512 kernels load a row's values 16 at a time and expand them under the row's
    # mask, so each load also reads values of the next rows: those lanes must stay zero,
    # whatever they hold. Every other row's values are inf or NaN here; the finite rows
    # must match fp64 exactly as usual, at every batch path (1 row, 2-8 direct, expanded).
    o, k = 48, 200
    w = torch.randn(o, k, dtype=dtype)
    W = BitmaskWeight.from_dense(w, torch.rand(o, k) < 0.3)
    rows = torch.repeat_interleave(torch.arange(o), W.mask().sum(1))
    values = W.values.clone()
    odd = rows % 2 == 1
    values[odd] = torch.where(torch.rand(int(odd.sum())) < 0.5, float("inf"), float("nan")).to(dtype)
    W2 = BitmaskWeight.from_tensors({**W.tensors(), "values": values})
    x = torch.randn(batch, k, dtype=dtype)
    with running(backend, "bitmask_linear", x, W2):
        y = ops.bitmask_linear(x, W2)
    assert_even_rows_ignore_odd_neighbours(y, x, W.to_dense(), dtype, f"batch {batch} {dtype}")


@pytest.mark.parametrize("device,backend", [p for p in pairs("bitmask_linear") if p.id == "cpu-cpp"])
@pytest.mark.parametrize("density", [0.1, 0.4, 0.8])
@pytest.mark.parametrize("batch", [1, 4, 5, 8, 9, 16, 40, 70])
def test_every_cpu_algorithm_matches_fp64_at_any_batch(device, backend, density, batch, poison):
    """bitmask_linear_cpu runs the algorithm it is given (dispatch_rules.bitmask_cpu_algo
    chooses it), whatever the batch and density: the row kernels in 16-row tiles (with the
    expanding loads up to 4 or, algorithm 3, 8 rows), the tiles, and the weight-stationary
    kernel where the CPU has AVX-512."""
    from sparsekern import dispatch_rules as rules

    w = torch.randn(37, 200)
    W = BitmaskWeight.from_dense(w, torch.rand(37, 200) < density)
    x, bias = torch.randn(batch, 200), torch.randn(37)
    algos = [rules.BITMASK_ALGO_DECODE, rules.BITMASK_ALGO_TILES] + (
        [rules.BITMASK_ALGO_GEMM, rules.BITMASK_ALGO_DECODE_EXPAND8, rules.BITMASK_ALGO_DECODE_B1_INDEXED]
        if _avx512() else [])
    assert set(algos) == set(rules.BITMASK_ALGO_NAMES) or not _avx512()
    for algo in algos:
        y = torch.ops.sparsekern.bitmask_linear_cpu(x, W.values, W.bitmask, W.offsets, 200, bias, None, algo)
        assert_linear_close(y, ref64(x, W.to_dense(), bias), torch.float32, what=f"algo {algo}")


@pytest.mark.parametrize("device,backend", [p for p in pairs("bitmask_linear") if p.id == "cpu-cpp"])
def test_cpu_op_refuses_an_unknown_algorithm(device, backend):
    W = BitmaskWeight.from_dense(torch.randn(6, 64), torch.rand(6, 64) < 0.3)
    for algo in (-1, 5, 99):
        with pytest.raises(ValueError, match=f"bitmask_linear: algo must be 0 .*, got {algo}"):
            torch.ops.sparsekern.bitmask_linear_cpu(torch.randn(2, 64), W.values, W.bitmask, W.offsets, 64, None,
                                                    None, algo)


@pytest.mark.parametrize("rows", [1, 16, 17, 64, 65, 300])
@pytest.mark.parametrize("density", [0.1, 0.4, 0.8])
def test_the_algorithm_follows_the_rules(rows, density, monkeypatch):
    """What dispatch_rules.bitmask_cpu_algo says (by batch bucket) is what the key and
    explain_backend say, and SPARSEKERN_BITMASK_GEMM=tile turns the weight-stationary kernel off."""
    from sparsekern import dispatch_rules as rules

    W = BitmaskWeight.from_dense(torch.randn(30, 64), torch.rand(30, 64) < density)
    x = torch.randn(rows, 64)
    monkeypatch.delenv("SPARSEKERN_BITMASK_GEMM", raising=False)
    want = rules.bitmask_cpu_algo(rules.bucket_min_rows(rules.batch_bucket(rows)), W.density)
    if rows == 1 and W.density <= rules.BITMASK_B1_INDEXED_MAX_DENSITY and _avx512():
        assert want == rules.BITMASK_ALGO_DECODE_B1_INDEXED
    elif rows <= rules.CPU_ROWS_MAX_ROWS:
        expand8 = W.density >= rules.BITMASK_EXPAND_8_MIN_DENSITY and _avx512()
        assert want == (rules.BITMASK_ALGO_DECODE_EXPAND8 if expand8 else rules.BITMASK_ALGO_DECODE)
    elif _avx512():  # 17 rows on: the weight-stationary GEMM up to 50% kept (at 17-64 rows above
        # the column index's 20%), bench/results/cpu-bitmask-algos-20261207
        low = rules.COLUMN_INDEX_MAX_DENSITY[64] if rows <= 64 else 0.0
        assert (want == rules.BITMASK_ALGO_GEMM) == (low < W.density <= rules.BITMASK_GEMM_MAX_DENSITY), want
    assert ops.OPS["bitmask_linear"].key(x, W)[1].cpu_algo == want
    assert rules.BITMASK_ALGO_NAMES[want] in ops.explain_backend("bitmask_linear", x, W)[1]
    monkeypatch.setenv("SPARSEKERN_BITMASK_GEMM", "tile")
    assert ops.OPS["bitmask_linear"].key(x, W)[1].cpu_algo != rules.BITMASK_ALGO_GEMM


@pytest.mark.parametrize("kept", [127, 128, 129])  # 0.2 of 10 x 64 entries is 128
def test_the_expanding_loads_run_where_the_kernel_chose_them_before(kept):
    """The choice the C++ row kernels made themselves until it moved to dispatch_rules
    (AVX-512 expanding loads for B <= 4, or B <= 8 with nnz >= 0.2 * O * K; the broadcast lanes
    kernels otherwise) is what the algorithm passed per batch bucket makes them run: algorithm
    3 (BITMASK_ALGO_DECODE_EXPAND8) takes the expanding loads up to 8 rows, algorithm 0 up to 4."""
    from sparsekern import dispatch_rules as rules

    mask = torch.zeros(10 * 64, dtype=torch.bool)
    mask[torch.randperm(10 * 64)[:kept]] = True
    W = BitmaskWeight.from_dense(torch.randn(10, 64), mask.reshape(10, 64))
    assert W.values.numel() == kept
    for rows in (*range(1, 19), 40, 65, 300):
        algo = ops.OPS["bitmask_linear"].key(torch.randn(rows, 64), W)[1].cpu_algo
        expanding_rows = {rules.BITMASK_ALGO_DECODE: 4, rules.BITMASK_ALGO_DECODE_EXPAND8: 8,
                          rules.BITMASK_ALGO_DECODE_B1_INDEXED: 4}.get(algo, 0)
        before = _avx512() and (rows <= 4 or (rows <= 8 and kept >= 0.2 * 10 * 64))
        assert (rows <= expanding_rows and _avx512()) == before, (rows, kept, algo)


@pytest.mark.parametrize("kept", [159, 160, 161])  # 0.25 of 10 x 64 entries is 160
def test_one_row_runs_the_indexed_kernel_where_the_kernel_chose_it_before(kept):
    """The one-row choice the AVX-512 row kernel made itself until it moved to dispatch_rules
    (the indexed kernel for nnz <= 0.25 * O * K) is the algorithm the key passes at one row
    (BITMASK_ALGO_DECODE_B1_INDEXED); the indexed kernel and the expanding loads agree with
    the fp64 product whichever runs."""
    from sparsekern import dispatch_rules as rules

    mask = torch.zeros(10 * 64, dtype=torch.bool)
    mask[torch.randperm(10 * 64)[:kept]] = True
    W = BitmaskWeight.from_dense(torch.randn(10, 64), mask.reshape(10, 64))
    x = torch.randn(1, 64)
    algo = ops.OPS["bitmask_linear"].key(x, W)[1].cpu_algo
    before = _avx512() and kept <= 0.25 * 10 * 64
    assert (algo == rules.BITMASK_ALGO_DECODE_B1_INDEXED) == before, (kept, algo)
    if _avx512():
        for a in (rules.BITMASK_ALGO_DECODE, rules.BITMASK_ALGO_DECODE_B1_INDEXED):
            y = torch.ops.sparsekern.bitmask_linear_cpu(x, W.values, W.bitmask, W.offsets, 64, None, None, a)
            assert_linear_close(y, ref64(x, W.to_dense(), None), torch.float32, what=f"algo {a}")


def test_the_avx512_row_algorithms_are_refused_without_it():
    """Capped to AVX2 (SPARSEKERN_CPU_ISA, read once per process: a child process), the rule
    never passes algorithm 3 or 4 and the op refuses them, naming the algorithm and the CPU."""
    import os
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import torch
        from sparsekern import dispatch_rules as rules, ops
        from sparsekern.formats import BitmaskWeight
        W = BitmaskWeight.from_dense(torch.randn(8, 64), torch.rand(8, 64) < 0.5)
        assert ops.OPS["bitmask_linear"].key(torch.randn(6, 64), W)[1].cpu_algo == rules.BITMASK_ALGO_DECODE
        # (rows, density the rule sees, the AVX-512 algorithm it must not pass)
        for rows, density, algo in ((6, W.density, rules.BITMASK_ALGO_DECODE_EXPAND8),
                                    (1, 0.1, rules.BITMASK_ALGO_DECODE_B1_INDEXED)):
            assert rules.bitmask_cpu_algo(rows, density) == rules.BITMASK_ALGO_DECODE
            try:
                torch.ops.sparsekern.bitmask_linear_cpu(torch.randn(rows, 64), W.values, W.bitmask, W.offsets, 64,
                                                        None, None, algo)
            except RuntimeError as e:
                assert f"algo {algo}" in str(e) and "AVX-512" in str(e), str(e)
            else:
                raise AssertionError(f"algo {algo} ran without AVX-512")
        """)
    env = dict(os.environ, SPARSEKERN_CPU_ISA="avx2")
    run = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
