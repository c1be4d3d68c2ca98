"""A small run of every CUDA op, for compute-sanitizer (bench/gpu_check.sh): odd shapes,
each output checked, so memcheck sees every kernel's reads and writes."""
import torch

from sparsekern import ops
from sparsekern.formats import BitmaskWeight, NMWeight
from sparsekern.patterns import pack_bitmask

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for B in (1, 3, 17):
        w = torch.randn(37, 200, device="cuda", dtype=dtype)
        x = torch.randn(B, 200, device="cuda", dtype=dtype)
        b = torch.randn(37, device="cuda", dtype=dtype)
        for W in (NMWeight.from_dense(w, 2, 4), NMWeight.from_dense(w, 4, 8),
                  BitmaskWeight.from_dense(w, torch.rand(37, 200, device="cuda") < 0.3)):
            y = ops.sparse_linear(x, W, b)
            ref = torch.nn.functional.linear(x.double(), W.to_dense().double(), b.double())
            assert ((y.double() - ref).norm() / ref.norm()) < 2e-2, type(W).__name__
        bits = pack_bitmask(torch.rand(37, 200, device="cuda") < 0.5)
        wg = w.clone().requires_grad_()
        xg = x.clone().requires_grad_()
        ops.masked_linear(xg, wg, bits, b).sum().backward()
torch.cuda.synchronize()
print("sanitize_case: ok")
