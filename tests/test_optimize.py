"""sparsekern.optimize: the knapsack against brute force, the back-off, the floor, the Plan's
JSON, apply_plan bit for bit, bad arguments, and one small real search end to end.
Everything but the last test runs on injected timings and scores."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import kinds, precisions
from sparsekern.optimize import (DENSE, MENU_SPELLINGS, Option, Plan, apply_choices, backoff, build_option,
                                 candidate_layers, default_menu, knapsack, pareto_rows, spearman, state_dicts_equal,
                                 target_score, write_report)


# ------------------------------------------------------------------------------ knapsack
def brute_force(items, budget):
    layers = list(items)
    best, best_choice = 0.0, {}
    for combo in itertools.product(*[[None] + list(items[n]) for n in layers]):
        saved = sum(items[n][o][0] for n, o in zip(layers, combo) if o is not None)
        loss = sum(max(items[n][o][1], 0) for n, o in zip(layers, combo) if o is not None)
        if loss <= budget + 1e-12 and saved > best + 1e-12:
            best, best_choice = saved, {n: o for n, o in zip(layers, combo) if o is not None}
    return best, best_choice


def saved_of(items, choice):
    return sum(items[n][o][0] for n, o in choice.items())


def test_knapsack_hand_case():
    # the greedy-by-ratio pick (a's cheap option, then b) is worse than a's big one alone
    items = {"a": {"x": (10.0, 6.0), "y": (3.0, 1.0)}, "b": {"x": (4.0, 5.0)}}
    assert knapsack(items, 6.0, bins=6) == {"a": "x"}
    assert knapsack(items, 11.0, bins=11) == {"a": "x", "b": "x"}
    assert knapsack(items, 0.5, bins=10) == {}
    assert knapsack(items, -1.0) == {}


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_matches_brute_force_on_grid_losses(seed):
    g = torch.Generator().manual_seed(seed)
    bins = 20
    budget = 2.0
    items = {}
    for i in range(4):
        n_opt = int(torch.randint(1, 4, (1,), generator=g))
        items[f"l{i}"] = {f"o{j}": (float(torch.rand(1, generator=g)) * 5 - 0.5,
                                    int(torch.randint(0, 12, (1,), generator=g)) * budget / bins)
                          for j in range(n_opt)}
    best, _ = brute_force(items, budget)
    got = knapsack(items, budget, bins=bins)
    assert saved_of(items, got) == pytest.approx(best)
    assert sum(items[n][o][1] for n, o in got.items()) <= budget + 1e-9


def test_knapsack_never_exceeds_the_budget_off_grid():
    g = torch.Generator().manual_seed(7)
    items = {f"l{i}": {f"o{j}": (float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g)))
                       for j in range(3)} for i in range(5)}
    for budget in (0.3, 0.9, 1.7):
        got = knapsack(items, budget, bins=50)
        assert sum(items[n][o][1] for n, o in got.items()) <= budget
        best, _ = brute_force(items, budget)
        assert saved_of(items, got) <= best + 1e-12
        assert saved_of(items, got) >= 0.8 * best  # coarse bins lose a little, not much


def test_knapsack_negative_loss_is_free_and_negative_saving_never_taken():
    items = {"a": {"gain": (1.0, -0.5)}, "b": {"slow": (-1.0, 0.0)}}
    assert knapsack(items, 0.0) == {"a": "gain"}


def test_knapsack_bad_bins():
    with pytest.raises(ValueError, match="bins"):
        knapsack({"a": {"x": (1.0, 0.1)}}, 1.0, bins=0)


# ------------------------------------------------------------------------------ back-off
def test_backoff_reverts_worst_ratio_until_floor():
    items = {"a": {"x": (10.0, 0.01)}, "b": {"x": (1.0, 0.02)}, "c": {"x": (5.0, 0.02)}}
    true_loss = {"a": 0.01, "b": 0.05, "c": 0.04}  # b and c interact worse than predicted

    def verify(ch):
        return 1.0 - sum(true_loss[n] for n in ch)

    choice, score, history = backoff({"a": "x", "b": "x", "c": "x"}, items, verify, target=0.95)
    assert history[0]["reverted"] == "b"  # 0.02 / 1 is the worst loss per ms saved
    assert choice == {"a": "x", "c": "x"}
    assert score == pytest.approx(0.95)
    assert len(history) == 2


def test_backoff_ends_dense_when_nothing_holds():
    items = {"a": {"x": (1.0, 0.0)}}
    choice, score, history = backoff({"a": "x"}, items, lambda ch: 0.5 if ch else 1.0, target=0.9)
    assert choice == {} and score == 1.0 and history[-1]["changed"] == 0


def test_backoff_keeps_a_choice_that_holds():
    calls = []
    choice, score, _ = backoff({"a": "x"}, {"a": {"x": (1.0, 0.1)}}, lambda ch: calls.append(1) or 0.99, 0.98)
    assert choice == {"a": "x"} and len(calls) == 1


# --------------------------------------------------------------------------------- floor
def test_floor_relative_and_absolute():
    assert target_score(2.0, 0.9) == pytest.approx(1.8)
    assert target_score(-3.0, -3.5, absolute=True) == -3.5
    assert target_score(0.5, 0.7, absolute=True) == 0.7
    with pytest.raises(ValueError, match="floor"):
        target_score(1.0, 1.5)
    with pytest.raises(ValueError, match="floor"):
        target_score(1.0, 0.0)
    with pytest.raises(ValueError, match="absolute=True"):
        target_score(-1.0, 0.9)
    with pytest.raises(ValueError, match="floor"):
        target_score(1.0, float("nan"))
    with pytest.raises(ValueError, match="floor"):
        target_score(1.0, True)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


# --------------------------------------------------------------------------------- menu
def test_every_prunable_kind_has_menu_spellings():
    for kind in kinds.KINDS.values():
        if kind.prunable and kind.format is not None:
            assert kind.name in MENU_SPELLINGS, f"kind {kind.name} has no MENU_SPELLINGS entry"
            for pattern, _ in MENU_SPELLINGS[kind.name]:
                assert kinds.parse(pattern).kind == kind.name


def test_default_menu_walks_the_registries():
    menu = default_menu()
    assert DENSE in menu and menu[DENSE].build == "keep"
    quantized = {o.quantize for o in menu.values()}
    for p in precisions.PRECISIONS.values():
        assert (None if p.storage is None else p.name) in quantized
    for o in menu.values():
        if o.build == "sparse" and o.quantize:
            prec = precisions.precision(o.quantize)
            assert not prec.grouped or kinds.KINDS[kinds.parse(o.pattern).kind].format.ROW_VALUES


# --------------------------------------------------------------------------- a tiny model
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 128)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


LAYERS = ["fc1", "fc2", "fc3"]


def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def cosine_eval(ref_model, x):
    with torch.no_grad():
        ref = ref_model(x)

    def eval_fn(m):
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(m(x), ref, dim=-1).mean())
    return eval_fn


def injected_timings(options):
    # dense 1 ms; each option saves a different amount on each layer
    return {n: {DENSE: 1.0, **{o: 1.0 - 0.1 * (i + 1) * (j + 1) / len(options) for j, o in enumerate(options)}}
            for i, n in enumerate(LAYERS)}


def fixed_time(dense, cand):
    return 3.0, 2.0


def plan_for(model, x, floor=0.9, options=("2:4", "unstructured 50% int8", "dense int8"), sens=None):
    timings = injected_timings(list(options))
    sens = sens or {n: {o: 0.01 * (j + 1) for j, o in enumerate(options)} for n in LAYERS}
    return sparsekern.optimize(model, cosine_eval(model, x), x, floor=floor, menu=list(options), timings=timings,
                               sensitivities=sens, time_model=fixed_time, show_progress=False)


def test_optimize_with_injected_measurements_follows_the_knapsack():
    model, x = mlp(), torch.randn(8, 128)
    # huge losses on fc2: the knapsack must leave it dense
    sens = {"fc1": {"2:4": 0.001, "unstructured 50% int8": 0.001, "dense int8": 0.0},
            "fc2": {"2:4": 5.0, "unstructured 50% int8": 5.0, "dense int8": 5.0},
            "fc3": {"2:4": 0.001, "unstructured 50% int8": 0.001, "dense int8": 0.0}}
    out, plan = plan_for(model, x, floor=0.5, sens=sens)
    assert "fc2" not in plan.choices and set(plan.choices) == {"fc1", "fc3"}
    # the largest saving of fc1 (j=2 of 3 options) is "dense int8"
    assert plan.choices["fc1"] == "dense int8"
    assert isinstance(out.fc2, nn.Linear) and not isinstance(out.fc1, nn.Linear)
    assert isinstance(model.fc1, nn.Linear)  # the input model is left as it was
    assert plan.measured["latency_ms"] == 2.0 and plan.dense["latency_ms"] == 3.0
    assert plan.measured["score"] >= plan.target


def test_optimize_floor_holds_by_backoff_when_sensitivities_lie():
    model, x = mlp(), torch.randn(8, 128)
    sens = {n: {"2:4": 0.0} for n in LAYERS}
    # predicted free: every layer goes 2:4, which cannot keep a cosine of 0.999 to dense
    _, plan = plan_for(model, x, floor=0.999, options=("2:4",), sens=sens)
    assert plan.measured["score"] >= plan.target
    hist = plan.search["backoff"]
    assert len(hist) >= 2 and "reverted" in hist[0]
    assert all(h["score"] < plan.target for h in hist[:-1])


def test_optimize_absolute_floor():
    model, x = mlp(), torch.randn(8, 128)
    _, plan = sparsekern.optimize(model, cosine_eval(model, x), x, floor=0.2, absolute=True, menu=["2:4"],
                                  timings=injected_timings(["2:4"]),
                                  sensitivities={n: {"2:4": 0.1} for n in LAYERS}, time_model=fixed_time,
                                  show_progress=False)
    assert plan.target == 0.2 and plan.absolute
    assert set(plan.choices) == set(LAYERS)  # 0.3 predicted loss within 1 - 0.2


def test_plan_json_round_trip_and_apply_plan_bit_for_bit(tmp_path):
    model, x = mlp(), torch.randn(8, 128)
    opts = ("2:4", "unstructured 50% int8", "dense int8")
    # one option per layer is cheap, the others cost the whole budget: a mixed plan
    sens = {n: {o: (0.001 if j == i else 5.0) for j, o in enumerate(opts)} for i, n in enumerate(LAYERS)}
    out, plan = plan_for(model, x, floor=0.5, sens=sens)
    assert plan.choices == dict(zip(LAYERS, opts))
    path = tmp_path / "plan.json"
    plan.save(str(path))
    again = Plan.load(str(path))
    assert again == plan
    assert json.loads(again.to_json()) == json.loads(plan.to_json())
    fresh = sparsekern.apply_plan(mlp(), again)
    assert state_dicts_equal(fresh.state_dict(), out.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out(x))
    # a different calibration would give other wanda masks: the plan's stored norms are what count
    assert any(r["act_norm"] for r in plan.layers if r["option"] != DENSE and
               plan.options[r["option"]]["build"] == "sparse")


def test_apply_plan_reproduces_quantized_dense_int8():
    model, x = mlp(), torch.randn(8, 128)
    out, plan = plan_for(model, x, floor=0.5, options=("dense int8",), sens={n: {"dense int8": 0.0} for n in LAYERS})
    assert set(plan.choices.values()) == {"dense int8"}
    fresh = sparsekern.apply_plan(mlp(), Plan.from_json(plan.to_json()))
    assert state_dicts_equal(fresh.state_dict(), out.state_dict())


def test_plan_from_bad_json():
    with pytest.raises(ValueError, match="version"):
        Plan.from_dict({"version": 99})
    with pytest.raises(ValueError, match="missing"):
        Plan.from_dict({"version": 1})


# -------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw, match", [
    ({"floor": 1.5}, "floor"),
    ({"floor": "high"}, "floor"),
    ({"budget_s": 0}, "budget_s"),
    ({"budget_s": -5}, "budget_s"),
    ({"method": "taylor"}, "method"),
    ({"menu": ["2:5"]}, "menu"),
    ({"rounds": 1}, "rounds"),
    ({"layers": ["nope"]}, "layers"),
    ({"example_inputs": None}, "example_inputs"),
])
def test_bad_arguments_raise_naming_them(kw, match):
    model, x = mlp(), torch.randn(4, 128)
    args = dict(eval_fn=cosine_eval(model, x), example_inputs=x, show_progress=False, time_model=fixed_time)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        sparsekern.optimize(model, **args)


@pytest.mark.parametrize("kw, match", [
    ({"eval_fn": 3}, "eval_fn"), ({"recover": "yes"}, "recover"), ({"menu": "2:4"}, "menu"),
    ({"menu": {"x": 1}}, "menu"),
])
def test_bad_argument_types_raise_naming_them(kw, match):
    model, x = mlp(), torch.randn(4, 128)
    args = dict(eval_fn=cosine_eval(model, x), example_inputs=x, show_progress=False)
    args.update(kw)
    with pytest.raises(TypeError, match=match):
        sparsekern.optimize(model, **args)


def test_bad_model_and_plan_types():
    with pytest.raises(TypeError, match="model"):
        sparsekern.optimize("model.pt", lambda m: 1.0, torch.randn(2, 128))
    with pytest.raises(TypeError, match="plan"):
        sparsekern.apply_plan(mlp(), {"layers": []})


def test_apply_choices_names_a_missing_layer_and_option():
    opts = default_menu()
    with pytest.raises(ValueError, match="no layer 'fc9'"):
        apply_choices(mlp(), {"fc9": "2:4"}, opts)
    with pytest.raises(ValueError, match="not in the plan's options"):
        apply_choices(mlp(), {"fc1": "3:4 magic"}, opts)
    with pytest.raises(ValueError, match="builder"):
        build_option(nn.Linear(128, 128), Option("x", "teleport"))


def test_injected_measurements_must_cover_every_layer():
    model, x = mlp(), torch.randn(4, 128)
    with pytest.raises(ValueError, match="timings"):
        sparsekern.optimize(model, cosine_eval(model, x), x, menu=["2:4"], timings={"fc1": {DENSE: 1.0}},
                            show_progress=False)


def test_candidate_layers_skip_small_and_tied():
    model = mlp()
    assert candidate_layers(model) == LAYERS
    assert candidate_layers(model, min_features=200) == ["fc2"]
    model.fc3.weight = nn.Parameter(model.fc1.weight.detach().t().contiguous())
    model.extra = nn.Linear(128, 256)
    model.extra.weight = model.fc1.weight  # a tie: fc1 and extra must stay as they are
    assert "fc1" not in candidate_layers(model) and "extra" not in candidate_layers(model)


# ------------------------------------------------------------------------ real, end to end
class WideMLP(nn.Module):
    """Layers above dispatch_rules.DENSE_COPY_MAX_BYTES: a sparse module of a smaller layer may
    keep a dense copy and tie with dense, leaving the search no option worth measuring."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(512, 1024)
        self.fc2 = nn.Linear(1024, 512)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def wide_mlp():
    torch.manual_seed(0)
    return WideMLP().eval()


def test_end_to_end_small_real_search(tmp_path):
    """Real timings, real sensitivities, real verification on a small MLP (a few seconds)."""
    model, x = wide_mlp(), torch.randn(64, 512)
    held_out = torch.randn(64, 512)
    out, plan = sparsekern.optimize(model, cosine_eval(model, x), x, floor=0.97,
                                    menu=["2:4", "unstructured 50%", "dense int8"], budget_s=60, rounds=3,
                                    show_progress=False)
    assert plan.measured["score"] >= plan.target
    assert plan.search["sensitivity"]["measured_pairs"] > 0
    for r in plan.layers:
        assert r["latency_ms"][DENSE] > 0 and all(v > 0 for v in r["latency_ms"].values())
        assert set(r["sensitivity"]) >= {DENSE}
    fresh = sparsekern.apply_plan(wide_mlp(), Plan.from_json(plan.to_json()))
    assert state_dicts_equal(fresh.state_dict(), out.state_dict())
    rows = pareto_rows(model, plan, cosine_eval(model, held_out), x, rounds=3, optimized=out, show_progress=False)
    kinds_seen = {r["kind"] for r in rows}
    assert {"dense", "uniform", "plan"} <= kinds_seen
    paths = write_report(str(tmp_path / "rep"), plan, rows)
    assert all((tmp_path / "rep" / p.split("/")[-1]).exists() for p in paths)
    assert "| fc1 |" in open(paths[2]).read()


def test_cli_optimize(tmp_path, monkeypatch):
    from sparsekern.__main__ import main

    model = mlp()
    torch.save(model, tmp_path / "mlp.pt")
    x = torch.randn(16, 128)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "mlp_eval.py").write_text(
        "import torch\n"
        f"X = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"REF = torch.load({str(tmp_path / 'mlp.pt')!r}, weights_only=False)(X).detach()\n"
        "def score(m):\n"
        "    with torch.no_grad():\n"
        "        return float(torch.nn.functional.cosine_similarity(m(X), REF, dim=-1).mean())\n"
        "def inputs():\n"
        "    return X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    rc = main(["optimize", str(tmp_path / "mlp.pt"), "--eval", "mlp_eval:score", "--inputs", "mlp_eval:inputs",
               "--floor", "0.98", "--menu", "2:4,dense int8", "--budget-s", "30", "--layout", "as given",
               "--out", str(out)])
    assert rc == 0
    plan = Plan.load(str(out / "plan.json"))
    assert plan.layout == "as given" and plan.search["layout"] == {"chosen": "as given", "why": "fixed"}
    assert plan.measured["score"] >= 0.98 * plan.dense["score"]
    saved = torch.load(out / "model.pt", weights_only=False)
    assert state_dicts_equal(saved.state_dict(), sparsekern.apply_plan(mlp(), plan).state_dict())
    with pytest.raises(SystemExit, match="--eval"):
        main(["optimize", str(tmp_path / "mlp.pt"), "--eval", "no_colon", "--inputs", "mlp_eval:inputs"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["optimize", str(tmp_path / "nope.pt"), "--eval", "mlp_eval:score", "--inputs", "mlp_eval:inputs"])


def test_an_option_slower_than_dense_is_not_measured_nor_chosen():
    model, x = mlp(), torch.randn(8, 128)
    timings = {n: {DENSE: 1.0, "2:4": 0.5, "dense int8": 2.0} for n in LAYERS}
    _, plan = sparsekern.optimize(model, cosine_eval(model, x), x, floor=0.5, menu=["2:4", "dense int8"],
                                  timings=timings, time_model=fixed_time, show_progress=False)
    for r in plan.layers:
        assert "dense int8" not in r["sensitivity"] and "2:4" in r["sensitivity"]
        assert r["measured"]["2:4"]  # a tiny model: every pair measured within the budget
    assert set(plan.choices.values()) == {"2:4"}


def test_sensitivity_deadlines_leave_unreached_and_unscaled_pairs_unoffered():
    import time as _time

    from sparsekern.optimize import measure_sensitivity

    model, x = mlp(), torch.randn(8, 128)
    menu = default_menu()
    inputs = {n: t for n, t in zip(LAYERS, [x, torch.relu(model.fc1(x)), torch.relu(model.fc2(torch.relu(model.fc1(x))))])}
    options_of = {n: [DENSE, "2:4", "dense int8"] for n in LAYERS}
    eval_fn = cosine_eval(model, x)
    # past the deadline: no pair reached
    loss, measured, v = measure_sensitivity(model, LAYERS, inputs, menu, options_of, eval_fn, 1.0, "l1", {},
                                            deadline=_time.perf_counter() - 1, show_progress=False)
    assert v["unreached_pairs"] == 6 and all(set(loss[n]) == {DENSE} for n in LAYERS)
    # proxies but no measurement: no ratio puts them in score units, so none is offered
    loss, measured, v = measure_sensitivity(model, LAYERS, inputs, menu, options_of, eval_fn, 1.0, "l1", {},
                                            deadline=_time.perf_counter() + 600, measure_share=0.0,
                                            show_progress=False)
    assert v["proxy_pairs"] == 6 and v["measured_pairs"] == 0 and all(set(loss[n]) == {DENSE} for n in LAYERS)
    # everything measured: the losses are eval_fn's
    loss, measured, v = measure_sensitivity(model, LAYERS, inputs, menu, options_of, eval_fn, 1.0, "l1", {},
                                            deadline=None, show_progress=False)
    assert v["measured_pairs"] == 6 and all(measured[n]["2:4"] for n in LAYERS)
    assert all(0 < loss[n]["2:4"] < 1 for n in LAYERS)
    assert v["spearman_proxy_vs_measured"] is not None


# ------------------------------------------------------------------------------- layout
def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 6 * 6, 10)).eval()


def test_layout_auto_takes_channels_last_only_when_it_is_timed_faster():
    from sparsekern.optimize import choose_layout

    cnn, x = small_cnn(), torch.randn(4, 3, 6, 6)
    m, why = choose_layout(cnn, "auto", x, 5, time_model=lambda given, cl: (2.0, 1.5))
    assert why == {"chosen": "channels_last", "why": "timed", "as_given_ms": 2.0, "channels_last_ms": 1.5}
    assert m is not cnn and m[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert not cnn[2].weight.is_contiguous(memory_format=torch.channels_last)  # the given model is left alone
    m, why = choose_layout(cnn, "auto", x, 5, time_model=lambda given, cl: (2.0, 1.99))  # within the noise
    assert m is cnn and why["chosen"] == "as given"
    m, why = choose_layout(mlp(), "auto", torch.randn(2, 128), 5, time_model=lambda *a: pytest.fail("timed"))
    assert why == {"chosen": "as given", "why": "no nn.Conv2d"}
    with pytest.raises(ValueError, match="layout must be one of"):
        sparsekern.optimize(cnn, lambda m: 1.0, x, layout="nhwc", show_progress=False)


def test_a_channels_last_plan_applies_bit_for_bit_and_old_plans_load_as_given():
    cnn, x = small_cnn(), torch.randn(4, 3, 6, 6)
    names = ["2", "5"]
    timings = {n: {DENSE: 1.0, "2:4": 0.5} for n in names}

    def score(m):
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(m(x).flatten(), cnn(x).flatten(), dim=0))
    out, plan = sparsekern.optimize(cnn, score, x, floor=0.5, menu=["2:4"], layers=names, timings=timings,
                                    sensitivities={n: {"2:4": 0.01} for n in names}, method="l1",
                                    time_model=lambda given, other: (2.0, 1.0), show_progress=False)
    assert plan.layout == "channels_last" and plan.search["layout"]["chosen"] == "channels_last"
    # the prediction starts from the searched (channels-last) model's time, 1.0, not the given one's 2.0
    assert plan.predicted["latency_ms"] == pytest.approx(1.0 - 2 * 0.5) and plan.dense["latency_ms"] == 2.0
    assert plan.choices == {"2": "2:4", "5": "2:4"}
    again = sparsekern.apply_plan(small_cnn(), Plan.from_json(plan.to_json()))
    assert again[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert state_dicts_equal(again.state_dict(), out.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), out(x))
    # the report sets the plan beside the dense model at the plan's layout too
    rows = {r["variant"]: r for r in pareto_rows(cnn, plan, score, x, peers=(), rounds=3, optimized=out,
                                                 show_progress=False)}
    assert rows["dense channels-last"]["kind"] == "peer" and {"dense", "uniform 2:4", "plan"} <= set(rows)
    d = json.loads(plan.to_json())
    del d["layout"]  # a plan saved before layouts: applied to the model as given
    assert Plan.from_dict(d).layout == "as given"
    with pytest.raises(ValueError, match="layout must be"):
        sparsekern.apply_plan(small_cnn(), Plan.from_dict({**d, "layout": "auto"}))
