"""Every compiled op passes torch.library.opcheck (schema, fake tensor, autograd
registration, AOT dispatch) and each public op runs under torch.compile(fullgraph=True)."""
import pytest
import torch

from conftest import DEVICES, needs_extension
from sparsekern import _extension, dispatch_rules, ops
from sparsekern.patterns import pack_bitmask
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight

pytestmark = needs_extension

DECODE, GEMM = dispatch_rules.NM_ALGO_DECODE, dispatch_rules.NM_ALGO_GEMM
Q_EXACT, Q_INT8_ACT = dispatch_rules.Q_ALGO_EXACT, dispatch_rules.Q_ALGO_INT8_ACT
GEMM_RUNS = bool(_extension.BUILD_INFO.get("cpu_avx2_runtime"))  # the 2:4 GEMM kernel: AVX2/AVX-512 CPUs
CPU_ONLY = {spec.cpu_op for spec in ops.OPS.values() if spec.cpu_op}
INT8_DOT = dispatch_rules.Q_ALGO_INT8_DOT
INT8_EXPAND = dispatch_rules.Q_ALGO_INT8_EXPAND  # torch's int8 GEMM: any CPU
Q_TILES = dispatch_rules.Q_ALGO_EXACT_TILES
AVX512 = bool(_extension.BUILD_INFO.get("cpu_avx512_runtime"))
INT8_DOT_RUNS = bool(_extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))  # the 2:4 int8 GEMM: AVX512_VNNI CPUs


def _samples(device):
    w = torch.randn(16, 64, device=device)
    nm = NMWeight.from_dense(w, 2, 4)
    bmw = BitmaskWeight.from_dense(w, torch.rand(16, 64, device=device) < 0.4)
    blk = BlockWeight.from_dense(w, (8, 16), torch.rand(16, 64, device=device) < 0.05)
    x = torch.randn(3, 64, device=device)
    x20 = torch.randn(20, 64, device=device)
    b = torch.randn(16, device=device)
    mask = torch.rand(16, 64, device=device) < 0.5
    bits = pack_bitmask(mask)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    conv = NMWeight.from_dense(torch.randn(16, 72, device=device), 2, 4)  # [out, 3 * 3 * 8]
    xc = torch.randn(2, 8, 5, 6, device=device)
    q8 = NMWeight.from_dense(w, 2, 4, quantize="int8")
    q4 = NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32)
    q48 = NMWeight.from_dense(w, 4, 8, quantize="int8")
    bq = BitmaskWeight.from_dense(w, torch.rand(16, 64, device=device) < 0.4, quantize="int8")
    kq = BlockWeight.from_dense(w, (8, 16), torch.rand(16, 64, device=device) < 0.2, quantize="int8")
    return {
        "nm_linear_q": [(x, *q8.kernel_args(), b), (xg, *q4.kernel_args(), None), (x20, *q8.kernel_args(), b),
                        (x20.clone().requires_grad_(), *q4.kernel_args(), b.clone().requires_grad_())],
        # CPU only: the algorithm chosen in Python (dispatch_rules.Q_ALGO_*: 1 = int8 activations,
        # 2 = the 2:4 int8 dot-product GEMM for int8 and int4 values, AVX512_VNNI CPUs, 3 = int8
        # values expanded for torch's int8 GEMM, 4 = x in fp32 through dequantized tiles)
        "nm_linear_q_cpu": [(x, *q8.kernel_args(), b, Q_INT8_ACT), (xg, *q4.kernel_args(), None, Q_INT8_ACT),
                            (x20, *q8.kernel_args(), b, Q_EXACT), (x20, *q48.kernel_args(), b, INT8_EXPAND),
                            (x20, *q4.kernel_args(), b, Q_TILES), (x20, *q8.kernel_args(), b, Q_INT8_ACT),
                            (x20.clone().requires_grad_(), *q8.kernel_args(), None, INT8_EXPAND)] + (
                            [] if not INT8_DOT_RUNS else [
            (x20, *q8.kernel_args(), b, INT8_DOT),
            (x20.clone().requires_grad_(), *q8.kernel_args(), b.clone().requires_grad_(), INT8_DOT),
            (x20, *q4.kernel_args(), b, INT8_DOT),
            (x20.clone().requires_grad_(), *q4.kernel_args(), b.clone().requires_grad_(), INT8_DOT)]),
        "bitmask_linear_q": [(x, *bq.kernel_args(), b), (xg, *bq.kernel_args(), None)],
        "bitmask_linear_q_cpu": [(x, *bq.kernel_args(), b, Q_INT8_ACT), (xg, *bq.kernel_args(), None, Q_INT8_ACT),
                                 (x20, *bq.kernel_args(), b, INT8_EXPAND), (x20, *bq.kernel_args(), b, Q_TILES),
                                 (x20.clone().requires_grad_(), *bq.kernel_args(), None, INT8_EXPAND)],
        "block_linear_q": [(x, *kq.kernel_args(), b), (xg, *kq.kernel_args(), None)],
        # CPU only: 0 = x in fp32 through the row kernel, 3 = the expanded int8 weight, 4 = x in
        # fp32 through dequantized tiles
        "block_linear_q_cpu": [(x, *kq.kernel_args(), b, Q_EXACT), (x20, *kq.kernel_args(), b, Q_EXACT),
                               (x20, *kq.kernel_args(), b, Q_TILES),
                               (x20, *kq.kernel_args(), b, INT8_EXPAND),
                               (x20.clone().requires_grad_(), *kq.kernel_args(), None, INT8_EXPAND)],
        "nm_linear": [(x, nm.values, nm.indices, 2, 4, 64, b), (xg, nm.values, nm.indices, 2, 4, 64, None),
                      (x20, nm.values, nm.indices, 2, 4, 64, b)],
        # CPU only: the algorithm chosen in Python (1: the 2:4 GEMM kernel, AVX2/AVX-512 CPUs) and
        # the pre-packed weight it reads
        "nm_linear_cpu": [(x, nm.values, nm.indices, 2, 4, 64, b, DECODE),
                          (x20, nm.values, nm.indices, 2, 4, 64, b, dispatch_rules.NM_ALGO_TILES)] + (
                          [] if not GEMM_RUNS else [
            (x20, nm.values, nm.indices, 2, 4, 64, b, GEMM, nm.gemm_panels()),
            (x20.clone().requires_grad_(), nm.values, nm.indices, 2, 4, 64, None, GEMM, nm.gemm_panels()),
            (xg, nm.values, nm.indices, 2, 4, 64, None, GEMM, None)]),
        "nm24_pack_panels": [(nm.values, nm.indices, 64), (conv.values, conv.indices, 72)],
        "nm_conv2d": [(xc, conv.values, conv.indices, 2, 4, [16, 8, 3, 3], [1, 1], [1, 1], [1, 1], b),
                      (xc.repeat(3, 1, 1, 1).requires_grad_(), conv.values, conv.indices, 2, 4, [16, 8, 3, 3],
                       [2, 1], [0, 1], [1, 2], None)],
        "nm_conv2d_cpu": [(xc, conv.values, conv.indices, 2, 4, [16, 8, 3, 3], [1, 1], [1, 1], [1, 1], b, DECODE)] + (
            [] if not GEMM_RUNS else [
                (xc, conv.values, conv.indices, 2, 4, [16, 8, 3, 3], [1, 1], [1, 1], [1, 1], b, GEMM,
                 conv.gemm_panels()),
                (xc.clone().requires_grad_(), conv.values, conv.indices, 2, 4, [16, 8, 3, 3], [2, 1], [0, 1], [1, 2],
                 None, GEMM, None)]),
        "nm_compress": [(w, None, 2, 4), (w, nm.mask(), 2, 4)],
        "nm_decompress": [(nm.values, nm.indices, 2, 4, 64)],
        "bitmask_linear": [(x, bmw.values, bmw.bitmask, bmw.offsets, 64, b),
                           (xg, bmw.values, bmw.bitmask, bmw.offsets, 64, None)],
        # CPU only: the column index and the algorithm chosen in Python (dispatch_rules.bitmask_cpu_algo)
        "bitmask_linear_cpu": [(x[:1], bmw.values, bmw.bitmask, bmw.offsets, 64, b, bmw.column_index()),
                               (xg[:1], bmw.values, bmw.bitmask, bmw.offsets, 64, None, bmw.column_index()),
                               (x20, bmw.values, bmw.bitmask, bmw.offsets, 64, b, None,
                                dispatch_rules.BITMASK_ALGO_TILES),
                               (x20.clone().requires_grad_(), bmw.values, bmw.bitmask, bmw.offsets, 64, None, None,
                                dispatch_rules.BITMASK_ALGO_DECODE)] + ([] if not AVX512 else [
            (x20[:6], bmw.values, bmw.bitmask, bmw.offsets, 64, b, None, dispatch_rules.BITMASK_ALGO_DECODE_EXPAND8),
            (x20[:1], bmw.values, bmw.bitmask, bmw.offsets, 64, b, None,
             dispatch_rules.BITMASK_ALGO_DECODE_B1_INDEXED)]),
        "bitmask_compress": [(w, mask), (w, None)],
        "bitmask_decompress": [(bmw.values, bmw.bitmask, bmw.offsets, 64)],
        "block_linear": [(x, blk.crow_indices, blk.col_indices, blk.values, 64, b),
                         (xg, blk.crow_indices, blk.col_indices, blk.values, 64, None)],
        # CPU only: the algorithm chosen in Python (dispatch_rules.block_cpu_algo)
        "block_linear_cpu": [(x20, blk.crow_indices, blk.col_indices, blk.values, 64, b, algo)
                             for algo in dispatch_rules.BLOCK_ALGO_NAMES] + [
            (xg, blk.crow_indices, blk.col_indices, blk.values, 64, None, dispatch_rules.BLOCK_ALGO_DECODE)],
        "block_compress": [(w, None, 8, 16)],
        "block_decompress": [(blk.crow_indices, blk.col_indices, blk.values, 64)],
        "masked_linear": [(x, w, bits, b), (xg, wg, bits, b.clone().requires_grad_())],
        "masked_linear_grad_input": [(x[:, :16].contiguous(), w, bits)],
        "masked_linear_grad_weight": [(x[:, :16].contiguous(), x, bits), (torch.randn(2, 3, 16, device=device),
                                                                        torch.randn(2, 3, 64, device=device), bits)],
        "nm_score_compress": [(w, torch.randn_like(w), torch.rand(64, device=device), 2, 4), (w, None, None, 4, 8)],
        "group_score": [(w, None, None, 1, 64, 1), (w, torch.randn_like(w), torch.rand(64, device=device), 4, 8, 2)],
        "act_norm_accumulate": [(torch.rand(64, device=device), torch.randn(2, 5, 64, device=device))],
        "hessian_accumulate": [(torch.rand(64, 64, device=device, dtype=torch.float64),
                                torch.randn(2, 5, 64, device=device))],
    }


def _cases():
    for device in DEVICES:
        dev = device.values[0] if hasattr(device, "values") else device
        marks = device.marks if hasattr(device, "marks") else ()
        for op in _samples("cpu"):
            if dev == "cuda" and (op in CPU_ONLY or not ops.OPS[op].cuda):
                continue
            yield pytest.param(op, dev, marks=marks, id=f"{op}-{dev}")


# Data-dependent output sizes (the number of kept elements) cannot go through AOT
# dispatch's dynamic-shape test; their fake kernels still run in the fake-tensor test.
DATA_DEPENDENT = {"bitmask_compress", "block_compress"}


@pytest.mark.parametrize("op,device", list(_cases()))
def test_opcheck(op, device):
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if op not in DATA_DEPENDENT:
        tests.append("test_aot_dispatch_dynamic")
    for args in _samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.sparsekern, op).default, args, test_utils=tests)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["nm", "bitmask", "block", "masked", "conv", "nm_q", "nm_q8", "bitmask_q"])
def test_torch_compile_fullgraph(device, fmt):
    torch._dynamo.reset()
    w = torch.randn(32, 64, device=device)
    b = torch.randn(32, device=device)
    if fmt == "nm":
        W = NMWeight.from_dense(w, 2, 4)
        fn = lambda x: torch.relu(ops.nm_linear(x, W, b)) * 2  # noqa: E731
    elif fmt == "bitmask":
        W = BitmaskWeight.from_dense(w, torch.rand_like(w) < 0.3)
        fn = lambda x: torch.relu(ops.bitmask_linear(x, W, b)) * 2  # noqa: E731
    elif fmt == "block":
        W = BlockWeight.from_dense(w, (16, 16), torch.rand_like(w) < 0.02)
        fn = lambda x: torch.relu(ops.block_linear(x, W, b)) * 2  # noqa: E731
    elif fmt == "nm_q":
        W = NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32)
        fn = lambda x: torch.relu(ops.nm_linear_q(x, W, b)) * 2  # noqa: E731
    elif fmt == "nm_q8":  # 20 rows: the 2:4 int8 dot-product GEMM (nm_linear_q_cpu) on AVX512_VNNI CPUs
        W = NMWeight.from_dense(w, 2, 4, quantize="int8")
        fn = lambda x: torch.relu(ops.nm_linear_q(x, W, b)) * 2  # noqa: E731
    elif fmt == "bitmask_q":
        W = BitmaskWeight.from_dense(w, torch.rand_like(w) < 0.3, quantize="int8")
        fn = lambda x: torch.relu(ops.bitmask_linear_q(x, W, b)) * 2  # noqa: E731
    elif fmt == "masked":
        bits = pack_bitmask(torch.rand_like(w) < 0.5)
        fn = lambda x: torch.relu(ops.masked_linear(x, w, bits, b)) * 2  # noqa: E731
    else:  # a 3x3 convolution over 8 channels: in_features 72
        W = NMWeight.from_dense(torch.randn(32, 72, device=device), 2, 4)
        fn = lambda x: torch.relu(ops.nm_conv2d(x.reshape(-1, 8, 4, 2), W, 3, b, 1, 1)) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for batch in (1, 5, 20):  # 20 rows: the CPU's 2:4 GEMM kernel for nm (nm_linear_cpu)
        x = torch.randn(batch, 64, device=device)
        torch.testing.assert_close(compiled(x), fn(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_masked_linear_backward():
    torch._dynamo.reset()
    w = torch.randn(32, 64, requires_grad=True)
    bits = pack_bitmask(torch.rand(32, 64) < 0.5)

    def loss(x):
        return ops.masked_linear(x, w, bits).square().sum()

    x = torch.randn(4, 64)
    torch.compile(loss, fullgraph=True)(x).backward()
    g1 = w.grad.clone()
    w.grad = None
    loss(x).backward()
    torch.testing.assert_close(g1, w.grad, rtol=1e-5, atol=1e-5)
