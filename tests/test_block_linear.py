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


@pytest.mark.parametrize("device,backend", [p for p in pairs("block_linear") if p.id == "cpu-cpp"])
@pytest.mark.parametrize("batch", [1, 16, 17, 40])
@pytest.mark.parametrize("density", [0.1, 0.6])
def test_every_cpu_algorithm_matches_fp64_at_any_batch(device, backend, batch, density, poison):
    """block_linear_cpu runs the algorithm it is given (dispatch_rules.block_cpu_algo chooses
    it), at any batch: the row kernel, the per-block-row GEMMs, the tiles."""
    from sparsekern import dispatch_rules as rules

    keep = torch.rand(4, 6) < density
    W = BlockWeight.from_dense(torch.randn(64, 96), (16, 16), keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    x, bias = torch.randn(batch, 96), torch.randn(64)
    for algo in rules.BLOCK_ALGO_NAMES:
        y = torch.ops.sparsekern.block_linear_cpu(x, *W.kernel_args(), bias, algo)
        assert_linear_close(y, ref64(x, W.to_dense(), bias), torch.float32, what=f"algo {algo}")
    for algo in (-1, 3):
        with pytest.raises(ValueError, match="block_linear: algo must be 0"):
            torch.ops.sparsekern.block_linear_cpu(x, *W.kernel_args(), bias, algo)


@pytest.mark.parametrize("rows", [1, 16, 17, 300])
@pytest.mark.parametrize("density", [0.1, 0.6])
def test_the_algorithm_follows_the_rules(rows, density, monkeypatch):
    """What dispatch_rules.block_cpu_algo says is what the key and explain_backend say."""
    from sparsekern import dispatch_rules as rules

    keep = torch.rand(4, 6) < density
    W = BlockWeight.from_dense(torch.randn(64, 96), (16, 16), keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    x = torch.randn(rows, 96)
    monkeypatch.delenv("SPARSEKERN_BLOCK_GEMM", raising=False)
    want = rules.block_cpu_algo(rules.bucket_min_rows(rules.batch_bucket(rows)), W.density)
    expect = rules.BLOCK_ALGO_DECODE if rows <= rules.CPU_ROWS_MAX_ROWS else \
        rules.BLOCK_ALGO_ROW_GEMM if W.density <= rules.BLOCK_ROW_GEMM_MAX_DENSITY else rules.BLOCK_ALGO_TILES
    assert want == expect
    assert ops.OPS["block_linear"].key(x, W)[1].cpu_algo == want
    monkeypatch.setenv("SPARSEKERN_BLOCK_GEMM", "tile")
    assert ops.OPS["block_linear"].key(x, W)[1].cpu_algo != rules.BLOCK_ALGO_ROW_GEMM
