import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before any
# kernel is defined (sparsekern.triton is imported lazily, by the tests that use it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reads or writes the user's on-disk tuning cache (sparsekern.decisions): a choice
# stored by an earlier run would stand in for the measurement a test makes or fakes.
# tests/test_tuning_cache.py points it at a temporary folder.
os.environ["SPARSEKERN_TUNING_CACHE"] = "off"

import sparsekern

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
LOW_PRECISION = (torch.bfloat16, torch.float16)
needs_extension = pytest.mark.skipif(not sparsekern._extension.LOADED,
                                     reason=f"compiled extension not loaded: {sparsekern._extension.LOAD_ERROR}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    # Per-bucket path choices are shared between identical layers for the whole process
    # (nn.Policy.share); a test starts without another test's measurements.
    sparsekern.nn.clear_shared_choices()
    yield


@pytest.fixture
def exact_products(monkeypatch):
    """Asks nm_linear_q / bitmask_linear_q for exact products (fp32 activations, weights
    dequantized in registers), for tests of those kernels to fp32's tolerance: the default
    on AVX512_VNNI CPUs rounds x per row to int8 on every path
    (dispatch_rules.q_activations_int8), tested with its own references in
    tests/test_decode_q.py. Child processes inherit the setting."""
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "exact")


@pytest.fixture
def poison():
    """Makes every uninitialised allocation (torch.empty, at::empty in the kernels) come
    back filled with NaN, so an output element a kernel forgets to write shows up."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_linear_close(out, ref64, dtype, torch_lowp_out=None, what=""):
    """fp32: relative error under 1e-5. bf16/fp16: at most 2x the error of torch's own
    linear in that dtype against the same fp64 reference (flash-attention's rule)."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype} != {dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    if dtype == torch.float32:
        assert err < 1e-5, f"{what}: fp32 relative error {err:.2e}"
    else:
        base = rel_err(torch_lowp_out, ref64)
        assert err <= 2 * base + 1e-6, f"{what}: {dtype} error {err:.2e} > 2x torch's {base:.2e}"
