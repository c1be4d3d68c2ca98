"""Quantized values in every format (sparsekern/precisions.py): the grids, the layouts, the
checks, state dicts, SparseGPT's joint quantization and the model-level API."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import BitmaskWeight, BlockWeight, NMWeight, kinds, ops, precisions, sparsify
from sparsekern.nn import PATHS, Policy, SparseLinear
from sparsekern.sparsegpt import sparsegpt_quantized_weight, sparsegpt_weight


def _formats(out=40, k=192):
    torch.manual_seed(0)
    w = torch.randn(out, k, dtype=torch.float64).float()
    blocks = (torch.rand(out // 8, k // 16) < 0.4).repeat_interleave(8, 0).repeat_interleave(16, 1)
    return {"2:4": NMWeight.from_dense(w, 2, 4), "4:8": NMWeight.from_dense(w, 4, 8),
            "unstructured": BitmaskWeight.from_dense(w, torch.rand(out, k) < 0.3),
            "block8x16": BlockWeight.from_dense(w, (8, 16), blocks)}


CASES = [(name, "int8", 0) for name in ("2:4", "4:8", "unstructured", "block8x16")] + \
        [("2:4", "int4", 32), ("2:4", "int4", 64), ("4:8", "int4", 128)]


def test_int4_nibbles_hand_checked():
    """Low nibble first, stored as q + 8; an odd row pads its last high nibble with 8."""
    v = torch.tensor([[7.0, -7.0, 3.5]])
    q, s = precisions.PRECISIONS["int4"].quantize(v, 32)
    assert s.tolist() == [[1.0]]
    assert q.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (4 + 8) | (8 << 4)]]  # 3.5 rounds half to even: 4
    back = precisions.PRECISIONS["int4"].dequantize(q, s, 3, torch.float32, 32)
    assert back.tolist() == [[7.0, -7.0, 4.0]]


def test_int8_hand_checked():
    q, s = precisions.PRECISIONS["int8"].quantize(torch.tensor([[254.0, -127.0, 1.0], [0.0, 0.0, 0.0],
                                                                [-254.0, 127.0, -1.0]]))
    assert s.tolist() == [2.0, 1.0, 2.0]  # an all-zero row gets scale 1; a row's largest magnitude may be negative
    assert q.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 64, 0]]  # -63.5 rounds half to even; 0.5 to 0


@pytest.mark.parametrize("name,precision,group", CASES)
def test_values_on_the_grid_and_the_op(name, precision, group):
    W = _formats()[name]
    Q = W.quantize(precision, group)
    assert Q.quantized and Q.precision == precision and Q.dtype == W.dtype and Q.is_validated
    dense, qdense = W.to_dense().double(), Q.to_dense().double()
    assert torch.equal(qdense != 0, (qdense != 0) & (dense != 0))  # nothing appears where nothing was kept
    # Each value is within half a step of its scale: a step is scale (int8: per row; int4:
    # per group of kept values, at most the row's max / 7).
    step = (dense.abs().amax(1) / (127 if precision == "int8" else 7)).clamp_min(1e-12)
    assert bool(((qdense - dense).abs() <= step[:, None] / 2 + 1e-6).all())
    assert Q.nbytes < W.nbytes * (0.4 if precision == "int8" else 0.3)
    x = torch.randn(5, W.shape[1])
    y = ops.sparse_linear(x, Q)
    # where the op multiplies int8-rounded activations (its integer kernels, or its other paths
    # with x rounded the same way), the product of the rounded x, else of x
    xr = precisions.round_activation_rows(x) if ops.rounds_activations(Q, x.device) else x
    torch.testing.assert_close(y.double(), xr.double() @ qdense.T, rtol=1e-5, atol=1e-5)
    # the op ran on the format's own kernel (values dequantized per call), not the reference
    assert ops.explain_backend(W.OP, x, Q)[0] == "cpp"


@pytest.mark.parametrize("name,precision,group", CASES)
def test_tensors_round_trip_and_bytes(name, precision, group):
    Q = _formats()[name].quantize(precision, group)
    d = Q.tensors()
    assert set(d) == set(Q.tensor_names()) | {"meta"} and "scales" in d
    back = type(Q).from_tensors(d)
    assert back.precision == precision and back.group_size == group and back.dtype == Q.dtype
    assert torch.equal(back.to_dense(), Q.to_dense())
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    assert torch.equal(type(Q).from_tensors(torch.load(buf, weights_only=True)).to_dense(), Q.to_dense())
    assert Q.dequantized().precision == "fp" and torch.equal(Q.dequantized().to_dense(), Q.to_dense())


def test_to_changes_the_compute_dtype_not_the_stored_values():
    Q = _formats()["2:4"].quantize("int8")
    B = Q.to(dtype=torch.bfloat16)
    assert B.values.dtype == torch.int8 and B.dtype == torch.bfloat16
    assert torch.equal(B.to_dense(), Q.to_dense().to(torch.bfloat16))


@pytest.mark.parametrize("name", ["unstructured", "block8x16"])
def test_int4_needs_values_by_row(name):
    with pytest.raises(ValueError, match="supports int4"):
        _formats()[name].quantize("int4", 64)


@pytest.mark.parametrize("precision,group,match", [("int3", 0, "unknown value precision"),
                                                   ("int4", 48, "group_size must be one of"),
                                                   ("int8", 64, "group_size applies to int4 only")])
def test_bad_precision_arguments(precision, group, match):
    with pytest.raises(ValueError, match=match):
        _formats()["2:4"].quantize(precision, group)


def test_quantizing_twice_is_refused():
    with pytest.raises(ValueError, match="already int8"):
        _formats()["2:4"].quantize("int8").quantize("int8")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(scales=d["scales"].double()), "scales must be float32"),
    (lambda d: d.update(scales=-d["scales"]), "finite and positive"),
    (lambda d: d.update(scales=d["scales"][:-1]), "scales must be float32 of shape"),
    (lambda d: d.update(values=d["values"].float()), "values must be"),
    (lambda d: d.pop("scales"), "need their scales"),
    (lambda d: d.update(meta=torch.cat([d["meta"][:-3], torch.tensor([9, 0, 0])])), "unknown value precision code"),
    (lambda d: d.update(meta=torch.cat([d["meta"][:-1], torch.tensor([7])])), "float dtype code"),
    (lambda d: d.update(meta=d["meta"][:-1]), "meta must be an int64 tensor"),
])
def test_corrupt_quantized_tensors_are_refused(edit, match):
    d = dict(_formats()["2:4"].quantize("int8").tensors())
    edit(d)
    with pytest.raises(ValueError, match=match):
        NMWeight.from_tensors(d)


def test_an_int4_nibble_zero_is_refused():
    d = dict(_formats()["2:4"].quantize("int4", 32).tensors())
    d["values"] = d["values"].clone()
    d["values"][0, 0] = 0
    with pytest.raises(ValueError, match="nibble 0"):
        NMWeight.from_tensors(d)


def test_cutting_quantized_values_says_how():
    Q = _formats()["2:4"].quantize("int8")
    with pytest.raises(ValueError, match="dequantized"):
        Q.slice_rows(0, 8)
    with pytest.raises(ValueError, match="dequantized"):
        NMWeight.cat_rows([Q, Q])


def test_fixed_scales_store_exactly_the_given_grid():
    W = _formats()["2:4"]
    s = torch.full((W.shape[0],), 0.01)
    Q = W.quantize("int8", scales=s)
    assert torch.equal(Q.scales, s)
    assert bool((Q.to_dense().abs() <= 1.27 + 1e-6).all())  # clamped to the grid's reach
    with pytest.raises(ValueError, match="scales must be a tensor of shape"):
        W.quantize("int8", scales=torch.ones(3))


# ------------------------------------------------------------------ SparseGPT joint
def _problem(rows=48, cols=512):
    torch.manual_seed(1)
    w = torch.randn(rows, cols, dtype=torch.float64).float()
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols) / cols ** 0.5  # correlated inputs
    x = torch.randn(1536, cols) @ mix
    return w, x, (x.T @ x).double()


def _out_err(x, w, w2):
    return float((x @ (w2 - w).T).pow(2).mean() / (x @ w.T).pow(2).mean())


@pytest.mark.parametrize("pattern,precision,group", [("2:4", "int8", 0), ("2:4", "int4", 128), ("2:4", "int4", 32),
                                                     ("4:8", "int4", 64), ("unstructured", "int8", 0)])
def test_joint_sparsegpt_stores_exactly_what_it_compensated(pattern, precision, group):
    w, x, H = _problem()
    new, mask, scales = sparsegpt_quantized_weight(w, H, pattern, 0.5, quantize=precision, group_size=group)
    f = kinds.compress(new, pattern, mask, quantize=precision, group_size=group, scales=scales)
    assert torch.equal(f.to_dense(), new)
    kinds.parse(pattern).entry.check_mask(mask, kinds.parse(pattern).params, pattern)


@pytest.mark.parametrize("group", [32, 128])
def test_joint_int4_beats_quantizing_after_pruning(group):
    """The sweep compensates the rounding too, so the layer's output error is lower than
    SparseGPT's pruning followed by round-to-nearest (SparseGPT paper, section 3.5)."""
    w, x, H = _problem()
    new, mask, scales = sparsegpt_quantized_weight(w, H, "2:4", quantize="int4", group_size=group)
    joint = _out_err(x, w, new)
    pruned, pmask = sparsegpt_weight(w, H, "2:4")
    after = _out_err(x, w, kinds.compress(pruned, "2:4", pmask, quantize="int4", group_size=group).to_dense())
    assert joint < after, (joint, after)


def test_joint_int4_refuses_a_pattern_without_rows_of_values():
    w, x, H = _problem(16, 128)
    with pytest.raises(ValueError, match="values by row"):
        sparsegpt_quantized_weight(w, H, "unstructured", quantize="int4", group_size=32)
    with pytest.raises(ValueError, match="multiple of n=3"):
        sparsegpt_quantized_weight(w, H, "3:8", quantize="int4", group_size=32)


# ------------------------------------------------------------------ modules and sparsify
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 128)).eval()


@pytest.mark.parametrize("pattern,precision", [("2:4", "int8"), ("2:4", "int4"), ("unstructured", "int8"),
                                               ("block", "int8")])
@pytest.mark.parametrize("method", ["l1", "sparsegpt"])
def test_sparsify_quantized_round_trips_through_a_state_dict(pattern, precision, method):
    model = _mlp()
    cal = [torch.randn(16, 256) for _ in range(3)]
    kw = dict(sparsity=0.5, block=(16, 16), show_progress=False, quantize=precision, group_size=64)
    m, report = sparsify(copy.deepcopy(model), pattern, method, calibration=cal, **kw)
    assert all(r["values"] == precision for r in report if r["status"] == "sparse")
    assert "values=" + precision in sparsify_explain(m)
    x = torch.randn(4, 256)
    y = m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh, _ = sparsify(copy.deepcopy(model), pattern, **kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)
    # checkpoint bytes of the pruned layers against the fp32 weights
    dense_bytes = sum(r["bytes_before"] for r in report if r["status"] == "sparse")
    stored = sum(r["bytes_after"] for r in report if r["status"] == "sparse")
    assert stored < dense_bytes * (0.45 if precision == "int8" else 0.2)


def sparsify_explain(m):
    from sparsekern import explain
    return explain(m)


@pytest.mark.parametrize("pattern,precision,match", [("unstructured", "int4", "needs an N:M pattern"),
                                                     ("dense", "int8", "quantize_dynamic"),
                                                     ("2:4", "fp8", "unknown value precision")])
def test_sparsify_refuses_what_cannot_be_stored(pattern, precision, match):
    with pytest.raises(ValueError, match=match):
        sparsify(_mlp(), pattern, sparsity=0.5, quantize=precision, show_progress=False)


@pytest.mark.parametrize("pattern,sparsity,precision", [("2:4", None, "int8"), ("2:4", None, "int4"),
                                                         ("unstructured", 0.6, "int8")])
def test_a_quantized_layer_runs_every_path_alike(pattern, sparsity, precision):
    """Whatever path the dispatch measures fastest for a batch bucket (the kernels, the
    decompressed weight, a dense copy), a quantized layer gives the same numbers: the paths
    that multiply floats round x as the integer kernels do (ops.rounds_activations), so the
    output depends neither on the path nor on the batch size."""
    lin = _mlp()[0]
    layer = SparseLinear.from_dense(lin, pattern, sparsity=sparsity, quantize=precision, policy=Policy("sparse"))
    f = layer.weight_format()
    x = torch.randn(40, 256)
    for rows in (1, 3, 17, 40):  # the decode kernels; above 16 rows the GEMM (2:4 int8) or the tiles
        outs = {p: layer._linear_path(p, x[:rows], f) for p in PATHS}
        for p in PATHS:
            torch.testing.assert_close(outs[p], outs["sparse"], rtol=1e-5, atol=1e-5, msg=f"{p} at {rows} rows")
        torch.testing.assert_close(outs["sparse"][:1], layer(x[:1]), rtol=1e-5, atol=1e-5)  # batch invariant
    # Policy("dense") stores the dequantized weight as a plain float layer: exact products of x
    dense = SparseLinear.from_dense(lin, pattern, sparsity=sparsity, quantize=precision, policy=Policy("dense"))
    xr = precisions.round_activation_rows(x) if ops.rounds_activations(f, x.device) else x
    torch.testing.assert_close(outs["sparse"], dense(xr), rtol=1e-5, atol=1e-5)
    if ops.rounds_activations(f, x.device):
        assert not torch.allclose(dense(x), outs["sparse"], rtol=1e-5, atol=1e-5), "no rounding: cannot fail"


def test_quantize_values_after_pruning_rounds_each_layer():
    from sparsekern import quantize_values

    model, x = _mlp(), torch.randn(4, 256)
    m, _ = sparsify(copy.deepcopy(model), "2:4", show_progress=False)
    y_fp = m(x)
    quantize_values(m, "int4", 64)
    for name in ("0", "2"):
        f = m.get_submodule(name).weight_format()
        assert f.precision == "int4" and f.group_size == 64
    assert 0 < float((m(x) - y_fp).norm() / y_fp.norm()) < 0.2
    quantize_values(m, None)
    assert m.get_submodule("0").weight_format().precision == "fp"
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_values(m, "int4", 100)


def test_quantize_values_refuses_a_dense_layer():
    layer = SparseLinear.from_dense(_mlp()[0], "2:4", policy=Policy("dense"))
    with pytest.raises(ValueError, match="dense weight"):
        layer.quantize_values("int8")


def _lm(vocab=300, dim=128):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, dim), nn.Linear(dim, vocab)).eval()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantize_dense_turns_the_layers_left_dense_into_torch_int8(tmp_path, precision):
    """sparsify(quantize_dense=True): the layers it leaves dense (here the excluded head and a
    layer under min_features) run torch's dynamic int8, so the whole model is compressed; the
    model saves and loads back with sparsekern.load (torch.save: weights_only)."""
    model = _lm()
    x = torch.randn(5, 128)
    kept_dense, _ = sparsify(copy.deepcopy(model), "2:4", quantize=precision, exclude=["3"], show_progress=False)
    with torch.no_grad():
        ref = kept_dense(x)  # the same sparse layers, the head in fp32
    m, report = sparsify(copy.deepcopy(model), "2:4", quantize=precision, exclude=["3"], quantize_dense=True,
                         show_progress=False)
    rows = {r["layer"]: r for r in report}
    assert rows["0"]["status"] == rows["2"]["status"] == "sparse"
    assert rows["3"]["status"] == "dense" and rows["3"]["values"] == "int8 (torch dynamic)"
    assert rows["3"]["bytes_after"] < rows["3"]["bytes_before"] / 3
    head = m.get_submodule("3")
    assert type(head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert "3: torch dynamic int8 Linear" in sparsekern.explain(m)
    with torch.no_grad():
        y = m(x)
    err = float((y - ref).norm() / ref.norm())
    assert 0 < err < 0.02, err  # the head's int8 rounding, and only that
    # saved and loaded into the model as built: the int8 head and the sparse layers come back
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    loaded = sparsekern.load(_lm(), path)
    assert type(loaded.get_submodule("3")) is type(head)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=1e-5, atol=1e-5)
    plain = sparsekern.load(_lm(), dict(m.state_dict()))  # a plain dict: no torch state-dict versions
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_quantize_dense_is_refused_without_quantize_and_keeps_ties():
    with pytest.raises(ValueError, match="quantize_dense"):
        sparsify(_lm(), "2:4", quantize_dense=True, show_progress=False)
    tied = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    tied[1].weight = tied[0].weight
    m, report = sparsify(tied, "2:4", quantize="int8", quantize_dense=True, show_progress=False)
    assert all(r.get("values") != "int8 (torch dynamic)" for r in report)
    assert m[0].weight is m[1].weight  # the tie holds: nothing converted
