"""README and docs tables are generated from bench/results/ (bench/make_tables.py): the
committed files agree with the JSON, a hand edit or a hand-typed figure fails, every row of a
run is shown, the noise rule holds, and folders added later (model rows, a GPU run, new peer
variants) show up without a change to the script. The README stays short: two generated
summary tables (speed, quality), its links resolve in docs/RESULTS.md, and the quick start's two commands."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import make_tables as mt  # noqa: E402
from sparsekern import reporting  # noqa: E402

SCRIPT = os.path.join(ROOT, "bench", "make_tables.py")


def check(*args):
    return subprocess.run([sys.executable, SCRIPT, "--check", *args], capture_output=True, text=True, timeout=300)


def test_readme_and_docs_agree_with_the_results():
    r = check()
    assert r.returncode == 0, "README/docs differ from bench/results; run python bench/make_tables.py\n" + \
        r.stdout[-3000:] + r.stderr[-2000:]


def _tree(tmp_path):
    """A copy of README.md, docs/ and the results files the repository's tables use, to edit
    (not a git checkout: every results file in it counts)."""
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    for run in mt.load_runs():
        dst = tmp_path / run.path
        os.makedirs(dst.parent, exist_ok=True)
        shutil.copy(os.path.join(ROOT, run.path), dst)
    return tmp_path


def write_tables(root):
    subprocess.run([sys.executable, SCRIPT, "--root", str(root)], check=True, capture_output=True, timeout=300)


def test_check_fails_on_a_hand_edit_and_on_a_hand_typed_figure(tmp_path):
    root = _tree(tmp_path)
    write_tables(root)
    assert check("--root", str(root)).returncode == 0
    for page, marker in (("README.md", "summary"), ("docs/RESULTS.md", "cpu-kernels")):
        path = root / page
        text = path.read_text()
        start = text.index(f"<!-- table:{marker} -->")
        row = text.index("\n| ", start) + 1
        row = text.index("\n| ", row + 1) + 1  # the first row after the header
        row = text.index("\n| ", row + 1) + 1
        edited = text[:row] + text[row:].replace("x (", "5x (", 1)  # a better number typed into the table
        assert edited != text
        path.write_text(edited)
        r = check("--root", str(root))
        assert r.returncode == 1 and page in r.stderr
        path.write_text(text.replace("## Quick start\n", "The 2:4 kernel is 1.83x faster.\n\n## Quick start\n")
                        if page == "README.md" else text + "\nThe 2:4 kernel is 1.83x faster.\n")
        r = check("--root", str(root))
        assert r.returncode == 1 and "1.83x" in r.stderr
        path.write_text(text)
    assert check("--root", str(root)).returncode == 0
    (root / "bench" / "results" / "cpu-linear-20261128" / "cpu_linear.json").unlink()
    assert check("--root", str(root)).returncode == 1  # the JSON changed: the README must follow


def _table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("|---")][1:]


def test_every_kernel_row_is_shown_losing_ones_included():
    runs = mt.load_runs()
    run = next(r for r in runs if r.path.startswith("bench/results/cpu-linear-"))
    md = mt.TABLES["cpu-kernels"](runs)
    assert run.path in md and run.env["commit"] in md and run.env["device_name"] in md
    shown = _table_rows(md)
    sparse = [r for r in run.of("kernel") if r["provider"] != "torch.dense"]
    assert len(shown) == len(sparse)  # every non-dense row, each with its dense partner
    for r, cells in zip(sparse, shown):
        assert cells[2].startswith(r["provider"]) and cells[1] == str(r["batch"])
        assert cells[3].startswith(mt.num(r["median_ms"]))
    dense_in_table = {c[4] for c in shown}
    assert {mt.spread(r) for r in run.of("kernel") if r["provider"] == "torch.dense"} <= dense_in_table
    assert any("0." in c[5].split("x")[0] for c in shown), "a slower-than-dense row is missing"


def _row(median, p20, p80, **kw):
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, **kw}


def test_noise_rule():
    dense = _row(10.0, 9.5, 10.5)
    assert mt.speedup_cell(_row(5.0, 4.8, 5.2), dense) == "2.0x (1.8–2.2)"
    assert mt.speedup_cell(_row(9.0, 8.0, 10.0), dense).startswith("no difference")
    assert mt.speedup_cell(_row(20.0, 19.0, 21.0), dense).startswith("0.50x")
    # a noise floor from two identical runs widens "no difference"
    assert mt.speedup_cell(_row(9.0, 8.9, 9.1), dense).startswith("1.1x")
    assert mt.speedup_cell(_row(9.0, 8.9, 9.1, noise_floor_rel=0.15), dense).startswith("no difference")
    assert mt.speedup_cell(dense, dense) == "1 (baseline)"
    # a row the benchmark compared itself: its verdict and per-round range, the same formatter
    judged = _row(9.0, 8.0, 10.0, speedup=1.11, speedup_p20=0.97, speedup_p80=1.2, verdict="no difference")
    assert mt.speedup_cell(judged, dense) == "no difference (0.97–1.2)" == \
        reporting.ratio_text(1.11, "no difference", 0.97, 1.2)


def _write(path, env, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f)


def test_folders_added_later_show_up(tmp_path):
    root = _tree(tmp_path)
    results = root / "bench" / "results"
    runs = mt.load_runs(str(results), str(root))
    assert "No GPU results yet" in mt.TABLES["gpu"](runs)
    before = mt.TABLES["cpu-models"](runs)
    assert "bench/results/cpu-" in before  # the newest committed CPU run with model rows
    # model-level rows as the models suite writes them (sparsekern.bench.common.compare: the
    # dense model timed twice for the noise floor, paired per-round ratios, a verdict)
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc123def456", "device": "cpu", "threads": 2,
           "cpu": "Test CPU", "device_name": "Test CPU", "torch": "2.14.1",
           "machine": {"host": "h", "cpus": 2, "loadavg": [1.5, 1.2, 1.0]}}
    rows = []
    for variant, ms, verdict in (("dense (again)", 10.1, "no difference"), ("dense", 10.0, "no difference"),
                                 ("2:4", 5.0, "faster"), ("unstructured 70%", 9.8, "no difference")):
        for batch in (1, 8):
            sp = 10.0 / ms
            rows.append({"op": "model", "model": "llama", "model_desc": "HF LlamaForCausalLM, tiny",
                         "variant": variant, "baseline": "dense", "metric": "decode_tokens_per_s", "batch": batch,
                         "median_ms": ms * batch, "p20_ms": ms * batch * 0.97, "p80_ms": ms * batch * 1.03,
                         "speedup": sp, "speedup_p20": sp * 0.95, "speedup_p80": sp * 1.05, "noise_floor": 0.01,
                         "verdict": verdict, "value": 1e3 / ms, "speedup_vs_dense": sp,
                         "sparse_layers": 0 if variant.startswith("dense") else 28,
                         "paths": None if variant.startswith("dense") else "28 layers, backend cpp; rows<=1: sparse 28"})
    rows.append({"op": "model", "model": "vit", "variant": "2:4", "error": "RuntimeError: boom"})
    _write(str(results / "cpu-models-20990102" / "results.json"), env, rows)
    # a GPU run as bench/bench_gpu_linear.py writes it (microseconds, cuBLAS as dense)
    genv = dict(env, device="cuda", gpu="NVIDIA H100 80GB HBM3", device_name="NVIDIA H100 80GB HBM3", cuda="13.0")
    grows = [{"suite": "linear", "op": "nm_linear", "provider": "cublas", "pattern": "2:4", "density": 0.5,
              "dtype": "bfloat16", "shape": "4096x4096", "batch": 1, "us": 40.0, "p20_us": 39.0, "p80_us": 41.0,
              "eager_us": 50.0, "x_cublas": 1.0},
             {"suite": "linear", "op": "nm_linear", "provider": "cuda", "pattern": "2:4", "density": 0.5,
              "dtype": "bfloat16", "shape": "4096x4096", "batch": 1, "us": 25.0, "p20_us": 24.0, "p80_us": 26.0,
              "eager_us": 35.0, "x_cublas": 1.6},
             {"suite": "e2e", "op": "llama_decoder", "provider": "2:4", "dtype": "bfloat16", "shape": "dim4096",
              "prefill_tok_per_s": 9000.0, "decode_tok_per_s": 80.0}]
    _write(str(results / "h100-20990103" / "bench.json"), genv, grows)
    with open(results / "h100-20990103" / "tuning.json", "w") as f:  # not a results file: skipped
        json.dump({"format": "sparsekern-tuning-1", "rows": []}, f)
    (results / "h100-20990103" / "summary.log").write_text("log\n")

    runs = mt.load_runs(str(results), str(root))
    models = mt.TABLES["cpu-models"](runs)
    assert "cpu-models-20990102" in models and "abc123def456" in models and "Test CPU" in models
    shown = _table_rows(models)
    assert len(shown) == 8 and "load average 1.5" in models and "HF LlamaForCausalLM, tiny" in models
    cells = {(c[1], c[3]): c[6] for c in shown}
    assert cells[("2:4", "1")] == "2.0x (1.9–2.1)" and cells[("dense", "8")] == "1 (baseline)"
    assert cells[("unstructured 70%", "1")].startswith("no difference")  # the suite's own verdict
    assert cells[("dense (again)", "1")].startswith("no difference")
    assert "rows<=1: sparse 28" in models
    assert "vit 2:4" in models and "boom" in models  # did-not-run rows are listed
    gpu = mt.TABLES["gpu"](runs)
    assert "No GPU results yet" not in gpu and "NVIDIA H100" in gpu and "1.6x" in gpu and "80.0" in gpu
    assert "no GPU" not in mt.TABLES["all-results"](runs)
    # and the script rewrites the README from them, after which --check passes again
    r = check("--root", str(root))
    assert r.returncode == 1
    write_tables(root)
    assert check("--root", str(root)).returncode == 0
    readme = (root / "README.md").read_text()
    assert "cpu-models-20990102" in readme and "Test CPU" in readme  # the summary: a new machine
    assert "No GPU run yet" not in readme and "time kernels, not models" in readme
    assert "NVIDIA H100" in (root / "docs" / "RESULTS.md").read_text()


def test_limits_table_and_the_goal_against_a_peer_variant(tmp_path):
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc123def456", "device": "cpu", "threads": 2,
           "device_name": "Test CPU", "copy_gbs": 20.0, "fma_peak_gflops": 300.0, "fma_lanes": 16,
           "gemm_gflops": 250.0, "roof_threads": 2}
    rows = []
    for variant, ms, sp in (("dense", 100.0, 1.0), ("dense channels-last", 80.0, 1.25), ("2:4", 62.5, 1.6)):
        rows.append({"op": "model", "model": "resnet50", "variant": variant, "baseline": "dense",
                     "metric": "images_per_s", "batch": 4, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "speedup": sp, "speedup_p20": sp, "speedup_p80": sp, "verdict": "faster", "noise_floor": 0.01,
                     "share_sparse": 0.5 if variant == "2:4" else 0.0, "share_gemm": 0.2 if variant == "2:4" else 0.7,
                     "share_attention": 0.0, "share_other": 0.3, "weight_bytes": 100 * 2**20,
                     "kept_macs": 10**9 if variant == "2:4" else 2 * 10**9, "weight_gb_per_s": 1.5,
                     "layer_gflop_per_s": 45.0})
    rows.append({"op": "model", "model": "resnet50", "variant": "dense (again)", "baseline": "dense",
                 "metric": "images_per_s", "batch": 4, "median_ms": 101.0, "p20_ms": 101.0, "p80_ms": 101.0,
                 "speedup": 0.99, "verdict": "no difference", "noise_floor": 0.01})
    _write(str(tmp_path / "bench" / "results" / "cpu-models-20990102" / "results.json"), env, rows)
    runs = mt.load_runs(str(tmp_path / "bench" / "results"), str(tmp_path))
    limits = mt.TABLES["cpu-limits"](runs)
    shown = _table_rows(limits)
    assert [c[2] for c in shown] == ["dense", "dense channels-last", "2:4"]  # every profiled row, not the repeat
    two4 = shown[2]
    assert two4[4:8] == ["50%", "20%", "0%", "30%"] and two4[8] == "100" and two4[9] == "1.50 (8%)"
    assert two4[10] == "2.00" and two4[11] == "45.0 (15%)"
    assert "copy bandwidth 20.0 GB/s" in limits and "FMA peak 300 GFLOP/s" in limits and "250 GFLOP/s" in limits
    goals = {c[0]: c for c in _table_rows(mt.TABLES["cpu-goals"](runs))}
    assert goals["ResNet-50, batch 4"][3].startswith("1.60x") and goals["ResNet-50, batch 4"][4] == "met"
    peer = goals["ResNet-50, batch 4, against dense channels-last"]
    assert peer[3].startswith("1.28x") and peer[4] == "met"  # 1.6 / 1.25
    never = goals["never slower: every model row"]
    assert "2:4" in never[3] and "channels-last" not in never[3]  # the peer is not a sparse row


def test_compression_goals_take_each_goal_from_the_newest_run_that_measures_it(tmp_path):
    """Issue 28's table: ratios against the named peer of the same run, the decode ceilings,
    busy rows and PASSIVE runs never counted, and a goal nobody measured says so."""
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc123def456", "device": "cpu", "threads": 2,
           "device_name": "Test CPU", "copy_gbs": 40.0, "fma_peak_gflops": 200.0}

    def row(variant, speedup, load="quiet", **kw):
        return {"op": "model", "model": "llama", "variant": variant, "baseline": "dense", "load": load,
                "metric": "decode_tokens_per_s", "batch": 1, "median_ms": 10.0 / speedup, "speedup": speedup,
                "speedup_p20": speedup * 0.98, "speedup_p80": speedup * 1.02, "verdict": "faster", **kw}
    rows = [row("dense", 1.0, weight_bytes=800, weight_gb_per_s=10.0),
            row("torch int8 dynamic", 4.0, weight_bytes=200, weight_gb_per_s=20.0),
            row("2:4 int8", 6.4, weight_bytes=100, weight_gb_per_s=19.0, layer_gflop_per_s=50.0, share_sparse=0.5),
            row("2:4", 2.0, weight_bytes=400, weight_gb_per_s=12.0),
            row("2:4 int8", 1.0, load="one core busy")]  # never the source of a quiet goal
    _write(str(tmp_path / "bench" / "results" / "cpu-models-20990102" / "results.json"), env, rows)
    # A newer run with PASSIVE waiting (OMP_WAIT_POLICY set): shown elsewhere, never a goal's source.
    _write(str(tmp_path / "bench" / "results" / "cpu-models-20990103" / "results.json"),
           {**env, "date": "2099-01-03T00:00:00+00:00", "OMP_WAIT_POLICY": "PASSIVE"},
           [row("torch int8 dynamic", 4.0), row("2:4 int8", 12.0)])
    _write(str(tmp_path / "bench" / "results" / "cpu-memory-20990102" / "results.json"), env,
           [{"op": "memory", "variant": "2:4", "resident_mb": 70.0, "resident_over_dense": 0.7},
            {"op": "memory", "variant": "2:4 int8", "resident_mb": 30.0, "resident_over_dense": 0.3,
             "steady_mb": 50.0, "steady_over_dense": 0.5},
            {"op": "memory", "variant": "2:4 int8 loaded", "resident_mb": 30.0, "resident_over_dense": 0.3,
             "steady_mb": 31.0, "steady_over_dense": 0.31, "resident_mb_each": [29.0, 30.0, 41.0]}])
    runs = mt.load_runs(str(tmp_path / "bench" / "results"), str(tmp_path))
    shown = _table_rows(mt.TABLES["compression-goals"](runs))
    by = {(c[0], c[1]): c for c in shown}
    int8 = by[("Llama decode, batch 1", "2:4 int8")]
    assert int8[4].startswith("1.60x") and int8[5] == "met" and "cpu-models-20990102" in int8[7]  # 6.4 / 4
    assert "19.0 GB/s (48% of copy)" in int8[6] and "50.0 GFLOP/s (25% of the fp32 FMA peak)" in int8[6]
    assert "reads 0.50 of the peer's weight bytes, so 2.00x" in int8[6]  # 100 / 200 bytes
    assert "so 3.20x the peer if they took none" in int8[6]  # 1.6 / (1 - 0.5)
    assert by[("Llama decode, batch 1", "unstructured 70% int8")][4] == "not measured"
    rate = by[("Llama decode, batch 1: weight bytes per second", "every row (2)")]
    assert rate[4].startswith("0.60x (2:4) to 0.95x (2:4 int8); 1 of 2 rows below") and rate[5] == "not met"
    mem = by[("resident memory, ViT-B/16 after batches 1, 4, 64", "2:4")]
    assert mem[4].startswith("0.700x") and mem[5] == "not met"
    steady = by[("resident memory, ViT-B/16 after batches 1, 4, 64", "2:4 int8")]  # one pass within, steady not
    assert "after three more batches of 64, 0.500x" in steady[4] and steady[5] == "not met"
    loaded = by[("resident memory, ViT-B/16 after batches 1, 4, 64", "2:4 int8, loaded from its checkpoint")]
    assert loaded[4].startswith("0.300x (30.0 MB; median of 3 processes, 29.0–41.0 MB)") and loaded[5] == "met"
    assert by[("resident memory, ViT-B/16 after batches 1, 4, 64", "2:4, loaded from its checkpoint")][4] == \
        "not measured"
    assert by[("real MiniLM, 16 sentences", "2:4 + int8, joint SparseGPT")][4] == "not measured"


def test_ops_table_follows_the_dispatch_table_and_says_what_has_run_on_a_gpu(tmp_path):
    from sparsekern import ops

    not_run = "built, not yet run on a GPU"
    md = mt.TABLES["ops"](mt.load_runs())
    shown = {c[0].strip("`"): c for c in _table_rows(md)}
    assert set(shown) == set(ops.OPS)
    for name, spec in ops.OPS.items():
        c = shown[name]
        assert c[2].startswith("yes") == spec.cpp
        # no committed run comes from a GPU: no GPU cell may say "yes"
        assert (c[3] == not_run) == spec.cuda and (c[3] == "—") == (not spec.cuda)
        assert c[4].startswith(not_run) == (spec.triton is not None)
        assert (c[5] == not_run) == spec.semi_structured
    assert not any(c.startswith("yes") for row in shown.values() for c in row[3:])
    # a GPU run that timed nm_linear's CUDA kernel and cuSPARSELt turns those two cells to "yes"
    env = {"date": "2099-01-03T00:00:00+00:00", "commit": "abc", "device": "cuda", "gpu": "NVIDIA H100",
           "device_name": "NVIDIA H100", "cuda": "13.0"}
    rows = [{"op": "nm_linear", "provider": p, "pattern": "2:4", "density": 0.5, "dtype": "bfloat16",
             "shape": "4096x4096", "batch": 1, "us": 40.0} for p in ("cublas", "cuda", "cusparselt")]
    rows.append({"op": "nm_linear", "provider": "triton", "pattern": "2:4", "error": "RuntimeError: boom"})
    _write(str(tmp_path / "bench" / "results" / "h100-20990103" / "bench.json"), env, rows)
    shown = {c[0].strip("`"): c for c in _table_rows(mt.TABLES["ops"](
        mt.load_runs(str(tmp_path / "bench" / "results"), str(tmp_path))))}
    assert shown["nm_linear"][3:] == ["yes, ran on a GPU", not_run, "yes, ran on a GPU"]  # triton failed
    assert shown["bitmask_linear"][3] == not_run


def _model_rows(model, metric, batch, variants):
    """Rows as the models suite writes them: (variant, speed-up, verdict) with a dense
    baseline and its repeat."""
    rows = []
    for variant, sp, verdict in [("dense", 1.0, "baseline"), ("dense (again)", 0.99, "no difference")] + variants:
        rows.append({"op": "model", "model": model, "variant": variant, "baseline": "dense", "metric": metric,
                     "batch": batch, "median_ms": 100.0 / sp, "p20_ms": 95.0 / sp, "p80_ms": 105.0 / sp,
                     "speedup": sp, "speedup_p20": sp * 0.9, "speedup_p80": sp * 1.1, "noise_floor": 0.01,
                     "verdict": verdict, "model_desc": f"{model}, tiny"})
    return rows


def test_summary_shows_the_best_variant_beside_every_peer_new_peers_included(tmp_path):
    """Peer variants the models suite adds later ("dense bf16", "torch int8 dynamic") become
    summary rows without a change to the script, a peer that wins is marked fastest, and
    the never-slower goal does not count peers as sparse rows."""
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc123def456", "device": "cpu", "threads": 2,
           "cpu": "Test CPU", "device_name": "Test CPU"}
    rows = _model_rows("llama", "decode_tokens_per_s", 1, [
        ("2:4", 1.4, "faster"), ("unstructured 70%", 1.6, "faster"), ("dense bf16", 1.9, "faster"),
        ("torch int8 dynamic", 0.5, "slower")])
    rows += _model_rows("resnet50", "images_per_s", 4,
                        [("2:4", 1.3, "faster"), ("dense channels-last", 1.2, "faster")])
    rows.append({"op": "model", "model": "vit", "variant": "2:4", "error": "RuntimeError: boom"})
    _write(str(tmp_path / "bench" / "results" / "cpu-models-20990102" / "results.json"), env, rows)
    qenv = dict(env, date="2099-01-03T00:00:00+00:00", cpu="Other CPU", device_name="Other CPU")
    _write(str(tmp_path / "bench" / "results" / "cpu-quick-20990103" / "results.json"), qenv,
           _model_rows("llama", "decode_tokens_per_s", 1, [("2:4", 9.0, "faster")]))  # a quick run: left out
    # a newer full run with libgomp's wait policy changed: shown in RESULTS.md, not the summary's source
    penv = dict(env, date="2099-01-04T00:00:00+00:00", OMP_WAIT_POLICY="PASSIVE")
    _write(str(tmp_path / "bench" / "results" / "cpu-models-20990104-passive" / "results.json"), penv,
           _model_rows("llama", "decode_tokens_per_s", 1, [("2:4", 7.0, "faster")]))
    runs = mt.load_runs(str(tmp_path / "bench" / "results"), str(tmp_path))
    md = mt.TABLES["summary"](runs)
    shown = _table_rows(md)
    got = [(c[1], c[3], c[4], c[5]) for c in shown]
    assert got == [("llama", "sparsekern unstructured 70% (best of 2)", "1.60x (1.44–1.76)", ""),
                   ("llama", "peer: dense bf16", "1.90x (1.71–2.09)", "yes"),
                   ("llama", "peer: torch int8 dynamic", "0.500x (0.450–0.550)", ""),
                   ("resnet50", "sparsekern 2:4", "1.30x (1.17–1.43)", "yes"),
                   ("resnet50", "peer: dense channels-last", "1.20x (1.08–1.32)", "")]
    assert all(c[0] == "Test CPU, 2 threads" for c in shown)
    assert all(c[6] == "[cpu-models-20990102](docs/RESULTS.md#cpu-models-20990102)" for c in shown)
    assert "No GPU run yet" in md and "built, not yet run on a GPU" in md and "llama, tiny" in md
    never = {c[0]: c for c in _table_rows(mt.TABLES["cpu-goals"](runs))}["never slower: every model row"]
    assert "3 rows" in never[3] and "int8" not in never[3] and never[4] == "met"
    passive = [r for r in runs if "passive" in r.path]
    assert passive and "OMP_WAIT_POLICY=PASSIVE" in passive[0].caption()
    assert mt.newest(runs, "model", False).path.startswith("bench/results/cpu-models-20990102/")


def test_readme_is_short_and_its_links_resolve():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) < 200
    # two summaries (speed, quality); every run's own tables live in RESULTS.md
    assert text.count("<!-- table:") == 2 and "<!-- table:summary -->" in text and "<!-- table:quality-summary -->" in text
    # .ci/run reads the quick start's first bash block and needs exactly its two commands
    quick = text[text.index("## Quick start"):]
    block = quick[quick.index("```bash\n") + 8:]
    assert len(block[:block.index("```")].strip().splitlines()) == 2
    results = open(os.path.join(ROOT, "docs", "RESULTS.md")).read()
    ids = set(re.findall(r'<a id="([^"]+)"></a>', results))
    slugs = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", results, re.M)}
    links = re.findall(r"\]\(docs/RESULTS\.md#([^)]+)\)", text)
    assert links and set(links) <= ids | slugs
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_kernel_rows_name_the_op_their_pattern_runs():
    assert [mt.op_of({"op": "linear", "pattern": p}) for p in ("2:4", "unstructured", "block32", "dense", "?")] == \
        ["nm_linear", "bitmask_linear", "block_linear", "linear", "linear"]
    assert mt.op_of({"op": "nm_conv2d", "pattern": "2:4"}) == "nm_conv2d"


def test_unknown_marker_and_unclosed_marker_are_errors():
    with pytest.raises(SystemExit, match="unknown table"):
        mt.rewrite("<!-- table:nonsense -->\n<!-- /table -->\n", [], {})
    with pytest.raises(SystemExit, match="no '<!-- /table -->'"):
        mt.rewrite("<!-- table:gpu -->\nstale\n", [], {})


def test_in_a_checkout_only_results_added_to_git_count(tmp_path):
    """A benchmark's output left in the working tree does not change the tables (or fail the
    check) until it is added to git; then it shows."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = _tree(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc", "device": "cpu", "threads": 1, "cpu": "C",
           "device_name": "C"}
    rows = [{"op": "model", "model": "m", "variant": "dense", "metric": "images_per_s", "batch": 1,
             "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}]
    _write(str(root / "bench" / "results" / "cpu-models-20990102" / "results.json"), env, rows)
    results = str(root / "bench" / "results")
    assert "cpu-models-20990102" not in mt.TABLES["cpu-models"](mt.load_runs(results, str(root)))
    assert mt.UNTRACKED == [os.path.join("bench", "results", "cpu-models-20990102", "results.json")]
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    assert "cpu-models-20990102" in mt.TABLES["cpu-models"](mt.load_runs(results, str(root)))
    assert mt.UNTRACKED == []


def test_quality_summary_shows_recovery_and_plan_beside_the_peers_that_score_higher(tmp_path):
    """The README's quality table: every one-shot and recovery row of the newest recovery run
    and the optimize plan, each with the peers of its own run that score higher; a folder of
    JSON in another shape is still listed, flattened."""
    env = {"date": "2099-01-02T00:00:00+00:00", "commit": "abc123def456", "device": "cpu", "threads": 1,
           "cpu": "Test CPU", "device_name": "Test CPU"}
    base = {"op": "quality", "model": "tiny", "metric": "cosine_to_dense", "eval": 64}
    rows = [dict(base, method="one-shot", pattern="2:4", value=0.80),
            dict(base, method="one-shot + recovery", pattern="2:4", value=0.95),
            dict(base, method="torch int8 dynamic", pattern="dense", value=0.90, peer="torch int8 dynamic")]
    results = tmp_path / "bench" / "results"
    _write(str(results / "quality-20990102-recovery" / "results.json"), env, rows)
    _write(str(results / "optimize-20990103" / "report.json"), dict(env, date="2099-01-03T00:00:00+00:00",
                                                                       held_out_sentences=32),
           [{"variant": "plan", "kind": "plan", "score": 0.97, "latency_ms": 5.0},
            {"variant": "dense bf16", "kind": "peer", "score": 0.99, "latency_ms": 9.0}])
    os.makedirs(results / "probe-20990104")
    with open(results / "probe-20990104" / "probe.json", "w") as f:
        json.dump({"before": {"commit": "abc", "ms": {"dense": 2.0, "2:4": 1.5}}}, f)
    runs = mt.load_runs(str(results), str(tmp_path))
    shown = {(c[1], c[2]): c[3] for c in _table_rows(mt.TABLES["quality-summary"](runs))}
    assert shown == {("sparsekern one-shot, 2:4", "0.8000"): "torch int8 dynamic (0.9000)",
                     ("sparsekern one-shot + recovery, 2:4", "0.9500"): "none",
                     ("peer: torch int8 dynamic", "0.9000"): "",
                     ("sparsekern optimize plan", "0.9700"): "dense bf16 (0.9900)",
                     ("peer: dense bf16", "0.9900"): ""}
    every = mt.TABLES["all-results"](runs)
    assert "probe-20990104" in every and "| before / ms | 2.00 | 1.50 |" in every and "| before | abc |" in every
