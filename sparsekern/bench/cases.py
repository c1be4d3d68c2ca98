"""Benchmark cases shared by the suite (sparsekern.bench.run), the repository's
bench/bench_cpu_linear.py, bench/bench_gpu_linear.py and bench/test_bench_cases.py
(pytest-benchmark): real model shapes, providers, correctness checks and timing loops."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from .. import kinds, ops
from ..formats import NMWeight
from .common import interleaved, quantiles, rel_err, time_variants, tolerance

F = torch.nn.functional

# Real model shapes (out, in): Llama-7B attention and MLP, Llama-70B MLP, ViT-B/L MLPs.
SHAPES = {
    "llama7b.qkvo": (4096, 4096), "llama7b.up": (11008, 4096), "llama7b.down": (4096, 11008),
    "llama70b.up": (28672, 8192), "vit_b.fc1": (3072, 768), "vit_b.fc2": (768, 3072), "vit_l.fc1": (4096, 1024),
}
PATTERNS = [("2:4", 0.5), ("4:8", 0.5), ("unstructured", 0.5), ("unstructured", 0.3), ("unstructured", 0.1),
            ("block16", 0.1), ("block32", 0.1), ("block64", 0.1)]


@dataclass
class Built:
    fn: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    dense_ref: torch.Tensor  # the weight the provider computes with, for the correctness check
    # fp64 of the provider's own math where it is not x @ dense_ref^T (the 2:4 int8 GEMM rounds
    # x per row first): checked against it, within fp32's tolerance
    expected: Callable[[torch.Tensor], torch.Tensor] | None = None


def _quantized_expected(W) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fp64 reference of nm_linear_q / bitmask_linear_q where the dispatch table sends x to
    an int8 GEMM that quantizes x per row first (the 2:4 int8 dot-product GEMM, the expanded
    int8 weight: the CPU op's reference for that algorithm), else None (x @ W^T is the
    reference)."""
    if not W.quantized:
        return None

    def expected(x):
        from .. import dispatch_rules
        from ..ops.dispatch import decide
        from ..ops.table import CPU_OP_REFERENCES, OPS

        d, key = decide(W.OP, (x, W))
        if d.backend != "cpp" or getattr(key, "cpu_algo", None) not in (dispatch_rules.Q_ALGO_INT8_DOT,
                                                       dispatch_rules.Q_ALGO_INT8_EXPAND):
            return None
        return CPU_OP_REFERENCES[OPS[W.OP].cpu_op](x.double(), *W.kernel_args(), None, key.cpu_algo)
    return expected


def _mask(w, pattern, density, gen):
    """A random keep-mask of the pattern (about `density` kept; N:M keeps its n of m)."""
    scores = torch.rand(w.shape, generator=gen, device=gen.device)
    return kinds.make_mask(scores, pattern, sparsity=1.0 - density, where="bench case")


def sparse_format(w, pattern, density, gen):
    """The pattern's format of `w` under a random mask (kinds.compress)."""
    return kinds.compress(w, pattern, _mask(w, pattern, density, gen))


def _torch_sparse(layout: str):
    """A builder of torch's own sparse matmul (CSR or BSR) over the masked weight."""
    def build(w, d, g, pattern):
        wd = w * _mask(w, pattern, d, g)
        block = kinds.parse(pattern).entry.block_of(kinds.parse(pattern).params, None)
        S = wd.to_sparse_csr() if layout == "csr" else wd.to_sparse_bsr(block)
        nb = sum(t.numel() * t.element_size() for t in (S.values(), S.col_indices(), S.crow_indices()))
        return Built(lambda x: torch.sparse.mm(S, x.t()).t(), nb, wd)
    return build


# Value precisions timed beside the float format: (precision, group_size).
QUANTIZED = (("int8", 0), ("int4", 128))


# torch's own sparse layout that holds each kind, a peer in every sweep of that kind.
TORCH_SPARSE_PEERS = {"unstructured": ("torch.csr", _torch_sparse("csr")),
                      "block": ("torch.bsr", _torch_sparse("bsr"))}


def providers(device: str, pattern: str, quantized: bool = False):
    """name -> builder(w, density, gen) -> Built, for the providers that run this pattern here.
    quantized: also the format with int8 / int4 values (QUANTIZED), "sparsekern.int8" and
    "sparsekern.int4"."""
    out = {}

    def sk(w, d, g):
        W = sparse_format(w, pattern, d, g)
        return Built(lambda x: ops.sparse_linear(x, W), W.nbytes, W.to_dense())

    out["sparsekern"] = sk
    # Quantized values (nm_linear_q, bitmask_linear_q and block_linear_q read them packed): int8
    # in every format, int4 (group 128) where the format stores a row's values contiguously
    # (ROW_VALUES: N:M).
    fmt_cls = kinds.parse(pattern).entry.format
    for prec, group in QUANTIZED if quantized else ():
        if fmt_cls is None or (group and not getattr(fmt_cls, "ROW_VALUES", False)):
            continue

        def skq(w, d, g, prec=prec, group=group):
            W = sparse_format(w, pattern, d, g).quantize(prec, group)
            return Built(lambda x: ops.sparse_linear(x, W), W.nbytes, W.to_dense(), _quantized_expected(W))

        out[f"sparsekern.{prec}"] = skq
    if device == "cuda":
        def tri(w, d, g):
            W = sparse_format(w, pattern, d, g)

            def fn(x):
                with ops.use_backend("triton"):
                    return ops.sparse_linear(x, W)
            return Built(fn, W.nbytes, W.to_dense())

        out["sparsekern.triton"] = tri
        if pattern == "2:4":
            def semi(w, d, g):
                from torch.sparse import to_sparse_semi_structured

                wd = NMWeight.from_dense(w, 2, 4).to_dense()
                S = to_sparse_semi_structured(wd)
                return Built(lambda x: F.linear(x, S), int(wd.numel() * wd.element_size() * 0.5625), wd)

            out["torch.semi_structured"] = semi
    peer = TORCH_SPARSE_PEERS.get(kinds.parse(pattern).kind)
    if peer is not None:
        name, build = peer
        out[name] = lambda w, d, g: build(w, d, g, pattern)
    return out


def check(built: Built, x: torch.Tensor, what: str) -> float:
    """The provider's output against x @ W^T in fp64, with the test suite's rule
    (common.tolerance): fp32 within 1e-5 relative, bf16/fp16 within 2x the error of torch's
    own F.linear in that dtype. Returns the error; raises (and the case is not timed) when
    it is off."""
    y = built.fn(x)
    ref = x.double() @ built.dense_ref.double().t()
    torch_err = rel_err(F.linear(x, built.dense_ref.to(x.dtype)), ref)
    own = built.expected(x) if built.expected is not None else None
    if own is not None:
        ref = own
    err, tol = rel_err(y, ref), tolerance(x.dtype, torch_err)
    if not err <= tol:
        raise RuntimeError(f"{what}: relative error {err:.2e} exceeds {tol:.1e} (torch's own: {torch_err:.1e}); "
                           "not timing it")
    return err


def time_calls(calls: list[Callable[[], object]], device: str, reps: int) -> list[float]:
    """Seconds per call of one provider alone: `reps` samples, each one pass over the
    rotated calls. For comparisons use common.interleaved, which times providers
    round-robin; this is for a single number (e.g. the copy bandwidth)."""
    return interleaved({"x": calls}, reps, device)["x"]


DENSE, DENSE_AGAIN = "torch.dense", "torch.dense (again)"


def linear_sweep(device: str, dtype: torch.dtype, shapes: dict, batches: list[int], patterns: list, reps: int,
                 rotate_mib: int, env: dict, show_progress: bool = True, quantized: bool = False) -> list[dict]:
    """Every (shape, pattern, provider, batch) against dense F.linear in the same loop:
    per batch, every provider checked against the fp64 reference, then all of them and
    dense twice ("torch.dense (again)": the noise floor of that cell) timed interleaved,
    `reps` rounds (common.interleaved), each sample one pass over the rotated weights.
    quantized: the int8 / int4 formats too (providers)."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    work = [(sn, s, p, d) for sn, s in shapes.items() for p, d in patterns]
    bar = tqdm(work, "linear", disable=not show_progress, mininterval=1.0)
    for sname, (N, K), pattern, density in bar:
        bar.set_postfix_str(f"{sname} {pattern} {density:.0%}", refresh=False)
        copies = max(2, math.ceil(rotate_mib * 2**20 / (N * K * torch.finfo(dtype).bits / 8)))
        weights = [torch.randn(N, K, device=device, dtype=dtype, generator=gen) for _ in range(copies)]
        built = {DENSE: [Built((lambda x, w=w: F.linear(x, w)), w.numel() * w.element_size(), w) for w in weights]}
        base = {"op": "linear", "pattern": pattern, "density": density, "shape": f"{N}x{K}", "model_shape": sname}
        for name, make in providers(device, pattern, quantized).items():
            try:
                built[name] = [make(w, density, gen) for w in weights]
            except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
                rows.append({**base, "provider": name, "error": f"{type(e).__name__}: {e}"[:200]})
        for B in batches:
            x = torch.randn(B, K, device=device, dtype=dtype, generator=gen)
            calls, errs = {}, {}
            for name, items in built.items():
                try:
                    errs[name] = check(items[0], x, f"{name} {pattern} {N}x{K} B={B}")
                    calls[name] = [lambda f=b.fn: f(x) for b in items]
                except Exception as e:  # noqa: BLE001
                    rows.append({**base, "provider": name, "batch": B, "error": f"{type(e).__name__}: {e}"[:200]})
            if DENSE not in calls:
                continue
            calls = {DENSE: calls[DENSE], DENSE_AGAIN: calls[DENSE], **calls}
            errs[DENSE_AGAIN] = errs[DENSE]
            res = time_variants(calls, reps, DENSE, DENSE_AGAIN, device)
            for name, r in res.items():
                dense = name in (DENSE, DENSE_AGAIN)
                nbytes = built[DENSE if dense else name][0].nbytes
                flops = 2 * B * N * K * (1.0 if dense else density)
                rows.append({**base, "provider": name, "variant": name, "metric": "latency", "pattern": "dense" if dense else pattern,
                             "density": 1.0 if dense else density, "dtype": str(dtype).split(".")[-1],
                             "batch": B, "device": env["device_name"], "baseline": DENSE, **r,
                             "speedup_vs_dense": r["speedup"], "cell_pattern": pattern, "cell_density": density,
                             "gb_per_s": nbytes / (r["median_ms"] * 1e-3) / 1e9,
                             "tflop_per_s": flops / (r["median_ms"] * 1e-3) / 1e12, "rel_err": errs[name],
                             "weight_bytes": nbytes})
        del weights, built
    return rows


def copy_bandwidth_gbs(device: str) -> float:
    """Measured copy bandwidth (bytes read + written per second), the memory roofline."""
    n = (256 if device == "cpu" else 1024) * 2**20 // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    samples = time_calls([lambda: b.copy_(a)], device, 5)
    return 2 * a.numel() * 4 / quantiles(samples)["median_ms"] / 1e6
