"""The dispatch table: explain_backend is what runs (checked independently, with the
profiler's record of which custom op executed), forcing a backend, batch buckets, and
reasons that say why a backend was passed over."""
import pathlib
import re

import pytest
import torch

from backends import pairs, running
from sparsekern import ops
from sparsekern.formats import BitmaskWeight, BlockWeight, NMWeight
from sparsekern.patterns import pack_bitmask


def _calls(device):
    """{op: (key args for explain_backend, thunk)} for every op, on fresh random data."""
    w = torch.randn(32, 64, device=device)
    x = torch.randn(5, 64, device=device)
    nm = NMWeight.from_dense(w, 2, 4)
    bm = BitmaskWeight.from_dense(w, torch.rand(32, 64, device=device) < 0.3)
    blk = BlockWeight.from_dense(w, (16, 16), torch.rand(32, 64, device=device) < 0.05)
    bits = pack_bitmask(torch.rand(32, 64, device=device) < 0.5)
    g = torch.randn(5, 32, device=device)
    s = torch.zeros(64, device=device)
    h = torch.zeros(64, 64, device=device)
    xc = torch.randn(2, 16, 5, 4, device=device)  # nm's 64 columns as a 2x2 kernel over 16 channels
    x20 = torch.randn(20, 64, device=device)  # from 17 rows: the CPU's 2:4 GEMM kernel (nm_linear_cpu)
    q8 = NMWeight.from_dense(w, 2, 4, quantize="int8")
    q4 = NMWeight.from_dense(w, 2, 4, quantize="int4", group_size=32)
    bq = BitmaskWeight.from_dense(w, torch.rand(32, 64, device=device) < 0.3, quantize="int8")
    kq = BlockWeight.from_dense(w, (8, 16), torch.rand(32, 64, device=device) < 0.2, quantize="int8")
    calls = [
        ("nm_linear_q", (x, q8), lambda: ops.nm_linear_q(x, q8)),
        ("nm_linear_q", (x20, q4), lambda: ops.sparse_linear(x20, q4)),
        ("bitmask_linear_q", (x, bq), lambda: ops.sparse_linear(x, bq)),
        ("block_linear_q", (x, kq), lambda: ops.sparse_linear(x, kq)),
        ("nm_linear", (x, nm), lambda: ops.nm_linear(x, nm)),
        ("nm_linear", (x20, nm), lambda: ops.nm_linear(x20, nm)),
        ("nm_conv2d", (xc, nm, 2, None, 1, 1), lambda: ops.nm_conv2d(xc, nm, 2, None, 1, 1)),
        ("bitmask_linear", (x, bm), lambda: ops.bitmask_linear(x, bm)),
        ("block_linear", (x, blk), lambda: ops.block_linear(x, blk)),
        ("masked_linear", (x,), lambda: ops.masked_linear(x, w, bits)),
        ("masked_linear_grad_input", (g,), lambda: ops.masked_linear_grad_input(g, w, bits)),
        ("masked_linear_grad_weight", (g, x), lambda: ops.masked_linear_grad_weight(g, x, bits)),
        ("nm_compress", (w,), lambda: ops.nm_compress(w, None, 2, 4)),
        ("nm_decompress", (nm.values,), lambda: ops.nm_decompress(*nm.kernel_args())),
        ("nm24_pack_panels", (nm.values,), lambda: ops.nm24_pack_panels(nm.values, nm.indices, 64)),
        ("bitmask_compress", (w,), lambda: ops.bitmask_compress(w, None)),
        ("bitmask_decompress", (bm.values,), lambda: ops.bitmask_decompress(*bm.kernel_args())),
        ("block_compress", (w,), lambda: ops.block_compress(w, None, 16, 16)),
        ("block_decompress", (blk.crow_indices, blk.values), lambda: ops.block_decompress(*blk.kernel_args())),
        ("group_score", (w,), lambda: ops.group_score(w, 1, 4)),
        ("act_norm_accumulate", (s, x), lambda: ops.act_norm_accumulate(s, x)),
        ("nm_score_compress", (w,), lambda: ops.nm_score_compress(w, 2, 4)),
        ("hessian_accumulate", (h, x), lambda: ops.hessian_accumulate(h, x)),
    ]
    out = {}
    for op, key, thunk in calls:
        out.setdefault(op, []).append((key, thunk))
    return out


def _custom_ops_run(thunk) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        thunk()
    return {e.name for e in prof.events() if e.name.startswith(("sparsekern::", "sparsekern_triton::"))}


def test_every_op_is_in_the_table_and_every_backend_it_names_exists():
    assert set(ops.OPS) == set(_calls("cpu"))
    for spec in ops.OPS.values():
        assert callable(spec.reference)


@pytest.mark.parametrize("op", sorted(ops.OPS))  # every op of the table: a new one without a call fails
@pytest.mark.parametrize("backend", [None, "cpp", "reference"])
def test_explain_backend_is_what_runs(op, backend):
    """Independent of the table: the profiler records which compiled op executed, if any
    (the op, or its CPU-only op with the C++ kernel's own arguments)."""
    names = {op} | ({ops.OPS[op].cpu_op} if ops.OPS[op].cpu_op else set())
    for key, thunk in _calls("cpu")[op]:
        with ops.use_backend(backend):
            chosen, why = ops.explain_backend(op, *key)
            ran = _custom_ops_run(thunk)
        assert why
        if chosen == "cpp":
            assert any(f"sparsekern::{n}" in ran for n in names), \
                f"{op}: explain says cpp ({why}) but {ran or 'no compiled op'} ran"
        else:
            assert not any(name.endswith("::" + n) for name in ran for n in names), \
                f"{op}: explain says {chosen} but {ran} ran"
        if backend is not None and ops.OPS[op].cpp:
            assert chosen == backend


def test_automatic_choice_on_cpu_is_the_compiled_kernel_when_built():
    from sparsekern import _extension

    if not _extension.LOADED:
        pytest.skip(f"extension not loaded: {_extension.LOAD_ERROR}")
    for op, calls in _calls("cpu").items():
        expect = "cpp" if ops.OPS[op].cpp else "reference"
        for key, _ in calls:
            assert ops.backend_for(op, *key) == expect, op


def test_float64_runs_the_reference_and_says_why():
    x = torch.randn(2, 64, dtype=torch.float64)
    backend, why = ops.explain_backend("nm_linear", x)
    assert backend == "reference" and "float64" in why


def test_forcing_a_backend_the_op_has_not_falls_back_and_says_so():
    w = torch.randn(8, 64)
    with ops.use_backend("cuda"):
        backend, why = ops.explain_backend("hessian_accumulate", torch.zeros(64, 64), w)
    assert backend != "cuda" and "has no cuda kernel" in why


def test_forcing_a_backend_that_cannot_run_here_raises_with_the_reason():
    W = NMWeight.from_dense(torch.randn(8, 64), 2, 4)
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="nm_linear: use_backend\\('cuda'\\) cannot run"):
        ops.nm_linear(torch.randn(2, 64), W)
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        ops.explain_backend("nm_lineaar", torch.randn(2, 64))


def test_batch_buckets():
    assert [ops.batch_bucket(r) for r in (0, 1, 2, 4, 5, 16, 17, 64, 65, 256, 257, 10**6)] == \
        [1, 1, 4, 4, 16, 16, 64, 64, 256, 256, -1, -1]
    x1, x3, x300 = torch.randn(1, 64), torch.randn(3, 64), torch.randn(2, 150, 64)
    key = ops.OPS["nm_linear"].key
    assert key(x1)[1] != key(x3)[1] != key(x300)[1]
    assert key(x300)[1].bucket == ops.batch_bucket(300) and key(x300)[1].shape is None


@pytest.mark.parametrize("device,backend", pairs("block_linear"))
def test_explanation_follows_the_block_shape_and_device(device, backend):
    """block_linear's decision depends on the block shape (the Triton kernel takes square
    blocks of 16/32/64): the key holds it, so two layers never share a wrong decision; and
    on each device the backend the explanation names is the one that runs, for both shapes."""
    x = torch.randn(3, 64, device=device)
    a = BlockWeight.from_dense(torch.randn(32, 64, device=device), (16, 16))
    b = BlockWeight.from_dense(torch.randn(32, 64, device=device), (4, 8))
    assert ops.OPS["block_linear"].key(x, a)[1] != ops.OPS["block_linear"].key(x, b)[1]
    for w in (a, b):
        with running(backend, "block_linear", x, w):
            y = ops.block_linear(x, w)
        assert y.device == x.device
        torch.testing.assert_close(y.double(), x.double() @ w.to_dense().double().T, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------- every registered op is covered
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Ops timed by no benchmark, and why (a new op must have a case or a line here).
NOT_BENCHMARKED = {
    "nm_compress": "one-time conversion (NMWeight.from_dense), not on the inference path",
    "bitmask_compress": "one-time conversion (BitmaskWeight.from_dense), not on the inference path",
    "block_compress": "one-time conversion (BlockWeight.from_dense), not on the inference path",
    "block_decompress": "runs inside the decompress path of a layer (timed as that path), not alone",
}
# Ops whose tests name them through their format only, and where.
TESTED_THROUGH = {"block_decompress": "BlockWeight.to_dense (tests/test_formats.py)"}


def _words(paths) -> set[str]:
    text = "\n".join(p.read_text() for p in paths)
    return set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))


def test_every_registered_op_has_its_reference_fake_autograd_tests_and_benchmark():
    """Walks the table (and the compiled library's schemas): no op is silently left out."""
    from sparsekern import _extension, reference
    from sparsekern.ops import registration

    tests = _words(p for p in (ROOT / "tests").glob("test_*.py") if p.name not in ("test_dispatch.py",
                                                                                   "test_opcheck.py"))
    opcheck = _words([ROOT / "tests" / "test_opcheck.py"])
    bench = _words(list((ROOT / "sparsekern" / "bench").glob("*.py")) + list((ROOT / "bench").glob("*.py")))
    missing = []
    for name, spec in ops.OPS.items():
        if getattr(reference, name, None) is not spec.reference:
            missing.append(f"{name}: no reference.{name} (sparsekern/reference.py) as its OpSpec.reference")
        for op in [name] + ([spec.cpu_op] if spec.cpu_op else []):
            if op not in registration.FAKES:
                missing.append(f"{op}: no fake kernel (sparsekern/ops/registration.py FAKES)")
            if spec.differentiable != (op in registration.AUTOGRAD):
                missing.append(f"{op}: OpSpec.differentiable={spec.differentiable} but AUTOGRAD "
                               f"{'lacks' if spec.differentiable else 'has'} it")
            if (spec.cpp or spec.cuda) and op not in opcheck:
                missing.append(f"{op}: not in tests/test_opcheck.py's samples")
        if name not in tests and name not in TESTED_THROUGH:
            missing.append(f"{name}: no test names it (tests/test_{name}.py or the family's)")
        if name not in bench and name not in NOT_BENCHMARKED:
            missing.append(f"{name}: no benchmark case (sparsekern/bench/, bench/) and no NOT_BENCHMARKED reason")
    assert not missing, "\n".join(missing)
    if _extension.LOADED:  # every schema of the library is in the table (or a table op's CPU-only op)
        import torch

        compiled = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("sparsekern::")}
        known = set(registration.compiled_ops()) | {"build_info", "cpu_fma_probe", "cpu_evict_from_cache",
                                                    "cpu_pool_takeovers", "cpu_pool_pinned_storages", "cpu_contention"}
        assert compiled and compiled <= known, f"schemas with no table entry: {sorted(compiled - known)}"


def test_every_threshold_names_the_run_it_came_from():
    """dispatch_rules holds every threshold and margin once, each with its stored run."""
    from sparsekern import dispatch_rules

    thresholds = {n for n, v in vars(dispatch_rules).items()
                  if n.isupper() and n != "EVIDENCE"
                  and not n.startswith(("NM_ALGO", "Q_ALGO", "BITMASK_ALGO", "BLOCK_ALGO", "BACKEND_ORDER",
                                          "KERNEL_DTYPES", "BATCH_BUCKETS"))
                  and not isinstance(v, type)}
    assert thresholds <= set(dispatch_rules.EVIDENCE), sorted(thresholds - set(dispatch_rules.EVIDENCE))
    for name, measured in dispatch_rules.EVIDENCE.items():
        if measured.run.startswith("bench/results/"):
            assert (ROOT / measured.run / "README.md").exists(), f"{name}: {measured.run} is not a stored run"
