"""The on-disk tuning cache (sparsekern.decisions): per-bucket path choices of sparse modules
kept across processes, tolerant of corrupt, foreign and unwritable files, filled ahead of
time by sparsekern.tune. Every test points the cache at its own temporary folder."""
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
from sparsekern import decisions
from sparsekern.nn import Policy, SparseLinear

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(decisions.ENV_VAR, str(folder))
    decisions.forget_loaded()
    yield folder
    decisions.forget_loaded()


@pytest.fixture
def fake_timings(monkeypatch):
    """Injected timings (sparse wins): measuring is counted, not timed."""
    calls = []

    def fake_measure(runners, device, reps, cold, evict=None):
        calls.append(sorted(runners))
        return {p: {"sparse": 1.0, "sparse_kept": 1.0, "decompress": 2.0, "dense_copy": 3.0}[p] for p in runners}

    monkeypatch.setattr(sparsekern.nn, "measure_paths", fake_measure)
    return calls


def _layer(out=32, policy=None):
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(64, out), "2:4", policy=policy).eval()


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_choice_measured_once_is_read_back_instead_of_measured(cache, fake_timings):
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    assert len(fake_timings) == 1
    files = _files(cache)
    assert len(files) == 1 and files[0].startswith("paths-") and files[0].endswith(".json")  # no temp file left
    data = json.loads((cache / files[0]).read_text())
    assert data["format"] == decisions.FORMAT and data["environment"]["threads"] == torch.get_num_threads()
    assert [e["path"] for e in data["entries"].values()] == ["sparse"]
    # Another "process": nothing in memory, only the file.
    decisions.forget_loaded()
    sparsekern.nn.clear_shared_choices()
    before = sparsekern.nn.measurement_count()
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert len(fake_timings) == 1 and sparsekern.nn.measurement_count() == before
    text = sparsekern.explain(nn.Sequential(layer))
    assert "read from the tuning cache, measured 20" in text and "UTC" in text


def test_explain_says_measured_now(cache, fake_timings):
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 64))
    text = sparsekern.explain(nn.Sequential(layer))
    assert "rows<=4: sparse" in text and "measured now, 20" in text and "tuning cache" not in text


def test_the_key_holds_the_shape_and_the_bucket(cache, fake_timings):
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
        decisions.forget_loaded()
        sparsekern.nn.clear_shared_choices()
        _layer()(torch.randn(40, 64))        # another bucket: measured
        _layer(out=48)(torch.randn(3, 64))   # another shape: measured
        _layer()(torch.randn(2, 64))         # same bucket and shape as the first: read
    assert len(fake_timings) == 3
    entries = json.loads((cache / _files(cache)[0]).read_text())["entries"]
    assert len(entries) == 3


def test_a_corrupt_file_is_ignored_with_a_warning_then_replaced(cache, fake_timings):
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    file = cache / _files(cache)[0]
    file.write_text("{ not json")
    decisions.forget_loaded()
    sparsekern.nn.clear_shared_choices()
    with pytest.warns(RuntimeWarning, match="ignoring"), torch.no_grad():
        _layer()(torch.randn(3, 64))
    assert len(fake_timings) == 2  # measured again
    assert json.loads(file.read_text())["format"] == decisions.FORMAT  # rewritten whole


@pytest.mark.parametrize("content", [
    {"format": "sparsekern-decisions-1", "environment": {"cpu": "another CPU"}, "entries": {}},
    {"format": "something else", "entries": {}},
    ["a", "list"],
])
def test_a_foreign_file_is_ignored_with_a_warning(cache, fake_timings, content):
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    file = cache / _files(cache)[0]
    file.write_text(json.dumps(content))
    decisions.forget_loaded()
    sparsekern.nn.clear_shared_choices()
    with pytest.warns(RuntimeWarning, match="ignoring"), torch.no_grad():
        _layer()(torch.randn(3, 64))
    assert len(fake_timings) == 2


def test_a_malformed_entry_is_dropped(cache, fake_timings):
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    file = cache / _files(cache)[0]
    data = json.loads(file.read_text())
    key = next(iter(data["entries"]))
    data["entries"][key]["times_ms"] = {"sparse": "fast"}
    file.write_text(json.dumps(data))
    decisions.forget_loaded()
    sparsekern.nn.clear_shared_choices()
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    assert len(fake_timings) == 2


def test_an_unwritable_folder_warns_and_keeps_the_choice_in_memory(tmp_path, monkeypatch, fake_timings):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(decisions.ENV_VAR, str(blocker / "cache"))
    decisions.forget_loaded()
    layer = _layer()
    with pytest.warns(RuntimeWarning, match="cannot write"), torch.no_grad():
        y = layer(torch.randn(3, 64))
    assert y.shape == (3, 32) and layer.bucket_choices[4].path == "sparse"
    decisions.forget_loaded()


@pytest.mark.parametrize("off", ["off", "0"])
def test_the_cache_can_be_disabled(tmp_path, monkeypatch, fake_timings, off):
    monkeypatch.setenv(decisions.ENV_VAR, off)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    decisions.forget_loaded()
    assert decisions.cache_dir() is None
    with torch.no_grad():
        _layer()(torch.randn(3, 64))
    assert not (tmp_path / "xdg").exists()


def test_the_default_folder_is_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(decisions.ENV_VAR, raising=False)
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path / "sk"))
    assert decisions.cache_dir() == tmp_path / "sk"
    monkeypatch.delenv("SPARSEKERN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decisions.cache_dir() == tmp_path / "xdg" / "sparsekern"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert decisions.cache_dir() == tmp_path / "home" / ".cache" / "sparsekern"


def test_policy_cache_false_neither_reads_nor_writes(cache, fake_timings):
    with torch.no_grad():
        _layer(policy=Policy("auto", cache=False))(torch.randn(3, 64))
    assert _files(cache) == []


def test_the_environment_names_what_a_measurement_depends_on():
    env = decisions.environment(torch.device("cpu"))
    assert {"cpu", "isa", "threads", "torch", "sparsekern", "kernels", "dispatch_rules", "device"} <= set(env)
    assert env["torch"] == torch.__version__ and env["sparsekern"] == sparsekern.__version__


def test_tune_fills_the_cache_for_each_batch_size(cache, fake_timings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    sparsekern.sparsify(model, "2:4", min_features=0, show_progress=False)
    model.train()
    text = sparsekern.tune(model, [torch.randn(1, 128), torch.randn(32, 128)], show_progress=False)
    assert model.training  # restored
    assert len(fake_timings) == 4 and text.count("measured now") == 4
    decisions.forget_loaded()
    sparsekern.nn.clear_shared_choices()
    torch.manual_seed(0)
    again = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    sparsekern.sparsify(again, "2:4", min_features=0, show_progress=False)
    again.eval()
    with torch.no_grad():
        again(torch.randn(1, 128))
        again(torch.randn(20, 128))
    assert len(fake_timings) == 4
    assert sparsekern.explain(again).count("read from the tuning cache") == 4


def test_tune_refuses_no_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        sparsekern.tune(nn.Sequential(nn.Linear(4, 4)), [])


SECOND_PROCESS = textwrap.dedent('''
    import json, sys, time
    import torch
    from torch import nn
    import sparsekern
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    sparsekern.sparsify(model, "2:4", min_features=0, show_progress=False,
                        policy=sparsekern.nn.Policy("auto", reps=1))
    model.eval()
    xs = [torch.randn(1, 256), torch.randn(32, 256)]
    # the time spent reading the cache (its files and the environment they are keyed by)
    lookup, spent = sparsekern.decisions.lookup, [0.0]
    def timed_lookup(*args):
        t = time.perf_counter()
        try:
            return lookup(*args)
        finally:
            spent[0] += time.perf_counter() - t
    sparsekern.decisions.lookup = timed_lookup
    with torch.no_grad():
        t, c = time.perf_counter(), time.thread_time()
        for x in xs:
            model(x)
        first, first_cpu = time.perf_counter() - t, time.thread_time() - c
        t, c = time.perf_counter(), time.thread_time()
        for x in xs:
            model(x)
        second, second_cpu = time.perf_counter() - t, time.thread_time() - c
    print(json.dumps({"measurements": sparsekern.nn.measurement_count(), "first_ms": first * 1e3,
                      "second_ms": second * 1e3, "lookup_ms": spent[0] * 1e3,
                      "first_cpu_ms": first_cpu * 1e3, "second_cpu_ms": second_cpu * 1e3,
                      "explain": sparsekern.explain(model)}))
''')


def test_a_second_process_measures_nothing(tmp_path):
    """Two processes run the same model; the second reads every choice the first measured.
    Counted, not timed (the added time of the first call is printed, for the record)."""
    script = tmp_path / "second_process.py"
    script.write_text(SECOND_PROCESS)
    env = dict(os.environ, SPARSEKERN_TUNING_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    # 2 batch buckets x (the two identical 256x256 layers, the second confirming the first's
    # choice, and the 256x64 one)
    assert first["measurements"] == 6
    assert second["measurements"] == 0
    assert "measured now" not in second["explain"] and second["explain"].count("read from the tuning cache") == 6
    print(f"second process: first call of both batch sizes {second['first_ms']:.1f} ms wall, "
          f"{second['first_cpu_ms']:.1f} ms CPU (of which reading the cache {second['lookup_ms']:.1f} ms), then "
          f"{second['second_ms']:.1f} ms wall, {second['second_cpu_ms']:.1f} ms CPU; first process: "
          f"{first['first_ms']:.1f} ms wall")
