"""Recovery after pruning: distillation from the dense teacher with the masks kept, and
gradual pruning on the Zhu-Gupta cubic schedule.

    model, _ = sparsify(model, "2:4", "sparsegpt", calibration=cal, trainable=True)
    report = recover(model, teacher, batches, steps=400, lr=3e-4, hidden="encoder.layer.*")
    freeze(model)   # the compressed inference modules; same output as the trained model

The student is a model with trainable sparse layers (sparsify(..., trainable=True), or a
model pruned with sparsekern.prune, whose torch-prune masks recover swaps to trainable
sparse layers first, from_torch_prune(trainable=True)). Each step runs the student on a
batch in training mode (the masked op: a pruned weight gets no gradient), the teacher
without gradients, and minimises

    output_weight * L_out + hidden_weight * L_hidden + task_weight * L_task

L_out: "mse", the mean squared difference of the outputs divided by the teacher's mean
square (so its weight compares with the hidden terms), or "kl", T^2 * KL(teacher || student)
of the softmaxes at temperature T over the last dimension. L_hidden: for each module named by
`hidden`, the same normalised MSE of its output (SquareHead), averaged over the modules.
L_task: task_loss(outputs, labels) when a batch carries labels (default: cross-entropy).

Masks are kept: after every optimizer step each masked weight is multiplied by its mask
again, so an optimizer whose state still moves a pruned weight (momentum from before a
pruning step) cannot revive it. Layers that store quantized values (quantize="int8"/"int4")
train through a straight-through estimator on the values their compressed copy will hold
(SparseLinear.training_weight). freeze(model) converts every trainable layer to its
compressed inference module afterwards.

Gradual pruning (GradualPruning): the fraction f_t of the final pruned set rises on the
cubic f_t = 1 - (1 - f_i)(1 - (t - t0)/(t1 - t0))^3 at steps t0, t0 + every, ..., t1;
masks are recomputed from the current weights at each of those steps and frozen after t1.
How a pattern is reached gradually, N:M included: at each pruning step the layer's pattern
mask of the current scores (kinds.make_mask at the final sparsity) names the candidates,
the weights the pattern would prune now; of those, the f_t lowest-scoring are pruned. So
every intermediate mask prunes a subset of a mask of the pattern (for N:M: at most M-N of
every group of M), and at t1 (f = 1) the mask is exactly the pattern's. Weights pruned
earlier are zero, so they score lowest and stay pruned while they remain candidates.

Layer: above modules and swap (sparsify, the sparse modules, kinds) and selection; below
reporting, the benchmarks and the app. docs/RECOVERY.md explains the API.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from . import kinds, prune
from .nn import SPARSE_MODULES, is_conv1d, linear_of
from .patterns import as_2d
from .sparsify import freeze, from_torch_prune, sparsify

__all__ = ["recover", "mixed_precision", "RecoveryReport", "GradualPruning", "cubic_fraction", "pruning_steps", "lr_factor",
           "gradual_mask", "sparsify_gradual", "masked_layers", "freeze", "LOSSES", "DECAYS"]

LOSSES = ("mse", "kl")
DECAYS = ("cosine", "linear", "constant")
GRADUAL_METHODS = ("l1", "l2")  # scores that need no calibration, recomputed at each pruning step


# ---------------------------------------------------------------------------- schedules
@dataclasses.dataclass
class GradualPruning:
    """Gradual pruning during recover, on the Zhu-Gupta cubic schedule.

    sparsity: the final fraction removed, for patterns that need one ("unstructured",
    "block"); None for N:M. start, end: the first and last pruning steps (end default: two
    thirds of recover's steps); every: steps between pruning steps (the last one is at end
    whatever the spacing); initial: the fraction of the final pruned set removed at start
    (0: start dense); method: the score, "l1" (|w|) or "l2", of the current weights."""
    sparsity: float | None = None
    start: int = 0
    end: int | None = None
    every: int = 10
    initial: float = 0.0
    method: str = "l1"


def cubic_fraction(step: int, start: int, end: int, initial: float = 0.0) -> float:
    """The fraction of the final pruned set removed at `step` (Zhu and Gupta):
    initial before start, 1 - (1 - initial) * (1 - (step - start) / (end - start))^3 between,
    1 from end on."""
    if step < start:
        return float(initial)
    if step >= end:
        return 1.0
    progress = (step - start) / (end - start)
    return 1.0 - (1.0 - initial) * (1.0 - progress) ** 3


def pruning_steps(start: int, end: int, every: int) -> list[int]:
    """The steps at which masks are recomputed: start, start + every, ..., and end."""
    steps = list(range(start, end + 1, every))
    if steps[-1] != end:
        steps.append(end)
    return steps


def lr_factor(step: int, steps: int, warmup: int, decay: str = "cosine", min_lr: float = 0.0) -> float:
    """The learning rate at `step` over the base rate: linear warm-up over the first `warmup`
    steps ((step + 1) / warmup), then "cosine" or "linear" decay to `min_lr` at the last step,
    or "constant"."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if decay == "cosine":
        return min_lr + (1.0 - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr) * progress


# -------------------------------------------------------------------------------- masks
def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every trainable sparse layer of `model`, each once."""
    seen, out = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, SPARSE_MODULES) and mod.trainable and id(mod) not in seen:
            seen.add(id(mod))
            out.append((name, mod))
    return out


def gradual_mask(scores: torch.Tensor, pattern: str, fraction: float, sparsity: float | None = None,
                 block: tuple[int, int] = (32, 32), where: str = "gradual_mask") -> torch.Tensor:
    """bool keep-mask (scores' shape) removing the `fraction` lowest-scoring of the weights
    that the pattern's own mask at its final `sparsity` prunes (the module docstring): a
    subset of a mask of the pattern, equal to it at fraction 1."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{where}: fraction must be in [0, 1], got {fraction!r}")
    final_keep = kinds.make_mask(scores, pattern, sparsity, block, where)
    candidates = (~final_keep).reshape(-1).nonzero().squeeze(1)
    keep = torch.ones_like(final_keep)
    k = int(round(fraction * candidates.numel()))
    if k >= candidates.numel():
        return final_keep
    if k:
        lowest = torch.topk(scores.reshape(-1)[candidates].float(), k, largest=False, sorted=False).indices
        keep.view(-1)[candidates[lowest]] = False
    return keep


def sparsify_gradual(model: nn.Module, pattern: str = "2:4", sparsity: float | None = None, **kwargs):
    """Swaps the layers sparsify would swap for trainable sparse layers of `pattern` that
    still hold their dense weights and keep every weight (the starting point of
    recover(..., gradual=GradualPruning(...)), which prunes them to the pattern). kwargs go
    to sparsify (include, exclude, min_features, block, quantize, group_size, ...). In
    place; returns (model, report) as sparsify does (density 1.0 in its rows)."""
    for bad in ("trainable", "method", "calibration"):
        if bad in kwargs:
            raise ValueError(f"sparsify_gradual: {bad}= is fixed here (trainable layers, magnitude placeholder "
                             "masks that recover replaces)")
    dense = {name: as_2d(linear_of(mod).weight.detach()).clone() for name, mod in model.named_modules()
             if isinstance(mod, prune.PRUNABLE + (nn.Linear,)) or is_conv1d(mod)}
    model, report = sparsify(model, pattern, "l1", sparsity, trainable=True, **kwargs)
    for row in report:
        if row.get("status") == "sparse":
            mod = model.get_submodule(row["layer"])
            w = dense[row["layer"]].to(mod.weight.device, mod.weight.dtype)
            mod.set_mask(torch.ones(tuple(mod.weight.shape), dtype=torch.bool, device=mod.weight.device),
                         weight=w.reshape(mod.weight.shape))
            row["density"] = 1.0
    return model, report


# --------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class RecoveryReport:
    """What recover did: steps run (the last step index + 1), the history (one dict per
    step: loss and its terms, learning rate, seconds; "metric" at evaluations), the best
    metric and its step, whether it stopped early, and the median seconds per training step
    (evaluations and checkpoints excluded)."""
    steps: int = 0
    history: list = dataclasses.field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds_per_step: float | None = None
    restored_best: bool = False
    teacher_cache_mb: float = 0.0


def default_output(outputs):
    """The tensor the output loss compares: a tensor itself; else `logits`, else
    `last_hidden_state` (Hugging Face outputs), else the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for key in ("logits", "last_hidden_state"):
        value = outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"recover: cannot find the output tensor in a {type(outputs).__name__}; pass output=")


def default_task_loss(outputs, labels):
    """Cross-entropy of default_output's logits against integer labels."""
    logits = default_output(outputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum (s - t)^2 / sum t^2 (SquareHead's per-layer term)."""
    t = teacher.float()
    return (student.float() - t).square().mean() / (t.square().mean() + 1e-12)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t / T) || softmax(s / T)) over the last dimension, mean over rows."""
    s = nn.functional.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, -1)
    t = nn.functional.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, -1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def _split(batch):
    """(inputs, labels) of a batch: a dict may hold "labels"; a tuple or list is
    (inputs, labels); anything else is inputs."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError("recover: a tuple or list batch must be (inputs, labels); wrap several inputs as "
                             "((a, b), labels) or ((a, b), None)")
        return batch[0], batch[1]
    return batch, None


def _stream(data, skip: int):
    """(key, batch): the batches of `data` in order, cycling, after the first `skip` of the
    stream; key is the batch's index in a list or tuple (the teacher cache's key), else None."""
    if isinstance(data, (list, tuple)):
        i = skip
        while True:
            yield i % len(data), data[i % len(data)]
            i += 1
    n = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if n >= skip:
                yield None, batch
            n += 1
        if empty:
            raise ValueError("recover: data yielded no batch")


def _hidden_names(model: nn.Module, teacher: nn.Module, hidden) -> list[str]:
    if hidden is None:
        return []
    patterns = [hidden] if isinstance(hidden, str) else list(hidden)
    names = [n for n, _ in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"recover: hidden={hidden!r} matches no module of the model")
    teacher_names = {n for n, _ in teacher.named_modules()}
    missing = [n for n in names if n not in teacher_names]
    if missing:
        raise ValueError(f"recover: hidden modules {missing[:3]} are not in the teacher (it must share the "
                         "student's module names)")
    return names


def _capture(model: nn.Module, names: list[str], store: dict) -> list:
    """Forward hooks that keep each named module's output tensor (the first of a tuple)."""
    def hook(name):
        def keep(_mod, _inp, out):
            store[name] = default_output(out)
        return keep
    return [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"recover: {message}")


def _positive_int(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive int, got {value!r}")


def recover(model: nn.Module, teacher: nn.Module, data: Iterable, steps: int, lr: float = 1e-4, *,
            loss: str = "mse", temperature: float = 2.0, output: Callable | None = None, hidden=None,
            output_weight: float = 1.0, hidden_weight: float = 1.0, task_weight: float = 1.0,
            task_loss: Callable | None = None, accumulate: int = 1, warmup: float | int = 0.05,
            decay: str = "cosine", min_lr: float = 0.0, weight_decay: float = 0.0, optimizer: Callable | None = None,
            clip_grad: float | None = 1.0, gradual: GradualPruning | None = None, eval_fn: Callable | None = None,
            eval_every: int | None = None, patience: int | None = None, min_delta: float = 0.0,
            restore_best: bool = True, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, resume: bool = True, dropout: bool = False,
            autocast: torch.dtype | None = None, cache_teacher: bool | None = None,
            teacher_cache_mb: float = 4096.0, show_progress: bool = True) -> RecoveryReport:
    """Fine-tunes `model` (trainable sparse layers; a sparsekern.prune model is swapped to
    them first) to match `teacher` (the dense model: same module names for `hidden`) on
    `data`, keeping the masks; in place. Returns a RecoveryReport. Module docstring: losses,
    masks, quantized layers, gradual pruning.

    data: batches, re-iterable (a list is read by index, cycling; an iterable is re-iterated
    each pass); a batch is a tensor, a dict of model inputs (its "labels" key, if any,
    feeds the task loss) or (inputs, labels). steps: optimizer steps, each over
    `accumulate` batches. lr: the base learning rate of AdamW (or of `optimizer`, a
    function params -> torch optimizer), with linear warm-up over `warmup` steps (a fraction
    below 1 is of `steps`) and `decay` ("cosine", "linear", "constant") to min_lr * lr.
    loss: "mse" or "kl" (temperature) on output(outputs, batch) (default: the tensor, logits
    or last_hidden_state); hidden: module names or fnmatch patterns whose outputs add
    SquareHead terms. clip_grad: the gradients' max norm (None: no clipping).
    eval_fn(model) -> float, higher is better, run in eval mode every `eval_every` steps and
    at the end; patience: stop after that many evaluations without a rise above min_delta;
    restore_best: end on the weights of the best evaluation. With gradual pruning only
    evaluations from the last pruning step on count (earlier masks are not the pattern).
    checkpoint: a file written every `checkpoint_every` steps (model, optimizer, step,
    history, best); with resume=True a run finds it and goes on from there (same
    arguments). dropout: False runs the model in eval mode except its trainable sparse
    layers (no dropout, batch-norm statistics fixed); True trains it all in training mode.
    autocast: None (full precision) or torch.bfloat16 / torch.float16: the student's forward
    and backward run under torch.autocast at that dtype (mixed precision: the parameters, the
    optimizer and the loss stay fp32; the trainable sparse layers multiply in that dtype);
    the teacher runs in full precision. On a CPU with bf16 dot products a masked MiniLM step
    ran 1.5x faster in bf16 (bench/results/cpu-training-20261206b); on a CPU attention then
    uses torch's math SDPA backend (mixed_precision).
    cache_teacher: keep the teacher's outputs (the compared output and the `hidden` modules')
    per batch, for data given as a list or tuple, so a batch seen again skips the teacher
    (its outputs are the same: the teacher runs in eval mode without gradients). None: cache
    when the steps pass over the list more than once. At most teacher_cache_mb megabytes are
    kept; batches beyond run the teacher each time. report.teacher_cache_mb says what it held.
    """
    _check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}")
    _check(isinstance(teacher, nn.Module), f"teacher must be an nn.Module, got {type(teacher).__name__}")
    _check(teacher is not model, "teacher must be another model than model (the dense original, a copy kept "
                                 "before pruning)")
    _positive_int(steps, "steps")
    _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, f"lr must be > 0, got {lr!r}")
    _check(loss in LOSSES, f"loss must be one of {LOSSES}, got {loss!r}")
    _check(isinstance(temperature, (int, float)) and temperature > 0, f"temperature must be > 0, got {temperature!r}")
    for name, value in (("output_weight", output_weight), ("hidden_weight", hidden_weight),
                        ("task_weight", task_weight), ("min_lr", min_lr), ("weight_decay", weight_decay),
                        ("min_delta", min_delta)):
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
               f"{name} must be a number >= 0, got {value!r}")
    _positive_int(accumulate, "accumulate")
    _check(isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and warmup >= 0,
           f"warmup must be >= 0 (steps, or a fraction of steps below 1), got {warmup!r}")
    _check(decay in DECAYS, f"decay must be one of {DECAYS}, got {decay!r}")
    _check(clip_grad is None or (isinstance(clip_grad, (int, float)) and clip_grad > 0),
           f"clip_grad must be > 0 or None, got {clip_grad!r}")
    _positive_int(eval_every, "eval_every", allow_none=True)
    _check(eval_every is None or eval_fn is not None, "eval_every needs eval_fn=")
    _check(eval_fn is None or callable(eval_fn), "eval_fn must be callable (model -> float, higher is better)")
    _positive_int(patience, "patience", allow_none=True)
    _check(patience is None or eval_every is not None, "patience needs eval_fn= and eval_every=")
    _positive_int(checkpoint_every, "checkpoint_every", allow_none=True)
    _check(checkpoint_every is None or checkpoint is not None, "checkpoint_every needs checkpoint= (a file path)")
    _check(autocast in (None, torch.bfloat16, torch.float16),
           f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    _check(cache_teacher in (None, True, False), f"cache_teacher must be None, True or False, got {cache_teacher!r}")
    _check(isinstance(teacher_cache_mb, (int, float)) and not isinstance(teacher_cache_mb, bool)
           and teacher_cache_mb >= 0, f"teacher_cache_mb must be a number >= 0, got {teacher_cache_mb!r}")
    _check(data is not None and not isinstance(data, (torch.Tensor, str)) and hasattr(data, "__iter__"),
           f"data must be an iterable of batches (a list of them), got {type(data).__name__}")
    if isinstance(data, (list, tuple)):
        _check(len(data) > 0, "data is empty")
    warmup_steps = int(round(warmup * steps)) if warmup < 1 else int(warmup)
    schedule = _gradual_schedule(gradual, steps)

    if not masked_layers(model) and any(isinstance(m, prune.PRUNABLE) and hasattr(m, "weight_mask")
                                        for m in model.modules()):
        from_torch_prune(model, trainable=True)  # torch-prune masks -> trainable sparse layers
    layers = masked_layers(model)
    _check(bool(layers), "model has no trainable sparse layers: build it with sparsify(..., trainable=True), "
                         "sparsify_gradual, or prune it with sparsekern.prune")
    if gradual is not None:
        for name, mod in layers:
            if kinds.parse(mod.pattern).entry.needs_sparsity and gradual.sparsity is None:
                raise ValueError(f"recover: gradual.sparsity is needed for layer {name!r} of pattern "
                                 f"{mod.pattern!r} (the final fraction removed)")
    hidden_names = _hidden_names(model, teacher, hidden) if hidden_weight else []
    output_fn = output or (lambda outputs, batch: default_output(outputs))
    task_fn = task_loss or default_task_loss

    params = [p for p in model.parameters() if p.requires_grad]
    _check(bool(params), "model has no parameter that requires grad")
    opt = optimizer(params) if optimizer is not None else _adamw(params, lr, weight_decay)
    _check(isinstance(opt, torch.optim.Optimizer), "optimizer must be a function params -> torch.optim.Optimizer")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"] if optimizer is not None else lr

    report = RecoveryReport()
    signature = {"steps": steps, "accumulate": accumulate, "lr": lr, "loss": loss, "warmup": warmup_steps,
                 "decay": decay, "gradual": dataclasses.asdict(gradual) if gradual is not None else None}
    start, best_state = 0, None
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        start, best_state = _load_checkpoint(checkpoint, model, opt, report, signature)
        report.resumed_from = start

    teacher.eval()
    if cache_teacher is None:
        cache_teacher = isinstance(data, (list, tuple)) and steps * accumulate > len(data)
    teacher_cache = _TeacherCache(int(teacher_cache_mb * 2 ** 20) if cache_teacher else 0)
    device_type = params[0].device.type
    student_out: dict = {}
    teacher_out: dict = {}
    hooks = _capture(model, hidden_names, student_out) + _capture(teacher, hidden_names, teacher_out)
    masks = {}
    batches = _stream(data, start * accumulate)
    bar = tqdm(total=steps, initial=start, desc="recover", disable=not show_progress, mininterval=1.0)
    step_seconds = []
    evals_since_best = 0
    try:
        _set_modes(model, layers, dropout)
        for step in range(start, steps):
            t0 = time.perf_counter()
            if step in schedule:
                _prune_step(layers, opt, gradual, cubic_fraction(step, gradual.start, schedule[-1], gradual.initial))
                masks.clear()
            factor = lr_factor(step, steps, warmup_steps, decay, min_lr)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            terms_sum: dict[str, float] = {}
            total_sum = 0.0
            for _ in range(accumulate):
                key, batch = next(batches)
                inputs, labels = _split(batch)
                cached = teacher_cache.get(key)
                if cached is None:
                    with torch.no_grad():
                        t_outputs = prune.run_batch(teacher, inputs)
                    t_output = output_fn(t_outputs, batch).detach() if output_weight else None
                    teacher_cache.put(key, t_output, teacher_out)
                else:
                    t_output, hidden_cached = cached
                    teacher_out.update(hidden_cached)
                with mixed_precision(device_type, autocast):
                    s_outputs = prune.run_batch(model, inputs)
                terms = {}
                if output_weight:
                    s = output_fn(s_outputs, batch)
                    terms["output"] = (output_weight, normalized_mse(s, t_output) if loss == "mse" else
                                       kl_loss(s, t_output, temperature))
                if hidden_names:
                    terms["hidden"] = (hidden_weight, sum(normalized_mse(student_out[n], teacher_out[n].detach())
                                                          for n in hidden_names) / len(hidden_names))
                if labels is not None and task_weight:
                    terms["task"] = (task_weight, task_fn(s_outputs, labels))
                _check(bool(terms), "every loss term is off (output_weight, hidden_weight, task_weight)")
                total = sum(w * v for w, v in terms.values())
                (total / accumulate).backward()
                total_sum += float(total.detach()) / accumulate
                for k, (_, v) in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / accumulate
                student_out.clear()
                teacher_out.clear()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(params, clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _keep_masks(layers, masks)
            seconds = time.perf_counter() - t0
            step_seconds.append(seconds)
            entry = {"step": step, "loss": total_sum, **{f"loss_{k}": v for k, v in terms_sum.items()},
                     "lr": opt.param_groups[0]["lr"], "seconds": seconds}
            last = step == steps - 1
            if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
                metric = float(_evaluate(model, layers, eval_fn, dropout))
                entry["metric"] = metric
                counts = not schedule or step >= schedule[-1]
                if counts and (report.best_metric is None or metric > report.best_metric + min_delta):
                    report.best_metric, report.best_step = metric, step
                    evals_since_best = 0
                    if restore_best:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                elif counts:
                    evals_since_best += 1
            report.history.append(entry)
            report.steps = step + 1
            bar.update(1)
            bar.set_postfix({"loss": f"{total_sum:.4g}", **({"metric": f"{entry['metric']:.4f}"}
                                                              if "metric" in entry else {})}, refresh=False)
            stop = patience is not None and evals_since_best >= patience
            if checkpoint is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0 or last or stop):
                _save_checkpoint(checkpoint, model, opt, report, signature, best_state)
            if stop:
                report.stopped_early = True
                break
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        model.eval()
    if restore_best and best_state is not None and report.history and \
            report.history[-1].get("metric", report.best_metric) < report.best_metric:
        model.load_state_dict(best_state)
        report.restored_best = True
    if step_seconds:
        report.seconds_per_step = float(torch.tensor(step_seconds).median())
    report.teacher_cache_mb = teacher_cache.nbytes / 2 ** 20
    return report


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the fused kernel for these parameters (CPU and CUDA
    floating tensors): one pass over each tensor instead of a dozen; a MiniLM step here
    went from 0.39 s to 0.30 s. Same update rule; the last bits may differ."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@contextlib.contextmanager
def mixed_precision(device_type: str, dtype: torch.dtype | None):
    """The context recover runs the student's forward in: nothing at full precision (dtype
    None); torch.autocast at `dtype`, plus on a CPU the math SDPA backend. Why: in bf16 the
    CPU flash kernel's backward took 82 ms of a MiniLM training step (16 ms in fp32), and the
    whole dense bf16 step ran 181 ms with the math backend against 240 ms with flash (Zen 4,
    2 threads, 16 sentences)."""
    if dtype is None:
        yield
        return
    math_sdpa = sdpa_kernel([SDPBackend.MATH]) if device_type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device_type, dtype=dtype), math_sdpa:
        yield


class _TeacherCache:
    """The teacher's outputs per batch key, within `capacity` bytes (0: nothing kept)."""

    def __init__(self, capacity: int):
        self.capacity, self.nbytes, self.entries = capacity, 0, {}

    def get(self, key):
        return self.entries.get(key) if key is not None else None

    def put(self, key, output, hidden: dict) -> None:
        if key is None or not self.capacity:
            return
        hidden = {n: t.detach() for n, t in hidden.items()}
        size = sum(t.numel() * t.element_size() for t in [output, *hidden.values()] if t is not None)
        if self.nbytes + size <= self.capacity:
            self.entries[key] = (output, hidden)
            self.nbytes += size


def _gradual_schedule(gradual: GradualPruning | None, steps: int) -> list[int]:
    """The pruning steps of `gradual` within `steps`, its arguments checked."""
    if gradual is None:
        return []
    if not isinstance(gradual, GradualPruning):
        raise TypeError(f"recover: gradual must be a GradualPruning, got {type(gradual).__name__}")
    end = max(gradual.start, (2 * steps) // 3) if gradual.end is None else gradual.end
    for name, value in (("gradual.start", gradual.start), ("gradual.end", end)):
        _check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < steps,
               f"{name} must be a step in [0, steps), got {value!r}")
    _check(end >= gradual.start, f"gradual.end ({end}) must be >= gradual.start ({gradual.start})")
    _positive_int(gradual.every, "gradual.every")
    _check(isinstance(gradual.initial, (int, float)) and 0 <= gradual.initial <= 1,
           f"gradual.initial must be in [0, 1], got {gradual.initial!r}")
    _check(gradual.method in GRADUAL_METHODS, f"gradual.method must be one of {GRADUAL_METHODS}, "
                                              f"got {gradual.method!r}")
    if gradual.sparsity is not None:
        prune.prune_count(float(gradual.sparsity), 1, "recover: gradual.sparsity")
    return pruning_steps(gradual.start, end, gradual.every)


@torch.no_grad()
def _prune_step(layers, opt: torch.optim.Optimizer, gradual: GradualPruning, fraction: float) -> None:
    """Every layer's mask recomputed at `fraction` of its final pruned set; the optimizer's
    state of newly pruned weights zeroed (no momentum revives them)."""
    for name, mod in layers:
        scores = prune.score(mod.weight.detach(), gradual.method)
        pattern = kinds.parse(mod.pattern)
        block = pattern.entry.block_of(pattern.params, (32, 32)) or (32, 32)  # sparsify's default block
        mask = gradual_mask(scores, mod.pattern, fraction, gradual.sparsity, block, where=f"recover: layer {name!r}")
        mask &= mod.mask()  # a weight once pruned stays pruned
        mod.set_mask(mask)
        for value in opt.state.get(mod.weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                value.mul_(mask.to(value.dtype))


@torch.no_grad()
def _keep_masks(layers, masks: dict) -> None:
    """Each masked weight multiplied by its mask (cached per layer until the next pruning step)."""
    for name, mod in layers:
        m = masks.get(name)
        if m is None:
            m = masks[name] = mod.mask().to(mod.weight.dtype)
        mod.weight.mul_(m)


def _set_modes(model: nn.Module, layers, dropout: bool) -> None:
    """Training mode for the trainable sparse layers (their masked op) and, with dropout,
    for everything; otherwise eval mode for the rest."""
    model.train(dropout)
    for _, mod in layers:
        mod.train()


def _evaluate(model: nn.Module, layers, eval_fn: Callable, dropout: bool) -> float:
    model.eval()
    try:
        with torch.no_grad():
            return eval_fn(model)
    finally:
        _set_modes(model, layers, dropout)


def _save_checkpoint(path, model, opt, report: RecoveryReport, signature: dict, best_state) -> None:
    """Written to a temporary file and renamed, so an interrupted save leaves the last one."""
    state = {"signature": signature, "step": report.steps, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "history": report.history, "best_metric": report.best_metric, "best_step": report.best_step,
             "best_state": best_state, "rng": torch.get_rng_state()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path, model, opt, report: RecoveryReport, signature: dict):
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("signature") != signature:
        raise ValueError(f"recover: checkpoint {os.fspath(path)!r} was written by a run with other arguments "
                         f"({state.get('signature')} against {signature}); remove it or pass resume=False")
    model.load_state_dict(state["model"])  # masks are buffers of it: gradual pruning's come back too
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    report.history = list(state["history"])
    report.best_metric, report.best_step = state["best_metric"], state["best_step"]
    report.steps = state["step"]
    return state["step"], state["best_state"]

