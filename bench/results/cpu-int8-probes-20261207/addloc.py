"""The residual add + layer norm after a [960, 384] int8 layer: timed after sparsekern's 2:4 int8
GEMM with its batch rows in one range (SPARSEKERN_INT8_RANGES=one: every thread writes a column
slice of every output row) and as dispatched (one range of rows per thread), and after torch's
dynamic int8 linear; interleaved, medians of 200 rounds. The GEMM itself is timed separately.

    python bench/results/cpu-int8-probes-20261207/addloc.py [B]"""
import os
import statistics
import sys
import time

import torch

from sparsekern import ops
from sparsekern.formats import NMWeight

torch.set_num_threads(2)
torch.backends.quantized.engine = "x86"
B, K, O = int(sys.argv[1]) if len(sys.argv) > 1 else 960, 1536, 384
w = torch.randn(O, K)
x = torch.randn(B, K)
r = torch.randn(B, O)
f = NMWeight.from_dense(w, 2, 4).quantize("int8")
lin = torch.nn.Linear(K, O, bias=False)
lin.weight.data = w
q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
ln = torch.nn.LayerNorm(O)


def one_range():
    os.environ["SPARSEKERN_INT8_RANGES"] = "one"
    try:
        return ops.nm_linear_q(x, f)
    finally:
        del os.environ["SPARSEKERN_INT8_RANGES"]


calls = {"sparsekern, one range": one_range, "sparsekern, as dispatched": lambda: ops.nm_linear_q(x, f),
         "torch int8 dynamic": lambda: q(x)}
res = {k: ([], []) for k in calls}
with torch.inference_mode():
    for _ in range(200):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            y = fn()
            t1 = time.perf_counter()
            ln(y + r)
            t2 = time.perf_counter()
            res[k][0].append(t1 - t0)
            res[k][1].append(t2 - t1)
print(f"B={B} K={K} O={O}, torch {torch.__version__}, 2 threads")
for k, (a, b) in res.items():
    print(f"{k}: linear {statistics.median(a) * 1e6:.0f} us, add + layer norm after it {statistics.median(b) * 1e6:.0f} us")
