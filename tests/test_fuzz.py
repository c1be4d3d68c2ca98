"""Fuzz battery: tampered compressed weights never crash, hang or read out of bounds.

For every format and every integer tensor in it (and `meta`), and for every sparse
module's state dict: the dtype's max and min, -1, random values, a wrong length and a
wrong dtype. Each tampered weight goes in through every door a user has (the format's
constructor, from_tensors, load_state_dict, torch.load(weights_only=True)) and then
through a forward on every device here. A clear Python exception is fine; so is a
tampering that happens to still be valid (then the output must equal the dense product);
a crash or a hang is not. Cases run in a subprocess, in groups, and print as they go, so
a crash names the case that caused it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekern

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# name[_precision]: the quantized ones also fuzz their stored values and scales
FORMATS = ["nm24", "nm28", "bitmask", "block", "nm24_int8", "nm24_int4", "bitmask_int8", "block_int8"]

WORKER = textwrap.dedent(r'''
    import io, sys, torch
    import sparsekern
    from sparsekern import ops
    from sparsekern.formats import NMWeight, BitmaskWeight, BlockWeight
    from sparsekern.nn import Policy, SparseLinear

    fmt_name, device = sys.argv[1], sys.argv[2]
    fmt_name, _, precision = fmt_name.partition("_")
    precision = precision or None
    torch.manual_seed(0)
    OUT, IN = 48, 1088  # bitmask: 17 words, 3 offset tiles; block: 3 x 34 blocks of 16
    w = torch.randn(OUT, IN, device=device)
    if fmt_name == "nm24":
        W = NMWeight.from_dense(w, 2, 4)
    elif fmt_name == "nm28":
        W = NMWeight.from_dense(w, 2, 8)
    elif fmt_name == "bitmask":
        W = BitmaskWeight.from_dense(w, torch.rand(OUT, IN, device=device) < 0.3)
    else:
        W = BlockWeight.from_dense(w, (16, 32), torch.rand(OUT, IN, device=device) < 0.02)
    W = W.quantize(precision, 64 if precision == "int4" else 0)
    x = torch.randn(3, IN, device=device)
    x20 = torch.randn(20, IN, device=device)
    lin = torch.nn.Linear(IN, OUT).to(device)
    pattern = {"nm24": "2:4", "nm28": "2:8", "bitmask": "unstructured", "block": "block16x32"}[fmt_name]
    mod = SparseLinear.from_dense(lin, pattern, mask=W.mask(), sparsity=0.5, block=(16, 32),
                                  policy=Policy("sparse"), quantize=precision, group_size=64)

    def mutations(t):
        if t.is_floating_point():  # scales
            for how, v in (("nan", float("nan")), ("negative", -1.0), ("zero", 0.0), ("inf", float("inf"))):
                yield how, torch.full_like(t, v)
            yield "shorter", t.reshape(-1)[:-1] if t.numel() > 1 else t[:0]
            yield "longer", torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
            yield "int32", t.to(torch.int32)
            return
        info = torch.iinfo(t.dtype) if not t.is_floating_point() and t.dtype != torch.bool else None
        yield "max", torch.full_like(t, info.max) if info else None
        yield "min", torch.full_like(t, info.min) if info else None
        yield "minus1", torch.full_like(t, -1) if info and info.min < 0 else None
        if info:
            hi = min(info.max, 2**31 - 1)
            lo = max(info.min, -2**31)
            yield "random", torch.randint(lo, hi, t.shape, dtype=torch.int64, device=t.device).to(t.dtype)
        yield "shorter", t.reshape(-1)[:-1] if t.numel() > 1 else t[:0]
        yield "longer", torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
        yield "float", t.float()
        yield "int32" if t.dtype != torch.int32 else "int64", t.to(torch.int32 if t.dtype != torch.int32 else torch.int64)

    def check_forward(fn, dense_of):
        y = fn()
        ref = x @ dense_of().T.to(x.dtype)
        assert y.shape == ref.shape, (y.shape, ref.shape)

    def run(case, thunk):
        print("START", case, flush=True)
        try:
            thunk()
            print("OK", case, flush=True)
        except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as e:
            print("REFUSED", case, type(e).__name__, str(e).splitlines()[0][:200], flush=True)

    names = [n for n in W.tensor_names() if n == "scales" or not W.tensors()[n].is_floating_point()] + ["meta"]
    for name in names:
        for how, bad in mutations(W.tensors()[name]):
            if bad is None:
                continue
            d = dict(W.tensors()); d[name] = bad
            def via_from_tensors(d=d):
                V = type(W).from_tensors(d)
                check_forward(lambda: ops.sparse_linear(x, V), V.to_dense)
            run(f"{fmt_name}/{device}/from_tensors/{name}/{how}", via_from_tensors)
            if name != "meta":
                def via_constructor(d=d):
                    V = type(W)(**{k: d[k] for k in W.tensor_names()}, **{k: getattr(W, k) for k in
                                ("n", "m", "in_features", "precision", "group_size", "compute_dtype")
                                if hasattr(W, k)})
                    check_forward(lambda: ops.sparse_linear(x, V), V.to_dense)
                run(f"{fmt_name}/{device}/constructor/{name}/{how}", via_constructor)
            sd = dict(mod.state_dict()); key = "weight_" + name
            sd[key] = bad
            def via_state_dict(sd=sd):
                m2 = SparseLinear.from_dense(lin, pattern, mask=W.mask(), sparsity=0.5, block=(16, 32),
                                             policy=Policy("sparse"), quantize=precision, group_size=64)
                m2.load_state_dict(sd)
                check_forward(lambda: m2(x) - m2.bias, lambda: m2.weight_format().to_dense())
            run(f"{fmt_name}/{device}/load_state_dict/{name}/{how}", via_state_dict)
            def via_weights_only(sd=sd):
                buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
                loaded = torch.load(buf, weights_only=True)
                m2 = SparseLinear.from_dense(lin, pattern, mask=W.mask(), sparsity=0.5, block=(16, 32),
                                             policy=Policy("sparse"), quantize=precision, group_size=64)
                m2.load_state_dict(loaded)
                check_forward(lambda: m2(x) - m2.bias, lambda: m2.weight_format().to_dense())
            run(f"{fmt_name}/{device}/torch.load/{name}/{how}", via_weights_only)
    # In place, after validation: a format and a module that already ran see their tensors
    # edited (same shape and dtype, so only the contents change) and run again.
    for name in [n for n in names if n != "meta"]:
        for how, bad in mutations(W.tensors()[name]):
            if bad is None or bad.shape != W.tensors()[name].shape or bad.dtype != W.tensors()[name].dtype:
                continue
            def in_place_format(name=name, bad=bad):
                V = type(W).from_tensors({k: v.clone() for k, v in W.tensors().items()})
                ops.sparse_linear(x, V)  # validated and run once
                getattr(V, name).copy_(bad)
                check_forward(lambda: ops.sparse_linear(x, V), V.to_dense)
                # and the large-batch kernels (tiles, the GEMMs, the expanded int8 weight)
                assert ops.sparse_linear(x20, V).shape == (x20.shape[0], OUT)
            run(f"{fmt_name}/{device}/in_place_format/{name}/{how}", in_place_format)
            def in_place_module(name=name, bad=bad):
                m2 = SparseLinear.from_dense(lin, pattern, mask=W.mask(), sparsity=0.5, block=(16, 32),
                                             policy=Policy("sparse"), quantize=precision, group_size=64)
                with torch.no_grad():
                    m2(x)
                    getattr(m2, "weight_" + name).copy_(bad)
                    check_forward(lambda: m2(x) - m2.bias, lambda: m2.weight_format().to_dense())
            run(f"{fmt_name}/{device}/in_place_module/{name}/{how}", in_place_module)
    print("DONE", flush=True)
''')


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_tampered_weights_never_crash(tmp_path, fmt, device):
    script = tmp_path / "fuzz_worker.py"
    script.write_text(WORKER)
    # the worker imports the sparsekern under test (a checkout need not be installed)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(sparsekern.__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, str(script), fmt, device], capture_output=True, text=True,
                              timeout=300, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [line for line in out.splitlines() if line.startswith("START")]
        pytest.fail(f"hang: {started[-1] if started else 'before the first case'}")
    lines = proc.stdout.splitlines()
    started = [line.split()[1] for line in lines if line.startswith("START")]
    finished = {line.split()[1] for line in lines if line.startswith(("OK", "REFUSED"))}
    assert proc.returncode == 0 and lines and lines[-1] == "DONE", (
        f"worker died (exit {proc.returncode}) in case {next((c for c in started if c not in finished), '?')}\n"
        f"{proc.stderr[-3000:]}")
    assert len(started) >= 40 and set(started) == finished
    summary = {"refused": sum(line.startswith("REFUSED") for line in lines),
               "ok": sum(line.startswith("OK") for line in lines)}
    print(json.dumps(summary))
    # Every out-of-range value must be refused; the valid-by-chance ones ran and matched shape.
    # Quantized values are legal at every int8 byte (and int4 nibble but 0), so their own
    # extreme fillings may run; a tampered scale never may. In place, an edit of a module's
    # buffer that happens to stay valid runs too (what counts there is: no crash).
    for line in lines:
        if line.startswith("OK") and "/values/" in line and any(h in line for h in ("/max", "/min", "/minus1")):
            continue
        if line.startswith("OK") and "/in_place_" in line and "/random" in line:
            continue
        if line.startswith("OK") and any(h in line for h in ("/max", "/min", "/minus1", "/float", "/shorter", "/nan",
                                                             "/negative", "/zero", "/inf")):
            case = line.split()[1]
            # meta "max"/"min": in_features becomes absurd or negative: must be refused
            pytest.fail(f"tampering accepted: {case}")
