"""2:4 weights for the sparse tensor-core GEMMs (sparsekern/semi_structured.py).

On the CPU: the NMWeight -> CUTLASS conversion against torch's own pure-torch layout functions
(torch.sparse._semi_structured_conversions), padded groups, the fallback for unsorted
indices, the meta reordering, the cache. On a GPU (skipped here): cuSPARSELt and CUTLASS
numerics against fp64 through sparsekern.ops at large batch, with the dispatch asserting the
backend that ran, gradients, and torch.compile."""
import pytest
import torch

from sparsekern import ops, semi_structured
from sparsekern.formats import NMWeight

conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,k", [(32, 64), (64, 128), (96, 320), (128, 1024)])
def test_cutlass_layout_equals_torchs_conversion(dtype, out, k):
    w = torch.randn(out, k, dtype=dtype)
    W = NMWeight.from_dense(w, 2, 4)
    dense = W.to_dense()
    assert int((dense.reshape(out, -1, 4) != 0).sum(-1).min()) == 2  # every group keeps exactly two
    packed, meta = semi_structured.to_cutlass(W.values, W.indices, k)
    ref_packed, ref_meta = conv.sparse_semi_structured_from_dense_cutlass(dense)
    assert packed.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(packed, ref_packed)
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_groups_decode_to_the_same_weight(dtype):
    """Groups keeping one or no element: our padding differs from torch's choice of
    indices, but both are valid metadata and decode to the same dense weight."""
    out, k = 64, 256
    w = torch.randn(out, k, dtype=dtype)
    mask = torch.rand(out, k // 4, 4).argsort(-1) < 2
    mask[:, ::3] &= torch.tensor([True, False, False, False])  # every third group keeps one
    mask[:, 1::7] = False                                      # some keep none
    W = NMWeight.from_dense(w, 2, 4, mask=mask.reshape(out, k))
    packed, meta = semi_structured.to_cutlass(W.values, W.indices, k)
    back = conv.sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert torch.equal(back, W.to_dense())


def test_meta_reordering_offsets_equal_torchs():
    for rows, cols in ((32, 4), (64, 8), (96, 20), (128, 64)):
        ours = semi_structured.cutlass_meta_offsets(rows, cols)
        ref = conv._calculate_meta_reordering_scatter_offsets(rows, cols, torch.int16, "cpu")
        assert torch.equal(ours, ref.to(ours.dtype)), (rows, cols)


def test_unsorted_indices_go_through_the_dense_form():
    """Indices with idx0 > idx1 are not valid sparse metadata: the conversion rebuilds the
    weight from its dense form instead (torch's own conversion)."""
    out, k = 32, 64
    W = NMWeight.from_dense(torch.randn(out, k, dtype=torch.bfloat16), 2, 4)
    idx = W.indices.to(torch.int32)
    swapped = ((idx & 0x3) << 2) | ((idx >> 2) & 0x3) | ((idx & 0x30) << 2) | ((idx >> 2) & 0x30)
    values = W.values.reshape(out, -1, 2).flip(-1).reshape(out, -1).contiguous()
    swapped = swapped.to(torch.uint8)
    packed, meta = semi_structured.to_cutlass(values, swapped, k)
    ref_packed, ref_meta = conv.sparse_semi_structured_from_dense_cutlass(W.to_dense())
    assert torch.equal(packed, ref_packed) and torch.equal(meta, ref_meta)


def test_cutlass_conversion_refuses_what_cutlass_cannot_take():
    W = NMWeight.from_dense(torch.randn(48, 64, dtype=torch.bfloat16), 2, 4)
    with pytest.raises(ValueError, match="out % 32"):
        semi_structured.to_cutlass(W.values, W.indices, 64)
    W = NMWeight.from_dense(torch.randn(32, 64), 2, 4)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        semi_structured.to_cutlass(W.values, W.indices, 64)
    with pytest.raises(RuntimeError, match="CUDA GPU only"):
        semi_structured.cusparselt_packed(W.values, W.indices, 64)


def test_converted_weight_is_cached_until_the_weight_changes():
    W = NMWeight.from_dense(torch.randn(32, 128, dtype=torch.bfloat16), 2, 4)
    first = semi_structured.cutlass_weight(W.values, W.indices, 128)
    assert semi_structured.cutlass_weight(W.values, W.indices, 128) is first
    W.values.mul_(2)  # in place: the version counter moves
    second = semi_structured.cutlass_weight(W.values, W.indices, 128)
    assert second is not first and torch.equal(second[0], W.values)
    semi_structured.clear_cache()
    assert semi_structured.cutlass_weight(W.values, W.indices, 128) is not second


def test_prepare_skips_what_is_not_a_cuda_2_4_half_weight():
    assert semi_structured.prepare(NMWeight.from_dense(torch.randn(32, 64, dtype=torch.bfloat16), 2, 4)) == []
    assert semi_structured.prepare(NMWeight.from_dense(torch.randn(32, 64), 4, 8)) == []


# ------------------------------------------------------------------------------- GPU
def _ref(x, W, b):
    return torch.nn.functional.linear(x.double(), W.to_dense().double(), None if b is None else b.double())


@gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [65, 128, 300, 2048])
def test_gpu_large_batch_backends_against_fp64(backend, dtype, rows):
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    W = NMWeight.from_dense(w, 2, 4)
    b = torch.randn(256, device="cuda", dtype=dtype)
    x = torch.randn(rows, 512, device="cuda", dtype=dtype)
    with ops.use_backend(backend):
        try:
            ran, why = ops.explain_backend("nm_linear", x, W)
        except RuntimeError as e:
            pytest.skip(f"{backend} cannot run here: {e}")
        assert ran == backend, why
        y = ops.nm_linear(x, W, b)
    ref = _ref(x, W, b)
    lowp = torch.nn.functional.linear(x, W.to_dense(), b)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    base = ((lowp.double() - ref).norm() / ref.norm()).item()
    assert y.shape == (rows, 256) and y.dtype == dtype
    assert err <= 2 * base + 1e-6, f"{backend}: {err:.2e} vs torch {base:.2e}"


@gpu
def test_gpu_dispatch_picks_a_2_4_gemm_at_large_batch_and_the_decode_kernel_below():
    W = NMWeight.from_dense(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16), 2, 4)
    small = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    large = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    backend, why = ops.explain_backend("nm_linear", small, W)
    assert backend not in semi_structured.BACKENDS and "decode kernel" in why, why
    backend, why = ops.explain_backend("nm_linear", large, W)
    if backend not in semi_structured.BACKENDS:
        pytest.skip(f"no 2:4 GEMM here: {why}")


@gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_large_batch_gradients_and_compile(backend):
    W = NMWeight.from_dense(torch.randn(128, 256, device="cuda", dtype=torch.bfloat16), 2, 4)
    x = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with ops.use_backend(backend):
        try:
            ops.explain_backend("nm_linear", x, W)
        except RuntimeError as e:
            pytest.skip(f"{backend} cannot run here: {e}")
        ops.nm_linear(x, W).float().square().sum().backward()
        f = torch.compile(lambda t: ops.nm_linear(t, W), fullgraph=True)
        torch.testing.assert_close(f(x.detach()), ops.nm_linear(x.detach(), W))
    xr = x.detach().clone().requires_grad_()
    with ops.use_backend("reference"):
        ops.nm_linear(xr, W).float().square().sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), rtol=5e-2, atol=5e-2)
