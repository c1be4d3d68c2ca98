"""sparsekern.recover: distillation with masks kept, gradual pruning, checkpoints, quantized
(straight-through) training, and the conversion back to compressed modules."""
import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import kinds, ops
from sparsekern.recover import (GradualPruning, cubic_fraction, gradual_mask, lr_factor, masked_layers,
                                normalized_mse, pruning_steps, recover, sparsify_gradual)

from conftest import needs_extension

pytestmark = needs_extension


def teacher_mlp(k=64, hidden=128, out=32):
    return nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, out))


def batches(n=6, rows=24, k=64):
    return [torch.randn(rows, k) for _ in range(n)]


def student_of(teacher, pattern="2:4", sparsity=None, quantize=None, group_size=128):
    m, _ = sparsekern.sparsify(copy.deepcopy(teacher), pattern, sparsity=sparsity, trainable=True, min_features=32,
                               quantize=quantize, group_size=group_size, show_progress=False)
    return m


@torch.no_grad()
def distill_loss(student, teacher, data):
    student.eval()
    return sum(float(normalized_mse(student(x), teacher(x))) for x in data) / len(data)


def masks_of(model):
    return {n: m.mask().clone() for n, m in masked_layers(model)}


def assert_masks_kept(model, masks, where=""):
    for name, mod in masked_layers(model):
        assert torch.equal(mod.mask(), masks[name]), f"{where}: mask of {name} changed"
        pruned = mod.weight.detach()[~masks[name]]
        assert pruned.numel() and bool((pruned == 0).all()), f"{where}: a pruned weight of {name} is non-zero"


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("unstructured", 0.7), ("block16", 0.5)])
def test_recover_reduces_distillation_loss_and_keeps_masks_every_step(pattern, sparsity):
    teacher = teacher_mlp()
    student = student_of(teacher, pattern, sparsity)
    masks = masks_of(student)
    assert len(masks) == 3
    train, held = batches(), batches(3)
    before = distill_loss(student, teacher, held)
    checked = []

    def every_step(model):  # the masks and the pruned zeros, after each optimizer step
        assert_masks_kept(model, masks, f"step {len(checked)}")
        checked.append(1)
        return 0.0

    x = train[0]
    backend, _ = ops.explain_backend("masked_linear", x, student[0].weight, student[0].weight_mask_bits)
    assert backend != "reference", "the masked training op fell back to the reference"
    report = recover(student, teacher, train, steps=30, lr=3e-3, eval_fn=every_step, eval_every=1,
                     show_progress=False)
    after = distill_loss(student, teacher, held)
    assert len(checked) == 30 and report.steps == 30
    assert after < 0.6 * before, f"distillation loss {before:.4f} -> {after:.4f}: recover did not reduce it"
    assert report.history[-1]["loss"] < report.history[0]["loss"]
    assert report.seconds_per_step is not None and report.seconds_per_step > 0


def test_kl_and_task_loss_with_labels():
    teacher = teacher_mlp(out=10)
    with torch.no_grad():
        teacher[4].weight.mul_(8.0)  # peaked class probabilities, so KL has something to measure
    student = student_of(teacher)
    inputs = [torch.randn(32, 64) for _ in range(4)]
    with torch.no_grad():
        data = [(x, teacher(x).argmax(-1)) for x in inputs]  # labels the teacher agrees with
    with torch.no_grad():
        before = sum(float(nn.functional.kl_div(nn.functional.log_softmax(student.eval()(x), -1),
                                                nn.functional.log_softmax(teacher(x), -1), log_target=True,
                                                reduction="batchmean")) for x, _ in data)
    report = recover(student, teacher, data, steps=25, lr=3e-3, loss="kl", temperature=1.0, task_weight=0.1,
                     show_progress=False)
    assert {"loss_output", "loss_task"} <= set(report.history[0])
    with torch.no_grad():
        after = sum(float(nn.functional.kl_div(nn.functional.log_softmax(student(x), -1),
                                               nn.functional.log_softmax(teacher(x), -1), log_target=True,
                                               reduction="batchmean")) for x, _ in data)
    assert after < 0.7 * before


def test_hidden_terms_are_normalised_per_layer():
    teacher = teacher_mlp()
    student = student_of(teacher)
    report = recover(student, teacher, batches(), steps=3, lr=1e-3, hidden=["0", "2"], output_weight=0.0,
                     show_progress=False)
    assert "loss_hidden" in report.history[0] and "loss_output" not in report.history[0]
    # each term is sum (s - t)^2 / sum t^2: scaling a layer's outputs leaves it unchanged
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert float(normalized_mse(s * 100, t * 100)) == pytest.approx(float(normalized_mse(s, t)), rel=1e-5)
    assert float(normalized_mse(t, t)) == 0.0


def test_cubic_schedule_by_hand():
    # Zhu and Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t1 - t0))^3, as a fraction of s_f
    assert cubic_fraction(0, 0, 10) == 0.0
    assert cubic_fraction(2, 0, 10) == pytest.approx(1 - 0.8 ** 3)  # 0.488
    assert cubic_fraction(5, 0, 10) == pytest.approx(0.875)
    assert cubic_fraction(10, 0, 10) == 1.0 and cubic_fraction(12, 0, 10) == 1.0
    assert cubic_fraction(5, 0, 10, initial=0.5) == pytest.approx(1 - 0.5 * 0.125)
    assert cubic_fraction(3, 4, 10, initial=0.2) == 0.2  # before the first pruning step
    assert cubic_fraction(7, 4, 10) == pytest.approx(0.875)
    assert pruning_steps(0, 10, 4) == [0, 4, 8, 10]
    assert pruning_steps(2, 8, 3) == [2, 5, 8]
    assert pruning_steps(5, 5, 3) == [5]


def test_lr_schedule_by_hand():
    assert lr_factor(0, 10, 2) == 0.5 and lr_factor(1, 10, 2) == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(9, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(9, 10, 2, "cosine", min_lr=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(5 / 9 * torch.pi)).item()))
    assert lr_factor(3, 7, 1, "linear") == pytest.approx(1 - 2 / 5)
    assert lr_factor(6, 7, 1, "constant") == 1.0


def test_gradual_mask_nm_by_hand():
    # one row, two groups of 4: 2:4 prunes {1, 2} and {5, 6} at the end
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
    half = gradual_mask(scores, "2:4", 0.5)
    assert half.tolist() == [[False, False, True, True, True, True, True, True]]
    quarter = gradual_mask(scores, "2:4", 0.25)
    assert quarter.tolist() == [[False, True, True, True, True, True, True, True]]
    assert gradual_mask(scores, "2:4", 0.0).all()
    assert torch.equal(gradual_mask(scores, "2:4", 1.0), kinds.make_mask(scores, "2:4"))
    # a weight the pattern keeps is never a candidate, however low its score among all
    scores = torch.tensor([[0.1, 0.2, 0.3, 9.0, 0.4, 9.0, 9.0, 9.0]])
    m = gradual_mask(scores, "2:4", 0.5)
    assert m.tolist() == [[False, False, True, True, True, True, True, True]]
    assert bool(m[0, 4])  # 0.4 is kept: its group keeps it at 2:4


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("4:8", None), ("unstructured", 0.6)])
def test_gradual_masks_subset_of_pattern_then_exact(pattern, sparsity):
    scores = torch.rand(16, 64)
    final = kinds.make_mask(scores, pattern, sparsity)
    last = torch.ones_like(final)
    for f in (0.1, 0.3, 0.6, 0.9, 1.0):
        m = gradual_mask(scores, pattern, f, sparsity)
        assert bool((final <= m).all()), "an intermediate mask pruned a weight the pattern keeps"
        assert bool((m <= last).all())
        assert int((~m).sum()) == round(f * int((~final).sum()))
        last = m
    assert torch.equal(last, final)


def test_gradual_recover_reaches_the_pattern_on_the_cubic_schedule():
    teacher = teacher_mlp()
    student, report = sparsify_gradual(copy.deepcopy(teacher), "2:4", min_features=32, show_progress=False)
    assert all(r["density"] == 1.0 for r in report if r["status"] == "sparse")
    densities = []

    def density(model):
        model(torch.randn(2, 64))  # eval mode mid-ramp: a mask that does not fit 2:4 yet runs masked dense
        densities.append(float(sum((~m.mask()).sum() for _, m in masked_layers(model)) /
                               sum(m.mask().numel() for _, m in masked_layers(model))))
        return 0.0

    schedule = GradualPruning(start=2, end=10, every=4)
    recover(student, teacher, batches(), steps=14, lr=1e-3, gradual=schedule, eval_fn=density, eval_every=1,
            show_progress=False)
    # steps 0-1 dense; pruned at 2, 6 and 10 (end), fixed after
    want = [0, 0] + [0.5 * cubic_fraction(2, 2, 10)] * 4 + [0.5 * cubic_fraction(6, 2, 10)] * 4 + [0.5] * 4
    assert densities == pytest.approx(want, abs=2e-3)
    for name, mod in masked_layers(student):
        kinds.KINDS["nm"].check_mask(mod.mask(), {"n": 2, "m": 4}, "2:4")
    x = torch.randn(5, 64)
    y = student.eval()(x)
    sparsekern.freeze(student)
    assert not masked_layers(student)
    torch.testing.assert_close(student(x), y, rtol=1e-5, atol=1e-6)


def test_gradual_quantized_trains_float_until_the_pattern_then_on_the_grid():
    teacher = teacher_mlp()
    student, _ = sparsify_gradual(copy.deepcopy(teacher), "2:4", min_features=32, quantize="int8",
                                  show_progress=False)
    layer = student[0]
    assert not layer.mask_fits_pattern() and layer.training_weight() is layer.weight
    recover(student, teacher, batches(), steps=8, lr=1e-3, gradual=GradualPruning(start=0, end=4, every=2),
            eval_fn=lambda m: float(m(torch.randn(2, 64)).sum()), eval_every=1, show_progress=False)
    assert layer.mask_fits_pattern() and layer.training_weight() is not layer.weight
    x = torch.randn(4, 64)
    y = student(x)
    sparsekern.freeze(student)
    assert student[0].weight_format().quantized
    torch.testing.assert_close(student(x), y, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_gives_the_same_result(tmp_path):
    teacher = teacher_mlp()
    start = student_of(teacher)
    data = batches(5)
    kw = dict(steps=8, lr=2e-3, eval_every=1, show_progress=False, gradual=None)
    straight = copy.deepcopy(start)
    ref = recover(straight, teacher, data, eval_fn=lambda m: -distill_loss(m, teacher, data[:1]), **kw)

    class Crash(Exception):
        pass

    calls = []

    def crash_at_5(m):
        calls.append(1)
        if len(calls) == 5:
            raise Crash
        return -distill_loss(m, teacher, data[:1])

    path = tmp_path / "ckpt.pt"
    interrupted = copy.deepcopy(start)
    with pytest.raises(Crash):
        recover(interrupted, teacher, data, eval_fn=crash_at_5, checkpoint=path, checkpoint_every=1, **kw)
    resumed = copy.deepcopy(start)  # a fresh process: the model as it was built, then the checkpoint
    rep = recover(resumed, teacher, data, eval_fn=lambda m: -distill_loss(m, teacher, data[:1]), checkpoint=path,
                  checkpoint_every=1, **kw)
    assert rep.resumed_from == 4
    assert [h["loss"] for h in rep.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-6)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match="checkpoint"):  # other arguments refuse the file
        recover(copy.deepcopy(start), teacher, data, steps=9, lr=2e-3, checkpoint=path, checkpoint_every=1,
                show_progress=False)


def test_early_stopping_and_restore_best():
    teacher = teacher_mlp()
    student = student_of(teacher)
    values = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    snapshots = []

    def metric(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(values)

    report = recover(student, teacher, batches(), steps=20, lr=1e-3, eval_fn=metric, eval_every=1, patience=3,
                     show_progress=False)
    assert report.stopped_early and report.steps == 5
    assert report.best_metric == 0.9 and report.best_step == 1 and report.restored_best
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_gradient_accumulation_reads_accumulate_batches_per_step():
    teacher = teacher_mlp()
    student = student_of(teacher)
    seen = []

    class Counting:
        def __iter__(self):
            for i in range(3):
                seen.append(i)
                yield torch.randn(8, 64)

    report = recover(student, teacher, Counting(), steps=4, accumulate=2, show_progress=False)
    assert report.steps == 4 and len(seen) == 8  # cycled through the 3 batches: 3 + 3 + 2


@pytest.mark.parametrize("quantize,group_size", [("int8", 128), ("int4", 32)])
def test_quantized_layers_train_straight_through_on_the_grid(quantize, group_size):
    teacher = teacher_mlp()
    student = student_of(teacher, quantize=quantize, group_size=group_size)
    x = torch.randn(6, 64)
    layer = student[0]
    layer.train()
    w = layer.training_weight()
    # forward: the values the compressed copy holds (not the float weight)
    on_grid = kinds.compress(layer.weight.detach(), "2:4", layer.mask(), quantize=quantize,
                             group_size=group_size if quantize == "int4" else 0).to_dense()
    torch.testing.assert_close(w.detach(), on_grid, rtol=0, atol=0)
    assert not torch.equal(w.detach(), layer.weight.detach()), "no rounding happened: the test cannot fail"
    # backward: straight through (the float weight gets the gradient of the quantized product, masked)
    y = student(x).square().sum()
    y.backward()
    g = layer.weight.grad
    assert g is not None and bool((g[~layer.mask()] == 0).all()) and float(g[layer.mask()].abs().sum()) > 0
    student.zero_grad()
    masks = masks_of(student)
    held = batches(2)
    before = distill_loss(student, teacher, held)
    recover(student, teacher, batches(), steps=30, lr=3e-3, show_progress=False)
    assert distill_loss(student, teacher, held) < 0.7 * before
    assert_masks_kept(student, masks, quantize)
    student.train()
    trained = student(x)  # the training forward: fake-quantized weights
    student.eval()
    inference = student(x)
    sparsekern.freeze(student)
    frozen = student(x)
    assert student[0].weight_format().quantized
    torch.testing.assert_close(frozen, inference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frozen, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("unstructured", 0.5)])
def test_freeze_gives_the_trained_models_output(pattern, sparsity):
    teacher = teacher_mlp()
    student = student_of(teacher, pattern, sparsity)
    recover(student, teacher, batches(), steps=10, lr=3e-3, show_progress=False)
    x = torch.randn(3, 7, 64)
    student.train()
    trained = student(x)  # the masked training op
    student.eval()
    masked = student(x)
    weights = {n: m.weight.detach() * m.mask() for n, m in masked_layers(student)}
    out = sparsekern.freeze(student)
    assert out is student and not masked_layers(student)
    for name, mod in student.named_modules():
        if name in weights:
            assert torch.equal(mod.dense_weight_2d(), weights[name])
    torch.testing.assert_close(student(x), masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student(x), trained, rtol=1e-5, atol=1e-6)


def test_a_sparsekern_prune_model_is_recovered_with_its_masks():
    teacher = teacher_mlp()
    student = copy.deepcopy(teacher)
    for name in ("0", "2"):
        sparsekern.prune.nm_prune(student, 2, 4, name=name)
    masks = {n: student.get_submodule(n).weight_mask.bool().clone() for n in ("0", "2")}
    before = distill_loss(student, teacher, batches(2))
    recover(student, teacher, batches(), steps=20, lr=3e-3, show_progress=False)
    assert {n for n, _ in masked_layers(student)} == {"0", "2"}
    assert_masks_kept(student, masks, "prune")
    assert distill_loss(student, teacher, batches(2)) < before


def _gradual_unstructured():
    return GradualPruning(sparsity=None, start=0, end=2, every=1)


@pytest.mark.parametrize("kwargs,name", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"lr": 0.0}, "lr"), ({"loss": "l1"}, "loss"),
    ({"temperature": 0}, "temperature"), ({"accumulate": 0}, "accumulate"), ({"warmup": -1}, "warmup"),
    ({"decay": "step"}, "decay"), ({"hidden_weight": -1.0}, "hidden_weight"), ({"clip_grad": 0}, "clip_grad"),
    ({"eval_every": 2}, "eval_every"), ({"patience": 2, "eval_fn": float}, "patience"),
    ({"checkpoint_every": 1}, "checkpoint_every"), ({"hidden": "nope.*"}, "hidden"),
    ({"gradual": GradualPruning(end=10)}, "gradual.end"), ({"gradual": GradualPruning(every=0)}, "gradual.every"),
    ({"gradual": GradualPruning(method="wanda")}, "gradual.method"),
    ({"gradual": GradualPruning(initial=1.5)}, "gradual.initial"),
    ({"autocast": torch.float32}, "autocast"), ({"autocast": "bf16"}, "autocast"),
    ({"cache_teacher": "yes"}, "cache_teacher"), ({"teacher_cache_mb": -1}, "teacher_cache_mb"),
])
def test_bad_arguments_raise_naming_them(kwargs, name):
    teacher = teacher_mlp()
    student = student_of(teacher)
    args = {"steps": 5, **kwargs}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        recover(student, teacher, batches(2), show_progress=False, **args)


def test_bad_models_and_data_raise_naming_them():
    teacher = teacher_mlp()
    student = student_of(teacher)
    with pytest.raises(ValueError, match="teacher"):
        recover(student, student, batches(2), steps=2)
    with pytest.raises(ValueError, match="model has no trainable sparse layers"):
        recover(copy.deepcopy(teacher), teacher, batches(2), steps=2)
    with pytest.raises(ValueError, match="data"):
        recover(student, teacher, [], steps=2)
    with pytest.raises(ValueError, match="data"):
        recover(student, teacher, torch.randn(4, 64), steps=2)
    unstructured = student_of(teacher, "unstructured", 0.5)
    with pytest.raises(ValueError, match=r"gradual\.sparsity"):
        recover(unstructured, teacher, batches(2), steps=4, gradual=GradualPruning(end=2))
    frozen = sparsekern.freeze(student_of(teacher))
    with pytest.raises(ValueError, match="not trainable"):
        frozen[0].set_mask(torch.ones(128, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        student[0].set_mask(torch.ones(3, 3, dtype=torch.bool))


def test_freeze_refuses_a_mask_that_does_not_fit_the_pattern():
    teacher = teacher_mlp()
    student, _ = sparsify_gradual(copy.deepcopy(teacher), "2:4", min_features=32, show_progress=False)
    with pytest.raises(ValueError, match="2:4"):
        sparsekern.freeze(student)  # still dense: gradual pruning never ran


class CountingTeacher(nn.Module):
    """The teacher MLP, counting its forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("hidden", [None, ["inner.2"]])
def test_teacher_cache_skips_the_teacher_and_changes_nothing(hidden):
    torch.manual_seed(0)
    teacher = CountingTeacher(teacher_mlp())
    start = copy.deepcopy(teacher)
    start.inner = student_of(teacher.inner)
    data = batches(4)
    runs = {}
    for cache in (False, True):
        student = copy.deepcopy(start)
        teacher.calls = 0
        rep = recover(student, teacher, data, steps=10, lr=2e-3, hidden=hidden, cache_teacher=cache,
                      show_progress=False)
        runs[cache] = (teacher.calls, [h["loss"] for h in rep.history], student.state_dict(), rep.teacher_cache_mb)
    assert runs[False][0] == 10 and runs[False][3] == 0.0
    assert runs[True][0] == 4, "a cached batch ran the teacher again"
    assert runs[True][3] > 0
    assert runs[True][1] == runs[False][1], "the cached teacher outputs changed the losses"
    for k, v in runs[False][2].items():
        assert torch.equal(v, runs[True][2][k]), k
    # None (the default) caches a list that the steps pass over more than once, not one they do not
    for steps, calls in ((10, 4), (3, 3)):
        teacher.calls = 0
        recover(copy.deepcopy(start), teacher, data, steps=steps, lr=2e-3, show_progress=False)
        assert teacher.calls == calls, steps
    # a cap below one batch's outputs keeps nothing; an iterable (not a list) is never cached
    teacher.calls = 0
    rep = recover(copy.deepcopy(start), teacher, data, steps=8, lr=2e-3, teacher_cache_mb=1e-4, show_progress=False)
    assert teacher.calls == 8 and rep.teacher_cache_mb == 0.0
    teacher.calls = 0
    recover(copy.deepcopy(start), teacher, iter_batches(data), steps=8, lr=2e-3, cache_teacher=True,
            show_progress=False)
    assert teacher.calls == 8


class iter_batches:
    """The batches as a re-iterable that is not a list."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_autocast_bf16_trains_in_bf16_keeps_fp32_parameters_and_masks():
    torch.manual_seed(0)
    teacher = teacher_mlp()
    student = student_of(teacher)
    masks = masks_of(student)
    train, held = batches(), batches(3)
    before = distill_loss(student, teacher, held)
    seen = []
    hook = student[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    report = recover(student, teacher, train, steps=30, lr=3e-3, autocast=torch.bfloat16, show_progress=False)
    hook.remove()
    assert set(seen) == {torch.bfloat16}, "the sparse layer did not run in bf16 under autocast"
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert_masks_kept(student, masks, "autocast")
    after = distill_loss(student, teacher, held)
    assert after < 0.6 * before, f"distillation loss {before:.4f} -> {after:.4f} under bf16 autocast"
    assert report.steps == 30


def test_trainable_layer_under_autocast_matches_the_bf16_masked_reference():
    torch.manual_seed(0)
    teacher = teacher_mlp()
    student = student_of(teacher)
    layer = student[2]
    layer.train()
    x = torch.randn(37, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    # fp64 reference on the bf16-rounded operands (what autocast multiplies)
    wm = (layer.weight.detach().to(torch.bfloat16).double() * layer.mask().double())
    xb = x.detach().to(torch.bfloat16).double()
    ref = xb @ wm.t() + layer.bias.detach().to(torch.bfloat16).double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    assert layer.weight.grad.dtype == torch.float32
    assert bool((layer.weight.grad[~layer.mask()] == 0).all()), "a pruned weight got a gradient"
    gw_ref = (g.double().t() @ xb) * layer.mask().double()
    torch.testing.assert_close(layer.weight.grad.double(), gw_ref, rtol=3e-2, atol=3e-2)
    gx_ref = g.double() @ wm
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("4:8", None), ("unstructured", 0.6),
                                              ("block16", 0.5)])
def test_int8_training_weight_is_the_formats_values_bit_for_bit(pattern, sparsity):
    # int8's one scale per row lets training_weight round the masked weight itself instead of
    # building the format each step; it must still be exactly what the format stores, also
    # for weights that training moved (a row whose largest value was pruned, an all-zero row).
    torch.manual_seed(0)
    teacher = teacher_mlp()
    student = student_of(teacher, pattern, sparsity, quantize="int8")
    for _, layer in masked_layers(student):
        with torch.no_grad():
            layer.weight.mul_(torch.rand_like(layer.weight) * 3)
            layer.weight[0].zero_()
        w = layer.training_weight().detach()
        fmt = kinds.compress(layer.weight.detach(), pattern, layer.mask(), layer._block, "int8", 0)
        assert fmt.quantized
        assert torch.equal(w, fmt.to_dense()), pattern
        assert not torch.equal(w, layer.weight.detach() * layer.mask()), "no rounding happened: the test cannot fail"
