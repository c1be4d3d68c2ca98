"""The registry of pattern kinds: everything that varies by kind, declared once.

A kind is a family of sparsity patterns with one compressed format: N:M, unstructured
(bitmask), block (BSR), and dense (a masked dense tensor). Each kind is one `Kind` entry
below; it declares

  grammar      the spellings users write ("2:4", "unstructured", "block16x32", "dense") and
               the canonical spelling of its parameters (`parse`, `Kind.spell`);
  code         the integer a sparse module stores first in its `weight_meta` buffer (these
               never change, so old checkpoints keep loading);
  format       the class in sparsekern.formats that holds it (None for dense), and
               `compress`, which builds one from a 2-D weight and a mask;
  masks        `mask`: the keep-mask of a score tensor (sparsekern.prune's functions), and
               whether the kind needs `sparsity=`;
  checks       `check_shape` (can a 2-D weight of this shape hold it) and `check_mask` (does
               a given mask fit it);
  SparseGPT    `sparsegpt_group` (the columns a mask decision spans) and `sparsegpt_select`
               (the mask decision inside the column sweep);
  sharding     `shard_step`: the multiple a tensor-parallel cut must fall on, and its words.

Nothing outside this module tests `kind == "nm"`: it asks the entry. Adding a kind is one
entry here, its format class (sparsekern/formats.py), its kernels and its tests
(docs/ADDING_A_FORMAT.md).

Layer: above sparsekern.formats and sparsekern.prune (an entry names its format class and
its mask function), below reconstruction, modules and swap, which read it.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from . import formats, prune
from .patterns import check_nm


class Pattern(NamedTuple):
    """A parsed pattern: the kind's name (a key of KINDS) and its parameters (nm: {"n", "m"};
    block: {"block": (rows, cols)} when the spelling names one; else {})."""
    kind: str
    params: dict

    @property
    def entry(self) -> "Kind":
        return KINDS[self.kind]

    @property
    def spelling(self) -> str:
        return self.entry.spell(self.params)


class Kind:
    """One pattern kind (module docstring). Subclasses fill in the class attributes and
    override what differs; the defaults are those of a kind with no parameters."""

    name: str = ""
    code: int = 0
    format: type | None = None
    grammar: str = ""             # a regular expression over the lowercased, stripped spelling
    examples: str = ""            # the spellings, for error messages
    needs_sparsity: bool = False  # the mask needs sparsity= (the fraction to remove)
    prunable: bool = True         # SparseGPT and the masks can produce it
    # Tensor parallelism: what a row-wise cut must keep whole (str.format over m, bh, bw).
    shard_what: str = "nothing"
    # detect_pattern tries the kinds in this order (None: never detected from a mask).
    detect_order: int | None = None

    # ---------------------------------------------------------------- grammar
    def params_of(self, match: re.Match, where: str) -> dict:
        """The parameters of a spelling that matched `grammar`, checked."""
        return {}

    def spell(self, params: dict) -> str:
        """The canonical spelling of these parameters (parse's inverse)."""
        return self.name

    def pattern_of_meta(self, meta_ints: list[int]) -> str:
        """The spelling of a saved weight_meta's format ints (after the code)."""
        return self.name

    def detect(self, mask2d: torch.Tensor) -> str | None:
        """The most compact spelling of this kind that holds the 2-D mask exactly, or None."""
        return None

    # ---------------------------------------------------------------- masks and checks
    def mask(self, scores: torch.Tensor, params: dict, sparsity, block, where: str = "mask") -> torch.Tensor:
        """bool keep-mask of `scores` (the weight's shape; conv weights as they are)."""
        raise NotImplementedError

    def check_shape(self, rows: int, cols: int, params: dict, block, where: str, channels: int | None = None) -> None:
        """Raises ValueError when a [rows, cols] 2-D weight cannot hold this kind. `channels`:
        for a convolution's [out, kh*kw*in] view, the input channels (a group must not
        cross a kernel position)."""

    def check_mask(self, mask2d: torch.Tensor, params: dict, pattern: str) -> None:
        """Raises ValueError when a 2-D keep-mask cannot be held by this kind."""

    def compress(self, w2d: torch.Tensor, mask2d: torch.Tensor, params: dict, block, quantize: str | None = None,
                 group_size: int = 0, scales: torch.Tensor | None = None):
        """The format object for a 2-D weight and its mask, its kept values stored in
        `quantize` (None, "int8", "int4": sparsekern/precisions.py; scales: fixed scales,
        _Format.quantize)."""
        raise NotImplementedError

    def block_of(self, params: dict, block):
        """The block shape this pattern uses (None for kinds without blocks)."""
        return None

    # ---------------------------------------------------------------- SparseGPT
    def sparsegpt_group(self, params: dict, block) -> int:
        """Columns one mask decision spans in SparseGPT's sweep (column blocks are cut on
        multiples of it)."""
        return 1

    def sparsegpt_select(self, W1: torch.Tensor, d1: torch.Tensor, i: int, mask1: torch.Tensor, params: dict,
                         sparsity, block) -> None:
        """At column i of a column block, marks in mask1 (True = pruned) what this kind
        prunes from that column on, by the OBS saliency w^2 / [H^-1]_jj^2 of the block's
        current weights W1 (d1: the block's [H^-1] diagonal)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- sharding
    def shard_step(self, dim: int, params: dict, block) -> int:
        """The multiple that each rank's share of the cut dimension must be (dim 0: output
        rows, 1: input columns)."""
        return 1

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


class NMKind(Kind):
    name, code, format = "nm", 1, formats.NMWeight
    grammar, examples = r"(\d+):(\d+)", "'N:M' (e.g. '2:4')"
    shard_what = "an N:M group of {m} columns"

    def params_of(self, match, where):
        n, m = int(match.group(1)), int(match.group(2))
        check_nm(n, m, where)
        return {"n": n, "m": m}

    def spell(self, params):
        return f"{params['n']}:{params['m']}"

    def pattern_of_meta(self, meta_ints):
        return f"{meta_ints[0]}:{meta_ints[1]}"

    detect_order = 0
    # Tried densest-first; a 90%-sparse mask also "fits" 4:8 but would store 50% of the values.
    DETECTED = ((2, 4), (1, 4), (4, 8), (2, 8), (1, 8), (8, 16))

    def detect(self, mask2d):
        density = float(mask2d.float().mean())
        for n, m in self.DETECTED:
            if mask2d.shape[1] % m == 0 and n / m <= density * 1.1 + 1e-9 and \
                    bool((mask2d.reshape(mask2d.shape[0], -1, m).sum(-1) <= n).all()):
                return self.spell({"n": n, "m": m})
        return None

    def mask(self, scores, params, sparsity, block, where="mask"):
        return prune.nm_mask(scores, params["n"], params["m"])

    def check_shape(self, rows, cols, params, block, where, channels=None):
        m = params["m"]
        if channels is not None and channels % m:
            raise ValueError(f"{where}: in_channels={channels} is not divisible by m={m} "
                             "(N:M groups run along input channels)")
        if cols % m:
            raise ValueError(f"{where}: in_features={cols} is not divisible by m={m}")

    def check_mask(self, mask2d, params, pattern):
        n, m = params["n"], params["m"]
        if mask2d.shape[1] % m or bool((mask2d.reshape(mask2d.shape[0], -1, m).sum(-1, dtype=torch.int16) > n).any()):
            raise ValueError(f"mask does not fit pattern {pattern!r}: some group of {m} inputs keeps more than {n}")

    def compress(self, w2d, mask2d, params, block, quantize=None, group_size=0, scales=None):
        return formats.NMWeight.from_dense(w2d, params["n"], params["m"], mask=mask2d).quantize(quantize, group_size,
                                                                                              scales)

    def sparsegpt_group(self, params, block):
        return params["m"]

    def sparsegpt_select(self, W1, d1, i, mask1, params, sparsity, block):
        n, m = params["n"], params["m"]
        if i % m:
            return
        tmp = W1[:, i:i + m].square() / d1[i:i + m].square()[None, :]
        idx = torch.sort(tmp, dim=1, stable=True).indices[:, : m - n]  # ties: lower column pruned
        mask1[:, i:i + m].scatter_(1, idx, True)

    def shard_step(self, dim, params, block):
        return params["m"] if dim == 1 else 1


class UnstructuredKind(Kind):
    name, code, format = "unstructured", 2, formats.BitmaskWeight
    grammar, examples = r"unstructured", "'unstructured'"
    needs_sparsity = True
    shard_what = "a 64-column bitmask word"
    detect_order = 2  # holds any mask: the fallback

    def detect(self, mask2d):
        return self.name

    def mask(self, scores, params, sparsity, block, where="mask"):
        _need_sparsity(self, sparsity, where, "weights")
        return prune.unstructured_mask(scores, sparsity)

    def compress(self, w2d, mask2d, params, block, quantize=None, group_size=0, scales=None):
        return formats.BitmaskWeight.from_dense(w2d, mask2d).quantize(quantize, group_size, scales)

    def sparsegpt_select(self, W1, d1, i, mask1, params, sparsity, block):
        if i:
            return  # one decision per column block, at its first column
        tmp = W1.square() / d1.square()[None, :]
        k = int(round(tmp.numel() * float(sparsity)))
        if k:
            mask1.view(-1)[torch.topk(tmp.reshape(-1), k, largest=False).indices] = True

    def shard_step(self, dim, params, block):
        return 64 if dim == 1 else 1  # whole bitmask words


class BlockKind(Kind):
    name, code, format = "block", 3, formats.BlockWeight
    grammar, examples = r"block(?:(\d+)(?:x(\d+))?)?", "'block' / 'block32' / 'block16x32'"
    needs_sparsity = True
    shard_what = "a {bh}x{bw} block"
    detect_order = 1
    DETECTED = (64, 32, 16, 8)  # square blocks, largest first

    def detect(self, mask2d):
        rows, cols = mask2d.shape
        for b in self.DETECTED:
            if rows % b == 0 and cols % b == 0:
                blocks = mask2d.reshape(rows // b, b, cols // b, b)
                if bool((blocks.all(3).all(1) == blocks.any(3).any(1)).all()):
                    return f"block{b}"
        return None

    def params_of(self, match, where):
        if match.group(1) is None:
            return {}
        bh = int(match.group(1))
        return {"block": (bh, int(match.group(2) or bh))}

    def spell(self, params):
        if "block" not in params:
            return self.name
        bh, bw = params["block"]
        return f"block{bh}x{bw}"

    def block_of(self, params, block):
        return tuple(params.get("block", block))

    def mask(self, scores, params, sparsity, block, where="mask"):
        _need_sparsity(self, sparsity, where, "blocks")
        return prune.block_mask(scores, self.block_of(params, block), sparsity)

    def check_shape(self, rows, cols, params, block, where, channels=None):
        bh, bw = self.block_of(params, block)
        if rows % bh or cols % bw:
            raise ValueError(f"{where}: weight 2-D shape {(rows, cols)} is not divisible by block {(bh, bw)}")

    def compress(self, w2d, mask2d, params, block, quantize=None, group_size=0, scales=None):
        return formats.BlockWeight.from_dense(w2d, self.block_of(params, block), mask2d).quantize(quantize, group_size,
                                                                                                  scales)

    def sparsegpt_group(self, params, block):
        return self.block_of(params, block)[1]

    def sparsegpt_select(self, W1, d1, i, mask1, params, sparsity, block):
        bh, bw = self.block_of(params, block)
        if i % bw:
            return
        rows = W1.shape[0]
        tmp = (W1[:, i:i + bw].square() / d1[i:i + bw].square()[None, :]).reshape(rows // bh, bh, bw).sum((1, 2))
        k = int(round(tmp.numel() * float(sparsity)))
        if k:
            drop = torch.zeros(rows // bh, dtype=torch.bool, device=W1.device)
            drop[torch.topk(tmp, k, largest=False).indices] = True
            mask1[:, i:i + bw] = drop.repeat_interleave(bh)[:, None]

    def pattern_of_meta(self, meta_ints):
        return self.name  # the block shape lives in the stored values' shape, not in the meta ints

    def shard_step(self, dim, params, block):
        b = params.get("block", block)
        if not b:
            return 1
        return b[0] if dim == 0 else b[1]


class DenseKind(Kind):
    """A masked dense tensor: the pattern that keeps a layer dense (zeros in place)."""
    name, code, format = "dense", 4, None
    grammar, examples = r"dense", "'dense'"
    prunable = False

    def mask(self, scores, params, sparsity, block, where="mask"):
        return torch.ones_like(scores, dtype=torch.bool)

    def compress(self, w2d, mask2d, params, block, quantize=None, group_size=0, scales=None):
        if quantize is not None:
            raise ValueError("pattern 'dense' keeps a float tensor; quantize a dense layer with torch's own int8 "
                             "(torch.ao.quantization.quantize_dynamic), or pick a sparse pattern")
        return w2d * mask2d


def _need_sparsity(kind: Kind, sparsity, where: str, what: str) -> None:
    if sparsity is None:
        raise ValueError(f"{where}: pattern '{kind.name}' needs sparsity= (fraction of {what} to remove)")


KINDS: dict[str, Kind] = {k.name: k for k in (NMKind(), UnstructuredKind(), BlockKind(), DenseKind())}
KIND_OF_CODE: dict[int, Kind] = {k.code: k for k in KINDS.values()}
KIND_OF_FORMAT: dict[type, Kind] = {k.format: k for k in KINDS.values() if k.format is not None}
FORMATS: tuple[type, ...] = tuple(KIND_OF_FORMAT)


def parse(pattern: str, where: str = "pattern") -> Pattern:
    """The kind and parameters of a pattern string, by the registered grammars."""
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: pattern must be a string such as '2:4', 'unstructured' or 'block', got {pattern!r}")
    p = pattern.strip().lower()
    for kind in KINDS.values():
        match = re.fullmatch(kind.grammar, p)
        if match:
            return Pattern(kind.name, kind.params_of(match, where))
    spellings = ", ".join(k.examples for k in KINDS.values())
    raise ValueError(f"{where}: unknown pattern {pattern!r}; use one of {spellings}")


def kind_of_code(code: int, where: str = "weight_meta") -> Kind:
    """The entry of a kind code stored in a module's weight_meta; ValueError if unknown."""
    kind = KIND_OF_CODE.get(int(code))
    if kind is None:
        raise ValueError(f"{where}: unknown kind code {int(code)} (known: {sorted(KIND_OF_CODE)})")
    return kind


def kind_of(fmt) -> Kind:
    """The entry of a format object (or of a dense tensor: the dense kind)."""
    if isinstance(fmt, torch.Tensor):
        return KINDS["dense"]
    kind = KIND_OF_FORMAT.get(type(fmt))
    if kind is None:
        raise TypeError(f"not a sparsekern format: {type(fmt).__name__}")
    return kind


def meta_of(fmt) -> torch.Tensor:
    """int64 weight_meta of a format object or a dense tensor: the kind code, then the
    format's own ints (how a sparse module stores the kind)."""
    kind = kind_of(fmt)
    head = torch.tensor([kind.code], dtype=torch.int64)
    return head if kind.format is None else torch.cat([head, fmt.meta()])


def pattern_of_meta(meta) -> str:
    """The pattern spelling of a saved weight_meta buffer (or its ints)."""
    ints = [int(v) for v in (meta.reshape(-1).tolist() if isinstance(meta, torch.Tensor) else meta)]
    if not ints:
        raise ValueError("weight_meta is empty")
    return kind_of_code(ints[0]).pattern_of_meta(ints[1:])


def detect_pattern(mask2d: torch.Tensor) -> str:
    """The most compact pattern that holds a 2-D mask exactly: each kind's `detect`, in
    `detect_order` (N:M when nearly every group keeps its n, else whole blocks, else the
    bitmask)."""
    for kind in sorted((k for k in KINDS.values() if k.detect_order is not None), key=lambda k: k.detect_order):
        spelling = kind.detect(mask2d)
        if spelling is not None:
            return spelling
    raise ValueError("detect_pattern: no registered kind holds this mask")


def compress(weight2d: torch.Tensor, pattern: str, mask: torch.Tensor, block: tuple[int, int] = (32, 32),
             quantize: str | None = None, group_size: int = 0, scales: torch.Tensor | None = None):
    """The format object of `pattern` for a 2-D weight and its bool mask; pattern "dense"
    gives the masked dense tensor. `block` is the block shape when the pattern names none;
    `quantize` the kept values' precision (None, "int8", "int4" with group_size; scales:
    fixed scales, as SparseGPT's joint quantization chose them)."""
    kind, params = parse(pattern, "kinds.compress")
    return KINDS[kind].compress(weight2d, mask, params, block, quantize, group_size, scales)


def make_mask(scores: torch.Tensor, pattern: str, sparsity=None, block: tuple[int, int] = (32, 32),
              where: str = "mask") -> torch.Tensor:
    """The keep-mask of `scores` for a pattern string (sparsity: the fraction to remove,
    for the kinds that need it)."""
    kind, params = parse(pattern, where)
    return KINDS[kind].mask(scores, params, sparsity, block, where)
