"""Resident memory of a model as a user holds it: one fresh process per (model, variant).

The process imports torch and sparsekern, reads its resident set size (VmRSS, the
baseline), builds the model (timm's ViT-B/16 with pretrained=False, or another of the
models suite), applies the variant (sparsify with a pattern and value precision, or a peer:
dense bf16, torch's int8 dynamic, torchao's int8 and int4 weight-only), runs batches of 1, 4 and 64 images in inference mode,
and reads VmRSS again after each (resident_mb: after the 64), then runs batches of 64
STEADY_REPEATS more times (steady_mb: the most it held after any of them, what a serving
process settles at). The figures are resident bytes above the baseline, so the
interpreter and its libraries (about 0.7 GB with a CUDA build of torch) are not counted for
anyone. Nothing is trimmed or collected beyond what sparsekern and torch do themselves: this
is what `top` shows the user.

    python -m sparsekern.bench.memory VARIANT [--model vit_base_patch16_224] [--size 224]

prints one JSON line; `measure(variants)` runs each in a subprocess and returns the rows.
Linux only (VmRSS from /proc/self/status).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

# variant -> how it is made: ("sparsify", kwargs) or ("peer", peer name) or ("dense", None)
VARIANTS = {
    "dense": ("dense", None),
    "2:4": ("sparsify", {"pattern": "2:4"}),
    "2:4 int8": ("sparsify", {"pattern": "2:4", "quantize": "int8"}),
    "2:4 int4 g128": ("sparsify", {"pattern": "2:4", "quantize": "int4", "group_size": 128}),
    "unstructured 70% int8": ("sparsify", {"pattern": "unstructured", "sparsity": 0.7, "quantize": "int8"}),
    "dense bf16": ("peer", "dense bf16"),
    "torch int8 dynamic": ("peer", "torch int8 dynamic"),
    "torchao int8 weight-only": ("peer", "torchao int8 weight-only"),
    "torchao int4 weight-only": ("peer", "torchao int4 weight-only"),
}
BATCHES = (1, 4, 64)
# Then the last batch again this many times: glibc keeps freed heap pages (its trim threshold
# rises with the largest block freed, up to 64 MiB), so the resident set after one pass
# depends on which frees happened to trim; after a few more calls it settles (steady_mb).
STEADY_REPEATS = 3


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(variant: str, model_name: str, size: int, threads: int) -> dict:
    """Runs in the fresh process: the row of one variant."""
    import torch

    from .. import models
    from ..sparsify import sparsify
    from . import peers

    torch.set_num_threads(threads)
    import timm  # noqa: F401  (its import is part of the baseline, not of the model)

    base_mb = _rss_mb()
    torch.manual_seed(0)
    model = models.timm_vit(model_name, **({} if size == 224 else {"img_size": size})).eval()
    how, arg = VARIANTS[variant]
    if how == "sparsify":
        model, _ = sparsify(model, method="l1", show_progress=False, **arg)
    elif how == "peer":
        # build() returns (peer model, the model it is checked against): the fp32 original,
        # which a user of the peer would not keep
        try:
            model = peers.build(arg, model, "cpu")[0]
        except (peers.Unavailable, peers.NotApplicable) as e:  # not installed, no kernel here: a skipped row
            return peers.skipped_row(arg, str(e) or type(e).__name__,
                                     {"model": model_name, "variant": variant, "threads": threads})
        import gc

        gc.collect()
    row = {"model": model_name, "variant": variant, "baseline_mb": base_mb, "param_bytes": models.param_bytes(model),
           "built_mb": _rss_mb() - base_mb, "threads": threads}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.inference_mode():
        for b in BATCHES:
            model(torch.randn(b, 3, size, size, dtype=dtype))
            row[f"after_batch_{b}_mb"] = _rss_mb() - base_mb
        steady = []
        for _ in range(STEADY_REPEATS):
            model(torch.randn(BATCHES[-1], 3, size, size, dtype=dtype))
            steady.append(_rss_mb() - base_mb)
    row["resident_mb"] = row[f"after_batch_{BATCHES[-1]}_mb"]
    row["steady_mb"] = max(steady)
    return row


def measure(variants=tuple(VARIANTS), model_name: str = "vit_base_patch16_224", size: int = 224,
            threads: int = 2, show=print) -> list[dict]:
    """Each variant in a fresh process (rows; a variant that fails is a row with its error);
    `resident_over_dense`: its resident bytes over the dense fp32 model's, same run (after
    batches 1, 4 and 64); `steady_over_dense`: the same after STEADY_REPEATS more batches of 64."""
    rows = []
    for v in variants:
        cmd = [sys.executable, "-m", "sparsekern.bench.memory", v, "--model", model_name, "--size", str(size),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            rows.append({"model": model_name, "variant": v, "error": (proc.stderr or proc.stdout)[-400:]})
        else:
            rows.append(json.loads(lines[-1]))
        show(f"   memory {v}: " + (f"{rows[-1]['resident_mb']:.0f} MB above the interpreter"
                                    if "resident_mb" in rows[-1] else
                                    f"{'skipped' if rows[-1].get('skipped') else 'did not run'}: {rows[-1]['error']}"))
    dense = next((r for r in rows if r["variant"] == "dense" and "resident_mb" in r), None)
    for r in rows:
        if dense and "resident_mb" in r:
            r["resident_over_dense"] = r["resident_mb"] / dense["resident_mb"]
            r["steady_over_dense"] = r["steady_mb"] / dense["steady_mb"]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=list(VARIANTS))
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    print(json.dumps(child(a.variant, a.model, a.size, a.threads)), flush=True)


if __name__ == "__main__":
    main()
