"""2:4 weights for the sparse tensor-core GEMMs (sparsekern/semi_structured.py).

On the CPU: the NMWeight -> CUTLASS conversion against torch's own pure-torch layout functions
(torch.sparse._semi_structured_conversions), padded groups, the fallback for unsorted
indices, the meta reordering, the cache; the int8 path's math (x quantized per row, exact
int32 sums, the fp32 epilogue) with cuSPARSELt's GEMM emulated, and why it does not run. On a GPU (skipped here): cuSPARSELt and CUTLASS
numerics against fp64 through sparsekern.ops at large batch, with the dispatch asserting the
backend that ran, gradients, and torch.compile."""
import math

import pytest
import torch

from sparsekern import dispatch_rules, ops, reference, semi_structured
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


# ------------------------------------------------- int8 (nm_linear_q on cuSPARSELt's int8 GEMM)
def _emulated_cslt_int32(dense_int8, xq_t):
    """torch._cslt_sparse_mm(packed, xq_t, out_dtype=int32, transpose_result=True) on the CPU,
    the packed weight standing in as its dense int8 form: exact int32 sums, [rows, out]."""
    assert dense_int8.dtype == torch.int8 and xq_t.dtype == torch.int8 and xq_t.shape[1] % 16 == 0
    # in fp64: exact (|sums| < 2**53), and CUDA has no int32 matmul
    return (dense_int8.double() @ xq_t.double()).to(torch.int32).t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,k", [(32, 64), (96, 320)])
@pytest.mark.parametrize("lead", [(1,), (15,), (16,), (2, 33)])
def test_int8_path_math_is_the_int8_dot_reference(dtype, out, k, lead):
    torch.manual_seed(0)
    W = NMWeight.from_dense(torch.randn(out, k), 2, 4, quantize="int8")
    values, indices, scales, n, m, in_features, bits, group_size = W.kernel_args()
    bias = torch.randn(out)
    x = torch.randn(*lead, k).to(dtype)
    x[..., 0, :] = 0.0  # a row of zeros: its scale is 0, it gives the bias
    dense = reference.nm_decompress(values, indices, 2, 4, k)
    y = semi_structured.int8_rows_linear(x, dense, scales, out, k, bias.to(dtype), _emulated_cslt_int32)
    ref = reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k, bias.to(dtype).double())
    assert y.shape == (*lead, out) and y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y[..., 0, :].double(), bias.to(dtype).double().expand_as(y[..., 0, :]))


def test_int8_path_quantizes_x_as_the_cpu_int8_gemm(monkeypatch):
    """Same weight and x: the int8 path's output equals the CPU int8 GEMM's reference in fp32."""
    W = NMWeight.from_dense(torch.randn(64, 128), 2, 4, quantize="int8")
    values, indices, scales, *_ = W.kernel_args()
    x = torch.randn(40, 128) * torch.logspace(-3, 3, 40)[:, None]  # rows of very different scales
    dense = reference.nm_decompress(values, indices, 2, 4, 128)
    y = semi_structured.int8_rows_linear(x, dense, scales, 64, 128, None, _emulated_cslt_int32)
    ref = reference.nm_linear_q_int8_dot(x, values, indices, scales, 2, 4, 128)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k", [((1,), 64), ((15,), 320), ((16,), 1056), ((2, 33), 96)])
def test_int8_path_fused_passes_give_the_torch_ops_numbers(dtype, lead, k):
    """The Triton quantization and epilogue (TRITON_INTERPRET on the CPU; on a GPU the op uses
    them) against the torch ops: the same int8 x and scales bit for bit, the padding rows
    zero, and the same output (on the CPU, where nothing fuses the epilogue's multiply-add)."""
    from sparsekern.triton import interpreting, load

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    passes = load("quantize_rows")
    torch.manual_seed(0)
    rows = math.prod(lead)
    x = (torch.randn(*lead, k) * torch.logspace(-3, 1, rows).reshape(*lead, 1)).to(device, dtype)
    x.reshape(rows, k)[rows // 2] = 0.0  # a row of zeros: scale 0
    pad = rows + (-rows) % 16
    q, s = passes.quantize_rows_int8(x.reshape(rows, k), pad)
    q_ref, s_ref = reference.quantize_rows_int8(x.reshape(rows, k))
    assert q.dtype == torch.int8 and q.shape == (pad, k) and s.shape == (rows, 1)
    assert torch.equal(q[:rows].double(), q_ref.double()) and not q[rows:].any()
    assert torch.equal(s, s_ref)
    W = NMWeight.from_dense(torch.randn(48, k, device=device), 2, 4, quantize="int8")
    values, indices, scales, *_ = W.kernel_args()
    dense = reference.nm_decompress(values, indices, 2, 4, k)
    bias = torch.randn(48, device=device).to(dtype)
    fused = semi_structured.int8_rows_linear(x, dense, scales, 48, k, bias, _emulated_cslt_int32, fused_passes=True)
    plain = semi_structured.int8_rows_linear(x, dense, scales, 48, k, bias, _emulated_cslt_int32)
    assert fused.dtype == dtype and fused.shape == (*lead, 48)
    if device == "cpu":
        assert torch.equal(fused, plain)
    else:
        torch.testing.assert_close(fused, plain, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    with pytest.raises(ValueError, match="padded_rows"):
        passes.quantize_rows_int8(x.reshape(rows, k), rows - 1)


def test_int8_path_says_why_it_does_not_run():
    cuda = torch.device("cuda")  # a device object only: nothing here reaches a GPU
    why = semi_structured.why_not_int8
    assert "through cuSPARSELt, not cutlass" in why("cutlass", cuda, torch.bfloat16, 2, 4, 64, 128, 8, True)
    assert "not int4" in why("cusparselt", cuda, torch.bfloat16, 2, 4, 64, 128, 4, True)
    assert "2:4 only, not 4:8" in why("cusparselt", cuda, torch.bfloat16, 4, 8, 64, 128, 8, True)
    assert "not torch.float64" in why("cusparselt", cuda, torch.float64, 2, 4, 64, 128, 8, True)
    assert "SPARSEKERN_Q_ACT=int8" in why("cusparselt", cuda, torch.bfloat16, 2, 4, 64, 128, 8, False)
    assert "multiples of 32, got 48x128" in why("cusparselt", cuda, torch.bfloat16, 2, 4, 48, 128, 8, True)


def test_a_gpu_rounds_activations_only_when_asked(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("SPARSEKERN_Q_ACT", raising=False)
    assert not dispatch_rules.q_activations_int8(cuda)
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "exact")
    assert not dispatch_rules.q_activations_int8(cuda)
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    assert dispatch_rules.q_activations_int8(cuda) and dispatch_rules.q_activations_int8(torch.device("cpu"))
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int4")
    with pytest.raises(ValueError, match="SPARSEKERN_Q_ACT"):
        dispatch_rules.q_activations_int8(cuda)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [65, 300])
def test_gpu_int8_weights_run_on_cusparselt_when_int8_activations_are_asked(monkeypatch, dtype, rows):
    W = NMWeight.from_dense(torch.randn(256, 512, device="cuda"), 2, 4, quantize="int8").to(dtype=dtype)
    b = torch.randn(256, device="cuda", dtype=dtype)
    x = torch.randn(rows, 512, device="cuda", dtype=dtype)
    monkeypatch.delenv("SPARSEKERN_Q_ACT", raising=False)
    ran, why = ops.explain_backend("nm_linear_q", x, W)
    assert ran != "cusparselt", why
    monkeypatch.setenv("SPARSEKERN_Q_ACT", "int8")
    ran, why = ops.explain_backend("nm_linear_q", x, W)
    if ran != "cusparselt":
        pytest.skip(f"cuSPARSELt's int8 GEMM does not run here: {why}")
    y = ops.nm_linear_q(x, W, b)
    values, indices, scales, n, m, k, bits, group_size = W.kernel_args()
    ref = reference.nm_linear_q_int8_dot(x.double(), values, indices, scales, n, m, k, b.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    xg = x.clone().requires_grad_()
    ops.nm_linear_q(xg, W, b).float().sum().backward()  # the gradient to x, through the dequantized weight
    torch.testing.assert_close(xg.grad.double(), W.dequantized().to_dense().double().sum(0).expand(rows, -1),
                               rtol=1e-2, atol=1e-2)
