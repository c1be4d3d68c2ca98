"""`python -m sparsekern demo`: the main job end to end on real data, no downloads.

1. trains a small MLP and CNN on scikit-learn's handwritten digits (sparsekern.models;
   or loads them from the cache folder, $SPARSEKERN_CACHE or ~/.cache/sparsekern);
2. prunes each several ways (l1 unstructured 50/70/90%, 2:4 by l1 and by activation-aware
   wanda, block, channel pruning that really shrinks the network, a removed layer) and
   fine-tunes briefly with the masks kept;
3. swaps in sparse modules (sparsekern.from_torch_prune) and measures accuracy, latency
   (against the dense model, same run), parameter bytes and checkpoint size;
4. prints one table and writes it (demo.json, demo.md) with a plot of accuracy against
   latency (demo.png) to the output folder (default sparsekern-out/demo), and says where.
On a GPU it also runs the Llama-style decoder (sparsekern.models.LlamaStyle), dense vs 2:4
and unstructured, in tokens/s. `models=` and `methods=` pick a subset (a short run).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time

import torch
from torch import nn
from tqdm import tqdm

from . import prune, simplify
from .models import (DIGITS_MODELS, DIGITS_REMOVABLE, LlamaStyle, accuracy, checkpoint_bytes, digits, param_bytes,
                     train, trained)
from .reporting import label_points, markdown_table, save_plot
from .sparsify import from_torch_prune, sparsify

DEFAULT_OUT = os.path.join("sparsekern-out", "demo")
METHOD_NAMES = ("l1 50%", "l1 70%", "l1 90%", "2:4 l1", "2:4 wanda", "block8 50%", "channels 50%", "layer removed")


def interleaved_latency_ms(models, x, device, rounds):
    """Median ms per forward of each model, all timed round-robin in the same loop so
    machine noise and warm-up hit them alike."""
    samples = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(x)
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(models):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(5):
                    m(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                samples[i].append((time.perf_counter() - t) / 5)
    return [sorted(s)[len(s) // 2] * 1e3 for s in samples]


def pruning_methods(kind):
    """name (METHOD_NAMES) -> function(model, calib, example) that prunes in place
    (masks recorded like torch.nn.utils.prune, or the structure changed)."""
    def l1(a):
        return lambda m, c, e: prune.l1_prune(m, amount=a)

    def nm(method):
        def f(m, c, e):
            norms = prune.collect_activation_norms(m, c, show_progress=False) if method == "wanda" else None
            for name, layer in prune.prunable_layers(m):
                if layer.weight.shape[1] % 4 == 0:  # the first conv has one input channel: left dense
                    prune.nm_prune(m, 2, 4, method, name=name, act_norms=norms)
        return f

    def block(m, c, e):
        for name, layer in prune.prunable_layers(m):
            if layer.weight.shape[0] % 8 == 0 and layer.weight[0].numel() % 8 == 0:
                prune.block_prune(m, (8, 8), 0.5, name=name)

    def channels(m, c, e):
        simplify.prune_channels(m, 0.5, e)

    def remove(m, c, e):
        simplify.remove_layers(m, [DIGITS_REMOVABLE[kind]], e)

    fns = [l1(0.5), l1(0.7), l1(0.9), nm("l1"), nm("wanda"), block, channels, remove]
    return dict(zip(METHOD_NAMES, fns))


def run(device="auto", quick=False, out=DEFAULT_OUT, show=True, models=("mlp", "cnn"), methods=None) -> list[dict]:
    """The whole demo; returns the rows it wrote. models: any of "mlp", "cnn"; methods:
    a subset of METHOD_NAMES (default all)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda but no CUDA GPU is available")
    unknown = [k for k in models if k not in DIGITS_MODELS]
    if unknown or not models:
        raise ValueError(f"demo: unknown model(s) {unknown}; choose from {', '.join(DIGITS_MODELS)}")
    chosen = list(METHOD_NAMES) if methods is None else list(methods)
    bad = [m for m in chosen if m not in METHOD_NAMES]
    if bad:
        raise ValueError(f"demo: unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
    t0 = time.time()
    data = digits(device)
    xtr, ytr, xte, yte = data
    epochs, ft_epochs, reps = (15, 2, 20) if quick else (30, 5, 50)
    rows = []
    xb = xte[:64]
    for kind in models:
        base, source = trained(kind, data, epochs, device, show)
        example = xte[:8]
        calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
        finals = [base]
        rows.append({"model": kind, "method": "dense", "accuracy": accuracy(base, xte, yte),
                     "param_bytes": param_bytes(base), "checkpoint_bytes": checkpoint_bytes(base),
                     "sparse_layers": 0, "note": f"dense model ({source})"})
        fns = pruning_methods(kind)
        for name in tqdm(chosen, f"pruning {kind}", disable=not show, mininterval=1.0):
            m = copy.deepcopy(base)
            fns[name](m, calib, example)
            train(m, xtr, ytr, ft_epochs, lr=1e-3, seed=1, show=False)  # masks kept by the pre-hooks
            acc_masked = accuracy(m, xte, yte)
            m, report = from_torch_prune(m)
            m.eval()
            acc = accuracy(m, xte, yte)
            if abs(acc - acc_masked) > 0.5:
                raise RuntimeError(f"demo: {kind} {name}: swapped model disagrees with the masked one "
                                   f"({acc:.1f}% vs {acc_masked:.1f}%)")
            finals.append(m)
            sparse = [r for r in report if r.get("status") == "sparse"]
            rows.append({"model": kind, "method": name, "accuracy": acc,
                         "param_bytes": param_bytes(m), "checkpoint_bytes": checkpoint_bytes(m),
                         "sparse_layers": sum(r["backend"] != "dense" for r in sparse),
                         "note": ", ".join(sorted({f"{r['pattern']}->{r['backend']}" for r in sparse}))})
        times = interleaved_latency_ms(finals, xb, device, reps)
        for r, ms in zip(rows[-len(finals):], times):
            r["latency_ms"], r["speedup"] = ms, times[0] / ms
    extra = decoder_rows(device, quick, show) if device == "cuda" else []
    write(out, rows, extra, device, time.time() - t0)
    return rows + extra


def decoder_rows(device, quick, show):
    """tokens/s of the Llama-style decoder (bf16), dense, 2:4 and 70% unstructured."""
    rows = []
    base = LlamaStyle(dim=2048, layers=8, hidden=5632).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (1, 16), device=device)
    variants = [("dense", None), ("2:4", dict(pattern="2:4")),
                ("unstructured 70%", dict(pattern="unstructured", sparsity=0.7))]
    for name, kw in tqdm(variants, "decoder", disable=not show, mininterval=1.0):
        m = copy.deepcopy(base)
        if kw:
            m, _ = sparsify(m, min_features=256, show_progress=False, **kw)
        ms = generate_ms(m, ids, 3 if quick else 10)
        rows.append({"model": "llama-style decoder", "method": name, "tokens_per_s": 32 / (ms * 1e-3)})
    return rows


def generate_ms(m, ids, reps) -> float:
    """Milliseconds to generate 32 tokens on CUDA (after a warm-up)."""
    m.generate(ids, 4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        m.generate(ids, 32)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


TABLE_COLUMNS = [("model", "model", ""), ("method", "method", ""), ("accuracy %", "accuracy", ".1f"),
                 ("latency ms (64 images)", "latency_ms", ".3f"), ("x dense", "speedup", ".2f"),
                 ("params KiB", lambda r: r["param_bytes"] / 1024, ".0f"),
                 ("checkpoint KiB", lambda r: r["checkpoint_bytes"] / 1024, ".0f"),
                 ("sparse layers", "sparse_layers", "d"), ("backends", "note", "")]


def table(rows) -> str:
    return markdown_table(rows, TABLE_COLUMNS)


def plot(rows, path, device_name) -> bool:
    """Accuracy against latency, one panel per model, each point labelled by its method."""
    kinds = list(dict.fromkeys(r["model"] for r in rows))

    def draw(axes):
        for ax, kind in zip(axes, kinds):
            rs = [r for r in rows if r["model"] == kind]
            label_points(ax, [r["latency_ms"] for r in rs], [r["accuracy"] for r in rs], [r["method"] for r in rs])
            ax.set_title(f"{kind} on digits ({device_name})", fontsize=9)
            ax.set_xlabel("latency, 64 images (ms)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)

    return save_plot(path, draw, ncols=len(kinds), figsize=(5 * len(kinds), 4))


def write(out, rows, extra, device, elapsed) -> list[str]:
    """demo.json, demo.md and demo.png in `out`; prints the table and where it went."""
    os.makedirs(out, exist_ok=True)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "elapsed_s": round(elapsed, 1)}
    paths = [os.path.join(out, f) for f in ("demo.json", "demo.md", "demo.png")]
    with open(paths[0], "w") as f:
        json.dump({"environment": env, "rows": rows, "decoder": extra}, f, indent=1)
    text = table(rows)
    if extra:
        text += "\n\n" + markdown_table(extra, [("decoder", "method", ""), ("tokens/s", "tokens_per_s", ".1f")])
    with open(paths[1], "w") as f:
        f.write(f"sparsekern demo on {env['device']} (torch {env['torch']}, {env['threads']} threads)\n\n" + text + "\n")
    print(text)
    if not plot(rows, paths[2], env["device"]):
        print("(matplotlib not installed: no plot)")
        paths.pop()
    print(f"wrote {', '.join(os.path.abspath(p) for p in paths)} in {elapsed:.0f} s")
    return paths
