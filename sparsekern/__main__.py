"""Command line: `python -m sparsekern info` (more commands come with the demo)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def info_dict() -> dict:
    import torch

    import sparsekern
    from sparsekern import _extension as ext

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    return {
        "sparsekern": sparsekern.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": ext.LOADED,
        "extension_error": ext.LOAD_ERROR,
        "build": ext.BUILD_INFO,
        "usable_now": {
            "cpu_kernels": ext.cpu_kernels_available(),
            "cpu_avx2": bool(ext.BUILD_INFO.get("cpu_avx2_runtime")),
            "cuda_kernels": ext.cuda_kernels_available(),
            "gpu": gpu,
            "triton": ext.triton_available(),
            "triton_ops": sorted(__import__("sparsekern.ops", fromlist=["TRITON_OPS"]).TRITON_OPS),
            "triton_mode": ("gpu" if torch.cuda.is_available() else
                            "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else None),
        },
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
    print(f"  CPU kernels   {yes(u['cpu_kernels'])}" + ("  (AVX2 fast paths)" if u["cpu_avx2"] else ""))
    gpu = u["gpu"]
    gpu_s = f"{gpu['name']} (sm_{gpu['capability'][0]}{gpu['capability'][1]})" if gpu else "no GPU"
    print(f"  CUDA kernels  {yes(u['cuda_kernels'])}  ({gpu_s})")
    print(f"  Triton        {yes(u['triton'])}" + (f"  ({u['triton_mode']})" if u["triton_mode"] else ""))
    if u["triton"]:
        print(f"                ops: {', '.join(u['triton_ops'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekern", description="sparsekern command line")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="what was built and what can run here")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    a = p.parse_args(argv)
    if a.command == "info":
        print_info(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
