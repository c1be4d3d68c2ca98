"""The registry of pattern kinds (sparsekern/kinds.py): every entry is complete, round-trips,
and nothing outside the registry tests a kind by name."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from sparsekern import kinds, ops
from sparsekern.bench import cases
from sparsekern.sparsegpt import sparsegpt_weight

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One spelling per kind with parameters, as users write them (dense and unstructured have none).
SPELLINGS = {"nm": ["2:4", "4:8", "1:16"], "unstructured": ["unstructured"], "block": ["block", "block8", "block8x16"],
             "dense": ["dense"]}


def test_every_kind_has_spellings_here():
    assert set(SPELLINGS) == set(kinds.KINDS), "add the new kind's spellings to SPELLINGS"


def test_kind_codes_never_change():
    """Modules store the code in weight_meta: old checkpoints load only if a code keeps its kind."""
    assert {k.name: k.code for k in kinds.KINDS.values()} == {"nm": 1, "unstructured": 2, "block": 3, "dense": 4}
    assert len(kinds.KIND_OF_CODE) == len(kinds.KINDS)


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_spellings_round_trip(kind):
    for spelling in SPELLINGS[kind]:
        p = kinds.parse(spelling)
        assert p.kind == kind and p.entry is kinds.KINDS[kind]
        assert kinds.parse(p.spelling) == p
        assert kinds.parse("  " + spelling.upper() + " ") == p


@pytest.mark.parametrize("bad", ["3:3", "2:5", "0:4", "blockx", "sparse", "", "2:4:8"])
def test_bad_spellings_name_the_argument(bad):
    with pytest.raises(ValueError, match="where-it-was"):
        kinds.parse(bad, "where-it-was")


def test_a_non_string_pattern_is_a_type_error():
    with pytest.raises(TypeError, match="pattern must be a string"):
        kinds.parse(24)


def _weight(rows=32, cols=64):
    return torch.randn(rows, cols, dtype=torch.float64).float()


@pytest.mark.parametrize("kind", [k for k in kinds.KINDS if kinds.KINDS[k].format is not None])
def test_a_kind_with_a_format_is_complete(kind):
    """The format, its op, its mask, its checks, its bench case and its tests exist."""
    entry = kinds.KINDS[kind]
    fmt = entry.format
    for attr in ("from_dense", "to_dense", "from_tensors", "validate", "slice_rows", "slice_cols", "cat_rows",
                 "cat_cols", "mask", "meta", "kernel_args"):
        assert callable(getattr(fmt, attr, None)), f"{fmt.__name__} lacks {attr}"
    assert hasattr(ops, fmt.OP), f"{fmt.__name__}.OP = {fmt.OP!r} is not an op in sparsekern.ops"
    assert any(kinds.parse(p).kind == kind for p, _ in cases.PATTERNS), f"no benchmark case of kind {kind}"
    for test_file in ("test_fuzz.py", "test_formats.py", "test_parallel_slicing.py"):
        assert fmt.__name__ in (ROOT / "tests" / test_file).read_text(), f"tests/{test_file} never names {fmt.__name__}"


@pytest.mark.parametrize("spelling", ["2:4", "4:8", "unstructured", "block8", "block8x16", "dense"])
def test_mask_compress_detect_and_meta_round_trip(spelling):
    p = kinds.parse(spelling)
    entry = p.entry
    w = _weight()
    mask = kinds.make_mask(w.abs(), spelling, sparsity=0.75)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    entry.check_mask(mask, p.params, spelling)
    entry.check_shape(*w.shape, p.params, (32, 32), "test")
    f = kinds.compress(w, spelling, mask, block=(32, 32))
    assert kinds.kind_of(f) is entry
    dense = f if isinstance(f, torch.Tensor) else f.to_dense()
    torch.testing.assert_close(dense, w * mask, rtol=0, atol=0)
    meta = kinds.meta_of(f)
    assert kinds.kind_of_code(int(meta[0])) is entry
    if entry.format is not None:
        assert kinds.parse(kinds.pattern_of_meta(meta)).kind == p.kind
        # the most compact kind holding the mask is the one it was made with (block8x16 is
        # detected as block8: square blocks only)
        assert kinds.parse(kinds.detect_pattern(mask)).kind == p.kind


def test_detect_prefers_the_most_compact_kind():
    w = _weight(64, 64)
    assert kinds.detect_pattern(kinds.make_mask(w.abs(), "2:4")) == "2:4"
    blocks = kinds.make_mask(w.abs(), "block16", sparsity=0.5)
    assert kinds.detect_pattern(blocks) == "block16"
    assert kinds.detect_pattern(torch.rand(64, 64) < 0.3) == "unstructured"


@pytest.mark.parametrize("spelling,shape,match", [("2:4", (8, 6), "divisible by m=4"),
                                                  ("block8", (12, 16), "not divisible by block")])
def test_check_shape_refuses_what_the_format_cannot_hold(spelling, shape, match):
    p = kinds.parse(spelling)
    with pytest.raises(ValueError, match=match):
        p.entry.check_shape(*shape, p.params, (32, 32), "here")


def test_check_mask_refuses_a_mask_that_does_not_fit():
    p = kinds.parse("2:4")
    with pytest.raises(ValueError, match="keeps more than 2"):
        p.entry.check_mask(torch.ones(4, 8, dtype=torch.bool), p.params, "2:4")


@pytest.mark.parametrize("spelling", ["unstructured", "block"])
def test_kinds_that_need_sparsity_say_so(spelling):
    with pytest.raises(ValueError, match="needs sparsity="):
        kinds.make_mask(_weight().abs(), spelling, sparsity=None, where="here")


@pytest.mark.parametrize("spelling", [s for k, ss in SPELLINGS.items() if kinds.KINDS[k].prunable for s in ss])
def test_sparsegpt_gives_a_mask_of_the_kind(spelling):
    p = kinds.parse(spelling)
    torch.manual_seed(0)
    rows, cols = 32, 64
    w = _weight(rows, cols)
    x = torch.randn(256, cols, dtype=torch.float64)
    new, mask = sparsegpt_weight(w, x.T @ x, spelling, 0.5, blocksize=16, block=(8, 8))
    p.entry.check_mask(mask, p.params, spelling)
    assert torch.equal(new != 0, (new != 0) & mask)
    kept = p.params["n"] / p.params["m"] if "n" in p.params else 0.5  # N:M fixes its own density
    assert abs(float(mask.float().mean()) - kept) < 0.05


def test_sparsegpt_refuses_a_kind_that_is_not_prunable():
    with pytest.raises(ValueError, match="not prunable"):
        sparsegpt_weight(_weight(), torch.eye(64, dtype=torch.float64), "dense")


@pytest.mark.parametrize("kind,dim,params,block,step", [("nm", 1, {"n": 2, "m": 8}, None, 8), ("nm", 0, {"n": 2, "m": 8}, None, 1),
                                                        ("unstructured", 1, {}, None, 64), ("block", 0, {}, (16, 32), 16),
                                                        ("block", 1, {}, (16, 32), 32), ("dense", 1, {}, None, 1)])
def test_shard_steps(kind, dim, params, block, step):
    assert kinds.KINDS[kind].shard_step(dim, params, block) == step


# `kind == "nm"`, `kind in ("nm", ...)`, `.KIND == ...`: a test of a pattern kind by name.
# (the dense kind's name is also a backend, a path and a method: only its tests as `kind == ...`)
_NAMES = "|".join(k.name for k in kinds.KINDS.values() if k.format is not None)
_KIND_TEST = re.compile(rf"""(==|!=)\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=)|"""
                        rf"""\b(not\s+)?in\s*[\(\[\{{][^)\]}}]*["']({_NAMES})["']|\.KIND\b|\bKIND_CODES\b|"""
                        r"""\bkind\s*(==|!=)\s*["']dense["']""")


# A stored result row's field compared with a spelling (r["pattern"] == "unstructured") picks
# rows of a table; it is not code that behaves by kind.
_ROW_FIELD = re.compile(r"""\w+\[["']\w+["']\]\s*(==|!=)\s*["'][\w:]+["']""")


def test_the_kind_test_finds_what_it_looks_for():
    for line in ('if kind == "nm":', "elif p.kind != 'block'", 'if kind in ("unstructured", "block")', 'f.KIND'):
        assert _KIND_TEST.search(line), line
    for line in ('for kind in ("mlp", "cnn"):', 'if name == "dense_copy"', 'kinds.KINDS["dense"]'):
        assert not _KIND_TEST.search(line), line


def test_no_kind_is_tested_by_name_outside_the_registry():
    files = [p for p in (ROOT / "sparsekern").rglob("*.py") if p.name != "kinds.py"]
    files += [ROOT / "bench" / "make_tables.py"]
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) if _KIND_TEST.search(_ROW_FIELD.sub("", line))]
    assert not bad, "ask sparsekern.kinds instead:\n" + "\n".join(bad)
