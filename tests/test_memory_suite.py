"""The memory suite (sparsekern.bench.memory): each variant in a fresh process, resident bytes
above the interpreter after batches 1, 4 and 64, ratios against dense fp32 of the same run, a
variant that fails is a row with its error. A small timm ViT keeps it to seconds; nothing here
asserts a size beyond what the formats themselves guarantee."""
import sys

import pytest

from sparsekern.bench import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")


def test_each_variant_in_its_own_process_with_ratios_against_dense():
    pytest.importorskip("timm")
    rows = memory.measure(["dense", "2:4 int8", "dense bf16"], model_name="vit_tiny_patch16_224", size=112,
                          threads=1, show=lambda *a: None)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "2:4 int8", "dense bf16"} and not [r for r in rows if "error" in r], rows
    for r in rows:
        assert r["model"] == "vit_tiny_patch16_224" and r["baseline_mb"] > 0 and r["param_bytes"] > 0
        assert r["resident_mb"] == r["after_batch_64_mb"] and {"after_batch_1_mb", "after_batch_4_mb"} <= set(r)
        assert r["resident_over_dense"] == pytest.approx(r["resident_mb"] / by["dense"]["resident_mb"])
        assert r["steady_mb"] > 0 and r["steady_over_dense"] == pytest.approx(r["steady_mb"] / by["dense"]["steady_mb"])
    assert by["dense"]["resident_over_dense"] == 1.0
    # what each variant stores: int8 values and 2-bit indices of half the pruned weights, bf16 halves
    assert by["2:4 int8"]["param_bytes"] < by["dense bf16"]["param_bytes"] < by["dense"]["param_bytes"]


def test_a_peer_that_cannot_run_here_is_a_skipped_row_saying_why():
    pytest.importorskip("timm")
    # torchao's CPU int4 kernel needs output channels divisible by 16 (the 1000-class head is
    # not), and without torchao the peer is not installed: skipped either way, with the reason
    rows = memory.measure(["torchao int4 weight-only"], model_name="vit_tiny_patch16_224", size=112, threads=1,
                          show=lambda *a: None)
    assert len(rows) == 1 and rows[0]["skipped"] is True and rows[0]["error"] and "resident_mb" not in rows[0]


def test_a_variant_that_fails_is_a_row_with_its_error():
    rows = memory.measure(["dense"], model_name="no_such_model_anywhere", size=112, threads=1, show=lambda *a: None)
    assert len(rows) == 1 and rows[0]["variant"] == "dense" and rows[0]["error"] and "resident_mb" not in rows[0]
    with pytest.raises(SystemExit):
        memory.main(["not a variant"])


def test_a_loaded_variant_reads_a_checkpoint_another_process_saved_and_repeats_give_medians():
    pytest.importorskip("timm")
    rows = memory.measure(["dense", "2:4 int8 loaded", "2:4 int8"], model_name="vit_tiny_patch16_224", size=112,
                          threads=1, show=lambda *a: None, repeats=3)
    by = {r["variant"]: r for r in rows}
    assert not [r for r in rows if "error" in r], rows
    for r in rows:
        assert r["processes"] == 3 and len(r["resident_mb_each"]) == 3 and len(r["steady_mb_each"]) == 3
        assert r["resident_mb"] == sorted(r["resident_mb_each"])[1] and r["steady_mb"] == sorted(r["steady_mb_each"])[1]
    # the loaded model holds what sparsify built, and never a dense weight
    assert by["2:4 int8 loaded"]["param_bytes"] == by["2:4 int8"]["param_bytes"]
    assert by["2:4 int8 loaded"]["resident_over_dense"] == pytest.approx(
        by["2:4 int8 loaded"]["resident_mb"] / by["dense"]["resident_mb"])


def test_a_loaded_variant_needs_its_checkpoint_and_repeats_must_be_positive():
    with pytest.raises(ValueError, match="--checkpoint"):
        memory.child("2:4 int8 loaded", "vit_tiny_patch16_224", 112, 1)
    with pytest.raises(ValueError, match="not loaded from a checkpoint"):
        memory.save_checkpoint("2:4 int8", "vit_tiny_patch16_224", 112, "/nonexistent/x.pt")
    with pytest.raises(ValueError, match="repeats"):
        memory.measure(["dense"], repeats=0)
