"""block_linear: compiled CPU kernel and reference against fp64."""
import pytest
import torch

from backends import pairs, running
from conftest import assert_linear_close
from linear_cases import DTYPES, lowp_torch_linear, ref64
from sparsekern import ops
from sparsekern.formats import BlockWeight


@pytest.mark.parametrize("device,backend", pairs("block_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (17,), (2, 5), (0,)])
@pytest.mark.parametrize("block,shape", [((16, 16), (48, 96)), ((32, 32), (64, 160)), ((64, 64), (64, 192)),
                                         ((4, 8), (12, 40))])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
def test_block_linear_matches_fp64(device, backend, dtype, lead, block, shape, density, poison):
    o, k = shape
    w = torch.randn(o, k, device=device, dtype=dtype)
    keep = torch.rand(o // block[0], k // block[1], device=device) < density
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    W = BlockWeight.from_dense(w, block, mask)
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    bias = torch.randn(o, device=device, dtype=dtype)
    with running(backend, "block_linear", x, W):
        y = ops.block_linear(x, W, bias)
    dense = W.to_dense()
    assert_linear_close(y, ref64(x, dense, bias), dtype, lowp_torch_linear(x, dense, bias),
                        f"block_linear {block} {density} {device} {dtype} x{tuple(x.shape)}")


@pytest.mark.parametrize("mode", ["tile", "auto"])
@pytest.mark.parametrize("density", [0.1, 0.6])
@pytest.mark.parametrize("batch", [17, 70])
def test_block_large_batch_paths_match_fp64(mode, density, batch, poison, monkeypatch):
    """Above 16 rows the CPU op runs one GEMM per block row over its kept blocks (at most
    30% of blocks kept) or decompressed tiles (denser, or SPARSEKERN_BLOCK_GEMM=tile)."""
    if mode == "tile":
        monkeypatch.setenv("SPARSEKERN_BLOCK_GEMM", "tile")
    else:
        monkeypatch.delenv("SPARSEKERN_BLOCK_GEMM", raising=False)
    w = torch.randn(96, 320)
    keep = torch.rand(96 // 32, 320 // 32) < density
    keep[1] = False  # an empty block row
    W = BlockWeight.from_dense(w, (32, 32), keep.repeat_interleave(32, 0).repeat_interleave(32, 1))
    x = torch.randn(batch, 320)
    assert ops.explain_backend("block_linear", x, W)[0] == "cpp"
    y = ops.block_linear(x, W)
    assert_linear_close(y, ref64(x, W.to_dense(), None), torch.float32, what=f"block {mode} {density} {batch}")


def test_bad_inputs():
    W = BlockWeight.from_dense(torch.randn(8, 16), (4, 4))
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        ops.block_linear(torch.randn(2, 8), W)
    with pytest.raises(TypeError, match="x dtype"):
        ops.block_linear(torch.randn(2, 16, dtype=torch.float16), W)
