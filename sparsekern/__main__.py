"""Command line: `python -m sparsekern info | demo | bench | prune | optimize` (`--help` on each)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def info_dict() -> dict:
    import torch

    from . import __version__, ops
    from . import _extension as ext

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    return {
        "sparsekern": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": ext.LOADED,
        "extension_error": ext.LOAD_ERROR,
        "build": ext.BUILD_INFO,
        "usable_now": {
            "cpu_kernels": ext.cpu_kernels_available(),
            "cpu_avx2": bool(ext.BUILD_INFO.get("cpu_avx2_runtime")),
            "cpu_avx512": bool(ext.BUILD_INFO.get("cpu_avx512_runtime")),
            "cpu_avx512_bf16": bool(ext.BUILD_INFO.get("cpu_avx512_bf16_runtime")),
            "cuda_kernels": ext.cuda_kernels_available(),
            "gpu": gpu,
            "triton": ext.triton_available(),
            "triton_ops": sorted(name for name, spec in ops.OPS.items() if spec.triton),
            "triton_mode": ("gpu" if torch.cuda.is_available() else
                            "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else None),
        },
        # libgomp reads it when torch loads it: unset or ACTIVE, its idle workers spin, which on
        # a machine whose cores other processes share costs every layer a time slice; unset, the
        # kernels stop the spinning while they judge the machine contended; PASSIVE never spins,
        # and the kernels then use their own pool (docs/DISPATCH.md).
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "threads": torch.get_num_threads(),
    }


def print_info(as_json: bool = False) -> None:
    d = info_dict()
    if as_json:
        print(json.dumps(d, indent=1))
        return
    b, u = d["build"], d["usable_now"]
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    print(f"sparsekern {d['sparsekern']}  torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})")
    if d["extension_loaded"]:
        cuda = (f"CUDA {b.get('cuda_version')} for sm {b.get('cuda_archs')}" if b.get("with_cuda")
                else "no CUDA code (C++ only)")
        print(f"extension: sparsekern._C built for torch {b.get('torch_version')}, {cuda}")
    else:
        print(f"extension: NOT loaded: {d['extension_error']}")
        print("           pure-torch reference paths in use; rebuild: pip install --no-build-isolation -e .")
    print("usable now:")
    fast = "AVX-512 and AVX2" if u["cpu_avx512"] else "AVX2" if u["cpu_avx2"] else ""
    bf16 = "; bf16 dot products (vdpbf16ps) in the 2:4 GEMM" if u["cpu_avx512_bf16"] else ""
    print(f"  CPU kernels   {yes(u['cpu_kernels'])}" + (f"  ({fast} fast paths{bf16})" if fast else ""))
    gpu = u["gpu"]
    gpu_s = f"{gpu['name']} (sm_{gpu['capability'][0]}{gpu['capability'][1]})" if gpu else "no GPU"
    print(f"  CUDA kernels  {yes(u['cuda_kernels'])}  ({gpu_s})")
    print(f"  Triton        {yes(u['triton'])}" + (f"  ({u['triton_mode']})" if u["triton_mode"] else ""))
    if u["triton"]:
        print(f"                ops: {', '.join(u['triton_ops'])}")
    policy = d["omp_wait_policy"]
    spin = ("unset (libgomp's workers spin; the kernels stop them while other processes use the cores, "
            "docs/DISPATCH.md)")
    print(f"  CPU threads   {d['threads']}; OMP_WAIT_POLICY " + (policy if policy else spin) +
          ("" if not policy or policy.lower() == "passive" else
           "; on a machine other processes share, start with OMP_WAIT_POLICY=PASSIVE (docs/DISPATCH.md)"))


def cmd_prune(a) -> int:
    import torch

    from . import prune as P
    from . import kinds
    from .sparsify import sparsify

    if not os.path.isfile(a.model):
        raise SystemExit(f"prune: no such file: {a.model}")
    kinds.parse(a.pattern, "prune --pattern")
    P.check_method(a.method, "prune --method")
    try:
        obj = torch.load(a.model, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module: loading it runs its pickle code
        print(f"prune: {a.model} is not a plain state dict; loading it as a pickled module (weights_only=False)",
              file=sys.stderr)
        obj = torch.load(a.model, map_location="cpu", weights_only=False)
    calib = None
    if a.calibration:
        if not os.path.isfile(a.calibration):
            raise SystemExit(f"prune: no such calibration file: {a.calibration}")
        data = torch.load(a.calibration, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise SystemExit("prune: --calibration must be a .pt file holding one tensor (batches along dim 0)")
        calib = list(data.split(a.calibration_batch))
    out = a.out or os.path.splitext(a.model)[0] + f".{a.pattern.replace(':', 'of')}.pt"
    if isinstance(obj, torch.nn.Module):
        if a.method == "taylor":
            raise SystemExit("prune: method 'taylor' needs a loss; use the Python API (sparsekern.sparsify)")
        model, report = sparsify(obj.eval(), a.pattern, a.method, sparsity=a.sparsity, calibration=calib,
                                 min_features=a.min_features, show_progress=True, quantize=a.quantize,
                                 group_size=a.group_size)
        torch.save(model, out)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if a.quantize:
            raise SystemExit("prune: --quantize stores compressed sparse modules; a bare state dict is pruned in "
                             "place (zeros) and stays float. Save the module with torch.save(model, path)")
        if a.method in ("wanda", "taylor"):
            raise SystemExit(f"prune: method {a.method!r} needs the model (activations or gradients), "
                             "not a bare state dict; save the module with torch.save(model, path)")
        kind, params = kinds.parse(a.pattern)
        entry = kinds.KINDS[kind]
        report, sd = [], dict(obj)
        for k, w in obj.items():
            if not (k.endswith("weight") and w.dim() in (2, 4) and w.is_floating_point()):
                continue
            if min(w.shape[0], w[0].numel()) < a.min_features:
                report.append({"tensor": k, "status": "dense", "reason": f"smaller than min_features={a.min_features}"})
                continue
            s = P.score(w, a.method)
            if not entry.prunable:
                continue
            try:
                mask = entry.mask(s, params, a.sparsity if a.sparsity is not None else 0.5, (32, 32), "prune")
            except ValueError as e:
                report.append({"tensor": k, "status": "dense", "reason": str(e)})
                continue
            sd[k] = w * mask
            report.append({"tensor": k, "status": "pruned", "pattern": a.pattern, "density": float(mask.float().mean())})
        if not any(r["status"] == "pruned" for r in report):
            raise SystemExit("prune: no weight in this state dict could be pruned with that pattern")
        torch.save(sd, out)
    else:
        raise SystemExit(f"prune: {a.model} holds a {type(obj).__name__}; expected an nn.Module or a state dict")
    rep = a.report or os.path.splitext(out)[0] + ".report.json"
    with open(rep, "w") as f:
        json.dump(report, f, indent=1)
    n = sum(r.get("status") in ("sparse", "pruned") for r in report)
    print(f"prune: {n} layers pruned with {a.pattern} ({a.method}); wrote {out} and {rep}")
    return 0


def entry_point(spec: str, where: str):
    """The object named by 'module:attribute' (a Python entry point), imported."""
    import importlib

    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise SystemExit(f"optimize: {where} must be 'module:function', got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise SystemExit(f"optimize: {where}: cannot import {mod!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"optimize: {where}: {mod!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def cmd_optimize(a) -> int:
    import torch

    from .optimize import optimize, pareto_rows, write_report

    if not os.path.isfile(a.model):
        raise SystemExit(f"optimize: no such file: {a.model}")
    model = torch.load(a.model, map_location="cpu", weights_only=False)  # a pickled module runs its pickle code
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"optimize: {a.model} holds a {type(model).__name__}; expected a torch.save'd nn.Module")
    eval_fn = entry_point(a.eval, "--eval")
    if a.inputs.endswith(".pt") and os.path.isfile(a.inputs):
        example = torch.load(a.inputs, map_location="cpu", weights_only=True)
    else:
        f = entry_point(a.inputs, "--inputs")
        example = f() if callable(f) else f
    calib = None
    if a.calibration:
        f = entry_point(a.calibration, "--calibration")
        calib = list(f() if callable(f) else f)
    menu = [m.strip() for m in a.menu.split(",")] if a.menu else None
    optimized, plan = optimize(model, eval_fn, example, floor=a.floor, absolute=a.absolute, menu=menu,
                               calibration=calib, budget_s=a.budget_s, method=a.method, layout=a.layout)
    out = a.out or os.path.splitext(a.model)[0] + ".optimized"
    os.makedirs(out, exist_ok=True)
    torch.save(optimized, os.path.join(out, "model.pt"))
    rows = pareto_rows(model, plan, eval_fn, example, calibration=calib, optimized=optimized) if a.report else []
    paths = write_report(out, plan, rows)
    print(f"optimize: {len(plan.choices)} of {len(plan.layers)} layers changed; score {plan.measured['score']:.4f} "
          f"(floor {plan.target:.4f}); {plan.dense['latency_ms']:.2f} -> {plan.measured['latency_ms']:.2f} ms; wrote "
          + ", ".join([os.path.join(out, "model.pt")] + paths))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern", description="sparsekern command line")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="what was built and what can run here")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    sub.add_parser("demo", help="the product end to end: a pretrained MiniLM, a Llama decoder and the digits "
                   "models pruned, swapped and measured (sparsekern.demo; its options follow, e.g. --quick)",
                   add_help=False)
    sub.add_parser("bench", help="the benchmark suite (sparsekern.bench.run; its options follow, e.g. --quick)",
                   add_help=False)
    pp = sub.add_parser("prune", help="prune a saved model or state dict and write it with a report")
    pp.add_argument("model", help="torch.save of an nn.Module, or of a state dict")
    pp.add_argument("--pattern", default="2:4", help="'N:M', 'unstructured' or 'block[S]' (default 2:4)")
    pp.add_argument("--method", default="l1", help="l1, l2, random, wanda (modules only)")
    pp.add_argument("--sparsity", type=float, default=None, help="fraction to remove (unstructured, block)")
    pp.add_argument("--calibration", default=None, help=".pt file with one input tensor, batches along dim 0")
    pp.add_argument("--calibration-batch", type=int, default=32)
    pp.add_argument("--min-features", type=int, default=128)
    pp.add_argument("--quantize", default=None, choices=["int8", "int4"],
                    help="store the kept values as int8 (a scale per row) or int4 (a scale per --group-size kept "
                         "values, N:M only); modules only")
    pp.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64 or 128 (default 128)")
    pp.add_argument("--out", default=None)
    pp.add_argument("--report", default=None)
    po = sub.add_parser("optimize", help="the fastest per-layer plan within a quality floor (sparsekern.optimize)")
    po.add_argument("model", help="torch.save of an nn.Module")
    po.add_argument("--eval", required=True, help="module:function, function(model) -> score (higher is better)")
    po.add_argument("--inputs", required=True, help="module:function returning one example batch (tensor, tuple "
                    "or dict of keyword arguments), or a .pt file holding a tensor")
    po.add_argument("--floor", type=float, default=0.99, help="fraction of the dense score (default 0.99)")
    po.add_argument("--absolute", action="store_true", help="--floor is the score itself, not a fraction")
    po.add_argument("--calibration", default=None, help="module:function returning calibration batches")
    po.add_argument("--menu", default=None, help="comma-separated option names (default: all that run here)")
    po.add_argument("--method", default="wanda", choices=["wanda", "l1"])
    po.add_argument("--budget-s", type=float, default=900.0, help="search time bound in seconds (default 900)")
    po.add_argument("--layout", default="auto", choices=["auto", "as given", "channels_last"],
                    help="the convolutions' memory layout (auto: channels-last where it is timed faster)")
    po.add_argument("--report", action="store_true", help="also time and score dense, every uniform option and "
                    "the peers (bf16, torch int8 dynamic) for the Pareto plot")
    po.add_argument("--out", default=None, help="folder for model.pt, plan.json, report.* (default <model>.optimized)")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":  # its own parser too (sparsekern.demo.main)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "bench":  # its own parser, so `bench --help` lists the suite's options
        from .bench.run import main as bench_main

        bench_main(argv[1:])
        return 0
    a = p.parse_args(argv)
    try:
        if a.command == "info":
            print_info(a.json)
        elif a.command == "prune":
            return cmd_prune(a)
        elif a.command == "optimize":
            return cmd_optimize(a)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
