"""optimize(model, eval_fn, example_inputs, floor=...): the fastest model within a quality
floor, chosen layer by layer from measured speed and measured sensitivity.

    model, plan = sparsekern.optimize(model, eval_fn, example_inputs, floor=0.99)
    plan.save("plan.json")
    same = sparsekern.apply_plan(fresh_copy, sparsekern.Plan.load("plan.json"))

Stages (each shown by one progress bar with the stage and the best so far):

0. layout: a model with convolutions is timed as given and channels-last (choose_layout); the
   search runs on the faster, the plan records it, and apply_plan lays a fresh copy out the
   same way (the plan's speed-up is always against the model as given).
1. capture: one forward of `example_inputs` records every candidate layer's input (the
   user's batch); the calibration batches give wanda's activation norms.
2. latency: every menu option of a layer is built (the sparse modules of sparsekern.nn with
   their own per-batch path choice, torch's dynamic int8 for "dense int8") and its forward
   timed on the captured input, round-robin against the dense layer. Layers of identical
   geometry (type, shape, bias, input shape) share one measurement: they run the same
   kernels on the same amount of data, and the time saved goes into more rounds.
3. sensitivity: eval_fn with only that layer changed, for every (layer, option) while the
   stage's share of `budget_s` lasts; the rest get a proxy (the layer's relative output
   error on its captured input) scaled by the measured loss/proxy ratio (the larger of the
   option's and the overall one). Options no faster than the dense layer are skipped.
   The plan records which values were measured and the Spearman rank correlation of proxy
   against measurement over the measured pairs (the proxy's validation).
4. knapsack: a multiple-choice knapsack (dynamic programming over the score loss,
   discretized upward so the predicted loss never exceeds the budget) picks one option per
   layer for the largest predicted latency saved with the summed loss within the floor.
5. recover (optional): `recover(model) -> model`, e.g. distillation, on the planned model.
6. verification: the whole model is evaluated and timed against the dense one; below the
   floor, the changed layer with the worst loss per millisecond saved goes back to dense
   and the model is verified again, until the floor holds.

The `Plan` holds per layer the choice, its measured latency, its sensitivity (and whether
measured), the model's predicted and measured latency and score, and everything apply_plan
needs to rebuild the same model without searching (options and wanda's activation norms,
stored exactly). Timings and scores can be injected (`timings=`, `sensitivities=`,
`time_model=`): the knapsack, the back-off and the floor are tested without timing anything.

The default menu walks the registries (sparsekern.kinds, sparsekern.precisions): every
prunable kind at the spellings of MENU_SPELLINGS, in every value precision its format can
hold, plus "dense" (the layer as it is) and "dense int8" (torch's dynamic int8 on that one
layer, the peer of sparsekern.bench.peers). Dense bf16 is a whole-model choice (activations
change dtype), so it is a peer in the report, not a menu option.

Layer: above selection and the benchmark suite (it times with sparsekern.bench.common and
builds the peers of sparsekern.bench.peers), below the app (CLI, demo).
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import os
import random
import statistics
import time
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from . import kinds, precisions, prune
from .bench import peers as peers_mod
from .bench.common import NOISE_MIN, interleaved
from .nn import SparseConv2d, SparseLinear
from .prune.calibration import run_batch
from .reporting import label_points, markdown_table, save_plot
from .sparsify import set_module

PLAN_VERSION = 1
# The memory layouts optimize may give the model's convolutions: "auto" times the model as
# given against the same model channels-last (torch's layout for fast CPU convolutions, the one
# sparsify gives a swapped model's dense convolutions) and searches on the faster one beyond
# the noise (NOISE_MIN); "as given" and "channels_last" fix it. A model without nn.Conv2d is
# searched as given.
LAYOUTS = ("auto", "as given", "channels_last")
# Spellings offered per prunable kind (kinds.KINDS); sparsity None for kinds whose pattern
# fixes it. tests/test_optimize.py checks every prunable kind has an entry.
MENU_SPELLINGS: dict[str, tuple[tuple[str, float | None], ...]] = {
    "nm": (("2:4", None), ("4:8", None)),
    "unstructured": (("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.7)),
    "block": (("block32", 0.5),),
}
INT4_GROUP = 128
METHODS = ("wanda", "l1")
# The sparse module class for each layer type a menu option can replace.
SPARSE_CLASS: dict[type, type] = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}
# Shares of budget_s: the latency stage ends by LATENCY_SHARE of it; the sensitivity stage
# takes SENSITIVITY_SHARE of what is left (the rest: knapsack, recovery, verification).
LATENCY_SHARE = 0.3
SENSITIVITY_SHARE = 0.75
KNAPSACK_BINS = 2000


# ---------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class Option:
    """One per-layer choice. `build` names the builder (BUILDERS); pattern, sparsity,
    quantize and group_size are what sparsekern.nn's from_dense takes."""
    name: str
    build: str
    pattern: str = "dense"
    sparsity: float | None = None
    quantize: str | None = None
    group_size: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Option":
        return cls(**d)


def _build_keep(layer: nn.Module, option: Option, act_norm, method: str) -> nn.Module:
    return layer


def _build_sparse(layer: nn.Module, option: Option, act_norm, method: str) -> nn.Module:
    cls = SPARSE_CLASS.get(type(layer))
    if cls is None:
        raise ValueError(f"option {option.name!r}: no sparse module for {type(layer).__name__}")
    if cls is SparseConv2d:
        SparseConv2d.check_supported(layer, option.pattern)
    else:
        kind, params = kinds.parse(option.pattern, "optimize")
        kinds.KINDS[kind].check_shape(layer.weight.shape[0], layer.weight[0].numel(), params, (32, 32), "optimize")
    use_wanda = method == "wanda" and act_norm is not None
    return cls.from_dense(layer, option.pattern, method="wanda" if use_wanda else "l1", sparsity=option.sparsity,
                          act_norm=act_norm if use_wanda else None, quantize=option.quantize,
                          group_size=option.group_size or INT4_GROUP).eval()


def _build_torch_int8(layer: nn.Module, option: Option, act_norm, method: str) -> nn.Module:
    peer = peers_mod.PEERS["torch int8 dynamic"]
    if not isinstance(layer, nn.Linear) or "cpu" not in peer.devices or layer.weight.device.type != "cpu":
        raise ValueError(f"option {option.name!r}: torch's dynamic int8 covers nn.Linear on the CPU only")
    wrapped, _ = peer.make(nn.Sequential(copy.deepcopy(layer)), {"device": "cpu"})
    return wrapped[0].eval()


BUILDERS: dict[str, Callable] = {"keep": _build_keep, "sparse": _build_sparse, "torch int8 dynamic": _build_torch_int8}
DENSE = "dense"


def default_menu() -> dict[str, Option]:
    """Every pattern and value precision that can run here, from the registries: the dense
    layer, torch's dynamic int8 of it (on a CPU), and each prunable kind's MENU_SPELLINGS in
    each precision its format holds (grouped precisions need values stored by row)."""
    menu = {DENSE: Option(DENSE, "keep")}
    if torch.backends.quantized.supported_engines and "cpu" in peers_mod.PEERS["torch int8 dynamic"].devices:
        menu["dense int8"] = Option("dense int8", "torch int8 dynamic")
    for kind in kinds.KINDS.values():
        if not kind.prunable or kind.format is None:
            continue
        for pattern, sparsity in MENU_SPELLINGS[kind.name]:
            base = pattern if sparsity is None else f"{pattern} {sparsity:.0%}"
            for prec in precisions.PRECISIONS.values():
                if prec.grouped and not kind.format.ROW_VALUES:
                    continue
                q = None if prec.storage is None else prec.name
                gs = INT4_GROUP if prec.grouped else 0
                name = base if q is None else f"{base} {q}" + (f" g{gs}" if gs else "")
                menu[name] = Option(name, "sparse", pattern, sparsity, q, gs)
    return menu


def build_option(layer: nn.Module, option: Option, act_norm: torch.Tensor | None = None,
                 method: str = "wanda") -> nn.Module:
    """The module that replaces `layer` under `option` (ValueError when it cannot hold it)."""
    if option.build not in BUILDERS:
        raise ValueError(f"option {option.name!r}: unknown builder {option.build!r}; one of {sorted(BUILDERS)}")
    return BUILDERS[option.build](layer, option, act_norm, method)


# ----------------------------------------------------------------------------- floor
def target_score(dense_score: float, floor: float, absolute: bool = False) -> float:
    """The lowest acceptable score: `floor` itself when absolute, else floor x the dense
    score (a fraction in (0, 1] of a positive dense score)."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor):
        raise ValueError(f"optimize: floor must be a finite number, got {floor!r}")
    if absolute:
        return float(floor)
    if not 0 < floor <= 1:
        raise ValueError(f"optimize: floor must be in (0, 1] relative to the dense score (or absolute=True), "
                         f"got {floor!r}")
    if not dense_score > 0:
        raise ValueError(f"optimize: floor is relative, but the dense model scores {dense_score!r} (not positive); "
                         "give an absolute floor with absolute=True")
    return float(floor) * float(dense_score)


# --------------------------------------------------------------------------- knapsack
def knapsack(items: dict[str, dict[str, tuple[float, float]]], budget: float,
             bins: int = KNAPSACK_BINS) -> dict[str, str]:
    """One option per layer: items[layer][option] = (latency saved, score loss). Returns
    {layer: option} maximizing the summed saving with summed loss <= budget; a layer whose
    options all save nothing or cost too much takes none (absent from the result, i.e. it
    stays dense). Losses are discretized upward into `bins` steps of budget/bins (a
    negative loss counts as 0), so the chosen set's true summed loss never exceeds the
    budget; it is the exact optimum when every loss is a multiple of the step."""
    if budget < 0:
        return {}
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"knapsack: bins must be a positive int, got {bins!r}")
    step = budget / bins if budget > 0 else 0.0

    def units(loss):
        if loss <= 0:
            return 0
        if step == 0:
            return bins + 1
        return math.ceil(loss / step - 1e-9)

    neg = float("-inf")
    best = [0.0] + [neg] * bins  # best[b]: largest saving using exactly b units
    picks: list[dict] = []
    for layer, opts in items.items():
        cand = [(o, s, units(l)) for o, (s, l) in opts.items() if s > 0 and units(l) <= bins]
        new, choice = list(best), [None] * (bins + 1)
        for o, s, u in cand:
            for b in range(bins, u - 1, -1):
                if best[b - u] != neg and best[b - u] + s > new[b]:
                    new[b], choice[b] = best[b - u] + s, (o, u)
        picks.append((layer, choice))
        best = new
    b = max(range(bins + 1), key=lambda i: best[i])
    out = {}
    for layer, choice in reversed(picks):
        if choice[b] is not None:
            o, u = choice[b]
            out[layer] = o
            b -= u
    return out


def backoff(choice: dict[str, str], items: dict[str, dict[str, tuple[float, float]]],
            verify: Callable[[dict[str, str]], float], target: float, on_step: Callable | None = None):
    """Verify `choice` (verify(choice) -> score); while below `target`, revert to dense the
    changed layer with the largest loss per latency saved (items[layer][option] = (saved,
    loss)) and verify again. Returns (choice, score, history: one dict per verification)."""
    choice = dict(choice)
    history = []
    while True:
        score = float(verify(choice))
        history.append({"changed": len(choice), "score": score})
        if on_step:
            on_step(choice, score)
        if score >= target or not choice:
            return choice, score, history

        def ratio(layer):
            saved, loss = items[layer][choice[layer]]
            return max(loss, 0.0) / max(saved, 1e-12)

        worst = max(choice, key=lambda layer: (ratio(layer), layer))
        history[-1]["reverted"] = worst
        history[-1]["reverted_option"] = choice.pop(worst)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else None


# ------------------------------------------------------------------------------ plan
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().to(torch.float32).contiguous().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.float32).clone()


@dataclasses.dataclass
class Plan:
    """What optimize chose and measured (module docstring). layers: one dict per candidate
    layer: name, option (the choice), latency_ms {option: ms}, sensitivity {option: score
    loss}, measured {option: True when the loss was measured, False for the proxy},
    act_norm (wanda's activation norms, base64 float32, or None). options: the menu
    {name: Option fields}. dense / predicted / measured: {"score", "latency_ms"}."""
    layers: list[dict]
    options: dict[str, dict]
    method: str
    floor: float
    absolute: bool
    target: float
    dense: dict
    predicted: dict
    measured: dict
    search: dict
    version: int = PLAN_VERSION
    layout: str = "as given"  # the model's layout the choices apply to (LAYOUTS; never "auto")

    @property
    def choices(self) -> dict[str, str]:
        """{layer: option} for the layers that changed."""
        return {r["name"]: r["option"] for r in self.layers if r["option"] != DENSE}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            raise ValueError(f"Plan: not a plan of version {PLAN_VERSION} (got version "
                             f"{d.get('version') if isinstance(d, dict) else type(d).__name__!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(d) - {"layout"}  # plans saved before layouts: as given
        if missing:
            raise ValueError(f"Plan: missing fields {sorted(missing)}")
        return cls(**{k: d[k] for k in fields if k in d})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())

    def table(self) -> str:
        """Markdown: one row per layer (choice, its latency against dense, its loss)."""
        rows = []
        for r in self.layers:
            lat = r["latency_ms"]
            o = r["option"]
            rows.append({"layer": r["name"], "option": o, "dense_ms": lat.get(DENSE), "ms": lat.get(o),
                         "loss": r["sensitivity"].get(o, 0.0),
                         "how": "measured" if r["measured"].get(o, True) else "proxy"})
        return markdown_table(rows, [("layer", "layer", ""), ("choice", "option", ""), ("dense ms", "dense_ms", ".4f"),
                                     ("choice ms", "ms", ".4f"), ("score loss", "loss", ".5f"),
                                     ("loss from", "how", "")])


def apply_choices(model: nn.Module, choices: dict[str, str], options: dict[str, Option], method: str = "wanda",
                  act_norms: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap each layer named in `choices` for its option's module, in place; returns the model."""
    for name, oname in choices.items():
        if oname not in options:
            raise ValueError(f"apply_plan: layer {name!r} chooses {oname!r}, which is not in the plan's options")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"apply_plan: the model has no layer {name!r}") from None
        new = build_option(layer, options[oname], (act_norms or {}).get(name), method)
        if new is not layer:
            set_module(model, name, new)
    return model


def state_dicts_equal(a: dict, b: dict) -> bool:
    """Two state dicts hold the same entries bit for bit: tensors by dtype, shape and values,
    quantized tensors by scale and integers, torch's packed dynamic-int8 weights unpacked
    (what apply_plan reproduces). Raises TypeError for an entry it has no rule for."""
    if a.keys() != b.keys():
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, tuple):
            if not state_dicts_equal(dict(enumerate(va)), dict(enumerate(vb))):
                return False
        elif isinstance(va, torch.Tensor):
            if va.is_quantized:
                if not (va.q_scale() == vb.q_scale() and torch.equal(va.int_repr(), vb.int_repr())):
                    return False
            elif va.dtype != vb.dtype or va.shape != vb.shape or not torch.equal(va, vb):
                return False
        elif isinstance(va, torch.dtype) or va is None or isinstance(va, (int, float, str)):
            if va != vb:
                return False
        elif hasattr(va, "__getstate__") and "PackedParams" in type(va).__name__:
            if not state_dicts_equal(dict(enumerate(torch.ops.quantized.linear_unpack(va))),
                               dict(enumerate(torch.ops.quantized.linear_unpack(vb)))):
                return False
        else:
            raise TypeError(f"state_dicts_equal: no rule for {k}: {type(va)}")
    return True


def apply_plan(model: nn.Module, plan: Plan, recover: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The plan applied to `model` (a fresh copy of the dense model it was found on), in
    place, without searching: the same options and activation norms give the same compressed
    weights bit for bit. `recover`: run it after, as optimize did (bit for bit only if it is
    deterministic). Returns the model."""
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan: plan must be a sparsekern Plan, got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan: model must be an nn.Module, got {type(model).__name__}")
    options = {k: Option.from_dict(v) for k, v in plan.options.items()}
    norms = {r["name"]: _unb64(r["act_norm"]) for r in plan.layers if r.get("act_norm")}
    if plan.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    elif plan.layout != "as given":
        raise ValueError(f"apply_plan: the plan's layout must be 'as given' or 'channels_last', got {plan.layout!r}")
    apply_choices(model, plan.choices, options, plan.method, norms)
    if recover is not None:
        model = recover(model)
    return model.eval()


# ----------------------------------------------------------------------- measurement
def _check_callable(f, name: str, required: bool = True) -> None:
    if (f is not None or required) and not callable(f):
        raise TypeError(f"optimize: {name} must be a callable, got {type(f).__name__}")


def candidate_layers(model: nn.Module, min_features: int = 128, layers: Iterable[str] | None = None) -> list[str]:
    """Names of the layers optimize may change: nn.Linear and nn.Conv2d with at least
    `min_features` inputs and outputs, reached by one path, their weight not shared with
    another module (a tie must hold); or exactly `layers`."""
    mods = dict(model.named_modules(remove_duplicate=False))
    if layers is not None:
        names = list(layers)
        for n in names:
            if n not in mods or type(mods[n]) not in SPARSE_CLASS:
                raise ValueError(f"optimize: layers names {n!r}, which is not an nn.Linear or nn.Conv2d of the model")
        return names
    paths: dict[int, int] = {}
    owners: dict[int, int] = {}
    for _, m in mods.items():
        paths[id(m)] = paths.get(id(m), 0) + 1
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out = []
    for n, m in model.named_modules():
        if type(m) not in SPARSE_CLASS or paths[id(m)] > 1 or owners.get(id(m.weight), 0) > 1:
            continue
        if min(m.weight.shape[0], m.weight[0].numel()) >= min_features:
            out.append(n)
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], example_inputs) -> dict[str, torch.Tensor]:
    """Each named layer's input (first call) on one forward of example_inputs."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def hook(m, args, n=n):
            got.setdefault(n, args[0].detach().clone())
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        run_batch(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in got]
    if missing:
        raise ValueError(f"optimize: example_inputs never reach layers {missing[:3]}... ({len(missing)}); "
                         "pass layers= to choose among the layers the forward runs")
    return got


def _geometry(layer: nn.Module, x: torch.Tensor) -> tuple:
    return (type(layer).__name__, tuple(layer.weight.shape), layer.bias is not None, tuple(x.shape),
            str(x.dtype), getattr(layer, "stride", None), getattr(layer, "padding", None))


@torch.inference_mode()
def measure_latency(model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor], menu: dict[str, Option],
                    method: str, act_norms: dict, rounds: int = 15, show_progress: bool = True,
                    deadline: float | None = None) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{layer: {option: median ms}} for every option that builds on the layer, and
    {layer: the layer timed for it}: the options of one geometry timed round-robin on the
    first such layer's captured input, with the dense layer among them. Geometries reached
    after `deadline` are timed dense only, with few rounds (their layers stay dense)."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(_geometry(model.get_submodule(n), inputs[n]), []).append(n)
    out, timed_on = {}, {}
    # Most layers first: when the deadline cuts the stage, the geometries left are the rare ones.
    bar = tqdm(sorted(groups.values(), key=len, reverse=True), "optimize: latency", disable=not show_progress,
               mininterval=0.5)
    for members in bar:
        first = members[0]
        layer, x = model.get_submodule(first), inputs[first]
        late = deadline is not None and time.perf_counter() > deadline
        calls = {}
        for oname, opt in ({DENSE: menu[DENSE]} if late else menu).items():
            try:
                mod = build_option(layer, opt, act_norms.get(first), method)
            except (ValueError, TypeError, RuntimeError):
                continue  # this option cannot hold this layer (shape, type, device)
            calls[oname] = (lambda mod=mod: mod(x))
        samples = interleaved(calls, 3 if late else rounds)
        ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        for n in members:
            out[n], timed_on[n] = dict(ms), first
        best = min(ms, key=ms.get)
        bar.set_postfix_str(f"{first}: best {best} {ms[DENSE] / ms[best]:.2f}x dense"
                            + (" (past the deadline: dense only)" if late else ""), refresh=False)
    return out, timed_on


@torch.no_grad()
def output_error(layer: nn.Module, replacement: nn.Module, x: torch.Tensor) -> float:
    """Relative squared error of the replacement's output on x against the layer's: the
    sensitivity proxy."""
    ref = layer(x).double()
    got = replacement(x).double()
    return float((got - ref).square().sum() / ref.square().sum().clamp_min(1e-30))


def _simulated(mod: nn.Module) -> nn.Module:
    """For scoring: a sparse module as the dense layer with its zeros and rounded values
    (to_dense), which computes the same outputs up to summation order without measuring
    paths on every evaluation; other modules as they are."""
    to_dense = getattr(mod, "to_dense", None)
    return to_dense().eval() if callable(to_dense) else mod


@torch.no_grad()
def measure_sensitivity(model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor],
                        menu: dict[str, Option], options_of: dict[str, list[str]], eval_fn, dense_score: float,
                        method: str, act_norms: dict, deadline: float | None, show_progress: bool = True,
                        seed: int = 0, measure_share: float = 0.7):
    """({layer: {option: score loss}}, {layer: {option: measured?}}, validation dict).

    The pairs are visited in a seeded shuffle (so a cut sample still covers every option).
    Each gets the proxy (output_error); until `measure_share` of the time to `deadline`
    also its measured loss, dense_score - eval_fn(model with only that layer changed).
    Unmeasured pairs use the proxy times the larger of the median measured loss/proxy ratio
    of their option and of all options; pairs not reached by `deadline` get no loss (not
    offered)."""
    pairs = [(n, o) for n in names for o in options_of[n] if o != DENSE]
    order = list(pairs)
    random.Random(seed).shuffle(order)
    start = time.perf_counter()
    measure_until = None if deadline is None else start + measure_share * max(0.0, deadline - start)
    proxy: dict[tuple, float] = {}
    measured: dict[tuple, float] = {}
    bar = tqdm(order, "optimize: sensitivity", disable=not show_progress, mininterval=0.5)
    for n, o in bar:
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            break
        layer = model.get_submodule(n)
        sim = _simulated(build_option(layer, menu[o], act_norms.get(n), method))
        proxy[(n, o)] = output_error(layer, sim, inputs[n])
        if measure_until is None or now < measure_until:
            set_module(model, n, sim)
            try:
                measured[(n, o)] = dense_score - float(eval_fn(model))
            finally:
                set_module(model, n, layer)
        bar.set_postfix_str(f"{len(measured)} measured, {len(proxy) - len(measured)} by proxy", refresh=False)
    bar.close()

    def ratios(keys):
        r = [measured[k] / proxy[k] for k in keys if proxy[k] > 0]
        return statistics.median(r) if r else None

    overall = ratios(list(measured))
    per_option = {o: ratios([k for k in measured if k[1] == o]) for o in menu}
    loss = {n: {DENSE: 0.0} for n in names}
    is_measured = {n: {DENSE: True} for n in names}
    for n, o in pairs:
        if (n, o) in measured:
            loss[n][o], is_measured[n][o] = measured[(n, o)], True
            continue
        # The larger of the option's ratio and the overall one: a ratio measured on a layer the
        # score ignores (0) must not make the option look free elsewhere; overestimating a
        # loss costs speed, never the floor.
        r = max((v for v in (per_option.get(o), overall) if v is not None), default=None)
        # Without a proxy, or without any measured ratio to put it in score units, the pair
        # has no loss and is not offered (never chosen blindly).
        if (n, o) in proxy and r is not None:
            loss[n][o], is_measured[n][o] = proxy[(n, o)] * r, False
    keys = list(measured)
    validation = {"measured_pairs": len(measured), "proxy_pairs": len(proxy) - len(measured),
                  "unreached_pairs": len(pairs) - len(proxy),
                  "proxy": "relative squared output error of the layer on its captured input",
                  "spearman_proxy_vs_measured": spearman([proxy[k] for k in keys], [measured[k] for k in keys]),
                  "loss_per_proxy": {o: r for o, r in per_option.items() if r is not None}}
    return loss, is_measured, validation


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], example_inputs, rounds: int = 10) -> dict:
    """{name: median ms} of each model's forward on example_inputs, round-robin."""
    calls = {name: (lambda m=m: run_batch(m, example_inputs)) for name, m in models.items()}
    samples = interleaved(calls, rounds)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def choose_layout(model: nn.Module, layout: str, example_inputs, rounds: int,
                  time_model: Callable | None = None) -> tuple[nn.Module, dict]:
    """(the model the search runs on, what was decided and why). A model with an nn.Conv2d is
    timed as given and channels-last (round-robin, or the injected time_model(given,
    channels-last) -> (ms, ms)); "auto" takes channels-last when it is faster beyond NOISE_MIN.
    The channels-last model is a copy (the given one is left as it was)."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if layout == "as given" or not has_conv:
        return model, {"chosen": "as given", "why": "fixed" if layout == "as given" else "no nn.Conv2d"}
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if time_model is not None:
        given_ms, cl_ms = time_model(model, cl)
    else:
        ms = time_models({"as given": model, "channels_last": cl}, example_inputs, rounds=max(5, rounds))
        given_ms, cl_ms = ms["as given"], ms["channels_last"]
    faster = layout == "channels_last" or cl_ms < given_ms * (1 - NOISE_MIN)
    return (cl if faster else model), {"chosen": "channels_last" if faster else "as given",
                                       "why": "fixed" if layout == "channels_last" else "timed",
                                       "as_given_ms": given_ms, "channels_last_ms": cl_ms}


# ---------------------------------------------------------------------------- optimize
def optimize(model: nn.Module, eval_fn: Callable[[nn.Module], float], example_inputs, floor: float = 0.99,
             menu: dict[str, Option] | Iterable[str] | None = None, calibration: Iterable | None = None,
             recover: Callable[[nn.Module], nn.Module] | None = None, budget_s: float = 900.0,
             absolute: bool = False, method: str = "wanda", layers: Iterable[str] | None = None,
             min_features: int = 128, rounds: int = 15, timings: dict | None = None,
             sensitivities: dict | None = None, time_model: Callable[[nn.Module, nn.Module], tuple] | None = None,
             layout: str = "auto", show_progress: bool = True) -> tuple[nn.Module, Plan]:
    """The fastest model whose eval_fn score stays at or above the floor (module docstring).

    eval_fn(model) -> float, higher is better (search it on training data only).
    example_inputs: one batch as the model takes it (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), at the batch the model will serve: layer
    latencies are measured on it. floor: a fraction of the dense score (relative), or the
    score itself with absolute=True. menu: {name: Option}, option names of default_menu(),
    or None for default_menu() ("dense" is always added). calibration: batches for wanda's
    activation norms (default: [example_inputs]); method "wanda" or "l1" (magnitude).
    recover(model) -> model: run on the planned model before verification. layout: the
    convolutions' memory layout the search runs on (LAYOUTS; "auto" times both). budget_s:
    bounds the search (sensitivities measured past their share fall back to the validated
    proxy; verification always completes, so the floor holds). layers / min_features:
    which layers may change (candidate_layers). Injected measurements (tests, or reuse of a
    previous search): timings {layer: {option: ms}}, sensitivities {layer: {option: score
    loss}}, time_model(dense, candidate) -> (dense ms, candidate ms).

    Returns (optimized model, Plan). `model` itself is left as it was (the result is a copy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    _check_callable(eval_fn, "eval_fn")
    _check_callable(recover, "recover", required=False)
    _check_callable(time_model, "time_model", required=False)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"optimize: budget_s must be a positive number of seconds, got {budget_s!r}")
    if method not in METHODS:
        raise ValueError(f"optimize: method must be one of {METHODS}, got {method!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 3:
        raise ValueError(f"optimize: rounds must be an int >= 3, got {rounds!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"optimize: layout must be one of {LAYOUTS}, got {layout!r}")
    if example_inputs is None:
        raise ValueError("optimize: example_inputs must be one batch the model takes (tensor, tuple or dict)")
    full_menu = default_menu()
    if menu is None:
        menu = full_menu
    elif isinstance(menu, dict):
        bad = [k for k, v in menu.items() if not isinstance(v, Option)]
        if bad:
            raise TypeError(f"optimize: menu values must be sparsekern.optimize.Option, not for {bad[:3]}")
        menu = {DENSE: Option(DENSE, "keep"), **menu}
    elif isinstance(menu, str) or not isinstance(menu, Iterable):
        raise TypeError(f"optimize: menu must be a dict of Options or a list of option names, got {menu!r}")
    else:
        names = list(menu)
        unknown = [n for n in names if n not in full_menu]
        if unknown:
            raise ValueError(f"optimize: menu names unknown options {unknown}; known: {sorted(full_menu)}")
        menu = {DENSE: full_menu[DENSE], **{n: full_menu[n] for n in names}}

    t0 = time.perf_counter()
    deadline_all = t0 + float(budget_s)
    model = model.eval()
    search = {"budget_s": float(budget_s), "stages_s": {}}

    def stage_done(name, since):
        search["stages_s"][name] = time.perf_counter() - since
        return time.perf_counter()

    with torch.no_grad():
        dense_score = float(eval_fn(model))
    target = target_score(dense_score, floor, absolute)
    given = model  # the dense model as the user gave it: the plan's speed-up is against it
    model, search["layout"] = choose_layout(model, layout, example_inputs, rounds, time_model)
    names = candidate_layers(model, min_features, layers)
    if not names:
        raise ValueError("optimize: the model has no layer to optimize (nn.Linear / nn.Conv2d with at least "
                         f"min_features={min_features} inputs and outputs)")
    t = time.perf_counter()
    inputs = capture_inputs(model, names, example_inputs)
    act_norms = {}
    if method == "wanda":
        norms = prune.collect_activation_norms(model, list(calibration) if calibration is not None
                                               else [example_inputs], show_progress=False)
        act_norms = {n: norms[n] for n in names if n in norms}
    t = stage_done("capture", t)

    if timings is None:
        timings, timed_on = measure_latency(model, names, inputs, menu, method, act_norms, rounds, show_progress,
                                            deadline=t0 + LATENCY_SHARE * budget_s)
    else:
        timed_on = {n: "injected" for n in names}
        missing = [n for n in names if n not in timings or DENSE not in timings[n]]
        if missing:
            raise ValueError(f"optimize: timings lacks layers (or their 'dense' time): {missing[:3]}")
    t = stage_done("latency", t)
    # An option no faster than the dense layer is never chosen: its sensitivity is not worth measuring.
    options_of = {n: [o for o in timings[n] if o in menu and (o == DENSE or timings[n][o] < timings[n][DENSE])]
                  for n in names}

    if sensitivities is None:
        sens_deadline = t + SENSITIVITY_SHARE * max(0.0, deadline_all - t)
        loss, is_measured, validation = measure_sensitivity(model, names, inputs, menu, options_of, eval_fn,
                                                            dense_score, method, act_norms, sens_deadline,
                                                            show_progress)
    else:
        missing = [n for n in names if n not in sensitivities]
        if missing:
            raise ValueError(f"optimize: sensitivities lacks layers: {missing[:3]}")
        loss = {n: {DENSE: 0.0, **{o: float(v) for o, v in sensitivities[n].items()}} for n in names}
        is_measured = {n: {o: True for o in loss[n]} for n in names}
        validation = {"injected": True}
    search["sensitivity"] = validation
    t = stage_done("sensitivity", t)

    items = {n: {o: (timings[n][DENSE] - timings[n][o], loss[n][o]) for o in options_of[n]
                 if o != DENSE and o in loss[n]} for n in names}
    budget = dense_score - target
    choice = knapsack(items, budget)
    predicted_saved = sum(items[n][o][0] for n, o in choice.items())
    predicted_loss = sum(max(items[n][o][1], 0.0) for n, o in choice.items())
    dense_ms_sum = sum(timings[n][DENSE] for n in names)
    t = stage_done("knapsack", t)

    def build(ch):
        m = apply_choices(copy.deepcopy(model), ch, menu, method, act_norms)
        if recover is not None:
            m = recover(m)
        return m.eval()

    state = {"model": None}
    bar = tqdm(total=None, desc="optimize: verification", disable=not show_progress, mininterval=0.5)

    def verify(ch):
        m = build(ch)
        with torch.no_grad():
            s = float(eval_fn(m))
        state["model"] = m
        bar.update(1)
        bar.set_postfix_str(f"{len(ch)} layers changed, score {s:.4f} (floor {target:.4f})", refresh=False)
        return s

    choice, score, history = backoff(choice, items, verify, target)
    bar.close()
    optimized = state["model"]
    if time_model is not None:
        dense_ms, plan_ms = time_model(given, optimized)
    else:
        ms = time_models({"dense": given, "plan": optimized}, example_inputs, rounds=max(5, rounds))
        dense_ms, plan_ms = ms["dense"], ms["plan"]
    stage_done("verification", t)
    # the layers' savings were measured on the searched model: its own time is the prediction's base
    search_ms = search["layout"]["channels_last_ms"] if search["layout"]["chosen"] == "channels_last" else dense_ms
    search["backoff"] = history
    search["seconds"] = time.perf_counter() - t0
    search["over_budget"] = search["seconds"] > budget_s
    final_saved = sum(items[n][o][0] for n, o in choice.items())
    layers_out = []
    for n in names:
        layers_out.append({"name": n, "option": choice.get(n, DENSE), "latency_ms": timings[n],
                           "timed_on": timed_on.get(n), "sensitivity": loss[n], "measured": is_measured[n],
                           "act_norm": _b64(act_norms[n]) if n in act_norms and n in choice else None})
    plan = Plan(layers=layers_out, options={k: v.to_dict() for k, v in menu.items()}, method=method,
                floor=float(floor), absolute=bool(absolute), target=target,
                dense={"score": dense_score, "latency_ms": dense_ms, "layers_ms": dense_ms_sum},
                predicted={"latency_ms": search_ms - final_saved, "score": dense_score - sum(
                    max(items[n][o][1], 0.0) for n, o in choice.items()),
                    "knapsack_latency_saved_ms": predicted_saved, "knapsack_score_loss": predicted_loss},
                measured={"score": score, "latency_ms": plan_ms, "speedup": dense_ms / plan_ms if plan_ms else None},
                search=search, layout=search["layout"]["chosen"])
    return optimized, plan


# ------------------------------------------------------------------------------ report
class CastInputs(nn.Module):
    """A peer model that takes what the dense model takes: floating input tensors cast to
    the peer's dtype (`cast`) on the way in, a floating tensor output back to float32 (so
    one eval_fn scores every variant; the casts are in its timing, as a user pays them)."""

    def __init__(self, model: nn.Module, cast: Callable):
        super().__init__()
        self.model, self.cast = model, cast

    def forward(self, *args, **kwargs):
        out = self.model(*[self.cast(a) for a in args], **{k: self.cast(v) for k, v in kwargs.items()})
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def uniform_choices(model: nn.Module, plan: Plan, option: str) -> dict[str, str]:
    """{layer: option} for every plan layer the option can hold (its measured latency)."""
    return {r["name"]: option for r in plan.layers if option in r["latency_ms"]}


def pareto_rows(model: nn.Module, plan: Plan, eval_fn, example_inputs, calibration=None, peers=(
        "dense bf16", "torch int8 dynamic"), rounds: int = 10, optimized: nn.Module | None = None,
        show_progress: bool = True, device: str = "cpu") -> list[dict]:
    """One row per variant, scored by eval_fn (e.g. on held-out data) and timed round-robin
    in one loop: the dense model, every uniform option of the plan's menu (that option on
    every candidate layer that holds it, wanda's norms from the plan's calibration), the
    peers (sparsekern.bench.peers) and the plan (`optimized`, or apply_plan on a copy). With
    a channels-last plan the uniform options are laid out channels-last too, and the dense
    channels-last peer is added: each row against the dense model at the plan's layout as well."""
    options = {k: Option.from_dict(v) for k, v in plan.options.items()}
    norms = None
    if plan.method == "wanda":
        all_norms = prune.collect_activation_norms(model, list(calibration) if calibration is not None
                                                   else [example_inputs], show_progress=False)
        norms = {r["name"]: all_norms[r["name"]] for r in plan.layers if r["name"] in all_norms}
    variants, kinds_of = {"dense": model}, {"dense": "dense"}
    laid_out = model if plan.layout == "as given" else copy.deepcopy(model).to(memory_format=torch.channels_last)
    for o in tqdm([o for o in options if o != DENSE], "report: uniform options", disable=not show_progress):
        variants[f"uniform {o}"] = apply_choices(copy.deepcopy(laid_out), uniform_choices(model, plan, o), options,
                                                 plan.method, norms).eval()
        kinds_of[f"uniform {o}"] = "uniform"
    skipped = []
    if plan.layout == "channels_last" and "dense channels-last" not in peers:
        peers = ("dense channels-last", *peers)
    for p in peers:
        try:
            m, _ = peers_mod.build(p, model, device)
        except peers_mod.NotApplicable:
            continue
        except peers_mod.Unavailable as e:
            skipped.append({"variant": p, "kind": "peer", "skipped": True, "error": str(e)})
            continue
        variants[p], kinds_of[p] = CastInputs(m, peers_mod.PEERS[p].cast).eval(), "peer"
    variants["plan"] = optimized if optimized is not None else apply_plan(copy.deepcopy(model), plan)
    kinds_of["plan"] = "plan"
    scores = {}
    for k, m in tqdm(list(variants.items()), "report: scores", disable=not show_progress):
        with torch.no_grad():
            scores[k] = float(eval_fn(m))
    ms = time_models(variants, example_inputs, rounds)
    rows = [{"variant": k, "kind": kinds_of[k], "score": scores[k], "latency_ms": ms[k],
             "speedup_vs_dense": ms["dense"] / ms[k]} for k in variants]
    return rows + skipped


def write_report(out_dir: str, plan: Plan, rows: list[dict], env: dict | None = None,
                 score_name: str = "score") -> list[str]:
    """plan.json, report.json ({environment, plan, rows}), report.md (rows and per-layer
    table) and pareto.png (latency against score) in out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("plan.json", "report.json", "report.md", "pareto.png")]
    plan.save(paths[0])
    with open(paths[1], "w") as f:
        json.dump({"environment": env or {}, "plan": plan.to_dict(), "rows": rows}, f, indent=1)
    timed = [r for r in rows if "latency_ms" in r]
    md = ["# optimize report", "", f"floor: {plan.floor} ({'absolute' if plan.absolute else 'relative'}), "
          f"target {score_name} {plan.target:.4f}; search {plan.search.get('seconds', 0):.0f} s", "",
          markdown_table(timed, [("variant", "variant", ""), ("kind", "kind", ""), (score_name, "score", ".4f"),
                                 ("latency ms", "latency_ms", ".2f"), ("speed-up vs dense", "speedup_vs_dense", ".2f")]),
          "", "## per layer", "", plan.table(), ""]
    with open(paths[2], "w") as f:
        f.write("\n".join(md))

    def draw(axes):
        ax = axes[0]
        for kind, marker in (("dense", "s"), ("uniform", "o"), ("peer", "^"), ("plan", "*")):
            rs = [r for r in timed if r["kind"] == kind]
            if rs:
                label_points(ax, [r["latency_ms"] for r in rs], [r["score"] for r in rs],
                             [r["variant"].replace("uniform ", "") for r in rs], marker=marker, label=kind,
                             s=80 if kind == "plan" else 25)
        ax.axhline(plan.target, color="0.5", lw=0.8, ls="--", label="floor")
        ax.set_xlabel("latency (ms, median)")
        ax.set_ylabel(score_name)
        ax.legend(fontsize=7)
        ax.set_title("optimize: latency against score")

    if not save_plot(paths[3], draw, figsize=(8, 5.5)):
        paths = paths[:3]
    return paths
