"""Saved sparse models back in one call (sparsekern.load): state dicts, torch.save files
(weights_only), safetensors and save_pretrained folders, loaded into the model as built
before sparsify (also on the meta device), in this process and in a fresh one; the bytes on
disk are the compressed bytes; a sparse checkpoint loaded the wrong way fails and names
sparsekern.load."""
import copy
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import Policy, SparseConv2d, SparseLinear

SPARSE = Policy("sparse")
ROOT = str(pathlib.Path(sparsekern.__file__).resolve().parents[1])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 25, 64)
        self.fc2 = nn.Linear(64, 64, bias=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def fresh_net():
    torch.manual_seed(1)  # a different init than the saved model: loading must overwrite it all
    return Net().eval()


def run_fresh(code: str) -> str:
    """Runs `code` in a new Python process (nothing of this one carried over); its stdout."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def compressed_bytes(model) -> int:
    """Bytes of the compressed tensors of every sparse layer (weight_meta included)."""
    return sum(m.weight_nbytes() + m.weight_meta.numel() * 8 for m in model.modules()
               if isinstance(m, (SparseLinear, SparseConv2d)))


def bytes_on_disk(path, suffix_filter) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if suffix_filter(k.rsplit(".", 1)[-1]):
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


CASES = [("2:4", {}), ("unstructured", {"sparsity": 0.7}), ("block16", {"sparsity": 0.5}),
         ("2:4", {"quantize": "int8"}), ("2:4", {"quantize": "int4", "group_size": 32}),
         ("unstructured", {"sparsity": 0.6, "quantize": "int8"})]


@pytest.mark.parametrize("pattern,kw", CASES)
@pytest.mark.parametrize("how", ["state_dict", "torch.save", "safetensors"])
def test_load_rebuilds_the_sparse_layers_without_pruning(tmp_path, pattern, kw, how):
    torch.manual_seed(0)
    model, report = sparsekern.sparsify(Net().eval(), pattern, min_features=32, policy=SPARSE, show_progress=False,
                                        **kw)
    assert {r["layer"] for r in report if r["status"] == "sparse"} >= {"fc1", "fc2"}
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        ref = model(x)
    sd = model.state_dict()
    if how == "torch.save":
        source = tmp_path / "m.pt"
        torch.save(sd, source)
    elif how == "safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "m.safetensors"
        save_file(sd, str(source))
    else:
        source = sd
    loaded = sparsekern.load(fresh_net(), source)
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            got = loaded.get_submodule(name)
            assert type(got) is type(mod) and got.weight_format().pattern == mod.weight_format().pattern, name
            assert got.pattern == mod.weight_format().pattern
            assert got.describe().split(", backend")[0].split(", ", 1)[1] == \
                mod.describe().split(", backend")[0].split(", ", 1)[1]  # density, values
            assert got.weight_nbytes() == mod.weight_nbytes()
    # The loaded layers measure their paths (default policy); every path of a quantized layer
    # multiplies what its integer kernels multiply (ops.rounds_activations), so whichever wins,
    # the loaded model computes what the saved one did.
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
    if how == "safetensors":
        assert bytes_on_disk(source, lambda leaf: leaf.startswith("weight_")) == compressed_bytes(loaded)


def test_load_into_a_meta_device_model_assigns_the_saved_tensors():
    torch.manual_seed(0)
    model, _ = sparsekern.sparsify(Net().eval(), "unstructured", sparsity=0.7, min_features=32, policy=SPARSE,
                                   show_progress=False)
    x = torch.randn(1, 16, 5, 5)
    with torch.device("meta"):
        empty = Net().eval()
    loaded = sparsekern.load(empty, model.state_dict())
    assert all(not t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_load_refuses_what_does_not_fit():
    torch.manual_seed(0)
    model, _ = sparsekern.sparsify(Net().eval(), "2:4", min_features=32, policy=SPARSE, show_progress=False)
    sd = model.state_dict()
    other = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(RuntimeError, match="does not fit the model.*unexpected"):
        sparsekern.load(other, sd)
    bad = dict(sd)
    bad["fc1.weight_indices"] = bad["fc1.weight_indices"][:-1]
    with pytest.raises(RuntimeError, match="fc1: corrupt or mismatched compressed weight"):
        sparsekern.load(fresh_net(), bad)
    net = fresh_net()
    net.fc1 = nn.Embedding(10, 10)
    with pytest.raises(ValueError, match="'fc1' is saved compressed but the model has a Embedding there"):
        sparsekern.load(net, sd)
    trainable, _ = sparsekern.sparsify(Net(), "2:4", min_features=32, trainable=True, show_progress=False)
    with pytest.raises(ValueError, match="saved trainable.*freeze"):
        sparsekern.load(fresh_net(), trainable.state_dict())
    with pytest.raises(RuntimeError, match="does not fit"):
        sparsekern.load(fresh_net(), {k: v for k, v in sd.items() if not k.startswith("head.")})
    sparsekern.load(fresh_net(), {k: v for k, v in sd.items() if not k.startswith("head.")}, strict=False)


def test_torch_save_is_read_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported global"):
        sparsekern.load(fresh_net(), path)


# ------------------------------------------------------------------ Hugging Face and a fresh process
def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                       max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval(), "LlamaForCausalLM"
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), "GPT2LMHeadModel"


@pytest.mark.parametrize("kind,pattern,kw", [("llama", "2:4", {}), ("gpt2", "unstructured", {"sparsity": 0.6}),
                                             ("llama", "2:4", {"quantize": "int4", "group_size": 32})])
def test_save_pretrained_comes_back_in_one_call_in_a_fresh_process(tmp_path, kind, pattern, kw):
    model, cls = _hf_model(kind)
    sparse, report = sparsekern.sparsify(model, pattern, min_features=32, policy=SPARSE, show_progress=False, **kw)
    sparse.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    sparse_rows = {r["layer"]: r for r in report if r["status"] == "sparse"}
    assert record["quant_method"] == "sparsekern" and set(record["layers"]) == set(sparse_rows)
    for name, row in record["layers"].items():
        assert row["pattern"] == pattern and row["values"] == kw.get("quantize", "float32")
        assert row.get("replaces") == ("Conv1D" if kind == "gpt2" else None)
    # The bytes on disk for the pruned layers are the compressed bytes.
    assert bytes_on_disk(tmp_path / "model.safetensors", lambda leaf: leaf.startswith("weight_")) == \
        compressed_bytes(sparse)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": sparse(ids).logits}, tmp_path / "expected.pt")
    # 18 rows: 2:4 int4 runs the int8 dot-product GEMM (x quantized per row) on the sparse path,
    # and the loaded model measures its paths: every one rounds x the same way
    tol = 1e-5
    out = run_fresh(f"""
        import torch, transformers, sparsekern
        from sparsekern.nn import SparseLinear
        path = {str(tmp_path)!r}
        expected = torch.load(path + "/expected.pt")
        model = sparsekern.load(transformers.{cls}, path)
        n = sum(isinstance(m, SparseLinear) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol={tol}, atol={tol})
        print("sparse layers", n)
        try:
            transformers.{cls}.from_pretrained(path)
            print("from_pretrained loaded it")
        except ValueError as e:
            print("from_pretrained refused:", e)
    """)
    assert f"sparse layers {len(sparse_rows)}" in out
    assert "from_pretrained refused:" in out and "sparsekern.load(" in out


def test_resnet_saved_as_safetensors_comes_back_in_a_fresh_process(tmp_path):
    tv = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    sparse, _ = sparsekern.sparsify(model, "2:4", min_features=64, policy=SPARSE, show_progress=False)
    path = tmp_path / "resnet.safetensors"
    save_file(sparse.state_dict(), str(path))
    assert bytes_on_disk(path, lambda leaf: leaf.startswith("weight_")) == compressed_bytes(sparse)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save({"x": x, "y": sparse(x)}, tmp_path / "expected.pt")
    out = run_fresh(f"""
        import torch, torchvision, sparsekern
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = sparsekern.load(torchvision.models.resnet18(num_classes=10).eval(), {str(path)!r})
        with torch.no_grad():
            torch.testing.assert_close(model(expected["x"]), expected["y"], rtol=1e-5, atol=1e-5)
        print("ok", sum(isinstance(m, sparsekern.nn.SparseConv2d) for m in model.modules()))
    """)
    assert out.startswith("ok ") and int(out.split()[1]) >= 10


def test_dense_state_dict_of_a_saved_gpt2_gives_conv1d_layouts():
    model, _ = _hf_model("gpt2")
    dense = copy.deepcopy(model)
    sparse, _ = sparsekern.sparsify(model, "2:4", min_features=32, policy=SPARSE, show_progress=False)
    from_model = sparsekern.dense_state_dict(sparse)
    from_file = sparsekern.dense_state_dict(sparse.state_dict(), template=dense)
    for k in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert from_model[k].shape == dense.state_dict()[k].shape
        # 2:4 along a row of the [out, in] view: along dim 0 of Conv1D's [in, out] weight
        assert ((from_model[k].t().reshape(-1, 4) != 0).sum(1) <= 2).all()
        torch.testing.assert_close(from_file[k], from_model[k])


def test_a_sharded_save_pretrained_folder_loads(tmp_path):
    model, cls = _hf_model("llama")
    sparse, _ = sparsekern.sparsify(model, "unstructured", sparsity=0.7, min_features=32, policy=SPARSE,
                                    show_progress=False)
    sparse.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    import transformers

    loaded = sparsekern.load(getattr(transformers, cls), tmp_path)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.config.quantization_config["layers"] == sparse.config.quantization_config["layers"]
