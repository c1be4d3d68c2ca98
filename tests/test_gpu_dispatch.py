"""GPU dispatch decisions, checked on any machine: the measured-timings table (sparsekern/
tuning.py) with injected timings, and sparsekern.ops' choice for CUDA tensors on a simulated
H100 (fake CUDA tensors, the capability, name and library checks patched), so every reason
explain_backend gives on a GPU is exercised without one. Nothing here runs a kernel."""
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsekern import _extension, dispatch_rules, ops, tuning

H100 = "NVIDIA H100 80GB HBM3"
BF16 = torch.bfloat16


@pytest.fixture
def table():
    tuning.clear()
    ops.clear_decisions()
    yield tuning
    tuning.clear()
    ops.clear_decisions()


@pytest.fixture
def gpu(monkeypatch, table):
    """A simulated H100 with the CUDA kernels built for it, cuSPARSELt and CUTLASS present."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "LOADED", True)
    monkeypatch.setattr(_extension, "BUILD_INFO", dict(_extension.BUILD_INFO, with_cuda=True, cuda_archs="90a"))
    monkeypatch.setattr(_extension, "cuda_kernels_available", lambda device=None: True)
    yield
    ops.clear_decisions()


def fake_x(rows, k, dtype=BF16):
    with FakeTensorMode():
        return torch.empty(rows, k, device="cuda", dtype=dtype)


def nm(n=2, m=4, out=4096, k=4096):
    return SimpleNamespace(n=n, m=m, shape=(out, k), in_features=k)


# ---------------------------------------------------------------- the table, pure
def test_choose_takes_the_fastest_unless_the_first_in_order_is_within_noise():
    assert dispatch_rules.fastest_within({"cuda": 1.0, "cusparselt": 0.5}) == "cusparselt"
    assert dispatch_rules.fastest_within({"cuda": 1.0, "cusparselt": 0.99}, order=("cuda",)) == "cuda"
    assert dispatch_rules.fastest_within({"cuda": 1.0, "cusparselt": 0.9}, order=("cuda",)) == "cusparselt"
    with pytest.raises(ValueError):
        dispatch_rules.fastest_within({})


def test_verdict_names_both_times_and_prefers_the_exact_shape(table):
    table.record("nm_linear", H100, BF16, 16, None, {"cuda": 0.010, "cusparselt": 0.020})
    table.record("nm_linear", H100, BF16, 16, (8192, 8192), {"cuda": 0.050, "cusparselt": 0.030})
    verdict = dispatch_rules.measured_verdict
    why = verdict("nm_linear", "cusparselt", H100, BF16, 16, (4096, 4096))
    assert "measured slower" in why and "cuda 0.0100 ms" in why and "cusparselt 0.0200 ms" in why
    assert verdict("nm_linear", "cuda", H100, BF16, 16, (4096, 4096)) is None
    assert verdict("nm_linear", "cusparselt", H100, BF16, 16, (8192, 8192)) is None
    assert verdict("nm_linear", "cuda", H100, BF16, 16, (8192, 8192)) is not None
    assert verdict("nm_linear", "cuda", "NVIDIA H200", BF16, 16, None) is None  # other card: no data
    with pytest.raises(ValueError, match="positive"):
        table.record("nm_linear", H100, BF16, 1, None, {"cuda": -1})


def test_tuning_file_round_trip(table, tmp_path):
    table.record("bitmask_linear", H100, BF16, 4, (4096, 11008), {"cuda": 0.02, "triton": 0.03})
    path = tmp_path / "tuning.json"
    table.save(str(path))
    table.clear()
    assert table.lookup("bitmask_linear", H100, BF16, 4, (4096, 11008)) is None
    assert table.load(str(path)) == 1
    assert table.lookup("bitmask_linear", H100, "bfloat16", 4, (4096, 11008)) == {"cuda": 0.02, "triton": 0.03}
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a sparsekern tuning file"):
        table.load(str(tmp_path / "bad.json"))


# ---------------------------------------------------- ops on a simulated GPU
def test_decode_buckets_run_the_cuda_kernel_and_say_why_not_the_gemms(gpu):
    for rows in (1, 4, 16, 64):
        backend, why = ops.explain_backend("nm_linear", fake_x(rows, 4096), nm())
        assert backend == "cuda", why
        assert "cusparselt: batch bucket" in why and "decode kernel" in why and "cutlass: batch bucket" in why


def test_large_buckets_run_cusparselt_first(gpu):
    for rows in (65, 256, 2048, 70000):
        backend, why = ops.explain_backend("nm_linear", fake_x(rows, 4096), nm())
        assert backend == "cusparselt", why
        assert "cuSPARSELt" in why


def test_cutlass_when_cusparselt_is_missing_and_a_gemm_when_the_shape_does_not_fit(gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    backend, why = ops.explain_backend("nm_linear", fake_x(512, 4096), nm())
    assert backend == "cutlass" and "no cuSPARSELt" in why
    ops.clear_decisions()
    # 512 rows: not the decode kernel (dispatch_rules.CUDA_DECODE_MAX_ROWS) but the next in
    # order, Triton's GEMM over the weight decompressed in tiles
    backend, why = ops.explain_backend("nm_linear", fake_x(512, 4096), nm(out=4104))
    assert backend == "triton" and "out % 32" in why and "CUDA_DECODE_MAX_ROWS" in why


@pytest.mark.parametrize("op,weight,last_decode_rows", [("nm_linear", nm(4, 8), 64),
                                                        ("bitmask_linear", None, 16)])
def test_the_cuda_decode_kernels_run_up_to_their_limit_and_a_gemm_above(gpu, op, weight, last_decode_rows):
    """The batch limit of the CUDA decode kernels is decided in dispatch_rules, per bucket; the
    GPU timing table overrides it where it measured the key."""
    assert dispatch_rules.CUDA_DECODE_MAX_ROWS[op] == last_decode_rows
    w = weight if weight is not None else SimpleNamespace(shape=(4096, 4096), in_features=4096, density=0.3,
                                                           COLUMN_INDEX_MAX_IN=1 << 15)
    for rows, decode in ((1, True), (last_decode_rows, True), (last_decode_rows + 1, False), (4096, False)):
        ops.clear_decisions()
        backend, why = ops.explain_backend(op, fake_x(rows, 4096), w)
        assert (backend == "cuda") == decode, (rows, backend, why)
        if not decode:
            assert backend in ("triton", "reference") and "CUDA_DECODE_MAX_ROWS" in why
    assert dispatch_rules.cuda_decode_verdict(op, None) is None
    assert dispatch_rules.cuda_decode_verdict("block_linear", -1) is None  # no limit declared


def test_the_timing_table_overrides_the_decode_limit(gpu, table):
    bucket = 256
    table.record("nm_linear", H100, BF16, bucket, (4096, 4096), {"cuda": 0.010, "triton": 0.020})
    backend, why = ops.explain_backend("nm_linear", fake_x(200, 4096), nm(4, 8))
    assert backend == "cuda", why
    ops.clear_decisions()
    table.record("nm_linear", H100, BF16, bucket, (4096, 4096), {"cuda": 0.030, "triton": 0.020})
    backend, why = ops.explain_backend("nm_linear", fake_x(200, 4096), nm(4, 8))
    assert backend == "triton" and "measured slower" in why


@pytest.mark.parametrize("n,m,dtype,needle", [(4, 8, BF16, "2:4 only"), (2, 4, torch.float32, "bfloat16/float16")])
def test_patterns_and_dtypes_the_gemms_do_not_take(gpu, n, m, dtype, needle):
    backend, why = ops.explain_backend("nm_linear", fake_x(512, 4096, dtype), nm(n, m))
    assert backend == "triton" and needle in why  # above the CUDA decode kernel's rows: Triton's GEMM


def test_without_the_weight_the_gemms_pass_and_say_they_need_it(gpu):
    backend, why = ops.explain_backend("nm_linear", fake_x(512, 4096))
    assert backend == "triton" and "needs the weight" in why


def test_measured_timings_override_the_static_rule_both_ways(gpu, table):
    # at 16 rows the table measured cuSPARSELt faster than the decode kernel: it runs there
    table.record("nm_linear", H100, BF16, 16, (4096, 4096), {"cuda": 0.0150, "cusparselt": 0.0100})
    backend, why = ops.explain_backend("nm_linear", fake_x(16, 4096), nm())
    assert backend == "cusparselt", why
    # at 256 rows the decode kernel measured faster than both GEMMs: they are passed over
    table.record("nm_linear", H100, BF16, 256, (4096, 4096),
                 {"cuda": 0.0300, "cusparselt": 0.0450, "cutlass": 0.0500})
    backend, why = ops.explain_backend("nm_linear", fake_x(200, 4096), nm())
    assert backend == "cuda", why
    assert "cusparselt: measured slower" in why and "cuda 0.0300 ms" in why
    # another shape of the same bucket has no row: the static rule again
    backend, _ = ops.explain_backend("nm_linear", fake_x(200, 4096), nm(out=8192, k=8192))
    assert backend == "cusparselt"


def test_measured_timings_can_prefer_triton_over_the_cuda_kernel(gpu, table):
    table.record("bitmask_linear", H100, BF16, 4, None, {"cuda": 0.040, "triton": 0.020})
    with FakeTensorMode():
        x = torch.empty(3, 4096, device="cuda", dtype=BF16)
    backend, why = ops.explain_backend("bitmask_linear", x)
    assert backend == "triton", why
    assert "cuda: measured slower" in why


def test_forcing_ignores_preferences_but_not_capabilities(gpu, table):
    """use_backend() runs a backend the bucket rule or the timings would pass over, and
    refuses one that cannot run, with the reason."""
    backend, why = None, None
    with ops.use_backend("cutlass"):
        backend, why = ops.explain_backend("nm_linear", fake_x(8, 4096), nm())
    assert backend == "cutlass" and "forced" in why
    table.record("nm_linear", H100, BF16, 4, None, {"cuda": 0.05, "triton": 0.01})
    with ops.use_backend("cuda"):
        assert ops.explain_backend("nm_linear", fake_x(4, 4096), nm())[0] == "cuda"
    with ops.use_backend("cusparselt"), pytest.raises(RuntimeError, match="cannot run here: cusparselt runs 2:4 only"):
        ops.explain_backend("nm_linear", fake_x(512, 4096), nm(4, 8))


def test_gemm_ops_are_registered_with_the_shared_fake(gpu):
    backend, _ = ops.explain_backend("nm_linear", fake_x(512, 4096), nm())
    assert backend == "cusparselt"  # building the decision registered the custom ops' fakes
    with FakeTensorMode():
        x = torch.empty(5, 7, 64, device="cuda", dtype=BF16)
        v = torch.empty(48, 32, device="cuda", dtype=BF16)
        ix = torch.empty(48, 8, device="cuda", dtype=torch.uint8)
        for ns in ("sparsekern_cusparselt", "sparsekern_cutlass"):
            y = getattr(torch.ops, ns).nm_linear(x, v, ix, 2, 4, 64, None)
            assert y.shape == (5, 7, 48) and y.dtype == BF16


def test_the_default_large_batch_buckets_are_the_documented_ones():
    assert dispatch_rules.SEMI_STRUCTURED_BUCKETS == (256, -1)
    assert [ops.batch_bucket(r) in dispatch_rules.SEMI_STRUCTURED_BUCKETS for r in (64, 65)] == [False, True]
