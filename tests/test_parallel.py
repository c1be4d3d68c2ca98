"""Model parallelism on torch.distributed, on the CPU: gloo, two processes.

Tensor parallelism (sparsekern.parallel styles through torch's parallelize_module) of a
Llama-style MLP and of a Hugging Face Llama decoder, for 2:4, unstructured 70% and block;
bad plans; FSDP2 masked fine-tuning; DCP save, load and reshard; shard-then-prune against
prune-then-shard; the examples/ script under torchrun. Every result is compared with the
single-process model. Each multi-process run has a timeout, so a hang fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsekern
from sparsekern.nn import Policy, SparseLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = Policy("sparse")  # the sparse op on every batch, whatever a measurement would pick
PATTERNS = {"2:4": {}, "unstructured": {"sparsity": 0.7}, "block16": {"sparsity": 0.5}}
HIDDEN, INTER = 128, 256

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------ running 2 ranks
def _entry(rank, scenario, out_dir, args):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init_' + scenario)}", rank=rank,
                            world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        result = SCENARIOS[scenario](rank, init_device_mesh("cpu", (2,)), out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_2_ranks(scenario, tmp_path, *args, timeout=300):
    """Run SCENARIOS[scenario] on 2 gloo ranks; returns each rank's result. A rank's
    exception fails the test with its traceback; a hang fails it after `timeout` s."""
    ctx = mp.spawn(_entry, args=(scenario, str(tmp_path), args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{scenario}: the 2-process run did not finish in {timeout} s")
    return [torch.load(tmp_path / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(2)]


# ----------------------------------------------------------------------- models
class MLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden=HIDDEN, inter=INTER):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter), nn.Linear(hidden, inter)
        self.down_proj = nn.Linear(inter, hidden)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def sparse_mlp(pattern, seed=0, trainable=False, **sparsify_kw):
    torch.manual_seed(seed)
    model = MLP()
    sparsekern.sparsify(model, pattern, min_features=8, policy=SPARSE, trainable=trainable, show_progress=False,
                        **{**PATTERNS.get(pattern, {}), **sparsify_kw})
    return model


def mlp_plan(colwise, rowwise, **kw):
    return {"gate_proj": colwise(**kw), "up_proj": colwise(**kw), "down_proj": rowwise(**kw)}


def sparse_plan():
    from sparsekern.parallel import ColwiseParallel, RowwiseParallel

    return mlp_plan(ColwiseParallel, RowwiseParallel, policy=SPARSE)


def inputs(seed=1, shape=(3, 5, HIDDEN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def held_bytes(module):
    """Bytes of every tensor the module holds (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- tensor parallel
def mlp_section(rank, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor import parallel as tp
    from torch.distributed.tensor.parallel import parallelize_module

    from sparsekern.parallel import ColwiseParallel, RowwiseParallel, TPSparseLinear

    result = {}
    x = inputs()
    for pattern in PATTERNS:
        model = sparse_mlp(pattern)
        ref = model(x)
        full = {n: m.weight_format().nbytes for n, m in model.named_children()}
        parallelize_module(model, mesh, sparse_plan())
        assert all(isinstance(m, TPSparseLinear) for m in model.children())
        close(model(x), ref, pattern)
        close(model(x[0, 0]), ref[0, 0], f"{pattern}, 1-D input")
        result[pattern] = {n: {"local": m.weight_format().nbytes, "full": full[n], "held": held_bytes(m),
                               "bias": m.bias.numel() * 4} for n, m in model.named_children()}

    # Layouts as torch's styles take them: colwise gathered to replicated output, rowwise
    # reduce-scattered to a sharded output, DTensor outputs kept.
    model = sparse_mlp("2:4")
    ref = model(x)
    parallelize_module(model, mesh, {"gate_proj": ColwiseParallel(output_layouts=Replicate(), policy=SPARSE),
                                     "down_proj": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                                  use_local_output=False, policy=SPARSE)})
    gate = model.gate_proj(x)
    assert not isinstance(gate, DTensor) and gate.shape == (3, 5, INTER)
    close(gate, sparse_mlp("2:4").gate_proj(x), "colwise to Replicate")
    y = model(x)
    assert isinstance(y, DTensor) and y.placements == (Shard(2),)
    close(y.full_tensor(), ref, "rowwise to Shard(-1)")

    # A partly sparse model: the same plan; nn.Linear layers get exactly torch's styles.
    torch.manual_seed(0)
    mixed = MLP()
    sparsekern.sparsify(mixed, "2:4", include="down_proj", min_features=8, policy=SPARSE, show_progress=False)
    twin = MLP()
    twin.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("down_proj")}, strict=False)
    ref = mixed(x)
    parallelize_module(mixed, mesh, sparse_plan())
    parallelize_module(twin, mesh, mlp_plan(tp.ColwiseParallel, tp.RowwiseParallel))
    assert type(mixed.gate_proj) is nn.Linear and isinstance(mixed.down_proj, TPSparseLinear)
    for name in ("gate_proj", "up_proj"):
        for p in ("weight", "bias"):
            a, b = getattr(getattr(mixed, name), p), getattr(getattr(twin, name), p)
            assert isinstance(a, DTensor) and a.placements == b.placements == (Shard(0),)
            assert torch.equal(a.to_local(), b.to_local())
    close(mixed(x), ref, "partly sparse")

    # src_data_rank=0 (torch's default): rank 0's weights are the truth even when rank 1's differ.
    model = sparse_mlp("unstructured", seed=rank)
    parallelize_module(model, mesh, sparse_plan())
    close(model(x), sparse_mlp("unstructured", seed=0)(x), "rank 0's weights")
    return result


def policies_section(rank, mesh):
    """Dense shards (Policy("dense")) next to a compressed one under the default policy;
    state dicts of a sharded model load back into it, and a single-device state dict loads
    into it (each rank keeps its shard)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from sparsekern.parallel import ColwiseParallel, RowwiseParallel

    x = inputs()
    model = sparse_mlp("unstructured")
    single_state, ref = model.state_dict(), model(x)
    dense = Policy("dense")
    parallelize_module(model, mesh, {"gate_proj": ColwiseParallel(policy=dense), "up_proj": ColwiseParallel(),
                                     "down_proj": RowwiseParallel(policy=dense)})
    assert model.gate_proj.backend == model.down_proj.backend == "dense"
    close(model(x), ref, "dense and compressed shards")
    model.load_state_dict(model.state_dict())
    close(model(x), ref, "own state dict loaded back")
    other = sparse_mlp("unstructured", seed=5)
    parallelize_module(other, mesh, sparse_plan())
    other.load_state_dict(single_state)
    close(other(x), ref, "single-device state dict into a sharded model")
    return {"backends": [m.backend for m in model.children()]}


def bad_plans_section(rank, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from sparsekern.parallel import ColwiseParallel, RowwiseParallel

    def build(out_f, in_f, pattern, **kw):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("proj", nn.Sequential())
        model.proj.add_module("down", nn.Linear(in_f, out_f))
        sparsekern.sparsify(model, pattern, min_features=8, policy=SPARSE, show_progress=False, **kw)
        return model

    # 72 columns of 2:8 over 2 ranks: 36 each, which would cut a group of 8.
    with pytest.raises(ValueError, match=r"RowwiseParallel on layer 'proj\.down'.*would cut an N:M group of 8"):
        parallelize_module(build(32, 72, "2:8"), mesh, {"proj.down": RowwiseParallel()})
    with pytest.raises(ValueError, match=r"'proj\.down'.*would cut a 64-column bitmask word"):
        parallelize_module(build(32, 192, "unstructured", sparsity=0.5), mesh, {"proj.*": RowwiseParallel()})
    # 33 output rows over 2 ranks.
    with pytest.raises(ValueError, match=r"ColwiseParallel on layer 'proj\.down'.*out_features=33 is not divisible "
                                         r"by the world size 2"):
        parallelize_module(build(33, 64, "2:4"), mesh, {"proj.down": ColwiseParallel()})
    with pytest.raises(ValueError, match=r"'proj\.down'.*24 output rows per rank.*would cut a 16x16 block"):
        parallelize_module(build(48, 64, "block16", sparsity=0.5), mesh, {"proj.down": ColwiseParallel()})
    trainable = build(32, 64, "2:4", trainable=True)
    with pytest.raises(ValueError, match=r"'proj\.down'.*trainable.*freeze\(\)"):
        parallelize_module(trainable, mesh, {"proj.down": ColwiseParallel()})
    return True


def llama_section(rank, mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    try:
        from transformers import LlamaConfig, LlamaModel
    except ImportError:
        return "skip"

    from sparsekern.parallel import ColwiseParallel, RowwiseParallel, TPSparseLinear

    cfg = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    col, row = ColwiseParallel(policy=SPARSE), RowwiseParallel(policy=SPARSE)
    plan = {"layers.*.self_attn.q_proj": col, "layers.*.self_attn.k_proj": col, "layers.*.self_attn.v_proj": col,
            "layers.*.self_attn.o_proj": row,
            "layers.*.mlp.gate_proj": col, "layers.*.mlp.up_proj": col, "layers.*.mlp.down_proj": row}
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    result = {}
    for pattern, kw in PATTERNS.items():
        torch.manual_seed(0)
        model = LlamaModel(cfg).eval()
        sparsekern.sparsify(model, pattern, min_features=8, policy=SPARSE, show_progress=False, **kw)
        with torch.no_grad():
            ref = model(ids).last_hidden_state
        sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        assert len(sparse) == 14, sorted(sparse)
        full = sum(m.weight_format().nbytes for m in sparse.values())
        parallelize_module(model, mesh, plan)
        assert all(isinstance(m, TPSparseLinear) for m in sparse.values())
        with torch.no_grad():
            out = model(ids).last_hidden_state
        close(out, ref, f"Llama decoder {pattern}")
        result[pattern] = {"local": sum(m.weight_format().nbytes for m in sparse.values()), "full": full}
    return result


def tp_scenario(rank, mesh, out_dir):
    """The tensor-parallel checks in one 2-rank run (one start-up instead of four). A
    section that raises records its traceback; its test fails with it. (Every check
    raises on both ranks alike, before any collective it would leave unmatched.)"""
    import traceback

    out = {}
    for name, fn in TP_SECTIONS.items():
        try:
            out[name] = fn(rank, mesh)
        except Exception:
            out[name] = TPFailure(traceback.format_exc())
    return out


class TPFailure(str):
    pass


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return run_2_ranks("tp", tmp_path_factory.mktemp("tp"))


def section(tp_results, name):
    """Both ranks' results of one section; the test fails with a rank's traceback."""
    for r, res in enumerate(tp_results):
        if isinstance(res[name], TPFailure):
            pytest.fail(f"rank {r}, {name}:\n{res[name]}", pytrace=False)
    return [res[name] for res in tp_results]


def assert_half_bytes(per_rank, full, what):
    """Each rank holds about half the compressed bytes; together, the whole (plus the
    bookkeeping each shard repeats: a bitmask row's last offsets tile, a block row pointer)."""
    for r, local in enumerate(per_rank):
        assert 0.35 * full <= local <= 0.65 * full, f"{what}: rank {r} holds {local} of {full} bytes"
    assert full <= sum(per_rank) <= 1.1 * full, f"{what}: shards hold {sum(per_rank)} bytes, the layer {full}"


@pytest.mark.slow
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_tp_mlp_matches_single_process_and_halves_bytes(tp_results, pattern):
    """gate/up column-wise, down row-wise: equal to the single-process model (checked in
    each rank), each rank holding about half of each layer's compressed bytes and
    nothing else (the full weight is gone)."""
    res = section(tp_results, "mlp")
    for layer in ("gate_proj", "up_proj", "down_proj"):
        rows = [res[r][pattern][layer] for r in range(2)]
        assert_half_bytes([x["local"] for x in rows], rows[0]["full"], f"{pattern} {layer}")
        if pattern == "2:4":
            assert rows[0]["local"] == rows[0]["full"] // 2
        for x in rows:  # compressed shard + bias + weight_meta: no full copy left behind
            assert x["held"] <= x["local"] + x["bias"] + 64, f"{layer} holds {x['held']} bytes"


@pytest.mark.slow
def test_tp_dense_shards_and_state_dict_round_trips(tp_results):
    """Dense shards (Policy("dense")) next to a compressed one under the default policy
    compute the single-process output; both ranks run the same backends; state dicts (the
    sharded model's own, and a single-device one) load into the sharded model with outputs
    unchanged."""
    res = section(tp_results, "policies")
    assert res[0]["backends"] == res[1]["backends"]
    assert res[0]["backends"][0] == res[0]["backends"][2] == "dense"


@pytest.mark.slow
def test_tp_llama_decoder_matches_single_process(tp_results):
    """A Hugging Face Llama decoder built from a config: q/k/v column-wise, o row-wise,
    gate/up column-wise, down row-wise; 2:4, unstructured 70% and block."""
    pytest.importorskip("transformers")
    res = section(tp_results, "llama")
    for pattern in PATTERNS:
        assert_half_bytes([res[r][pattern]["local"] for r in range(2)], res[0][pattern]["full"], pattern)


@pytest.mark.slow
def test_bad_plans_fail_naming_the_layer(tp_results):
    """Through torch's parallelize_module on 2 ranks: a row-wise cut through an N:M group
    or a bitmask word, a world size that does not divide the output rows, a cut through
    a block, a trainable layer. Checked with pytest.raises in each rank."""
    assert section(tp_results, "bad_plans") == [True, True]


def test_check_plan_names_the_layer_before_sharding():
    """check_plan needs no process group: the same errors, before anything is sharded."""
    from torch.distributed.tensor import parallel as tp

    from sparsekern.parallel import ColwiseParallel, RowwiseParallel, check_plan

    torch.manual_seed(0)
    model = nn.Sequential(MLP(hidden=64, inter=72))
    sparsekern.sparsify(model, "2:8", min_features=8, policy=SPARSE, show_progress=False)
    ok = {"0.gate_proj": ColwiseParallel(), "0.up_proj": ColwiseParallel()}
    assert check_plan(model, ok, 2) == ["0.gate_proj", "0.up_proj"]
    with pytest.raises(ValueError, match=r"RowwiseParallel on layer '0\.down_proj'.*36 input columns per rank.*"
                                         r"N:M group of 8"):
        check_plan(model, {**ok, "*.down_proj": RowwiseParallel()}, 2)
    with pytest.raises(ValueError, match=r"ColwiseParallel on layer '0\.gate_proj'.*out_features=72 is not "
                                         r"divisible by the world size 5"):
        check_plan(model, ok, 5)
    with pytest.raises(ValueError, match=r"layer '0\.up_proj'.*torch's styles cannot shard a SparseLinear"):
        check_plan(model, {"0.up_proj": tp.ColwiseParallel()}, 2)


# ----------------------------------------------------------------------- FSDP2
STEPS, BATCH = 4, 8


def fsdp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16))
    sparsekern.sparsify(model, "2:4", include=["0", "4"], min_features=8, trainable=True, show_progress=False)
    sparsekern.sparsify(model, "unstructured", sparsity=0.7, include="2", min_features=8, trainable=True,
                        show_progress=False)
    return model


def fsdp_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * BATCH, 64, generator=g), torch.randn(2 * BATCH, 16, generator=g)) for _ in range(STEPS)]


def fsdp_train(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def fsdp_scenario(rank, mesh, out_dir):
    import warnings

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sparsekern.parallel import apply_masks_

    model = fsdp_model()
    for m in model:
        if isinstance(m, SparseLinear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model[0].weight, DTensor) and model[0].weight.to_local().shape == (64, 64)
    shard = [(x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]) for x, y in fsdp_data()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        fsdp_train(model, shard)
    moved = apply_masks_(model)  # nothing to fix: the masked gradients kept the zeros
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # An update that moves pruned weights (here: +1 everywhere): apply_masks_ puts the zeros back.
    pruned = 0
    for m in model:
        if isinstance(m, SparseLinear):
            with torch.no_grad():
                m.weight.to_local().add_(1.0)
            rows = m.weight.to_local().shape[0]
            pruned += int((~m.mask()[rank * rows:(rank + 1) * rows]).sum())
    fixed = apply_masks_(model)
    perturbed = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {"state": state, "moved": moved, "fixed": fixed, "pruned": pruned, "perturbed": perturbed}


@pytest.mark.slow
def test_fsdp2_masked_finetune_matches_single_process(tmp_path):
    """fully_shard on each trainable sparse layer and the root, AdamW with weight decay, a
    few steps on each rank's half of the batch: the masks do not change, pruned weights
    stay exactly zero, and the weights equal single-process training on the whole batch."""
    import sparsekern.reference as ref

    res = run_2_ranks("fsdp", tmp_path)
    single = fsdp_model()
    before = {k: v.clone() for k, v in single.state_dict().items() if k.endswith("weight_mask_bits")}
    single = fsdp_train(single, fsdp_data()).state_dict()
    for r in range(2):
        assert res[r]["moved"] == 0
        state = res[r]["state"]
        assert set(state) == set(single)
        for k, v in state.items():
            if k.endswith("weight_mask_bits"):
                assert torch.equal(v, single[k]) and torch.equal(v, before[k]), f"mask {k} changed"
            else:
                close(v, single[k], k)
        for name in ("0", "2", "4"):
            w, bits = state[f"{name}.weight"], state[f"{name}.weight_mask_bits"]
            assert (w[~ref.unpack_bitmask(bits, w.shape[1])] == 0).all(), f"pruned weights of {name} moved"
            assert (w[ref.unpack_bitmask(bits, w.shape[1])] != 0).any()
        assert res[r]["fixed"] == res[r]["pruned"] > 0
        for name in ("0", "2", "4"):
            w, bits = res[r]["perturbed"][f"{name}.weight"], state[f"{name}.weight_mask_bits"]
            assert (w[~ref.unpack_bitmask(bits, w.shape[1])] == 0).all(), f"apply_masks_ left {name} unmasked"


def test_apply_masks_on_plain_weights():
    """apply_masks_ without FSDP: linear and convolution weights, only the trainable ones."""
    from sparsekern.parallel import apply_masks_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 32), nn.Linear(32, 32))
    sparsekern.sparsify(model, "2:4", include=["0", "2"], min_features=8, trainable=True, show_progress=False)
    sparsekern.sparsify(model, "2:4", include="3", min_features=8, policy=SPARSE, show_progress=False)
    assert apply_masks_(model) == 0
    pruned = 0
    for m in (model[0], model[2]):
        with torch.no_grad():
            m.weight.add_(1.0)
        pruned += int((~m.mask()).sum())
    assert apply_masks_(model) == pruned
    for m in (model[0], model[2]):
        w2d = sparsekern.patterns.as_2d(m.weight)
        assert (w2d[~m.mask()] == 0).all() and (w2d[m.mask()] != 0).all()


# ------------------------------------------------------------------ checkpoints
def dcp_model(seed):
    """Three layers, three formats: gate unstructured 70%, up 2:4, down block16 50%."""
    torch.manual_seed(seed)
    model = MLP()
    for name, pattern in (("gate_proj", "unstructured"), ("up_proj", "2:4"), ("down_proj", "block16")):
        sparsekern.sparsify(model, pattern, include=name, min_features=8, policy=SPARSE, show_progress=False,
                            **PATTERNS[pattern])
    return model


def dcp_scenario(rank, mesh, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor.parallel import parallelize_module

    from sparsekern.parallel import load_checkpoint, unshard_state_dict
    from sparsekern.sparsify import set_module

    class Recording(dcp.FileSystemReader):
        """Records which stored chunk of which tensor each read asks for."""

        reads: list = []

        def read_data(self, plan, planner):
            self.reads.extend((ri.storage_index.fqn, tuple(ri.storage_index.offset)) for ri in plan.items)
            return super().read_data(plan, planner)

    x = inputs()
    ckpt = os.path.join(out_dir, "ckpt")
    model = dcp_model(seed=0)
    parallelize_module(model, mesh, sparse_plan())
    y = model(x)
    dcp.save(model.state_dict(), checkpoint_id=ckpt)

    # Into 2 ranks: a model pruned from other weights (other masks, other sizes).
    fresh = dcp_model(seed=7)
    parallelize_module(fresh, mesh, sparse_plan())
    assert not torch.allclose(fresh(x), y)
    reader = Recording(ckpt)
    load_checkpoint(fresh, ckpt, storage_reader=reader)
    assert torch.equal(fresh(x), y)
    for name, m in fresh.named_children():
        assert torch.equal(m.weight_format().values, getattr(model, name).weight_format().values)
    stacks = [(k, off) for k, off in reader.reads if k.split(".")[-1] not in ("weight_meta", "weight_tp", "bias")]
    assert stacks and all(off[0] == rank for k, off in stacks), f"rank {rank} read other ranks' shards: {stacks}"

    # A model that never exists whole: placeholders on the meta device, sharded, given
    # memory (each rank: its dense placeholder shard), filled from the checkpoint.
    with torch.device("meta"):
        skeleton = MLP()
    for name, pattern in (("gate_proj", "unstructured"), ("up_proj", "2:4"), ("down_proj", "block16")):
        lin = getattr(skeleton, name)
        set_module(skeleton, name, SparseLinear(lin.in_features, lin.out_features, pattern=pattern, block=(16, 16),
                                                device="meta"))
    parallelize_module(skeleton, mesh, sparse_plan())
    skeleton.to_empty(device="cpu")
    load_checkpoint(skeleton, ckpt)
    assert torch.equal(skeleton(x), y)
    assert all(m.weight_format().nbytes == getattr(model, n).weight_format().nbytes
               for n, m in skeleton.named_children())

    # A gathered state dict, turned into a single-device one.
    gathered = unshard_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return {"x": x, "y": y.detach(), "single_state": gathered}


@pytest.mark.slow
def test_dcp_save_load_and_reshard(tmp_path):
    """dcp.save from 2 ranks; load_checkpoint into 2 ranks (each reads only its rows) and
    into a single process (resharding) of a model pruned from other weights, and into a
    sharded model built on the meta device: outputs unchanged. A gathered state dict
    loads into a single process too."""
    from sparsekern.parallel import load_checkpoint

    res = run_2_ranks("dcp", tmp_path)
    x, y = res[0]["x"], res[0]["y"]
    single = dcp_model(seed=7)
    assert not torch.allclose(single(x), y, atol=1e-3)
    load_checkpoint(single, str(tmp_path / "ckpt"))
    assert all(type(m) is SparseLinear for m in single.children())
    close(single(x), y, "single process from the 2-rank checkpoint")
    again = dcp_model(seed=9)
    again.load_state_dict(res[1]["single_state"])
    close(again(x), y, "single process from the gathered state dict")
    for name in ("gate_proj", "up_proj", "down_proj"):
        a, b = getattr(single, name).weight_format(), dcp_model(seed=0).get_submodule(name).weight_format()
        for t in a.TENSOR_NAMES:
            assert torch.equal(getattr(a, t), getattr(b, t)), f"{name}.{t} differs from the saved model's"


def test_load_checkpoint_single_process(tmp_path):
    """A checkpoint written by one process (dcp.save of a plain sparse model) loads into
    a plain model pruned from other weights: load_checkpoint sizes the compressed buffers
    from the checkpoint, where a bare dcp.load would refuse their sizes."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from sparsekern.parallel import load_checkpoint

    x = inputs()
    model = dcp_model(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    other = dcp_model(seed=3)
    assert other.gate_proj.weight_format().values.numel() != model.gate_proj.weight_format().values.numel() or \
        not torch.equal(other(x), model(x))
    load_checkpoint(other, str(tmp_path / "ckpt"))
    assert torch.equal(other(x), model(x))


# ------------------------------------------------------------ sparsify, sharded
def sparsify_section(rank, mesh):
    from torch.distributed.tensor import parallel as tp
    from torch.distributed.tensor.parallel import parallelize_module

    from sparsekern.parallel import TPSparseLinear, sparsify_sharded

    x = inputs()
    for pattern, kw in PATTERNS.items():
        pruned_first = sparse_mlp(pattern)
        ref = pruned_first(x)
        parallelize_module(pruned_first, mesh, sparse_plan())
        torch.manual_seed(0)
        sharded_first = MLP()
        parallelize_module(sharded_first, mesh, mlp_plan(tp.ColwiseParallel, tp.RowwiseParallel))
        _, report = sparsify_sharded(sharded_first, pattern, min_features=8, policy=SPARSE, **kw)
        assert [r["layer"] for r in report] == ["gate_proj", "up_proj", "down_proj"]
        for name, a in pruned_first.named_children():
            b = getattr(sharded_first, name)
            assert isinstance(b, TPSparseLinear) and (a.tp_dim, a.tp_rank) == (b.tp_dim, b.tp_rank)
            sa, sb = a.state_dict(), b.state_dict()
            assert sorted(sa) == sorted(sb)
            for k in sa:
                la = sa[k].to_local() if hasattr(sa[k], "to_local") else sa[k]
                lb = sb[k].to_local() if hasattr(sb[k], "to_local") else sb[k]
                assert torch.equal(la, lb), f"{pattern} {name}.{k}: shard-then-prune differs"
        close(sharded_first(x), ref, f"{pattern}: shard then prune")
    with pytest.raises(ValueError, match="wanda.*prune before sharding"):
        sparsify_sharded(MLP(), "2:4", method="wanda")
    return True


@pytest.mark.slow
def test_shard_then_prune_equals_prune_then_shard(tp_results):
    """A dense model sharded with torch's styles then pruned by sparsify_sharded holds,
    rank for rank, the very shards of the model pruned then sharded (2:4, unstructured,
    block), and computes the single-process output."""
    assert section(tp_results, "sparsify") == [True, True]


# ------------------------------------------------------------------- the example
@pytest.mark.slow
def test_example_tp_sparse_decoder_under_torchrun():
    """examples/tp_sparse_decoder.py under `torchrun --nproc_per_node 2` on gloo."""
    pytest.importorskip("transformers")
    # the ranks import the sparsekern under test (a checkout need not be installed)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(sparsekern.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "examples", "tp_sparse_decoder.py"), "--tiny"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 300 s: {(e.stdout or b'')[-2000:]!r}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any("tensor-parallel output matches the single-process model" in line for line in lines), r.stdout
    assert sum("rank" in line and "compressed bytes" in line for line in lines) == 2, r.stdout


TP_SECTIONS = {"mlp": mlp_section, "policies": policies_section, "bad_plans": bad_plans_section,
               "llama": llama_section, "sparsify": sparsify_section}
SCENARIOS = {"tp": tp_scenario, "fsdp": fsdp_scenario, "dcp": dcp_scenario}
