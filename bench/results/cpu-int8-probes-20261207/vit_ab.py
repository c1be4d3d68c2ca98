"""ViT-B/16 (timm, random weights) at batch 4, bf16 model: 2:4 (sparsify, l1) with the bf16
GEMM's lane ranges as dispatched against SPARSEKERN_NM_BF16_RANGES=one, and dense bf16,
interleaved; medians and the per-round ratio.

    python bench/results/cpu-int8-probes-20261207/vit_ab.py [rounds]"""
import torch, copy, time, statistics, os, sys, timm
torch.set_num_threads(2)
from sparsekern.sparsify import sparsify
torch.manual_seed(0)
m = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(torch.bfloat16)
x = torch.randn(4, 3, 224, 224, dtype=torch.bfloat16)
sk, _ = sparsify(copy.deepcopy(m), "2:4", show_progress=False)
def auto(): os.environ.pop("SPARSEKERN_NM_BF16_RANGES", None); return sk(x)
def one(): os.environ["SPARSEKERN_NM_BF16_RANGES"] = "one"; r = sk(x); os.environ.pop("SPARSEKERN_NM_BF16_RANGES"); return r
fs = {"auto": auto, "one": one, "dense bf16": lambda: m(x)}
with torch.inference_mode():
    for f in fs.values():
        for _ in range(3): f()
    ts = {k: [] for k in fs}
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
        for k, f in fs.items():
            t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
for k in ts: print(k, f"{statistics.median(ts[k])*1e3:.1f} ms", f"dense/this {statistics.median(ts['dense bf16'])/statistics.median(ts[k]):.3f}")
r = sorted(b / a for a, b in zip(ts["auto"], ts["one"]))
print("one/auto per round: median", f"{statistics.median(r):.3f}", "p20-p80", f"{r[len(r)//5]:.3f}-{r[4*len(r)//5]:.3f}")
