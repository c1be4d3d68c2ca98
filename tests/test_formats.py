"""Formats: hand-checked layouts, byte arithmetic, round trips, validation."""
import io

import pytest
import torch

from sparsekern import ops, reference
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight

BACKENDS = ["auto", "reference"]


def _with(backend):
    return ops.use_backend(None if backend == "auto" else backend)


# ---------------------------------------------------------------- hand-checked cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_nm24_hand_checked(backend):
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 0.0, 2.0, -2.0, 1.0]])
    with _with(backend):
        W = NMWeight.from_dense(w, 2, 4)
    # group 0: |-5| and |3| -> columns 1, 2; group 1: tie |2| = |-2| -> columns 1, 2
    assert W.values.tolist() == [[-5.0, 3.0, 2.0, -2.0]]
    # slots: 1, 2, 1, 2 at 2 bits each, little-endian: 0b10_01_10_01
    assert W.indices.tolist() == [[0b10011001]]
    assert W.to_dense().tolist() == [[0.0, -5.0, 3.0, 0.0, 0.0, 2.0, -2.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nm_mask_with_fewer_kept_pads_with_zeros(backend):
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[False, False, True, False]])
    with _with(backend):
        W = NMWeight.from_dense(w, 2, 4, mask=mask)
    assert W.to_dense().tolist() == [[0.0, 0.0, 3.0, 0.0]]
    assert W.values.tolist() == [[0.0, 3.0]]  # padding slot at column 0 holds a zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmask_hand_checked(backend):
    w = torch.zeros(2, 70)
    w[0, 0], w[0, 65], w[1, 3] = 1.0, 2.0, 3.0
    with _with(backend):
        W = BitmaskWeight.from_dense(w)
    assert W.values.tolist() == [1.0, 2.0, 3.0]
    assert W.bitmask.tolist() == [[1, 2], [8, 0]]
    assert W.offsets.tolist() == [[0], [2]]
    assert torch.equal(W.to_dense(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_hand_checked(backend):
    w = torch.zeros(4, 6)
    w[0, 3] = 1.0
    w[3, 0] = 2.0
    with _with(backend):
        W = BlockWeight.from_dense(w, (2, 3))
    assert W.crow_indices.tolist() == [0, 1, 2]
    assert W.col_indices.tolist() == [1, 0]
    assert W.values.tolist() == [[[1.0, 0, 0], [0, 0, 0]], [[0, 0, 0], [2.0, 0, 0]]]
    assert torch.equal(W.to_dense(), w)
    S = torch.sparse_bsr_tensor(W.crow_indices, W.col_indices, W.values, size=(4, 6))
    assert torch.equal(S.to_dense(), w)


# ------------------------------------------------------- kernels agree with reference
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 8), (5, 16), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nm_compress_matches_reference(n, m, dtype):
    w = torch.randn(37, 3 * 16, dtype=dtype)
    v, ix = ops.nm_compress(w, None, n, m)
    rv, rix = reference.nm_compress(w, None, n, m)
    assert torch.equal(v, rv) and torch.equal(ix, rix)
    dense = ops.nm_decompress(v, ix, n, m, w.shape[1])
    assert torch.equal(dense, reference.nm_decompress(rv, rix, n, m, w.shape[1]))
    assert torch.equal(dense, w * reference.nm_mask(w, n, m))
    mask = torch.rand(37, 48) < 0.3
    mask &= reference.nm_mask(torch.rand(37, 48), n, m)  # any subset of an N:M mask
    v, ix = ops.nm_compress(w, mask, n, m)
    assert torch.equal(ops.nm_decompress(v, ix, n, m, 48), w * mask)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (5, 64), (33, 100), (8, 1100)])
def test_bitmask_round_trip(density, shape):
    w = torch.randn(shape)
    mask = torch.rand(shape) < density
    W = BitmaskWeight.from_dense(w, mask)
    R = reference.bitmask_compress(w, mask)
    for a, b in zip((W.values, W.bitmask, W.offsets), R):
        assert torch.equal(a, b)
    assert torch.equal(W.to_dense(), w * mask)
    assert torch.equal(W.mask(), mask)
    assert W.density == pytest.approx(mask.float().mean().item())


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (1, 64), (8, 4)])
def test_block_round_trip(block):
    w = torch.randn(64, 128)
    keep = torch.rand(64 // block[0], 128 // block[1]) < 0.3
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    W = BlockWeight.from_dense(w, block, mask)
    R = reference.block_compress(w, mask, *block)
    for a, b in zip((W.crow_indices, W.col_indices, W.values), R):
        assert torch.equal(a, b)
    assert torch.equal(W.to_dense(), w * mask)
    assert W.values.shape[0] == int(keep.sum())


# ------------------------------------------------------------------- byte arithmetic
def test_sizes_follow_the_arithmetic():
    w = torch.randn(256, 1024, dtype=torch.bfloat16)
    dense = w.numel() * 2
    assert NMWeight.from_dense(w, 2, 4).nbytes / dense == pytest.approx(0.5625)
    for density, expected in ((0.5, 0.5625), (0.1, 0.1625)):
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.randperm(w.numel())[: int(density * w.numel())]] = True
        W = BitmaskWeight.from_dense(w, mask.view_as(w))
        offsets = W.offsets.numel() * 4 / dense
        assert (W.nbytes / dense - offsets) == pytest.approx(expected, abs=1e-5)  # count rounded down
        assert offsets < 0.005
    assert NMWeight.from_dense(w, 4, 8).nbytes / dense == pytest.approx(0.5 + 0.125)


# --------------------------------------------------------------- tensors and saving
@pytest.mark.parametrize("make", [
    lambda w: NMWeight.from_dense(w, 2, 4),
    lambda w: NMWeight.from_dense(w, 3, 8),
    lambda w: BitmaskWeight.from_dense(w, torch.rand_like(w) < 0.3),
    lambda w: BlockWeight.from_dense(w, (16, 16), torch.rand_like(w) < 0.01),
])
def test_tensors_round_trip_through_torch_save(make):
    W = make(torch.randn(32, 64))
    buf = io.BytesIO()
    torch.save(W.tensors(), buf)
    buf.seek(0)
    d = torch.load(buf, weights_only=True)
    W2 = type(W).from_tensors(d)
    assert torch.equal(W2.to_dense(), W.to_dense())
    assert W2.nbytes == W.nbytes


def test_to_changes_dtype_and_keeps_structure():
    W = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
    Wb = W.to(dtype=torch.bfloat16)
    assert Wb.dtype == torch.bfloat16 and torch.equal(Wb.indices, W.indices)
    with pytest.raises(TypeError, match="dtype"):
        W.to(dtype=torch.int32)


# ------------------------------------------------------------------------ bad input
def test_bad_nm_parameters():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="n must satisfy"):
        NMWeight.from_dense(w, 4, 4)
    with pytest.raises(ValueError, match="m must be 4, 8 or 16"):
        NMWeight.from_dense(w, 2, 6)
    with pytest.raises(ValueError, match="divisible by m"):
        NMWeight.from_dense(torch.randn(4, 18), 2, 4)


def test_mask_that_is_not_nm_is_refused():
    w = torch.randn(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask is not 2:4"):
        NMWeight.from_dense(w, 2, 4, mask=mask)
    with ops.use_backend("reference"), pytest.raises(ValueError, match="mask is not 2:4"):
        NMWeight.from_dense(w, 2, 4, mask=mask)


@pytest.mark.parametrize("cls,kw", [(NMWeight, {}), (BitmaskWeight, {}), (BlockWeight, {"block": (2, 2)})])
def test_bad_weights_and_masks(cls, kw):
    with pytest.raises(ValueError, match="mask shape"):
        cls.from_dense(torch.randn(4, 8), mask=torch.ones(4, 4, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="mask must be a bool"):
        cls.from_dense(torch.randn(4, 8), mask=torch.ones(4, 8), **kw)
    with pytest.raises(TypeError, match="floating"):
        cls.from_dense(torch.ones(4, 8, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match="2-D"):
        cls.from_dense(torch.randn(4, 8, 2), **kw)
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 8)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            cls.from_dense(w, **kw)


def test_bad_block_shapes():
    with pytest.raises(ValueError, match="divisible by block"):
        BlockWeight.from_dense(torch.randn(10, 16), (4, 4))
    with pytest.raises(ValueError, match="two positive ints"):
        BlockWeight.from_dense(torch.randn(8, 16), (0, 4))


def test_corrupt_tensors_are_refused_on_load():
    W = NMWeight.from_dense(torch.randn(4, 32), 2, 8)
    d = W.tensors()
    d["indices"] = torch.full_like(d["indices"], 0xFF)  # in-group index 15 >= m = 8
    with pytest.raises(ValueError, match="index >= m"):
        NMWeight.from_tensors(d)
    B = BitmaskWeight.from_dense(torch.randn(4, 100), torch.rand(4, 100) < 0.5)
    d = B.tensors()
    d["values"] = d["values"][:-1]
    with pytest.raises(ValueError, match="values has"):
        BitmaskWeight.from_tensors(d)
    d = B.tensors()
    d["bitmask"] = d["bitmask"] | (1 << 40)  # bit for column 104 > in_features
    with pytest.raises(ValueError, match="beyond in_features"):
        BitmaskWeight.from_tensors(d)
    d = B.tensors()
    d["offsets"] = d["offsets"] + 1
    with pytest.raises(ValueError, match="offsets"):
        BitmaskWeight.from_tensors(d)
    K = BlockWeight.from_dense(torch.randn(8, 8), (4, 4))
    d = K.tensors()
    d["col_indices"] = d["col_indices"] + 5
    with pytest.raises(ValueError, match="col_indices out of range"):
        BlockWeight.from_tensors(d)


@pytest.mark.parametrize("edit", ["offsets", "bitmask"])
def test_an_in_place_edit_after_validation_is_refused_not_run(edit):
    """issue 31: w.offsets.fill_(int32 max) after validation used to reach the kernel (a
    segfault); the format's version stamps now send it through validate() again."""
    w = BitmaskWeight.from_dense(torch.randn(64, 600), torch.rand(64, 600) < 0.3)
    x = torch.randn(2, 600)
    ops.bitmask_linear(x, w)
    assert w.is_validated
    t = getattr(w, edit)
    t.fill_(torch.iinfo(t.dtype).max)
    assert not w.is_validated
    with pytest.raises(ValueError, match="not a valid BitmaskWeight"):
        ops.bitmask_linear(x, w)


def test_an_in_place_edit_that_stays_valid_is_validated_again_and_runs():
    w = NMWeight.from_dense(torch.randn(16, 64))
    x = torch.randn(3, 64)
    w.values.mul_(2)
    assert not w.is_validated
    torch.testing.assert_close(ops.nm_linear(x, w), x @ w.to_dense().T, rtol=1e-5, atol=1e-5)
    assert w.is_validated
