"""The compiler's resource report (nvcc -Xptxas=-v) as one line per kernel and architecture.

    python bench/ptxas_report.py build.log [--fail-on-spill]

Reads ptxas's "Compiling entry function ... for 'sm_XX'" / "N bytes stack frame, N bytes
spill stores, N bytes spill loads" / "Used N registers, used N barriers, N bytes smem"
lines, demangles the kernel names enough to read (template arguments kept), and prints
arch, registers, stack frame, spill stores/loads, static shared memory per kernel. With
--fail-on-spill it exits 1 when any kernel spills (CI and bench/gpu_check.sh use it).
"""
from __future__ import annotations

import argparse
import re
import sys

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def short_name(mangled: str) -> str:
    """'_ZN..4cuda..13nm_fma_kernelIN3c108BFloat16ELi4EEEv..' -> 'nm_fma_kernel<BFloat16,4>': the
    Itanium-mangled identifier (length-prefixed) that ends in 'kernel', plus its template args."""
    name, rest = None, ""
    for m in re.finditer(r"\d+", mangled):
        digits = m.group(0)
        for i in range(len(digits)):
            length = int(digits[i:])
            cand = mangled[m.end():m.end() + length]
            if length and len(cand) == length and cand.endswith("kernel") and cand.isidentifier():
                name, rest = cand, mangled[m.end() + length:]
                break
    if name is None:
        return mangled[:60]
    if rest.startswith("I"):
        args = []
        for tok in re.finditer(r"N3c108BFloat16E|N3c104HalfE|Lb[01]E|Li(\d+)E|^If|^Id", rest[:80]):
            t = tok.group(0)
            args.append({"N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16", "Lb0E": "false", "Lb1E": "true",
                         "If": "fp32", "Id": "fp64"}.get(t, tok.group(1)))
        name += "<" + ",".join(a for a in args if a) + ">"
    return name


def parse(text: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        e = _ENTRY.search(line)
        if e:
            cur = {"kernel": short_name(e.group(1)), "arch": e.group(2), "registers": None, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        f = _FRAME.search(line)
        if f:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in f.groups())
        u = _USED.search(line)
        if u:
            cur["registers"] = int(u.group(1))
            cur["smem"] = int(u.group(3) or 0)
    # one row per (arch, kernel); ptxas may print a kernel twice across translation units
    seen, out = set(), []
    for r in rows:
        key = (r["arch"], r["kernel"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return sorted(out, key=lambda r: (r["arch"], r["kernel"]))


def table(rows: list[dict]) -> str:
    lines = [f"{'arch':7} {'kernel':44} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}"]
    for r in rows:
        lines.append(f"{r['arch']:7} {r['kernel']:44} {r['registers'] or 0:>4} {r['stack']:>5} "
                     f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} {r['smem']:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a build log holding ptxas -v output ('-' for stdin)")
    p.add_argument("--fail-on-spill", action="store_true")
    a = p.parse_args(argv)
    text = sys.stdin.read() if a.log == "-" else open(a.log, errors="replace").read()
    rows = parse(text)
    print(table(rows))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if not rows:
        print("ptxas_report: no resource report found (was -Xptxas=-v passed?)")
    for r in spills:
        print(f"SPILL: {r['arch']} {r['kernel']}: {r['spill_stores']} bytes stored, {r['spill_loads']} loaded")
    return 1 if (a.fail_on_spill and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
