"""2:4 convolutions on the CPU: ResNet-50's distinct convolution shapes, dense F.conv2d
(oneDNN, channels-last) against ops.nm_conv2d and against the patch-matrix path it replaced,
timed interleaved in one process.

    python bench/bench_cpu_conv.py                      # every distinct shape at batch 4
    python bench/bench_cpu_conv.py --batch 1 --rounds 15
    python bench/bench_cpu_conv.py --out bench/results/cpu-conv-YYYYMMDD/conv.json

Providers (each checked against the fp64 reference before it is timed):
  torch.conv2d        F.conv2d on the pruned weight stored dense, channels-last input (what
                      the dense model runs, and what SparseConv2d's "decompress" path runs
                      after decompressing)
  torch.conv2d.again  the same call again: the noise floor of the run
  cpp.patches         the channels-last patch matrix (one strided copy) through nm_linear:
                      SparseConv2d's sparse path before nm_conv2d (with today's nm_linear,
                      whose x tiles and chunk order nm_conv2d shares)
  cpp.nm_conv2d       ops.nm_conv2d: the taps gathered straight into the weight-stationary
                      kernel's x tiles (2:4 from 17 output pixels)
The shapes come from a forward pass of torchvision's resnet50 (no weights) at --batch images
of 224x224: each distinct (in, out, kernel, stride, input size) once, with how many of the
model's convolutions share it. Convolutions stay in cache between calls here (their weights
are small, at most 9.4 MiB dense); the model-level suite times them in the whole network.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from sparsekern import ops
from sparsekern.bench.common import compare, environment, interleaved, ratio_text, write_progress
from sparsekern.formats import NMWeight
from sparsekern.patterns import as_2d


def resnet50_convs(batch: int) -> list[dict]:
    """Distinct Conv2d geometries of torchvision resnet50 at `batch` images, with counts."""
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    seen: dict[tuple, dict] = {}

    def hook(mod, inputs, _out):
        x = inputs[0]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, tuple(x.shape[2:]))
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = {"name": name_of[mod], "in": mod.in_channels, "out": mod.out_channels,
                         "kernel": mod.kernel_size, "stride": mod.stride, "padding": mod.padding,
                         "hw": tuple(x.shape[2:]), "count": 1}

    name_of = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for h in hooks:
        h.remove()
    # The stem (3 input channels) cannot hold 2:4 groups along input channels.
    return [c for c in seen.values() if c["in"] % 4 == 0]


def run_case(c: dict, batch: int, rounds: int, env: dict) -> list[dict]:
    torch.manual_seed(0)
    kh, kw = c["kernel"]
    w = torch.randn(c["out"], c["in"], kh, kw)
    W = NMWeight.from_dense(as_2d(w), 2, 4)
    dense = W.to_dense().reshape(c["out"], kh, kw, c["in"]).permute(0, 3, 1, 2).contiguous()
    x = torch.randn(batch, c["in"], *c["hw"]).contiguous(memory_format=torch.channels_last)
    geo = (c["stride"], c["padding"], (1, 1))
    ref = F.conv2d(x.double(), dense.double(), None, *geo)
    n, _, h, wd = x.shape
    oh, ow = ref.shape[2:]

    def patches():
        xl = x.permute(0, 2, 3, 1)
        ph, pw = c["padding"]
        if ph or pw:
            xl = F.pad(xl, (0, 0, pw, pw, ph, ph))
        xl = xl.contiguous()
        s = xl.stride()
        cols = xl.as_strided((n, oh, ow, kh, kw, c["in"]),
                             (s[0], s[1] * geo[0][0], s[2] * geo[0][1], s[1], s[2], s[3])).reshape(-1, kh * kw * c["in"])
        return ops.nm_linear(cols, W).reshape(n, oh, ow, c["out"]).permute(0, 3, 1, 2)

    calls = {
        "torch.conv2d": lambda: F.conv2d(x, dense, None, *geo),
        "torch.conv2d.again": lambda: F.conv2d(x, dense, None, *geo),
        "cpp.patches": patches,
        "cpp.nm_conv2d": lambda: ops.nm_conv2d(x, W, (kh, kw), None, *geo),
    }
    assert ops.explain_backend("nm_conv2d", x, W)[0] == "cpp"
    for name, fn in calls.items():  # correctness first
        err = ((fn().double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{name} {c}: relative error {err:.2e}"
    res = compare(interleaved(calls, rounds), "torch.conv2d", "torch.conv2d.again")
    flop = 2.0 * n * oh * ow * c["out"] * c["in"] * kh * kw
    shape = f"{c['in']}->{c['out']} {kh}x{kw}/{geo[0][0]} @{c['hw'][0]}x{c['hw'][1]}"
    return [{"op": "nm_conv2d" if name.startswith("cpp.") else "conv2d", "provider": name,
             "pattern": "2:4" if name.startswith("cpp.") else "dense", "dtype": "float32", "shape": shape,
             "layer": c["name"], "layers_sharing": c["count"], "batch": batch, "rows": n * oh * ow,
             "device": "cpu", **r, "dense_equiv_gflop_per_s": flop / (r["median_ms"] * 1e-3) / 1e9,
             "speedup_vs_dense": r["speedup"], "commit": env["commit"]} for name, r in res.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    env = environment("cpu")
    env["SPARSEKERN_CPU_ISA"] = os.environ.get("SPARSEKERN_CPU_ISA")
    print(f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads, load {env['machine']['loadavg']}")
    print(f"{'shape':>26} {'n':>2} {'rows':>6} {'provider':>18} {'median ms':>10} {'x dense':>7} "
          f"{'ratio p20-p80':>14} {'noise':>6} verdict")
    rows = []
    for c in resnet50_convs(a.batch):
        rows += run_case(c, a.batch, a.rounds, env)
        for r in rows[-4:]:
            print(f"{r['shape']:>26} {r['layers_sharing']:>2} {r['rows']:>6} {r['provider']:>18} "
                  f"{r['median_ms']:>10.3f} {ratio_text(r)}", flush=True)
        write_progress(a.out, env, rows)
    if a.out:
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
