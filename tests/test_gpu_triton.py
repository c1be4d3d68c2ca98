"""The Triton backends' launch machinery (sparsekern/triton/_common.py) and the benchmark-only
fused masked kernels: block shapes from the heuristic table, at most four autotune
candidates, the device guard. Kernels run on CUDA tensors when there is a GPU, else under the
interpreter (TRITON_INTERPRET=1), never on CPU tensors without it."""
import pytest
import torch

from sparsekern.patterns import pack_bitmask
from sparsekern.triton import interpreting

pytest.importorskip("triton")
from sparsekern.triton import _common  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
elif interpreting():
    DEVICE = "cpu"
else:
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def test_at_most_four_autotune_candidates_and_one_table_row_per_bucket():
    configs = _common.autotune_configs()
    assert 1 <= len(configs) <= 4
    assert set(_common.LINEAR_TABLE) == {16, 64, 256, -1}
    for bucket, (bn, bk, warps, stages) in _common.LINEAR_TABLE.items():
        assert bn in (32, 64, 128) and bk == 64 and warps in (4, 8) and 1 <= stages <= 4, bucket


def test_linear_config_follows_the_batch_bucket(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    for rows, edge in ((1, 16), (16, 16), (17, 64), (64, 64), (65, 256), (256, 256), (257, -1), (70000, -1)):
        cfg = _common.linear_config(rows)
        assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]) == _common.LINEAR_TABLE[edge]
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    assert _common.linear_config(70000)["num_stages"] == 1
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "1")
    assert not _common.autotuning()  # never under the interpreter


def test_device_guard_is_a_no_op_for_cpu_tensors():
    with _common.on_device(torch.zeros(1)):
        pass
    if torch.cuda.is_available():
        t = torch.zeros(1, device=f"cuda:{torch.cuda.device_count() - 1}")
        with _common.on_device(t):
            assert torch.cuda.current_device() == t.device.index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_masked_kernels_match_fp64(dtype):
    from sparsekern.triton import load

    mt = load("masked_linear")
    w = torch.randn(40, 130, device=DEVICE, dtype=dtype)
    mask = torch.rand(40, 130, device=DEVICE) < 0.5
    bits = pack_bitmask(mask)
    x = torch.randn(6, 130, device=DEVICE, dtype=dtype)
    g = torch.randn(6, 40, device=DEVICE, dtype=dtype)
    wm = (w * mask).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for out, ref in ((mt.fused_forward(x, w, bits), x.double() @ wm.t()),
                     (mt.fused_grad_input(g, w, bits), g.double() @ wm),
                     (mt.fused_grad_weight(g, x, bits), (g.double().t() @ x.double()) * mask),
                     (mt.masked_weight(w, bits), wm)):
        assert out.dtype == dtype
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, err
