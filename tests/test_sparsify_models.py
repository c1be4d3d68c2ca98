"""sparsify on models as users bring them: tied weights (a Llama with tie_word_embeddings),
GPT-2's transformers Conv1D layers, models already quantized with torch.ao, models on the
meta device; every module that holds a weight has a report row saying what happened to it."""
import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import Policy, SparseLinear

SPARSE = Policy("sparse")
transformers = pytest.importorskip("transformers")


def tiny_llama(tie=True):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def weight_holders(model):
    """Names of the modules that hold a weight (own parameters, or a `weight`)."""
    return {n for n, m in model.named_modules()
            if next(m.parameters(recurse=False), None) is not None or hasattr(m, "weight")}


def masked_dense(dense, sparse):
    ref = copy.deepcopy(dense)
    ref.load_state_dict(sparsekern.dense_state_dict(sparse))
    return ref


def test_tied_lm_head_stays_dense_and_tied():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", min_features=32, policy=SPARSE,
                                         show_progress=False)
    by = {r["layer"]: r for r in report}
    assert by["lm_head"]["status"] == "dense" and "tied to model.embed_tokens.weight" in by["lm_head"]["reason"]
    assert sparse.lm_head.weight is sparse.model.embed_tokens.weight  # the tie holds
    sparse.tie_weights()  # and transformers can still tie them
    assert sparse.lm_head.weight is sparse.model.embed_tokens.weight
    assert sum(r["status"] == "sparse" for r in report) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert {r["layer"] for r in report} == weight_holders(model)  # every weight-holding module has a row
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, masked_dense(model, sparse)(ids).logits, rtol=1e-4, atol=1e-4)


def test_untie_prunes_the_tied_layer_and_says_so():
    model = tiny_llama(tie=True)
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", min_features=32, policy=SPARSE, untie=True,
                                         show_progress=False)
    by = {r["layer"]: r for r in report}
    assert by["lm_head"]["status"] == "sparse" and "untied from model.embed_tokens.weight" in by["lm_head"]["tied"]
    assert isinstance(sparse.lm_head, SparseLinear) and not sparse.config.tie_word_embeddings
    sparse.tie_weights()  # leaves the sparse head alone
    assert isinstance(sparse.lm_head, SparseLinear) and not sparse.lm_head.trainable
    untied = copy.deepcopy(model)  # the reference unties too: the embedding keeps the dense weight
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, masked_dense(untied, sparse)(ids).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_module_reached_by_two_paths_is_swapped_once_under_both():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model, report = sparsekern.sparsify(model, "2:4", min_features=32, policy=SPARSE, show_progress=False)
    assert model[0] is model[2] and isinstance(model[0], SparseLinear)
    assert [r["layer"] for r in report] == ["0"] and report[0]["shared_with"] == ["2"]


@pytest.mark.parametrize("pattern,kw", [("2:4", {}), ("unstructured", {"sparsity": 0.6})])
def test_gpt2_conv1d_layers_are_swapped_and_match_the_masked_model(pattern, kw):
    model = tiny_gpt2()
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), pattern, min_features=32, policy=SPARSE,
                                         show_progress=False, **kw)
    by = {r["layer"]: r for r in report}
    for i in range(2):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            row = by[f"transformer.h.{i}.{layer}"]
            assert row["status"] == "sparse" and row["type"] == "Conv1D", row
            mod = sparse.get_submodule(f"transformer.h.{i}.{layer}")
            assert isinstance(mod, SparseLinear) and mod.transposed
    assert by["lm_head"]["status"] == "dense" and "tied" in by["lm_head"]["reason"]
    assert {r["layer"] for r in report} == weight_holders(model)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, masked_dense(model, sparse)(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_with_wanda_calibrates_through_the_swapped_layers():
    model = tiny_gpt2()
    batches = [{"input_ids": torch.randint(0, 96, (2, 8))} for _ in range(2)]
    sparse, report = sparsekern.sparsify(copy.deepcopy(model), "2:4", method="wanda", calibration=batches,
                                         min_features=32, policy=SPARSE, show_progress=False)
    assert sum(r["status"] == "sparse" for r in report) == 8


def test_conv1d_from_dense_directly():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs: weight [64, 48]
    s = SparseLinear.from_dense(conv, "2:4", policy=SPARSE)
    assert s.transposed and (s.in_features, s.out_features) == (64, 48)
    x = torch.randn(3, 5, 64)
    ref = x.double() @ (conv.weight.detach().double() * s.mask().T.double()) + conv.bias.detach().double()
    torch.testing.assert_close(s(x).double(), ref, rtol=1e-4, atol=1e-5)
    assert "replaces a Conv1D" in repr(s)


def test_quantized_model_is_listed_not_silent():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64))
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    _, report = sparsekern.sparsify(q, "2:4", min_features=32, show_progress=False)
    by = {r["layer"]: r for r in report}
    assert set(by) == {"0", "2", "3"}
    for name in ("0", "2"):
        assert by[name]["status"] == "skipped" and "already quantized" in by[name]["reason"]
        assert "quantize='int8'" in by[name]["reason"]
    assert by["3"]["status"] == "dense" and "not a layer sparsify swaps" in by["3"]["reason"]


def test_an_integer_weight_in_an_nn_linear_is_listed():
    lin = nn.Linear(64, 64)
    lin.weight = nn.Parameter(torch.randint(-8, 8, (64, 64), dtype=torch.int8), requires_grad=False)
    _, report = sparsekern.sparsify(nn.Sequential(lin), "2:4", min_features=32, show_progress=False)
    assert report[0]["status"] == "skipped" and "int8" in report[0]["reason"]


def test_meta_model_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"meta device.*Load the weights first.*sparsekern\.load"):
        sparsekern.sparsify(model, "2:4", min_features=32, show_progress=False)


def test_partly_meta_model_lists_the_meta_layers():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64, device="meta"))
    model, report = sparsekern.sparsify(model, "2:4", min_features=32, policy=SPARSE, show_progress=False)
    by = {r["layer"]: r for r in report}
    assert by["0"]["status"] == "sparse"
    assert by["2"]["status"] == "skipped" and "meta device" in by["2"]["reason"]


def test_modules_outside_include_have_rows():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    _, report = sparsekern.sparsify(model, "2:4", include="1", min_features=32, show_progress=False)
    by = {r["layer"]: r for r in report}
    assert by["0"]["status"] == "dense" and "include" in by["0"]["reason"] and by["1"]["status"] == "sparse"
