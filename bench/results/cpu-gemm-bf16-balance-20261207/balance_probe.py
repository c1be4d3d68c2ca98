"""The 2:4 bf16 GEMM's lane ranges split into whole tiles nearest an equal share
(nm_gemm_bf16.h range_lanes_for) against the previous split (ceil(tiles / ranges) tiles per
range), interleaved call by call in one process, each call followed by layer_norm(y + residual)
in bf16 (what a transformer block does next). Needs the probe switch in probe_switch.diff
applied to csrc/cpu/nm_linear.cpp (SPARSEKERN_PROBE_TILE_CEIL_RANGES=1: the previous split)
and the extension rebuilt; the committed code has no such switch.

    PYTHONPATH=. python bench/results/cpu-gemm-bf16-balance-20261207/balance_probe.py [--ceil-first]

--ceil-first times the previous split first in each round (the default times it second): the
call that runs second in a round can be faster or slower for reasons of its own (3136 x 1152 ->
128 splits the same way in both, and reads 0.87-0.91 or 1.14 by position alone), so run both
orders and read a row only where the two agree.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsekern.formats import NMWeight

torch.set_num_threads(2)
torch.manual_seed(0)
ops = torch.ops.sparsekern
SWITCH = "SPARSEKERN_PROBE_TILE_CEIL_RANGES"
SHAPES = [  # (rows, in, out, what)
    (788, 768, 2304, "ViT-B qkv"), (788, 768, 768, "ViT-B proj"), (788, 768, 3072, "ViT-B fc1"),
    (788, 3072, 768, "ViT-B fc2"), (784, 2304, 256, "ResNet-50 layer3 3x3 as GEMM"),
    (784, 1024, 256, "ResNet-50 layer3 conv1"), (3136, 1152, 128, "ResNet-50 layer2 3x3 as GEMM"),
    (3136, 512, 128, "ResNet-50 layer2 conv1"), (128, 2048, 5632, "Llama gate/up (one range either way)"),
]
ROUNDS = 31
print(f"{'shape':<40} {'balanced ms':>12} {'ceil ms':>9} {'ceil/balanced (p20-p80 per round)':>34}")
for B, K, O, what in SHAPES:
    x = torch.randn(B, K).to(torch.bfloat16)
    res = torch.randn(B, O).to(torch.bfloat16)
    fmt = NMWeight.from_dense(torch.randn(O, K), 2, 4)
    vals, idx = fmt.values.to(torch.bfloat16), fmt.indices
    ref = F.linear(x.double(), fmt.to_dense().to(torch.bfloat16).double())

    def call():
        y = ops.nm_linear_cpu(x, vals, idx, 2, 4, K, None, 1, None)
        return y, F.layer_norm(y + res, (O,))

    times = {False: [], True: []}
    for ceil in (False, True):
        if ceil:
            os.environ[SWITCH] = "1"
        y, _ = call()
        os.environ.pop(SWITCH, None)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (what, ceil, err)
    order = (True, False) if "--ceil-first" in sys.argv else (False, True)
    for _ in range(ROUNDS):
        for ceil in order:
            if ceil:
                os.environ[SWITCH] = "1"
            t = time.perf_counter()
            call()
            times[ceil].append(time.perf_counter() - t)
            os.environ.pop(SWITCH, None)
    ratios = sorted(c / b for b, c in zip(times[False], times[True]))
    q = statistics.quantiles(ratios, n=5)
    print(f"{f'{B}x{K}->{O} {what}':<40} {statistics.median(times[False]) * 1e3:>12.3f} "
          f"{statistics.median(times[True]) * 1e3:>9.3f} {statistics.median(ratios):>14.3f} ({q[0]:.3f}-{q[3]:.3f})",
          flush=True)
