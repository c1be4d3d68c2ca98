"""Cutting compressed weights into shards and joining them again (no process group).

The formats' slice_rows / slice_cols / cat_rows / cat_cols (what tensor parallelism cuts
with), hand-checked on tiny weights, round-tripped on awkward shapes, refused at illegal
cuts; and the state-dict stack layout of sparsekern.parallel.layout undone by
unshard_state_dict."""
from __future__ import annotations

import pytest
import torch

from sparsekern import formats, kinds
from sparsekern.parallel import layout, unshard_state_dict


def tensors_equal(a, b):
    assert type(a) is type(b)
    assert a.shape == b.shape
    for name in a.TENSOR_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.meta(), b.meta())


# --------------------------------------------------------------- hand-checked
def test_nm_slice_cols_hand_checked():
    w = torch.tensor([[1., 0., 2., 0., 0., 3., 0., 4.],
                      [0., 5., 0., 6., 7., 0., 8., 0.]])
    f = formats.NMWeight.from_dense(w, 2, 4)
    right = f.slice_cols(4, 8)
    assert right.values.tolist() == [[3., 4.], [7., 8.]]
    assert right.indices.tolist() == [[1 | 3 << 2], [0 | 2 << 2]]  # in-group columns, 2 bits each
    assert right.in_features == 4
    assert torch.equal(right.to_dense(), w[:, 4:])
    assert f.slice_rows(1, 2).values.tolist() == [[5., 6., 7., 8.]]


def test_bitmask_slice_hand_checked():
    w = torch.zeros(2, 128)
    w[0, 3], w[0, 70], w[1, 64], w[1, 127], w[1, 5] = 1., 2., 3., 4., 5.
    f = formats.BitmaskWeight.from_dense(w)
    right = f.slice_cols(64, 128)
    assert right.values.tolist() == [2., 3., 4.]
    assert right.bitmask.tolist() == [[1 << 6], [1 | -(1 << 63)]]  # bits 6; 0 and 63 (the sign bit)
    assert right.offsets.tolist() == [[0], [1]]
    bottom = f.slice_rows(1, 2)
    assert bottom.values.tolist() == [5., 3., 4.] and bottom.offsets.tolist() == [[0]]


def test_block_slice_hand_checked():
    w = torch.zeros(4, 4)
    w[0:2, 2:4] = torch.tensor([[1., 2.], [3., 4.]])
    w[2:4, 0:2] = torch.tensor([[5., 6.], [7., 8.]])
    f = formats.BlockWeight.from_dense(w, (2, 2))
    right = f.slice_cols(2, 4)
    assert right.crow_indices.tolist() == [0, 1, 1]
    assert right.col_indices.tolist() == [0]
    assert right.values.tolist() == [[[1., 2.], [3., 4.]]]
    bottom = f.slice_rows(2, 4)
    assert bottom.crow_indices.tolist() == [0, 1] and bottom.col_indices.tolist() == [0]


# ----------------------------------------------------------------- round trips
def _sparse(rows, cols, density=0.3, dtype=torch.float32):
    w = torch.randn(rows, cols)
    return (w * (torch.rand(rows, cols) < density)).to(dtype)


CASES = {
    "2:4": (lambda: formats.NMWeight.from_dense(torch.randn(7, 96), 2, 4), 4),
    "3:8 bf16": (lambda: formats.NMWeight.from_dense(torch.randn(5, 48).bfloat16(), 3, 8), 8),
    "1:16": (lambda: formats.NMWeight.from_dense(torch.randn(3, 64), 1, 16), 16),
    "bitmask 200 cols": (lambda: formats.BitmaskWeight.from_dense(_sparse(7, 200)), 64),
    "bitmask 3 tiles": (lambda: formats.BitmaskWeight.from_dense(_sparse(5, 1100, 0.1)), 64),
    "bitmask empty rows": (lambda: formats.BitmaskWeight.from_dense(_sparse(6, 128, 0.01)), 64),
    "block 16x32": (lambda: formats.BlockWeight.from_dense(
        torch.randn(64, 128) * torch.rand(4, 4).lt(0.5).repeat_interleave(16, 0).repeat_interleave(32, 1), (16, 32)),
        32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_cut_and_join_round_trip(case, parts):
    """Cut into `parts` shards along columns (at the format's step) and along rows: each
    shard is the dense slice, and joining them gives back the very tensors."""
    make, step = CASES[case]
    f = make()
    dense = f.to_dense()
    out, k = f.shape
    row_step = kinds.kind_of(f).shard_step(0, {}, getattr(f, "block", None))
    for dim, size, unit in ((1, k, step), (0, out, row_step)):
        units = -(-size // unit)
        cuts = sorted({min(size, round(i * units / parts) * unit) for i in range(parts + 1)})
        shards = [f.slice_cols(a, b) if dim else f.slice_rows(a, b) for a, b in zip(cuts, cuts[1:])]
        for (a, b), s in zip(zip(cuts, cuts[1:]), shards):
            assert s.dtype == f.dtype
            assert torch.equal(s.to_dense(), dense[:, a:b] if dim else dense[a:b])
        whole = type(f).cat_cols(shards) if dim else type(f).cat_rows(shards)
        tensors_equal(whole, f)


@pytest.mark.parametrize("make,cut,msg", [
    (CASES["2:4"][0], lambda f: f.slice_cols(0, 6), "cutting at 6 would split an N:M group of 4 columns"),
    (CASES["bitmask 200 cols"][0], lambda f: f.slice_cols(32, 200), "cutting at 32 would split a 64-column "
                                                                    "bitmask word"),
    (CASES["block 16x32"][0], lambda f: f.slice_rows(0, 8), "cutting at 8 would split a 16x32 block"),
    (CASES["block 16x32"][0], lambda f: f.slice_cols(0, 48), "cutting at 48 would split a 16x32 block"),
    (CASES["2:4"][0], lambda f: f.slice_rows(3, 3), r"\[3, 3\) is not a non-empty range"),
    (CASES["2:4"][0], lambda f: f.slice_rows(0, 8), r"\[0, 8\) is not a non-empty range inside \[0, 7\)"),
])
def test_illegal_cuts_are_refused(make, cut, msg):
    with pytest.raises(ValueError, match=msg):
        cut(make())


def test_joins_check_their_parts():
    a = formats.NMWeight.from_dense(torch.randn(4, 8), 2, 4)
    with pytest.raises(ValueError, match="share n, m and in_features"):
        formats.NMWeight.cat_rows([a, formats.NMWeight.from_dense(torch.randn(4, 16), 2, 4)])
    with pytest.raises(TypeError, match="non-empty sequence of NMWeight"):
        formats.NMWeight.cat_cols([])
    b = formats.BitmaskWeight.from_dense(_sparse(4, 100))
    with pytest.raises(ValueError, match="every part but the last needs a multiple of 64 columns"):
        formats.BitmaskWeight.cat_cols([b, b])
    with pytest.raises(ValueError, match="one dtype"):
        formats.NMWeight.cat_rows([a, a.to(dtype=torch.bfloat16)])


# -------------------------------------------------------------- state-dict stacks
@pytest.mark.parametrize("case", ["2:4", "bitmask 3 tiles", "block 16x32"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("world", [2, 4])
def test_unshard_state_dict_undoes_the_stacks(case, dim, world):
    """The stacks a sharded layer writes (each rank's shard flattened, zero-padded to the
    longest, with its shapes) turn back into the single-device tensors."""
    f = CASES[case][0]()
    if dim == 0 and f.shape[0] % world:
        f = f.slice_rows(0, f.shape[0] - f.shape[0] % world)
    if dim == 0 and (f.shape[0] // world) % kinds.kind_of(f).shard_step(0, {}, getattr(f, "block", None)):
        pytest.skip("the rows per rank would cut a block")
    if dim == 1 and (f.shape[1] // world) % CASES[case][1]:
        f = f.slice_cols(0, f.shape[1] // (world * CASES[case][1]) * world * CASES[case][1])
    shards = [layout.cut(f, dim, r, world) for r in range(world)]
    sd = {"other.weight": torch.ones(3), "layer.weight_tp": torch.tensor([dim, world]),
          "layer.weight_meta": kinds.meta_of(f),
          "layer.weight_tp_shapes": torch.stack([layout.shape_row(s) for s in shards]),
          "layer.bias": torch.zeros(f.shape[0])}
    for name in f.TENSOR_NAMES:
        length = max(getattr(s, name).numel() for s in shards)
        sd["layer.weight_" + name] = torch.cat([layout.flat_padded(getattr(s, name), length) for s in shards])
    out = unshard_state_dict(sd)
    assert sorted(out) == sorted(["other.weight", "layer.bias", "layer.weight_meta"] +
                                 ["layer.weight_" + n for n in f.TENSOR_NAMES])
    whole = type(f).from_tensors({n: out["layer.weight_" + n] for n in f.TENSOR_NAMES},
                                 meta_ints=out["layer.weight_meta"].tolist()[1:])
    tensors_equal(whole, f)
