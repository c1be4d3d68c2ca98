"""nm_linear's large-batch CPU paths (batch > 16) against fp64: the 2:4 weight-stationary
kernel (csrc/cpu/nm_gemm_impl.h with AVX2, avx512::nm24_gemm on AVX-512 CPUs; both builds
also in tests/test_cpu_isa.py) and the decompress + GEMM path that every other N:M (and the
portable build) takes.

SPARSEKERN_NM_GEMM (read by the C++ op on every call): "direct" forces the 2:4 kernel,
"tile" the decompress + GEMM path; unset, the op picks by batch."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_linear_close, needs_extension
from linear_cases import lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.formats import NMWeight

pytestmark = needs_extension

KS = [4 * 37, 520, 1100]
BATCHES = [17, 33, 64, 127, 130, 300]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


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
def test_nm24_gemm_matches_fp64(mode, dtype, k, batch, with_bias, poison, monkeypatch):
    if mode == "direct":
        monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
    else:
        monkeypatch.delenv("SPARSEKERN_NM_GEMM", raising=False)
    o = 37  # not a multiple of the kernel's 3-row block
    W = NMWeight.from_dense(torch.randn(o, k, dtype=dtype), 2, 4)
    # 3-D x for odd batches: [batch, 1, k] -> flattened rows inside the op
    x = torch.randn(batch, k, dtype=dtype) if batch % 2 == 0 else torch.randn(batch, 1, k, dtype=dtype)
    bias = torch.randn(o, dtype=dtype) if with_bias else None
    _check(x, W, bias, dtype, f"2:4 {mode} {dtype} x{tuple(x.shape)} K={k}")


@pytest.mark.parametrize("batch", [17, 64, 300])
def test_nm24_gemm_agrees_with_tile_gemm_path(batch, poison, monkeypatch):
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


def test_nm24_gemm_nan_and_inf_stay_in_their_columns(monkeypatch):
    # K tail (K = 4 * 37: the last quad of slots is half padding) and padding rows must
    # not pick up an inf/NaN of x from a column the row does not keep.
    monkeypatch.setenv("SPARSEKERN_NM_GEMM", "direct")
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
