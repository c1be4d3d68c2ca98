"""The CUDA decode kernels' paths on CUDA tensors (skipped without a GPU): every batch tile of
the 2:4 tensor-core kernel (8/16/32 rows, several tiles), K splits with the fp32 finalize, K
and row tails, the generic N:M kernel (m = 4/8/16, fp32/bf16/fp16), the bitmask warp kernel,
the GEMM paths above the decode batch, the decompress ops, masked training on cuBLAS, and
CUDA-graph capture of the decode kernels. Each call asserts that the CUDA backend ran.

On the CPU the same index arithmetic is checked by tests/test_gpu_layout.py, the Triton
kernels by tests/test_triton.py under the interpreter, dispatch by tests/test_gpu_dispatch.py.
"""
import pytest
import torch

from sparsekern import _extension, ops, reference
from sparsekern.formats import BitmaskWeight, NMWeight
from sparsekern.patterns import pack_bitmask

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _extension.cuda_kernels_available()),
                                reason="no CUDA GPU with sparsekern's CUDA kernels built for it")
F = torch.nn.functional


def _close(y, ref, dtype, what):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(y).all() and err < tol, f"{what}: relative error {err:.2e}"


def _run(op, x, W, b=None):
    with ops.use_backend("cuda"):
        ran, why = ops.explain_backend(op, x, W)
        assert ran == "cuda", why
        return getattr(ops, op)(x, W, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out,k", [(37, 320), (64, 4096), (200, 11008), (16, 64)])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 17, 32, 33, 64])
def test_nm24_tensor_core_decode(dtype, out, k, rows):
    W = NMWeight.from_dense(torch.randn(out, k, device="cuda", dtype=dtype), 2, 4)
    b = torch.randn(out, device="cuda", dtype=dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    y = _run("nm_linear", x, W, b)
    _close(y, F.linear(x.double(), W.to_dense().double(), b.double()), dtype, f"2:4 {out}x{k} rows {rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,k", [(2, 4, 1100), (1, 4, 96), (3, 4, 64), (4, 8, 1104), (3, 8, 256), (5, 16, 1104),
                                   (8, 16, 4096)])
@pytest.mark.parametrize("rows", [1, 3, 8, 40, 65, 300])
def test_nm_generic_and_gemm_paths(dtype, n, m, k, rows):
    W = NMWeight.from_dense(torch.randn(96, k, device="cuda", dtype=dtype), n, m)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    _close(_run("nm_linear", x, W), F.linear(x.double(), W.to_dense().double()), dtype, f"{n}:{m} rows {rows}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,density", [(513, 0.3), (4096, 0.1), (11008, 0.5), (64, 1.0), (200, 0.0)])
@pytest.mark.parametrize("rows", [1, 4, 8, 31, 33, 300])
def test_bitmask_warp_and_gemm_paths(dtype, k, density, rows):
    W = BitmaskWeight.from_dense(torch.randn(70, k, device="cuda", dtype=dtype),
                                 torch.rand(70, k, device="cuda") < density)
    b = torch.randn(70, device="cuda", dtype=dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), W.to_dense().double(), b.double())
    _close(_run("bitmask_linear", x, W, b), ref, dtype, f"bitmask {k} {density} rows {rows}")


def test_decompress_ops_match_the_reference():
    w = torch.randn(96, 1104, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("cuda"):
        for n, m in ((2, 4), (4, 8), (5, 16)):
            W = NMWeight.from_dense(w, n, m)
            assert ops.explain_backend("nm_decompress", W.values)[0] == "cuda"
            assert torch.equal(ops.nm_decompress(*W.kernel_args()), reference.nm_decompress(*W.kernel_args()))
        B = BitmaskWeight.from_dense(w, torch.rand(96, 1104, device="cuda") < 0.3)
        assert torch.equal(ops.bitmask_decompress(*B.kernel_args()), reference.bitmask_decompress(*B.kernel_args()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [200, 201, 4096])
def test_masked_training_on_cublas(dtype, k):
    w = torch.randn(48, k, device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.rand(48, k, device="cuda") < 0.5
    bits = pack_bitmask(mask)
    x = torch.randn(2, 7, k, device="cuda", dtype=dtype, requires_grad=True)
    with ops.use_backend("cuda"):
        assert ops.explain_backend("masked_linear", x)[0] == "cuda"
        y = ops.masked_linear(x, w, bits)
        y.float().square().sum().backward()
    w64, x64 = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    F.linear(x64, w64 * mask).square().sum().backward()
    _close(x.grad, x64.grad, dtype, "grad x")
    _close(w.grad, w64.grad, dtype, "grad w")
    assert (w.grad[~mask] == 0).all()


def test_decode_kernels_capture_in_a_cuda_graph():
    W = NMWeight.from_dense(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16), 2, 4)
    B = BitmaskWeight.from_dense(W.to_dense(), torch.rand(4096, 4096, device="cuda") < 0.3)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("cuda"):
        eager = (ops.nm_linear(x, W), ops.bitmask_linear(x, B))  # first calls: attributes, warm-up
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.nm_linear(x, W)
            ops.bitmask_linear(x, B)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = (ops.nm_linear(x, W), ops.bitmask_linear(x, B))
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    for o, Wf in zip(out, (W, B)):
        _close(o, F.linear(x.double(), Wf.to_dense().double()), torch.bfloat16, "graph replay")
    assert not torch.equal(out[0], eager[0])  # the replay computed the new x
