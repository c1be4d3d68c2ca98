"""Every CPU algorithm of the bitmask op against dense F.linear, per shape, density and row
count: the evidence behind dispatch_rules.bitmask_cpu_algo's row and density edges.

    python bench/bench_cpu_bitmask_algos.py --out bench/results/cpu-bitmask-algos-DATE
    python bench/bench_cpu_bitmask_algos.py --shapes 1536x384 --densities 0.5 --rows 20,46

The algorithms are those of the CPU-only op `bitmask_linear_cpu` (dispatch_rules
BITMASK_ALGO_NAMES), called directly with each `algo`, so every one runs at every row count
whatever the dispatch would pick. Weights are rotated (copies whose dense bytes exceed
--rotate-mib), so each call reads its weight from memory as inside a model. Each algorithm's
output is checked against the fp64 reference first. Per case, dense and every algorithm are
timed interleaved: `--rounds` rounds, each timing every provider over all the copies; the
figure is the median round's time per call, and "x dense" is dense's over it. Dense is timed
twice: the difference is the noise floor.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from sparsekern import _extension, dispatch_rules
from sparsekern.bench.common import environment, pick_threads
from sparsekern.formats import BitmaskWeight
from sparsekern.reporting import markdown_table


def _median_ms(fn, copies: int) -> float:
    t = time.perf_counter()
    for i in range(copies):
        fn(i)
    return (time.perf_counter() - t) / copies * 1e3


def run_case(out_f: int, in_f: int, density: float, rows_list, rounds: int, rotate_mib: int, algos) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    copies = max(2, (rotate_mib << 20) // (out_f * in_f * 4))
    dense = [torch.randn(out_f, in_f, generator=gen) for _ in range(copies)]
    dense = [w * (torch.rand(out_f, in_f, generator=gen) < density) for w in dense]
    fmts = [BitmaskWeight.from_dense(w) for w in dense]
    op = torch.ops.sparsekern.bitmask_linear_cpu
    rows_out = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, generator=gen)
        providers = {"dense": lambda i: F.linear(x, dense[i]), "dense (again)": lambda i: F.linear(x, dense[i])}
        for algo in algos:
            providers[dispatch_rules.BITMASK_ALGO_NAMES[algo]] = (
                lambda i, a=algo: op(x, fmts[i].values, fmts[i].bitmask, fmts[i].offsets, in_f, None, None, a))
        if density <= max(dispatch_rules.COLUMN_INDEX_MAX_DENSITY.values()):
            # the row kernels reading the 16-bit column index (BitmaskWeight.column_index)
            cols = [f.column_index() for f in fmts]
            providers["decode, column index"] = (
                lambda i: op(x, fmts[i].values, fmts[i].bitmask, fmts[i].offsets, in_f, None, cols[i],
                             dispatch_rules.BITMASK_ALGO_DECODE))
        ref = x.double() @ dense[0].double().T
        for name, fn in providers.items():
            err = float((fn(0).double() - ref).abs().max() / ref.abs().max())
            if err > 1e-5:
                raise AssertionError(f"{name} at {out_f}x{in_f}, density {density}, {rows} rows: relative error {err:.2e}")
        times = {name: [] for name in providers}
        for fn in providers.values():
            _median_ms(fn, copies)  # warm-up
        for _ in range(rounds):
            for name, fn in providers.items():
                times[name].append(_median_ms(fn, copies))
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        floor = abs(med["dense"] / med["dense (again)"] - 1)
        chosen = dispatch_rules.BITMASK_ALGO_NAMES[dispatch_rules.bitmask_cpu_algo(rows, density)]
        for name, ms in med.items():
            rows_out.append({"shape": f"{out_f}x{in_f}", "density": density, "rows": rows, "provider": name,
                             "ms": ms, "x_dense": med["dense"] / ms, "noise_floor": floor,
                             "dispatch_picks": name == chosen})
        best = min((n for n in med if not n.startswith("dense")), key=med.get)
        print(f"{out_f}x{in_f} density {density} rows {rows}: dense {med['dense']:.3f} ms; " +
              ", ".join(f"{n} {med['dense'] / med[n]:.2f}x" for n in med if not n.startswith("dense")) +
              f"; best {best}; dispatch picks {chosen}", flush=True)
    return rows_out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1536x384,384x1536,384x384", help="comma-separated OUTxIN")
    p.add_argument("--densities", default="0.1,0.3,0.5")
    p.add_argument("--rows", default="17,20,32,46,64")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--rotate-mib", type=int, default=64, help="dense bytes of the rotated copies (MiB)")
    p.add_argument("--threads", default="2", help="intra-op threads, or auto")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    a = p.parse_args(argv)
    if not _extension.cpu_kernels_available():
        raise SystemExit("the C++ extension is not built: pip install -e . (or setup.py build_ext --inplace)")
    threads, why = pick_threads(a.threads)
    # the one-row indexed kernel runs as the decode kernels above one row: not timed twice
    algos = [a for a in sorted(dispatch_rules.BITMASK_ALGO_NAMES) if a != dispatch_rules.BITMASK_ALGO_DECODE_B1_INDEXED]
    rows = []
    for shape in a.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for density in (float(d) for d in a.densities.split(",")):
            rows += run_case(out_f, in_f, density, [int(r) for r in a.rows.split(",")], a.rounds, a.rotate_mib, algos)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        env = environment("cpu")
        import shlex
        import sys
        command = "python bench/bench_cpu_bitmask_algos.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"environment": env, "command": command, "threads": threads, "threads_choice": why,
                       "rows": rows}, f, indent=1)
        table = markdown_table(rows, [("shape", "shape", ""), ("density", "density", "g"), ("rows", "rows", "d"),
                                      ("provider", "provider", ""), ("ms", "ms", ".3f"), ("x dense", "x_dense", ".2f"),
                                      ("noise floor", "noise_floor", ".1%"),
                                      ("dispatch picks", lambda r: "yes" if r["dispatch_picks"] else "", "")])
        with open(os.path.join(a.out, "results.md"), "w") as f:
            f.write(f"# bitmask CPU algorithms against dense ({env.get('cpu')}, {threads} threads, "
                    f"commit `{env.get('commit')}`)\n\nCommand: `{command}`\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
