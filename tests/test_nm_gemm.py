"""nm_linear's large-batch CPU paths (batch > 16) against fp64: the 2:4 weight-stationary
kernel (csrc/cpu/nm_gemm_impl.h with AVX2, avx512::nm24_gemm on AVX-512 CPUs; both builds
also in tests/test_cpu_isa.py) and the decompress + GEMM path that every other N:M (and the
portable build) takes.

The algorithm is chosen in sparsekern/dispatch_rules.py (nm_cpu_algo) and passed to the C++
kernel (the CPU-only op nm_linear_cpu, argument `algo`). SPARSEKERN_NM_GEMM (read there on every
call): "tile" never takes the 2:4 kernel; "direct" or unset, from 17 rows."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_linear_close, needs_extension
from linear_cases import lowp_torch_linear, ref64
from sparsekern import _extension, dispatch_rules, ops, reference
from sparsekern.formats import NMWeight
from sparsekern.patterns import nm24_panels_bytes

pytestmark = needs_extension

# The C++ op reads the pre-packed weight (NMWeight.gemm_panels) where its 2:4 GEMM kernel
# runs: AVX2 and AVX-512 CPUs (both kernels; tests/test_cpu_isa.py pins each one).
READS_PANELS = bool(_extension.BUILD_INFO.get("cpu_avx2_runtime"))

KS = [4 * 37, 520, 1100]
BATCHES = [17, 33, 64, 127, 130, 300]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GEMM = dispatch_rules.NM_ALGO_GEMM


def _check(x, W, bias, dtype, what):
    assert ops.explain_backend("nm_linear", x, W)[0] == "cpp"
    y = ops.nm_linear(x, W, bias)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense, bias), what)
    return y


@pytest.mark.parametrize("mode", ["direct", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("panels", [True, False])
def test_nm24_gemm_matches_fp64(mode, dtype, k, batch, with_bias, panels, poison, monkeypatch):
    if mode == "direct":
        monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    else:
        monkeypatch.delenv("SPARSEKERN_NM_GEMM", raising=False)
    monkeypatch.setattr(dispatch_rules, "CPU_GEMM_PANELS", panels)
    o = 37  # not a multiple of the kernel's 3-row block
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), 2, 4)
    # 3-D x for odd batches: [batch, 1, k] -> flattened rows inside the op
    x = torch.randn(batch, k, dtype=dtype) if batch % 2 == 0 else torch.randn(batch, 1, k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype) if with_bias else None
    _check(x, W, bias, dtype, f"2:4 {mode} {dtype} x{tuple(x.shape)} K={k} panels={panels}")
    # The pre-packed weight is built exactly where the kernel reads it (fp32 weights).
    read = panels and READS_PANELS and dtype == torch.float32
    assert W.derived_nbytes == (nm24_panels_bytes(o, k) if read else 0)


@pytest.mark.parametrize("batch", [17, 64, 300])
def test_nm24_gemm_agrees_with_tile_gemm_path(batch, poison, monkeypatch):
    # The direct kernel reads the pre-packed weight here (dispatch_rules.CPU_GEMM_PANELS):
    # 1001 rows are ten 96-row panels and a partial one of 41 rows.
    # Many output rows: several panels, both threads, and the old path on the same input.
    W = NMWeight.from_dense(torch.randn(1001, 520), 2, 4)
    x = torch.randn(batch, 520)
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    y_new = _check(x, W, None, torch.float32, f"2:4 direct B={batch}")
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "tile")
    y_old = _check(x, W, None, torch.float32, f"2:4 tile B={batch}")
    torch.testing.assert_close(y_new, y_old, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,m", [(1, 4), (3, 4), (4, 8), (2, 8), (8, 16)])
@pytest.mark.parametrize("mode", ["direct", "tile", "auto"])
@pytest.mark.parametrize("batch", [33, 130])
def test_other_nm_take_the_gemm_path(n, m, mode, batch, poison, monkeypatch):
    # The 2:4 kernel never takes other N:M, even when forced ("direct").
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", mode)
    W = NMWeight.from_dense(torch.randn(29, 160), n, m)
    x = torch.randn(batch, 160)
    _check(x, W, torch.randn(29), torch.float32, f"{n}:{m} {mode} B={batch}")


@pytest.mark.parametrize("panels", [True, False])
def test_nm24_gemm_nan_and_inf_stay_in_their_columns(panels, monkeypatch):
    # K tail (K = 4 * 37: the last quad of slots is half padding) and padding rows must
    # not pick up an inf/NaN of x from a column the row does not keep, packed per call or
    # ahead (the pre-packed padding slots point at the zero column too).
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    monkeypatch.setattr(dispatch_rules, "CPU_GEMM_PANELS", panels)
    k = 4 * 37
    w = torch.randn(7, k)
    mask = torch.zeros(7, k, dtype=torch.bool)
    mask[:, 1::4] = True
    mask[:, 2::4] = True  # every row keeps columns 1, 2 of each group
    W = NMWeight.from_dense(w, 2, 4, mask=mask)
    x = torch.randn(40, k)
    x[:, 0] = float("inf")
    x[:, k - 1] = float("nan")
    x[5, 1] = float("nan")
    y = ops.nm_linear(x, W)
    assert torch.isnan(y[5]).all()
    rest = torch.cat([y[:5], y[6:]])
    assert torch.isfinite(rest).all()
    ref = ref64(torch.nan_to_num(x, nan=0.0, posinf=0.0), W.to_dense(), None)
    assert_linear_close(rest, torch.cat([ref[:5], ref[6:]]), torch.float32, what="inf/NaN in unkept columns")


def test_portable_build_takes_the_gemm_path():
    # SPARSEKERN_CPU_ISA=generic is read once per process: run a child.
    code = (
        "import torch, sparsekern; from sparsekern import ops; from sparsekern.formats import NMWeight\n"
        "torch.manual_seed(0); W = NMWeight.from_dense(torch.randn(37, 520), 2, 4); x = torch.randn(64, 520)\n"
        "y = ops.nm_linear(x, W); r = x.double() @ W.to_dense().double().t()\n"
        "assert ops.explain_backend('nm_linear', x, W)[0] == 'cpp'\n"
        "assert sparsekern._extension.BUILD_INFO['cpu_avx2_runtime'] is False\n"
        "e = ((y.double() - r).norm() / r.norm()).item(); assert e < 1e-5, e\n"
    )
    env = dict(os.environ, SPARSEKERN_CPU_ISA="generic")
    env.pop("SPARSEKERN_NM_GEMM", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_tile_gemm_path_spans_several_weight_tiles(monkeypatch):
    # The decompress + GEMM path takes tiles of about 16 MiB of dense fp32 weight: 4100 x
    # 4096 is five (1024 rows four times, then 4), each multiplied into its own columns of
    # the output.
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "tile")
    W = NMWeight.from_dense(torch.randn(4100, 4096), 2, 4)
    x = torch.randn(17, 4096)
    bias = torch.randn(4100)
    _check(x, W, bias, torch.float32, "2:4 tile path over two tiles")


# ---- the pre-packed weight (NMWeight.gemm_panels, layout in csrc/nm24_panels.h) ----------
@pytest.mark.parametrize("o,k", [(1, 4), (2, 12), (37, 148), (96, 128), (97, 260), (200, 4100), (300, 1028)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_panels_cpp_matches_the_torch_twin(o, k, dtype):
    # Two independent builders of the layout (C++ loops, torch gathers) agree byte for byte:
    # panels of 96 rows (one partial), K tails of a partial quad, rows past a 3-row block.
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), 2, 4)
    assert ops.explain_backend("nm24_pack_panels", W.values)[0] == "cpp"
    got = ops.nm24_pack_panels(W.values, W.indices, k)
    want = reference.nm24_pack_panels(W.values, W.indices, k)
    assert got.dtype == torch.uint8 and got.numel() == nm24_panels_bytes(o, k)
    assert torch.equal(got, want)


def test_gemm_panels_are_derived_explained_and_rebuilt_after_an_edit(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    W = NMWeight.from_dense(torch.randn(100, 264), 2, 4)
    x = torch.randn(40, 264)
    backend, why = ops.explain_backend("nm_linear", x, W)
    assert backend == "cpp" and ("gemm_panels" in why) == READS_PANELS
    assert "gemm_panels" not in ops.explain_backend("nm_linear", x[:16], W)[1]  # the row kernels below 17 rows
    ops.nm_linear(x, W)
    if not READS_PANELS:
        assert W.derived_nbytes == 0
        return
    first = W.gemm_panels()
    assert W.derived_nbytes == first.numel() == nm24_panels_bytes(100, 264)
    assert W.gemm_panels() is first  # kept with the weight
    assert set(W.tensors()) == {"values", "indices", "meta"}  # never saved
    with torch.no_grad():
        W.values.mul_(-2.0)  # an in-place edit (an optimizer step) invalidates it
    assert W.gemm_panels() is not first
    assert_linear_close(ops.nm_linear(x, W), ref64(x, W.to_dense(), None), torch.float32, what="after an edit")


@pytest.mark.parametrize("order", ["panels", "chunks"])
@pytest.mark.parametrize("o,k,batch", [(37, 148, 300), (100, 264, 1000), (192, 1028, 130)])
def test_pre_packed_weight_in_both_kernel_orders(order, o, k, batch, poison, monkeypatch):
    # The chunk order (a small weight, many rows: what ws_plan picks for convolutions and
    # thin layers) builds each chunk's x tiles with the layout's extra columns too.
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    monkeypatch.setenv("SPARSEKERN_WS_ORDER", order)
    W = NMWeight.from_dense(torch.randn(o, k), 2, 4)
    x = torch.randn(batch, k)
    y = _check(x, W, torch.randn(o), torch.float32, f"pre-packed, {order} order, {o}x{k} B={batch}")
    assert W.derived_nbytes == (nm24_panels_bytes(o, k) if READS_PANELS else 0)
    if READS_PANELS:  # and the kernel read it: zeroed bytes give zeros
        zeros = torch.zeros(nm24_panels_bytes(o, k), dtype=torch.uint8)
        assert not torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, k, None, GEMM, zeros).any()
        assert y.abs().sum() > 0


def test_gemm_panels_of_inference_tensors_and_misaligned_views(monkeypatch):
    # Tensors made under inference_mode track no version (the cache keys on their storage);
    # a layout handed over at an odd byte offset is copied before the kernel reads it.
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    with torch.inference_mode():
        W = NMWeight.from_dense(torch.randn(50, 520), 2, 4)
        x = torch.randn(64, 520)
        y = ops.nm_linear(x, W)
        assert W.gemm_panels() is W.gemm_panels()
    assert_linear_close(y, ref64(x, W.to_dense(), None), torch.float32, what="inference tensors")
    good = reference.nm24_pack_panels(W.values, W.indices, 520)
    buf = torch.zeros(good.numel() + 1, dtype=torch.uint8)
    buf[1:] = good
    odd = buf[1:]
    y_odd = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, 520, None, GEMM, odd)
    assert_linear_close(y_odd, ref64(x, W.to_dense(), None), torch.float32, what="odd offset")


@pytest.mark.skipif(not READS_PANELS, reason="the C++ op reads the pre-packed weight on AVX2/AVX-512 CPUs only")
def test_tampered_panels_stay_inside_x(monkeypatch):
    # Whatever the bytes, the kernel masks each offset into its K tile, which the x tiles
    # hold: random bytes must not crash (read out of bounds), and all-zero bytes (every value
    # 0) must give exactly the bias, which shows the kernel read them.
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    W = NMWeight.from_dense(torch.randn(100, 1028), 2, 4)  # the last K tile is 4 columns
    x = torch.randn(130, 1028)
    bias = torch.randn(100)
    size = nm24_panels_bytes(100, 1028)
    for order in ("panels", "chunks"):
        monkeypatch.setenv("SPARSEKERN_WS_ORDER", order)
        for _ in range(3):
            junk = torch.randint(0, 256, (size,), dtype=torch.uint8)
            y = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, 1028, bias, GEMM, junk)
            assert y.shape == (130, 100)
    monkeypatch.delenv("SPARSEKERN_WS_ORDER")
    zeros = torch.zeros(size, dtype=torch.uint8)
    y = torch.ops.sparsekern.nm_linear_cpu(x, W.values, W.indices, 2, 4, 1028, bias, GEMM, zeros)
    torch.testing.assert_close(y, bias.expand(130, 100), rtol=0, atol=0)


@pytest.mark.skipif(not READS_PANELS, reason="the 2:4 GEMM kernel runs on AVX2/AVX-512 CPUs only")
def test_bad_panels_and_algorithms_are_refused():
    """panels reach only the CPU-only op nm_linear_cpu (no other backend sees them), with the
    algorithm chosen in Python; the kernel checks both and does not choose again."""
    W = NMWeight.from_dense(torch.randn(30, 64), 2, 4)
    x = torch.randn(20, 64)
    good = reference.nm24_pack_panels(W.values, W.indices, 64)
    run = torch.ops.sparsekern.nm_linear_cpu
    bad = [(good.view(torch.int8), "panels"), (good[:-1], "panels must be 1-D with"),
           (good.view(2, -1), "panels must be 1-D with"), (torch.zeros(0, dtype=torch.uint8), "panels must be 1-D with")]
    for panels, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            run(x, W.values, W.indices, 2, 4, 64, None, GEMM, panels)
    W28 = NMWeight.from_dense(torch.randn(30, 64), 2, 8)
    with pytest.raises(ValueError, match="panels is a 2:4 layout"):
        run(x, W28.values, W28.indices, 2, 8, 64, None, GEMM, good)
    with pytest.raises(ValueError, match="algo 1 .* runs 2:4 weights"):
        run(x, W28.values, W28.indices, 2, 8, 64, None, GEMM, None)
    with pytest.raises(ValueError, match="panels are read by algo 1"):
        run(x, W.values, W.indices, 2, 4, 64, None, dispatch_rules.NM_ALGO_DECODE, good)
    with pytest.raises(ValueError, match="algo must be"):
        run(x, W.values, W.indices, 2, 4, 64, None, 7, None)
    for rows in (1, 5, 20):  # the kernel runs the algorithm it is given, at any batch
        for algo, panels in ((GEMM, good), (GEMM, None), (dispatch_rules.NM_ALGO_DECODE, None),
                             (dispatch_rules.NM_ALGO_TILES, None)):
            torch.testing.assert_close(run(x[:rows], W.values, W.indices, 2, 4, 64, None, algo, panels),
                                       x[:rows] @ W.to_dense().t(), rtol=1e-4, atol=1e-4)


def test_the_algorithm_follows_the_rules(monkeypatch):
    """What dispatch_rules.nm_cpu_algo says is what the key (and explain_backend) says."""
    W = NMWeight.from_dense(torch.randn(30, 64), 2, 4)
    monkeypatch.delenv("SPARSEKERN_NM_GEMM", raising=False)
    for rows in (1, 16, 17, 300):
        want = dispatch_rules.NM_ALGO_DECODE if rows <= dispatch_rules.CPU_ROWS_MAX_ROWS else \
            GEMM if rows >= dispatch_rules.NM24_GEMM_MIN_ROWS and READS_PANELS else dispatch_rules.NM_ALGO_TILES
        key = ops.OPS["nm_linear"].key(torch.randn(rows, 64), W)[1]
        assert key.cpu_algo == want, rows
        assert dispatch_rules.NM_ALGO_NAMES[want] in ops.explain_backend("nm_linear", torch.randn(rows, 64), W)[1]
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "tile")
    assert ops.OPS["nm_linear"].key(torch.randn(300, 64), W)[1].cpu_algo == dispatch_rules.NM_ALGO_TILES
    assert ops.OPS["nm_linear"].key(torch.randn(16, 64), W)[1].cpu_algo == dispatch_rules.NM_ALGO_DECODE


def test_pack_panels_refuses_bad_arguments():
    W = NMWeight.from_dense(torch.randn(30, 64), 2, 4)
    with pytest.raises(ValueError, match="values"):
        ops.nm24_pack_panels(W.values.double(), W.indices, 64)
    with pytest.raises(ValueError, match="in_features"):
        ops.nm24_pack_panels(W.values, W.indices, 60)
    with pytest.raises(ValueError, match="indices"):
        ops.nm24_pack_panels(W.values, W.indices[:, :-1], 64)
    with pytest.raises(ValueError, match="indices"):
        ops.nm24_pack_panels(W.values, W.indices.to(torch.int32), 64)
    with pytest.raises(ValueError, match="2:4 layout"):
        NMWeight.from_dense(torch.randn(30, 64), 2, 8).gemm_panels()
    # The raw op names its arguments too.
    with pytest.raises(ValueError, match="values must have shape"):
        torch.ops.sparsekern.nm24_pack_panels(W.values[:, :-1], W.indices, 64)
    with pytest.raises(ValueError, match="in_features"):
        torch.ops.sparsekern.nm24_pack_panels(W.values, W.indices, 66)


@pytest.mark.parametrize("winner", ["sparse", "decompress"])
def test_a_layer_keeps_the_pre_packed_weight_only_while_it_runs_sparse(winner, monkeypatch):
    # A layer measures its paths on the first batch of a bucket; the sparse path's call
    # builds the pre-packed weight. If another path wins in every bucket seen, the layer
    # drops it (models.held_bytes counts what is kept).
    import copy

    import sparsekern
    from sparsekern import models
    from sparsekern import nn as sknn

    def timed(runners, device, reps, cold, evict=None):
        for fn in runners.values():
            fn()
        return {p: (1.0 if p == winner else 2.0) for p in runners}

    monkeypatch.setattr(sknn, "measure_paths", timed)
    # derived_budget=None: keep what the kernel builds (the default budget drops the panels
    # after each call: tests/test_sparse_modules.py::test_derived_layouts_stay_within_the_policy_budget);
    # dense_copy_max_bytes=0, never_slower=False: this small layer measures "decompress", not
    # a kept dense copy nor "sparse_kept" (derived_budget=None keeps the panels anyway)
    model, _ = sparsekern.sparsify(copy.deepcopy(torch.nn.Sequential(torch.nn.Linear(256, 192))), "2:4",
                                   method="l1", show_progress=False,
                                   policy=sknn.Policy(derived_budget=None, dense_copy_max_bytes=0,
                                                      never_slower=False))
    x = torch.randn(40, 256)
    with torch.no_grad():
        y = model(x)
    layer = model[0]
    assert layer.bucket_choices[ops.batch_bucket(40)].path == winner
    kept = nm24_panels_bytes(192, 256) if (winner == "sparse" and READS_PANELS) else 0
    assert layer.weight_format().derived_nbytes == kept == models.held_bytes(model)
    assert_linear_close(y, ref64(x, layer.weight_format().to_dense(), layer.bias), torch.float32, what=winner)
