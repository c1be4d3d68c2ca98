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

Two ways to hold a sparse model are measured, as users do:
- "2:4", "2:4 int8", ...: sparsify in the process that serves, the dense model built first;
- "2:4 loaded", "2:4 int8 loaded": a checkpoint that an earlier process saved
  (torch.save of the sparsified model's state dict), loaded with `sparsekern.load` into the
  model built on the meta device, so no dense weight ever exists in the serving process.

The two differ by more than the weights: sparsify's per-layer work (scores, masks, the
quantized values) leaves free holes in glibc's main heap between objects that live on, and
the inference batches' transient tensors later land in those holes, which the process then
keeps resident. A loaded model's heap has no such holes. How far the first way grows varies
from process to process (the holes' layout is not repeatable), so `measure(repeats=R)` runs
every variant in R fresh processes, interleaved, and reports the median and the spread.

    python -m sparsekern.bench.memory VARIANT [--model vit_base_patch16_224] [--size 224]

prints one JSON line; `measure(variants)` runs each in a subprocess and returns the rows.
Linux only (VmRSS from /proc/self/status).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# variant -> how it is made: ("sparsify", kwargs), ("load", the sparsify kwargs its checkpoint was
# saved with), ("peer", peer name) or ("dense", None)
VARIANTS = {
    "dense": ("dense", None),
    "2:4": ("sparsify", {"pattern": "2:4"}),
    "2:4 int8": ("sparsify", {"pattern": "2:4", "quantize": "int8"}),
    "2:4 int4 g128": ("sparsify", {"pattern": "2:4", "quantize": "int4", "group_size": 128}),
    "unstructured 70% int8": ("sparsify", {"pattern": "unstructured", "sparsity": 0.7, "quantize": "int8"}),
    "2:4 loaded": ("load", {"pattern": "2:4"}),
    "2:4 int8 loaded": ("load", {"pattern": "2:4", "quantize": "int8"}),
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


def _build(model_name: str, size: int):
    from .. import models

    return models.timm_vit(model_name, **({} if size == 224 else {"img_size": size})).eval()


def save_checkpoint(variant: str, model_name: str, size: int, path: str) -> None:
    """Builds and sparsifies the model as `variant` (a "load" variant) says and saves its
    state dict to `path` (torch.save): what a user ships to the serving process."""
    import torch

    from ..sparsify import sparsify

    how, arg = VARIANTS[variant]
    if how != "load":
        raise ValueError(f"save_checkpoint: variant {variant!r} is not loaded from a checkpoint")
    torch.manual_seed(0)
    model, _ = sparsify(_build(model_name, size), method="l1", show_progress=False, **arg)
    torch.save(model.state_dict(), path)


def child(variant: str, model_name: str, size: int, threads: int, checkpoint: str | None = None) -> dict:
    """Runs in the fresh process: the row of one variant (a "load" variant reads `checkpoint`,
    which save_checkpoint wrote in another process)."""
    how, arg = VARIANTS[variant]
    if how == "load" and not checkpoint:
        raise ValueError(f"variant {variant!r} needs --checkpoint (a file save_checkpoint wrote)")
    import torch

    from .. import models, nn as sparse_nn
    from ..serialization import load
    from ..sparsify import sparsify
    from . import peers

    torch.set_num_threads(threads)
    import timm  # noqa: F401  (its import is part of the baseline, not of the model)

    base_mb = _rss_mb()
    torch.manual_seed(0)
    if how == "load":
        with torch.device("meta"):  # structure only: load() assigns the saved tensors
            model = _build(model_name, size)
        load(model, checkpoint)
    else:
        model = _build(model_name, size)
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
    # Layers whose first call of a batch size measured its paths (the tuning cache had no
    # choice for them): that measurement builds and frees dense weights in this process.
    row["path_measurements"] = sparse_nn.measurement_count()
    return row


def _run_child(v: str, model_name: str, size: int, threads: int, workdir: str) -> dict:
    base = [sys.executable, "-m", "sparsekern.bench.memory", v, "--model", model_name, "--size", str(size),
            "--threads", str(threads)]
    if VARIANTS[v][0] == "load":
        path = os.path.join(workdir, v.replace(" ", "_").replace(":", "-") + ".pt")
        if not os.path.exists(path):  # saved once per run, by a process of its own
            proc = subprocess.run(base + ["--save", path], capture_output=True, text=True, timeout=1800)
            if proc.returncode or not os.path.exists(path):
                return {"model": model_name, "variant": v, "error": "saving its checkpoint failed: " +
                        (proc.stderr or proc.stdout)[-400:]}
        base += ["--checkpoint", path]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"model": model_name, "variant": v, "error": (proc.stderr or proc.stdout)[-400:]}
    return json.loads(lines[-1])


def measure(variants=tuple(VARIANTS), model_name: str = "vit_base_patch16_224", size: int = 224,
            threads: int = 2, show=print, repeats: int = 1) -> list[dict]:
    """Each variant in `repeats` fresh processes, the variants interleaved round by round (rows;
    a variant that fails is a row with its error). With repeats > 1, resident_mb and steady_mb
    are the medians over the processes and `resident_mb_each` / `steady_mb_each` list them all.
    `resident_over_dense`: the resident bytes over the dense fp32 model's, same run (after
    batches 1, 4 and 64); `steady_over_dense`: the same after STEADY_REPEATS more batches of 64."""
    if repeats < 1:
        raise ValueError(f"measure: repeats must be at least 1, got {repeats}")
    each: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="sparsekern-memory-") as workdir:
        for round_ in range(repeats):
            for v in variants:
                r = _run_child(v, model_name, size, threads, workdir)
                each[v].append(r)
                show(f"   memory {v}{f' ({round_ + 1}/{repeats})' if repeats > 1 else ''}: " +
                     (f"{r['resident_mb']:.0f} MB above the interpreter" if "resident_mb" in r else
                      f"{'skipped' if r.get('skipped') else 'did not run'}: {r['error']}"))
    rows = []
    for v in variants:
        ok = [r for r in each[v] if "resident_mb" in r]
        if not ok:  # every process failed or was skipped: the first one's row says why
            rows.append(each[v][0])
            continue
        row = dict(ok[0])
        if repeats > 1:
            for key in ("resident_mb", "steady_mb", "built_mb", "path_measurements"):
                row[f"{key}_each"] = [r[key] for r in ok]
                row[key] = statistics.median(row[f"{key}_each"])
            row["processes"] = len(ok)
            if len(ok) < len(each[v]):
                row["failed_processes"] = [r["error"] for r in each[v] if "resident_mb" not in r]
        rows.append(row)
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
    p.add_argument("--checkpoint", help="a \"loaded\" variant: the file --save wrote")
    p.add_argument("--save", metavar="PATH", help="a \"loaded\" variant: build, sparsify and save its checkpoint "
                   "to PATH (nothing is measured)")
    a = p.parse_args(argv)
    if a.save:
        save_checkpoint(a.variant, a.model, a.size, a.save)
        return
    print(json.dumps(child(a.variant, a.model, a.size, a.threads, a.checkpoint)), flush=True)


if __name__ == "__main__":
    main()
