"""`python -m sparsekern demo`: the main job end to end on real data, no downloads.

1. trains a small MLP and CNN on scikit-learn's handwritten digits (or loads them from
   the cache folder);
2. prunes each several ways (l1 unstructured 50/70/90%, 2:4 by l1 and by activation-aware
   wanda, block, channel pruning that really shrinks the network, a removed layer) and
   fine-tunes briefly with the masks kept;
3. swaps in sparse modules (sparsekern.from_torch_prune) and measures accuracy, latency
   (against the dense model, same run), parameter bytes and checkpoint size;
4. prints one table and writes it (demo.json, demo.md) with a plot of accuracy against
   latency (demo.png) to the output folder.
On a GPU it also runs the Llama-style decoder from the benchmark suite, dense vs 2:4 and
unstructured, in tokens/s.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time

import torch
from torch import nn

from . import prune, simplify
from ._progress import progress
from .nn import Policy
from .sparsify import from_torch_prune


def cache_dir() -> str:
    return os.environ.get("SPARSEKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sparsekern"))


def digits(device):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("demo: scikit-learn is needed for the digits data (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def make_mlp():
    # The middle block keeps its width, so it can be removed whole.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(),
                         nn.Sequential(nn.Linear(256, 256), nn.ReLU()), nn.Linear(256, 10))


def make_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()),
                         nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


REMOVABLE = {"mlp": "3", "cnn": "5"}


def train(model, x, y, epochs, lr=3e-3, seed=0, desc=None, show=True):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in progress(range(epochs), desc or "training", enabled=show):
        perm = torch.randperm(len(y), generator=gen).to(y.device)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(1) == y).float().mean()) * 100


def trained(kind, data, epochs, device, show):
    path = os.path.join(cache_dir(), f"demo_{kind}_e{epochs}.pt")
    model = (make_mlp() if kind == "mlp" else make_cnn()).to(device)
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return model.eval(), "cache"
        except (RuntimeError, OSError):
            pass  # stale or broken cache entry: train again
    torch.manual_seed(0)
    train(model, data[0], data[1], epochs, desc=f"training {kind}", show=show)
    os.makedirs(cache_dir(), exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, "trained"


def interleaved_latency_ms(models, x, device, rounds):
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


def param_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def checkpoint_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def methods(kind):
    """name -> function(model, calib, example) that prunes in place (masks via torch prune)."""
    def l1(a):
        return lambda m, c, e: prune.l1_prune(m, amount=a)

    def nm(method):
        def f(m, c, e):
            norms = prune.collect_activation_norms(m, c, show_progress=False) if method == "wanda" else None
            for name, layer in prune.prunable_layers(m):
                if prune._as_2d(layer.weight).shape[1] % 4 == 0 and layer.weight.shape[1] % 4 == 0:
                    prune.nm_prune(m, 2, 4, method, name=name, act_norms=norms)
        return f

    def block(m, c, e):
        for name, layer in prune.prunable_layers(m):
            rows, cols = prune._as_2d(layer.weight).shape
            if rows % 8 == 0 and cols % 8 == 0:
                prune.block_prune(m, (8, 8), 0.5, name=name)

    def channels(m, c, e):
        simplify.prune_channels(m, 0.5, e)

    def remove(m, c, e):
        simplify.remove_layers(m, [REMOVABLE[kind]], e)

    return {"l1 50%": l1(0.5), "l1 70%": l1(0.7), "l1 90%": l1(0.9), "2:4 l1": nm("l1"), "2:4 wanda": nm("wanda"),
            "block8 50%": block, "channels 50%": channels, "layer removed": remove}


def run(device="auto", quick=False, out="sparsekern-demo", show=True) -> list[dict]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda but no CUDA GPU is available")
    t0 = time.time()
    data = digits(device)
    xtr, ytr, xte, yte = data
    epochs, ft_epochs, reps = (15, 2, 20) if quick else (30, 5, 50)
    rows = []
    xb = xte[:64]
    for kind in ("mlp", "cnn"):
        base, source = trained(kind, data, epochs, device, show)
        example = xte[:8]
        calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
        finals = [base]
        rows.append({"model": kind, "method": "dense", "accuracy": accuracy(base, xte, yte),
                     "param_bytes": param_bytes(base), "checkpoint_bytes": checkpoint_bytes(base),
                     "sparse_layers": 0, "note": f"dense model ({source})"})
        for name, fn in progress(list(methods(kind).items()), f"pruning {kind}", enabled=show):
            m = copy.deepcopy(base)
            fn(m, calib, example)
            train(m, xtr, ytr, ft_epochs, lr=1e-3, seed=1, show=False)  # masks kept by the pre-hooks
            acc_masked = accuracy(m, xte, yte)
            m, report = from_torch_prune(m, policy=Policy("auto", batch=64, image=8))
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
        # Latency: every model of this kind timed round-robin in the same loop, so machine
        # noise and warm-up hit all alike; the median over rounds.
        times = interleaved_latency_ms(finals, xb, device, reps)
        for r, ms in zip(rows[-len(finals):], times):
            r["latency_ms"], r["speedup"] = ms, times[0] / ms
    extra = decoder_rows(device, quick, show) if device == "cuda" else []
    write(out, rows, extra, device, time.time() - t0)
    return rows + extra


def decoder_rows(device, quick, show):
    import importlib.util
    import sys

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "models.py")
    if not os.path.exists(here):
        return [{"model": "llama-style", "method": "-", "note": "bench/models.py not found (run from a checkout)"}]
    spec = importlib.util.spec_from_file_location("sk_bench_models", here)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    from .sparsify import sparsify

    rows = []
    base = mod.LlamaStyle(dim=2048, layers=8, hidden=5632).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (1, 16), device=device)
    for name, kw in progress([("dense", None), ("2:4", dict(pattern="2:4")),
                              ("unstructured 70%", dict(pattern="unstructured", sparsity=0.7))], "decoder",
                             enabled=show):
        m = copy.deepcopy(base)
        if kw:
            m, _ = sparsify(m, min_features=256, policy=Policy("auto", batch=1), show_progress=False, **kw)
        ms = _gen_ms(m, ids, device, 3 if quick else 10)
        rows.append({"model": "llama-style decoder", "method": name, "tokens_per_s": 32 / (ms * 1e-3)})
    return rows


def _gen_ms(m, ids, device, reps):
    m.generate(ids, 4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        m.generate(ids, 32)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def table(rows) -> str:
    head = ("| model | method | accuracy % | latency ms (64 images) | x dense | params KiB | checkpoint KiB | "
            "sparse layers | backends |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "accuracy" not in r:
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['accuracy']:.1f} | {r['latency_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {r['param_bytes'] / 1024:.0f} | {r['checkpoint_bytes'] / 1024:.0f} | "
                     f"{r['sparse_layers']} | {r['note']} |")
    return "\n".join(lines)


def write(out, rows, extra, device, elapsed):
    os.makedirs(out, exist_ok=True)
    import platform

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "elapsed_s": round(elapsed, 1)}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"environment": env, "rows": rows, "decoder": extra}, f, indent=1)
    text = table(rows)
    if extra:
        text += "\n\n| decoder | tokens/s |\n|---|---|\n" + "\n".join(
            f"| {r['method']} | {r.get('tokens_per_s', 0):.1f} |" for r in extra)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(f"sparsekern demo on {env['device']} (torch {env['torch']}, {env['threads']} threads)\n\n" + text + "\n")
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind in zip(axes, ("mlp", "cnn")):
            for r in rows:
                if r["model"] == kind:
                    ax.scatter(r["latency_ms"], r["accuracy"])
                    ax.annotate(r["method"], (r["latency_ms"], r["accuracy"]), fontsize=7)
            ax.set_title(f"{kind} on digits ({env['device']})", fontsize=9)
            ax.set_xlabel("latency, 64 images (ms)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "demo.png"), dpi=120)
        plt.close(fig)
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print(f"wrote {out}/demo.json, demo.md" + (", demo.png" if os.path.exists(os.path.join(out, "demo.png")) else "")
          + f" in {elapsed:.0f} s")
