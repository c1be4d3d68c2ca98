"""sparsekern.optimize on the real all-MiniLM-L6-v2: the fastest per-layer plan whose sentence
embeddings keep a cosine of `--floor` to the dense model's, against every uniform option and
the peers (dense bf16, torch int8 dynamic), all measured in one run.

    python bench/bench_optimize.py [--floor 0.95] [--budget-s 900] [--threads 2] [--out DIR]

The search (sensitivities, verification, wanda's calibration) sees training sentences only;
the Pareto rows and the goals are scored on held-out sentences. Batch: 16 training sentences
(the example input every latency is measured on). After the search the plan is saved,
loaded and applied to a freshly loaded model, which must equal the optimized one bit for
bit (state dict and outputs).

Writes plan.json, report.json (environment, plan, rows, goals), report.md, pareto.png
(default folder bench/results/optimize-20261206-minilm).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from sparsekern.bench.common import environment
from sparsekern.bench.quality import embed, english_sentences, load_minilm
from sparsekern.optimize import Plan, apply_plan, optimize, pareto_rows, state_dicts_equal, write_report

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floor", type=float, default=0.95, help="cosine to the dense embeddings (default 0.95)")
    p.add_argument("--budget-s", type=float, default=900.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="sentences per example input (default 16)")
    p.add_argument("--train", type=int, default=128, help="training sentences the search scores on")
    p.add_argument("--held-out", type=int, default=512)
    p.add_argument("--rounds", type=int, default=20, help="rounds of the interleaved whole-model timing")
    p.add_argument("--out", default=os.path.join(HERE, "results", "optimize-20261206-minilm"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    env = environment("cpu")

    model, tok = load_minilm()
    sents = english_sentences()
    perm = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
    train = [sents[i] for i in perm[:a.train]]
    held = [sents[i] for i in perm[a.train:a.train + a.held_out]]

    def batches(texts, bs=32):
        return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    train_b, held_b = batches(train), batches(held)
    example = batches(train[:a.batch], a.batch)[0]
    ref_train, ref_held = embed(model, train_b), embed(model, held_b)

    def cosine_train(m):
        return float((embed(m, train_b) * ref_train).sum(-1).mean())

    def cosine_held(m):
        return float((embed(m, held_b) * ref_held).sum(-1).mean())

    t = time.perf_counter()
    optimized, plan = optimize(copy.deepcopy(model), cosine_train, example, floor=a.floor, calibration=train_b,
                               budget_s=a.budget_s)
    search_s = time.perf_counter() - t
    print(f"search: {search_s:.0f} s; {len(plan.choices)} of {len(plan.layers)} layers changed; "
          f"train cosine {plan.measured['score']:.4f}; {plan.dense['latency_ms']:.2f} -> "
          f"{plan.measured['latency_ms']:.2f} ms", flush=True)

    os.makedirs(a.out, exist_ok=True)
    plan_path = os.path.join(a.out, "plan.json")
    plan.save(plan_path)
    fresh = apply_plan(load_minilm()[0], Plan.load(plan_path))
    with torch.no_grad():
        same_outputs = torch.equal(fresh(**example).last_hidden_state, optimized(**example).last_hidden_state)
    reproduced = {"state_dict_equal": state_dicts_equal(fresh.state_dict(), optimized.state_dict()),
                  "outputs_equal": bool(same_outputs)}
    print(f"re-applied plan: {reproduced}", flush=True)
    del fresh

    rows = pareto_rows(model, plan, cosine_held, example, calibration=train_b, rounds=a.rounds, optimized=optimized)
    by = {r["variant"]: r for r in rows if "latency_ms" in r}
    target = plan.target
    uniform_ok = [r for r in rows if r["kind"] == "uniform" and r.get("score", -1) >= target]
    best_uniform = min(uniform_ok, key=lambda r: r["latency_ms"]) if uniform_ok else None
    planr = by["plan"]
    int8 = by.get("torch int8 dynamic")
    goals = {
        "floor": a.floor, "target": target, "search_seconds": search_s, "budget_s": a.budget_s,
        "plan_held_out_cosine": planr["score"], "plan_meets_floor_held_out": planr["score"] >= target,
        "plan_ms": planr["latency_ms"],
        "speedup_vs_torch_int8_dynamic": int8["latency_ms"] / planr["latency_ms"] if int8 else None,
        "torch_int8_dynamic_held_out_cosine": int8["score"] if int8 else None,
        "best_uniform_meeting_floor": best_uniform["variant"] if best_uniform else None,
        "speedup_vs_best_uniform": best_uniform["latency_ms"] / planr["latency_ms"] if best_uniform else None,
        "reapplied_bit_for_bit": reproduced,
        "goal_1_5x_vs_int8": bool(int8 and int8["latency_ms"] / planr["latency_ms"] >= 1.5),
        "goal_1_1x_vs_best_uniform": bool(best_uniform and best_uniform["latency_ms"] / planr["latency_ms"] >= 1.1),
        "goal_within_15_min": search_s <= 900,
    }
    env = {**env, "batch_sentences": a.batch, "train_sentences": a.train, "held_out_sentences": a.held_out,
           "goals": goals}  # the load average is in "machine"
    paths = write_report(a.out, plan, rows, env, score_name="held-out cosine to dense")
    with open(os.path.join(a.out, "goals.json"), "w") as f:
        json.dump(goals, f, indent=1)
    print(json.dumps(goals, indent=1))
    print("wrote " + ", ".join(paths + [os.path.join(a.out, "goals.json")]))
    return goals


if __name__ == "__main__":
    main()
