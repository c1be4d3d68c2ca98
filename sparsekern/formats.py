"""Compressed weight formats for a linear weight of shape [out, in].

Each format is a small class holding plain tensors (what goes into a state_dict) and
a few ints; `from_dense` compresses (through sparsekern.ops), `to_dense` restores the
weight with zeros in place, `nbytes` counts the compressed bytes and `density` the kept
fraction. Tensors loaded from a
file go through `validate()`, so a corrupt checkpoint fails with a clear error instead
of letting a kernel read out of bounds.

Memory layouts (the kernels in csrc/ and sparsekern/triton/ read exactly these):

N:M -- NMWeight (n < m, m in {4, 8, 16}), groups of m consecutive input columns:
  values  [out, in*n/m], weight dtype. Row r, slot s = g*n + t is the t-th kept element
          (in column order) of group g, i.e. of columns [g*m, g*m + m).
  indices uint8 [out, ceil(in*n/m * bits / 8)], bits = 2 for m=4, 4 for m=8/16. Slot
          s's in-group column j (0 <= j < m) sits at bit (s*bits) % 8 of byte
          (s*bits) // 8 of its row (little-endian within the byte). The weight element
          is W[r, g*m + j]. Groups with fewer than n kept elements pad with zero values.
  2:4 bf16: values 50% of the dense bytes + indices 6.25% = 56.25%.
  gemm_panels() uint8 (derived, not saved, 2:4 only): the weight pre-packed for the CPU GEMM
          kernel (csrc/nm24_panels.h), built on first use when sparsekern.ops runs an fp32
          weight on an AVX2 or AVX-512 CPU through nm_linear from 17 rows or nm_conv2d
          (ops.CPU_GEMM_PANELS). 6 bytes per kept value: 75% of the dense fp32 bytes, on top
          of values and indices.

Bitmask (unstructured) -- BitmaskWeight:
  bitmask int64 [out, ceil(in/64)]: bit j (LSB first) of word w of row r says whether
          W[r, 64*w + j] is kept; bits past `in` are zero.
  values  [nnz], weight dtype: the kept elements in row-major order (row, then column).
  offsets int32 [out, ceil(in/512)]: index in `values` of the first kept element of
          row r in columns [512*t, 512*t + 512), so a kernel (a GPU lane, a split-K
          slice) finds any 512-column tile's values without scanning the row.
  bf16 at 50% density: 50% + 6.25% = 56.25% of dense; at 10%: 10% + 6.25% = 16.25%;
  offsets add 4 bytes per 512 elements (0.4% of dense bf16).
  column_index() int16 [nnz] (derived, not saved): the column of each kept value, built on
          first use when sparsekern.ops runs the CPU kernels at low density and 1 to 64 rows
          (ops.COLUMN_INDEX_*). It adds 2 bytes per kept value (fp32 at 10% kept: 5% of
          dense, on top of values 10% + bitmask 3.1%); that kernel streams values and
          columns (15% of dense) instead of values and bitmask.

Block (BSR) -- BlockWeight, block shape (bh, bw) dividing (out, in):
  crow_indices int64 [out/bh + 1]: blocks of block row i are crow[i]:crow[i+1].
  col_indices  int64 [nnz_blocks]: block column of each kept block (ascending per row).
  values       [nnz_blocks, bh, bw], weight dtype, each block row-major.
  This is torch's sparse BSR layout (torch.sparse_bsr_tensor(crow, col, values)).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import ops, precisions, reference
from .patterns import (BITMASK_TILE_COLS, check_nm, nm24_panels_bytes, nm_index_bits, pack_bits, popcount64,
                       unpack_bitmask, unpack_bits)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _stamp(t: torch.Tensor):
    """What a derived cache checks, beside the tensor's identity, before reuse: its in-place
    version. Inference tensors have none, so an in-place edit of one is not seen, nor is an
    edit through `.data` of any tensor: rebuild the cache with release_derived(). While
    torch.compile traces, the version alone (is_inference() would break the graph)."""
    if torch.compiler.is_compiling():
        return t._version
    return None if t.is_inference() else t._version


def _check_weight(name: str, weight, mask) -> None:
    """from_dense's checks: ops' own argument checks (one definition), and finiteness, which
    a compressed format needs and the compress ops do not check."""
    ops.check_dense_weight(name, weight)
    ops.check_mask(name, mask, weight)
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}: weight has NaN or inf; sparse formats need finite weights")


def _meta(*ints: int) -> torch.Tensor:
    return torch.tensor(list(ints), dtype=torch.int64)


# Ints a quantized format appends to its meta: precision code, group size, compute dtype code.
QUANT_META_INTS = 3


def _meta_ints(d: dict, count: int, where: str) -> list[int]:
    """The meta ints of a saved format: `count` for float values, QUANT_META_INTS more for
    quantized ones."""
    meta = d.get("meta")
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or \
            meta.numel() not in (count, count + QUANT_META_INTS):
        raise ValueError(f"{where}: meta must be an int64 tensor of {count} (or {count + QUANT_META_INTS} for "
                         f"quantized values) ints, got {getattr(meta, 'shape', type(meta).__name__)} "
                         f"{getattr(meta, 'dtype', '')}")
    return [int(v) for v in meta.tolist()]


def _quant_fields(ints: list[int], count: int, d: dict, where: str) -> dict:
    """The quantization fields of a format from its meta ints past the first `count` (none:
    float values) and its tensors."""
    if len(ints) == count:
        return {}
    if len(ints) != count + QUANT_META_INTS:
        raise ValueError(f"{where}: meta must hold {count} or {count + QUANT_META_INTS} ints, got {len(ints)}")
    code, group, dcode = ints[count:]
    prec = precisions.precision_of_code(code, where)
    dtype = precisions.FLOAT_DTYPE_OF_CODE.get(dcode)
    if prec.name == "fp" or dtype is None:
        raise ValueError(f"{where}: meta holds precision {prec.name!r} and dtype code {dcode}; a quantized format "
                         "needs int8 or int4 and a float dtype code")
    if "scales" not in d:
        raise ValueError(f"{where}: quantized ({prec.name}) values need their scales tensor")
    return {"scales": d["scales"], "precision": prec.name, "group_size": group, "compute_dtype": dtype}


class _Format:
    """Shared behaviour: tensors(), nbytes, density, to(), dtype/device.

    `from_tensors(d)` rebuilds a format from `tensors()`, validated; validate=False means
    the caller vouches for tensors it validated already (a sparse module validates its
    buffers when it builds or loads them), and the result counts as validated. `meta_ints`
    stands in for d["meta"] when the caller holds the ints (a module's forward never reads
    a tensor for them).

    Memory safety: the kernels read formats without bounds checks, so sparsekern.ops runs
    validated formats only (`is_validated`): from_dense's output, from_tensors' output, or
    any format after validate(), which checks every index and offset once. Reassigning a
    field clears the flag, and so does editing one of its tensors in place (their version
    counters are stamped when it is set; `_stamp` says which edits are seen), so the next op
    call validates again instead of letting a kernel read out of bounds.

    Each format declares the op that runs it once, and every other module reads it from
    here: OP (the sparse linear op, in sparsekern.ops) and `pattern` (the spelling users
    write). Its pattern kind (grammar, kind code, masks, checks) is the entry of
    sparsekern.kinds that names this class."""

    OP: str = ""
    TENSOR_NAMES: tuple[str, ...] = ()  # of a format with float values; quantized ones add "scales"
    # True when `values` is [out, kept per row] (groups of kept values along a row are
    # contiguous: int4 needs it); False when values are ragged per row (int8 only).
    ROW_VALUES: bool = False
    META_INTS: int = 0  # meta() ints of a format with float values

    @classmethod
    def op_name(cls, quantized: bool) -> str:
        """The op a weight of this format runs through, with float or quantized values (OP of
        an instance says which applies to it)."""
        op = next(k.__dict__["OP"] for k in cls.__mro__ if "OP" in k.__dict__)
        return getattr(op, "quantized" if quantized else "plain", op)

    def __setattr__(self, name, value):
        # Any new tensor or int invalidates the check; only validate() (or a format built by
        # sparsekern's own compress kernels) sets it. The ops run validated formats only.
        object.__setattr__(self, name, value)
        if name != "_validated":
            object.__setattr__(self, "_validated", False)
            self.__dict__.pop("_keeps_derived", None)  # a new tensor may change nbytes

    @property
    def is_validated(self) -> bool:
        """True once validate() passed (or the format came from from_dense), and since then
        no field was reassigned and no tensor edited in place (an edit through `.data`, or of
        an inference tensor, is not seen: _stamp)."""
        stamps = self.__dict__.get("_validated", False)
        if torch.compiler.is_compiling():
            # Version counters are symbolic while tracing (comparing them would guard on data);
            # a traced graph runs the format it was traced with.
            return stamps is not False
        return stamps is not False and stamps == self._tensor_stamps()

    def _tensor_stamps(self) -> tuple:
        return tuple(_stamp(getattr(self, k)) for k in self.tensor_names())

    def _valid(self):
        object.__setattr__(self, "_validated", self._tensor_stamps())
        return self

    def kernel_args(self) -> tuple:
        """The format's tensors and ints in the order its op's schema (self.OP) takes them.
        Quantized values are handed over as stored, with their scales (their ops nm_linear_q,
        bitmask_linear_q and block_linear_q read them packed)."""
        raise NotImplementedError

    # ------------------------------------------------------------ value precision
    @property
    def quantized(self) -> bool:
        """True when the values are stored int8 or int4 (sparsekern.precisions)."""
        return self.__dict__.get("scales") is not None

    @property
    def value_precision(self) -> "precisions.Precision":
        return precisions.precision(self.precision if self.quantized else None, type(self).__name__)

    def tensor_names(self) -> tuple[str, ...]:
        """The names of this object's tensors (TENSOR_NAMES, plus "scales" when quantized)."""
        return self.TENSOR_NAMES + (("scales",) if self.quantized else ())

    @classmethod
    def tensor_names_of(cls, meta_ints: list[int]) -> tuple[str, ...]:
        """The tensor names of a saved format with these meta ints (after the kind code)."""
        return cls.TENSOR_NAMES + (("scales",) if len(meta_ints) > cls.META_INTS else ())

    def _quant_meta(self) -> list[int]:
        if not self.quantized:
            return []
        return [self.value_precision.code, int(self.group_size), precisions.FLOAT_DTYPE_CODES[self.compute_dtype]]

    def _values_rows(self) -> torch.Tensor:
        """int64 [values.numel()]: the output row of each float value (ragged formats)."""
        raise NotImplementedError

    def _fp_values_shape(self) -> tuple[int, ...]:
        """The shape of the values when stored as floats."""
        return tuple(self.values.shape)

    def _float_values(self) -> torch.Tensor:
        """The values as floats in the compute dtype (dequantized when quantized)."""
        if not self.quantized:
            return self.values
        prec = self.value_precision
        if self.ROW_VALUES:
            rows, k = self._fp_values_shape()
            return prec.dequantize(self.values, self.scales, k, self.compute_dtype, self.group_size)
        return precisions.dequantize_ragged_int8(self.values.reshape(-1), self.scales, self._values_rows(),
                                                 self.compute_dtype).view(self.values.shape)

    def quantize(self, precision: str | None, group_size: int = 0, scales: torch.Tensor | None = None):
        """A copy with the values stored in `precision` ("int8": one scale per output row;
        "int4": one per group_size kept values of a row, N:M only; None: this object).
        scales: fixed scales (float32 [rows] for int8, [rows, groups] for int4) instead of
        the values' max, as SparseGPT's joint quantization chose them. Layouts:
        sparsekern/precisions.py and docs/FORMATS.md."""
        where = f"{type(self).__name__}.quantize"
        prec = precisions.precision(precision, where)
        if prec.name == "fp":
            return self
        if self.quantized:
            raise ValueError(f"{where}: the values are already {self.precision}; call dequantized() first")
        group_size = prec.check_group_size(group_size, where)
        v = self.values
        if self.ROW_VALUES:
            stored, scales = prec.quantize(v, group_size, scales)
        elif prec.name == "int8":
            stored, scales = precisions.quantize_ragged_int8(v.reshape(-1), self._values_rows(), self.shape[0], scales)
            stored = stored.view(v.shape)
        else:
            raise ValueError(f"{where}: {prec.name} groups kept values along a row, which {type(self).__name__} does "
                             "not store contiguously; N:M (NMWeight) supports int4, every format supports int8")
        out = dataclasses.replace(self, values=stored, scales=scales, precision=prec.name, group_size=group_size,
                                  compute_dtype=v.dtype)
        return out._valid() if self.is_validated else out

    def dequantized(self):
        """This weight with float values in its compute dtype (itself when not quantized)."""
        if not self.quantized:
            return self
        out = dataclasses.replace(self, values=self._float_values(), scales=None, precision="fp", group_size=0,
                                  compute_dtype=None)
        return out._valid() if self.is_validated else out

    def _checked_values(self, where: str) -> torch.Tensor:
        """The values as validate() reads their shape: the stored tensor, or, for quantized
        values (checked here against their precision), a float stand-in of the float shape
        that allocates nothing."""
        if not self.quantized:
            return self.values
        if self.precision not in precisions.PRECISIONS or self.precision == "fp":
            raise ValueError(f"{where}: unknown value precision {self.precision!r}")
        if self.compute_dtype not in precisions.FLOAT_DTYPE_CODES:
            raise ValueError(f"{where}: compute_dtype must be a float dtype, got {self.compute_dtype}")
        prec = self.value_precision
        prec.check_group_size(self.group_size, where)
        shape = self._fp_values_shape()
        if self.ROW_VALUES:
            prec.check(self.values, self.scales, shape[0], shape[1], self.group_size, where)
        elif prec.name == "int8":
            precisions.check_ragged_int8(self.values, self.scales, self.shape[0], self.values.numel(), where)
        else:
            raise ValueError(f"{where}: {prec.name} values need a format with values by row (N:M)")
        return torch.zeros((), dtype=self.compute_dtype, device=self.values.device).expand(shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors (and an int64 `meta` tensor) that fully describe the weight."""
        d = {k: getattr(self, k) for k in self.tensor_names()}
        d["meta"] = self.meta()
        return d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, k) for k in self.tensor_names()))

    # Indexes derived from the tensors and cached on this object for a kernel (not in
    # tensors(), nbytes or a state_dict): __dict__ key -> (sources, their stamps, the index).
    _DERIVED: tuple[str, ...] = ()  # the keys this format can hold

    def _derived(self, key: str, sources: tuple, build) -> torch.Tensor:
        """The index cached under `key`, rebuilt by build() when a source tensor was replaced
        or edited in place since (_stamp says which edits are seen)."""
        cached = self.__dict__.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[0], sources)) or \
                cached[1] != tuple(_stamp(t) for t in sources):
            stamps = tuple(_stamp(t) for t in sources)
            # Set through __dict__: a derived cache, not a field (it must not clear is_validated).
            self.__dict__[key] = cached = (sources, stamps, build())
        return cached[2]

    def derived_tensors(self) -> list[torch.Tensor]:
        """The derived indexes built so far (none: an empty list)."""
        return [c[2] for c in map(self.__dict__.get, self._DERIVED) if c]

    @property
    def derived_nbytes(self) -> int:
        """Bytes of the derived indexes built so far; 0 when none is."""
        return sum(t.numel() * t.element_size() for t in self.derived_tensors())

    def release_derived(self) -> None:
        """Drops the derived indexes (derived_nbytes becomes 0); the next call that needs one
        builds it again."""
        for key in self._DERIVED:
            self.__dict__.pop(key, None)

    def derived_layout_nbytes(self, key: str) -> int:
        """The bytes the derived index `key` (one of _DERIVED) takes once built, computed
        from the shapes without building it."""
        raise KeyError(f"{type(self).__name__} derives no {key!r}")

    def set_derived_budget(self, fraction: float | None) -> None:
        """The bytes the derived indexes may take, as a fraction of nbytes (None: no limit).
        A sparse module sets its Policy.derived_budget here; sparsekern.ops then asks for a
        derived index only where keeps_derived() says it is kept, and the kernel reads the
        compressed tensors instead of one built for a single call and dropped."""
        if self.__dict__.get("_derived_budget", None) != fraction:
            # Through __dict__: a setting of this object, not a field (it must not clear is_validated).
            self.__dict__["_derived_budget"] = fraction
            self.__dict__.pop("_keeps_derived", None)

    @property
    def derived_budget(self) -> float | None:
        """The fraction set by set_derived_budget (None: no limit, the default)."""
        return self.__dict__.get("_derived_budget")

    def budget_drops_derived(self) -> bool:
        """Whether the budget (set_derived_budget) leaves out one of the derived indexes this
        weight can have: a sparse module then also measures keeping it (nn "sparse_kept")."""
        return any(not self.keeps_derived(key) for key in self._DERIVED)

    def keeps_derived(self, key: str) -> bool:
        """Whether the derived index `key` fits this weight's budget (set_derived_budget)."""
        budget = self.__dict__.get("_derived_budget")
        if budget is None:
            return True
        keeps = self.__dict__.setdefault("_keeps_derived", {})
        if key not in keeps:  # shapes change only when a field is set, which clears this
            keeps[key] = self.derived_layout_nbytes(key) <= budget * self.nbytes
        return keeps[key]

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the weight computes in (quantized values: the dtype they were
        quantized from)."""
        return self.compute_dtype if self.quantized else self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device=None, dtype=None):
        """A copy on another device and/or with values in another float dtype."""
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}.to: dtype must be floating, got {dtype}")
        kw = {k: getattr(self, k).to(device) for k in self.tensor_names()}
        if dtype is not None:
            if self.quantized:
                kw["compute_dtype"] = dtype  # the stored values stay; they dequantize to dtype
            else:
                kw["values"] = kw["values"].to(dtype)
        out = self._replace(**kw)
        return out._valid() if self.is_validated else out

    def __repr__(self) -> str:
        values = f", values={self.precision}" + (f" (group {self.group_size})" if self.group_size else "") \
            if self.quantized else ""
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, {self.pattern}, density={self.density:.4f}, "
                f"dtype={self.dtype}{values}, nbytes={self.nbytes})")

    def _replace(self, **kw):
        """A copy with some fields replaced (not validated)."""
        return dataclasses.replace(self, **kw)

    def _check_cut(self, start: int, stop: int, axis: int, step: int, what: str, where: str) -> None:
        """[start, stop) must be a non-empty range of rows (axis 0) or columns (axis 1) whose
        ends fall on multiples of `step` (the end of the weight is always a legal cut)."""
        if self.quantized:
            raise ValueError(f"{where}: cutting quantized ({self.precision}) values is not supported; cut "
                             "dequantized() and quantize the parts")
        size = self.shape[axis]
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= size):
            raise ValueError(f"{where}: [{start}, {stop}) is not a non-empty range inside [0, {size})")
        bad = [c for c in (start, stop) if c % step and c != size]
        if bad:
            raise ValueError(f"{where}: cutting at {bad[0]} would split {what}; cuts must fall on multiples of "
                             f"{step}")

    @staticmethod
    def _check_parts(parts, cls, where: str) -> list:
        parts = list(parts)
        if not parts or not all(isinstance(p, cls) for p in parts):
            raise TypeError(f"{where}: expected a non-empty sequence of {cls.__name__}")
        if any(p.quantized for p in parts):
            raise ValueError(f"{where}: joining quantized values is not supported; join dequantized() parts")
        if len({p.dtype for p in parts}) != 1 or len({str(p.device) for p in parts}) != 1:
            raise ValueError(f"{where}: parts must share one dtype and one device")
        return parts


class _OpName:
    """A format's OP: the op its float values run through, or, for a weight whose values are
    quantized (int8/int4), the op that reads them packed. On the class: the float op."""

    def __init__(self, plain: str, quantized: str):
        self.plain, self.quantized = plain, quantized

    def __get__(self, obj, cls=None) -> str:
        return self.quantized if obj is not None and obj.quantized else self.plain


# ------------------------------------------------------------------------------- N:M
@dataclass(repr=False, eq=False)
class NMWeight(_Format):
    values: torch.Tensor
    indices: torch.Tensor
    n: int
    m: int
    in_features: int
    scales: torch.Tensor | None = None  # quantized values only (sparsekern/precisions.py)
    precision: str = "fp"
    group_size: int = 0
    compute_dtype: torch.dtype | None = None

    OP = _OpName("nm_linear", "nm_linear_q")
    TENSOR_NAMES = ("values", "indices")
    ROW_VALUES, META_INTS = True, 3
    _DERIVED = ("_gemm_panels",)

    def kernel_args(self) -> tuple:
        if self.quantized:  # nm_linear_q's: values and scales as stored, bits, group_size
            return (self.values, self.indices, self.scales, self.n, self.m, self.in_features,
                    self.value_precision.bits, int(self.group_size))
        return (self.values, self.indices, self.n, self.m, self.in_features)

    def _fp_values_shape(self):
        return (self.indices.shape[0], self.in_features // self.m * self.n)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int = 2, m: int = 4, mask: torch.Tensor | None = None,
                   quantize: str | None = None, group_size: int = 0) -> "NMWeight":
        """Compress `weight` [out, in] to N:M along `in`. Without a mask keep the n
        largest |w| of each group of m (ties: lower column); a mask must keep at most
        n of every m (fewer is padded with zeros). quantize: None, "int8" or "int4" (with
        group_size 32, 64 or 128): the kept values' precision (_Format.quantize)."""
        precisions.precision(quantize, "NMWeight.from_dense").check_group_size(group_size, "NMWeight.from_dense")
        check_nm(n, m, "NMWeight.from_dense")
        _check_weight("NMWeight.from_dense", weight, mask)
        if weight.shape[1] % m:
            raise ValueError(f"NMWeight.from_dense: in_features (weight.shape[1] = {weight.shape[1]}) must be "
                             f"divisible by m = {m}")
        values, indices = ops.nm_compress(weight.detach(), mask, n, m)
        return cls(values, indices, n, m, weight.shape[1])._valid().quantize(quantize, group_size)

    def to_dense(self) -> torch.Tensor:
        return ops.nm_decompress(self._float_values(), self.indices, self.n, self.m, self.in_features)

    def mask(self) -> torch.Tensor:
        """bool [out, in]: the N:M positions (including zero-valued padding slots)."""
        out, kept = self._fp_values_shape()
        idx = unpack_bits(self.indices, nm_index_bits(self.m), kept).reshape(out, -1, self.n)
        mask = torch.zeros(out, self.in_features // self.m, self.m, dtype=torch.bool, device=self.device)
        return mask.scatter_(-1, idx, True).reshape(out, self.in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indices.shape[0], self.in_features)

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def meta(self) -> torch.Tensor:
        return _meta(self.n, self.m, self.in_features, *self._quant_meta())

    def gemm_panels(self) -> torch.Tensor:
        """uint8: this 2:4 weight pre-packed for the CPU GEMM kernel (ops.nm24_pack_panels,
        layout in csrc/nm24_panels.h). Derived, not stored in tensors() or a state_dict: built on
        first use and kept with this object (6 bytes per kept value) until values or indices
        are replaced or edited in place (an edit through `.data`, or of an inference tensor,
        is not seen: call release_derived()). sparsekern.ops passes it to the C++ kernel for
        fp32 weights on AVX2 and AVX-512 CPUs: nm_linear from 17 rows, nm_conv2d at any size (read
        over 16 output pixels); ops.CPU_GEMM_PANELS turns it off."""
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"NMWeight.gemm_panels: a 2:4 layout, this weight is {self.pattern}")
        if self.quantized:
            raise ValueError(f"NMWeight.gemm_panels: a float 2:4 layout; this weight's values are {self.precision} "
                             "(nm_linear_q reads them packed)")
        v, ix = self.values, self.indices
        return self._derived("_gemm_panels", (v, ix),
                             lambda: ops.nm24_pack_panels(self._float_values().detach(), ix, self.in_features))

    def derived_layout_nbytes(self, key: str) -> int:
        if key != "_gemm_panels":
            return super().derived_layout_nbytes(key)
        return nm24_panels_bytes(self.shape[0], self.in_features)

    def budget_drops_derived(self) -> bool:
        # The panels exist for fp32 2:4 values only (the kernel's fp32 layout): another
        # pattern, precision or dtype has nothing a budget could drop.
        return (self.n, self.m) == (2, 4) and not self.quantized and self.dtype == torch.float32 and \
            super().budget_drops_derived()

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], validate: bool = True,
                     meta_ints: list[int] | None = None) -> "NMWeight":
        ints = meta_ints or _meta_ints(d, 3, "NMWeight")
        n, m, k = ints[:3]
        w = cls(d["values"], d["indices"], n, m, k, **_quant_fields(ints, 3, d, "NMWeight"))
        return w.validate() if validate else w._valid()

    def validate(self) -> "NMWeight":
        where = "NMWeight"
        check_nm(self.n, self.m, where)
        if self.in_features <= 0 or self.in_features % self.m:
            raise ValueError(f"{where}: in_features ({self.in_features}) must be a positive multiple of m ({self.m})")
        kept = self.in_features // self.m * self.n
        v, ix = self._checked_values(where), self.indices
        if v.dim() != 2 or v.shape[1] != kept or v.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: values must be a float tensor of shape [out, {kept}], got "
                             f"{tuple(v.shape)} {v.dtype}")
        bits = nm_index_bits(self.m)
        if ix.dtype != torch.uint8 or tuple(ix.shape) != (v.shape[0], math.ceil(kept * bits / 8)):
            raise ValueError(f"{where}: indices must be uint8 of shape [{v.shape[0]}, {math.ceil(kept * bits / 8)}], "
                             f"got {tuple(ix.shape)} {ix.dtype}")
        if ix.device != v.device:
            raise ValueError(f"{where}: indices are on {ix.device} but values on {v.device}")
        if ix.numel() and kept:
            idx = unpack_bits(ix, bits, kept)
            if int(idx.max()) >= self.m:
                raise ValueError(f"{where}: indices hold an in-group index >= m={self.m} (corrupt)")
            if self.n > 1 and bool((idx.view(idx.shape[0], -1, self.n).diff(dim=-1) <= 0).any()):
                raise ValueError(f"{where}: the indices of a group must increase (slot t is the t-th kept column; "
                                 "corrupt)")
            if ix.shape[1] * 8 > kept * bits and bool((ix[:, -1].to(torch.int32) >> ((kept * bits) % 8)).ne(0).any()):
                raise ValueError(f"{where}: indices have bits set past the last slot (corrupt)")
        return self._valid()

    def slice_rows(self, start: int, stop: int) -> "NMWeight":
        """Output rows [start, stop) of the weight (any row boundary is legal)."""
        self._check_cut(start, stop, 0, 1, "rows", "NMWeight.slice_rows")
        return NMWeight(self.values[start:stop].contiguous(), self.indices[start:stop].contiguous(), self.n, self.m,
                        self.in_features).validate()

    def slice_cols(self, start: int, stop: int) -> "NMWeight":
        """Input columns [start, stop) of the weight; both ends on multiples of m, so no
        N:M group is cut. Indices are repacked when the cut is not on a byte."""
        self._check_cut(start, stop, 1, self.m, f"an N:M group of {self.m} columns", "NMWeight.slice_cols")
        s0, s1 = start // self.m * self.n, stop // self.m * self.n
        bits = nm_index_bits(self.m)
        slots = unpack_bits(self.indices, bits, self.values.shape[1])[:, s0:s1]
        return NMWeight(self.values[:, s0:s1].contiguous(), pack_bits(slots, bits), self.n, self.m,
                        stop - start).validate()

    @classmethod
    def cat_rows(cls, parts) -> "NMWeight":
        """The weight whose rows are the parts' rows in order (inverse of slice_rows)."""
        parts = cls._check_parts(parts, cls, "NMWeight.cat_rows")
        if len({(p.n, p.m, p.in_features) for p in parts}) != 1:
            raise ValueError("NMWeight.cat_rows: parts must share n, m and in_features")
        p0 = parts[0]
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]), p0.n, p0.m,
                   p0.in_features).validate()

    @classmethod
    def cat_cols(cls, parts) -> "NMWeight":
        """The weight whose columns are the parts' columns in order (inverse of slice_cols)."""
        parts = cls._check_parts(parts, cls, "NMWeight.cat_cols")
        if len({(p.n, p.m, p.shape[0]) for p in parts}) != 1:
            raise ValueError("NMWeight.cat_cols: parts must share n, m and the number of rows")
        p0 = parts[0]
        bits = nm_index_bits(p0.m)
        slots = torch.cat([unpack_bits(p.indices, bits, p.values.shape[1]) for p in parts], 1)
        return cls(torch.cat([p.values for p in parts], 1), pack_bits(slots, bits), p0.n, p0.m,
                   sum(p.in_features for p in parts)).validate()


# --------------------------------------------------------------------------- bitmask
@dataclass(repr=False, eq=False)
class BitmaskWeight(_Format):
    values: torch.Tensor
    bitmask: torch.Tensor
    offsets: torch.Tensor
    in_features: int
    scales: torch.Tensor | None = None  # quantized values only (sparsekern/precisions.py)
    precision: str = "fp"
    group_size: int = 0
    compute_dtype: torch.dtype | None = None

    OP = _OpName("bitmask_linear", "bitmask_linear_q")
    TENSOR_NAMES = ("values", "bitmask", "offsets")
    META_INTS = 1
    _DERIVED = ("_column_index",)

    def kernel_args(self) -> tuple:
        if self.quantized:  # bitmask_linear_q's: int8 values as stored and their row scales
            return (self.values, self.bitmask, self.offsets, self.scales, self.in_features)
        return (self.values, self.bitmask, self.offsets, self.in_features)

    def _values_rows(self) -> torch.Tensor:
        rows = self.bitmask.shape[0]
        return torch.repeat_interleave(torch.arange(rows, device=self.device), self._row_starts().diff(),
                                       output_size=self.values.numel())

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   quantize: str | None = None) -> "BitmaskWeight":
        """Compress `weight` [out, in], keeping `mask` (default: the nonzeros). quantize:
        None or "int8" (one scale per output row)."""
        precisions.precision(quantize, "BitmaskWeight.from_dense")
        _check_weight("BitmaskWeight.from_dense", weight, mask)
        if weight.shape[1] == 0:
            raise ValueError("BitmaskWeight.from_dense: weight must have at least one column")
        if weight.numel() >= 2**31:
            raise ValueError("BitmaskWeight.from_dense: more than 2^31-1 elements; split the weight")
        values, bitmask, offsets = ops.bitmask_compress(weight.detach(), mask)
        return cls(values, bitmask, offsets, weight.shape[1])._valid().quantize(quantize)

    def to_dense(self) -> torch.Tensor:
        return ops.bitmask_decompress(self._float_values(), self.bitmask, self.offsets, self.in_features)

    def mask(self) -> torch.Tensor:
        return unpack_bitmask(self.bitmask, self.in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.bitmask.shape[0], self.in_features)

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.values.numel() / total if total else 0.0

    @property
    def pattern(self) -> str:
        return "unstructured"

    def meta(self) -> torch.Tensor:
        return _meta(self.in_features, *self._quant_meta())

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], validate: bool = True,
                     meta_ints: list[int] | None = None) -> "BitmaskWeight":
        ints = meta_ints or _meta_ints(d, 1, "BitmaskWeight")
        w = cls(d["values"], d["bitmask"], d["offsets"], ints[0], **_quant_fields(ints, 1, d, "BitmaskWeight"))
        return w.validate() if validate else w._valid()

    def validate(self) -> "BitmaskWeight":
        where = "BitmaskWeight"
        k = self.in_features
        words, tiles = math.ceil(k / 64), math.ceil(k / BITMASK_TILE_COLS)
        v, bm, off = self._checked_values(where), self.bitmask, self.offsets
        if k <= 0 or bm.dtype != torch.int64 or bm.dim() != 2 or bm.shape[1] != words:
            raise ValueError(f"{where}: bitmask must be int64 [out, {words}] for in_features={k}, got "
                             f"{tuple(bm.shape)} {bm.dtype}")
        if off.dtype != torch.int32 or tuple(off.shape) != (bm.shape[0], tiles):
            raise ValueError(f"{where}: offsets must be int32 [{bm.shape[0]}, {tiles}], got {tuple(off.shape)} {off.dtype}")
        if v.dim() != 1 or v.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: values must be a 1-D float tensor, got {tuple(v.shape)} {v.dtype}")
        if not (bm.device == off.device == v.device):
            raise ValueError(f"{where}: values, bitmask and offsets must be on one device")
        if k % 64 and bm.numel() and bool((bm[:, -1] >> (k % 64)).ne(0).any()):
            raise ValueError(f"{where}: bitmask has bits set beyond in_features ({k})")
        counts = popcount64(bm)  # kept elements per word, [out, words]
        total = int(counts.sum())
        if total != v.numel():
            raise ValueError(f"{where}: bitmask keeps {total} elements but values has {v.numel()}")
        per_tile = BITMASK_TILE_COLS // 64
        tile_counts = torch.nn.functional.pad(counts, (0, tiles * per_tile - words)).view(-1, per_tile).sum(-1)
        expected = (torch.cumsum(tile_counts, 0) - tile_counts).view(bm.shape[0], tiles)
        if not torch.equal(expected, off.to(torch.int64)):
            raise ValueError(f"{where}: offsets do not match the bitmask's popcounts (corrupt)")
        return self._valid()

    @staticmethod
    def _offsets_of(keep: torch.Tensor) -> torch.Tensor:
        """int32 offsets of a bool keep mask [out, in] (layout in the module docstring)."""
        out, k = keep.shape
        tiles = math.ceil(k / BITMASK_TILE_COLS)
        counts = torch.nn.functional.pad(keep.to(torch.int64), (0, tiles * BITMASK_TILE_COLS - k))
        counts = counts.view(out, tiles, BITMASK_TILE_COLS).sum(-1).flatten()
        return (counts.cumsum(0) - counts).view(out, tiles).to(torch.int32)

    COLUMN_INDEX_MAX_IN = 32768  # int16 columns

    def column_index(self) -> torch.Tensor:
        """int16 [nnz]: the column of each kept value, in the order of `values`. Derived from
        the bitmask, not stored in tensors() or a state_dict: built on first use and kept with
        this object (2 bytes per kept value) until the bitmask is replaced or edited in place.
        sparsekern.ops passes it to the CPU kernel at low density and small batch, where it
        makes a cost per kept value instead of per 16-column piece (sparsekern/ops.py,
        COLUMN_INDEX_*)."""
        if self.in_features > self.COLUMN_INDEX_MAX_IN:
            raise ValueError(f"BitmaskWeight.column_index: int16 columns address at most "
                             f"{self.COLUMN_INDEX_MAX_IN} in_features, got {self.in_features}")
        bm = self.bitmask
        return self._derived("_column_index", (bm,),
                             lambda: unpack_bitmask(bm, self.in_features).nonzero()[:, 1].to(torch.int16))

    def derived_layout_nbytes(self, key: str) -> int:
        if key != "_column_index":
            return super().derived_layout_nbytes(key)
        return 2 * self.values.numel()  # int16 per kept value

    def _row_starts(self) -> torch.Tensor:
        """int64 [out + 1]: index in `values` of each row's first kept element, then nnz."""
        starts = self.offsets[:, 0].to(torch.int64) if self.offsets.numel() else \
            torch.zeros(self.shape[0], dtype=torch.int64, device=self.device)
        return torch.cat([starts, torch.tensor([self.values.numel()], device=self.device)])

    def slice_rows(self, start: int, stop: int) -> "BitmaskWeight":
        """Output rows [start, stop) of the weight (any row boundary is legal)."""
        self._check_cut(start, stop, 0, 1, "rows", "BitmaskWeight.slice_rows")
        rows = self._row_starts()
        v0, v1 = int(rows[start]), int(rows[stop])
        offsets = (self.offsets[start:stop].to(torch.int64) - v0).to(torch.int32)
        return BitmaskWeight(self.values[v0:v1].clone(), self.bitmask[start:stop].contiguous(), offsets,
                             self.in_features).validate()

    def slice_cols(self, start: int, stop: int) -> "BitmaskWeight":
        """Input columns [start, stop) of the weight; both ends on multiples of 64, so no
        bitmask word is cut. Offsets are recomputed for the slice's 512-column tiles."""
        self._check_cut(start, stop, 1, 64, "a 64-column bitmask word", "BitmaskWeight.slice_cols")
        keep = unpack_bitmask(self.bitmask, self.in_features)
        before, sub = keep[:, :start].sum(1), keep[:, start:stop]
        counts = sub.sum(1)
        first = self._row_starts()[:-1] + before  # index in values of each row's first kept column >= start
        base = torch.repeat_interleave(first - (counts.cumsum(0) - counts), counts)
        index = base + torch.arange(int(counts.sum()), device=self.device)
        return BitmaskWeight(self.values[index], self.bitmask[:, start // 64: math.ceil(stop / 64)].contiguous(),
                             self._offsets_of(sub), stop - start).validate()

    @classmethod
    def cat_rows(cls, parts) -> "BitmaskWeight":
        """The weight whose rows are the parts' rows in order (inverse of slice_rows)."""
        parts = cls._check_parts(parts, cls, "BitmaskWeight.cat_rows")
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("BitmaskWeight.cat_rows: parts must share in_features")
        bases = [0]
        for p in parts[:-1]:
            bases.append(bases[-1] + p.values.numel())
        offsets = torch.cat([(p.offsets.to(torch.int64) + b).to(torch.int32) for p, b in zip(parts, bases)])
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.bitmask for p in parts]), offsets,
                   parts[0].in_features).validate()

    @classmethod
    def cat_cols(cls, parts) -> "BitmaskWeight":
        """The weight whose columns are the parts' columns in order (inverse of slice_cols);
        every part but the last must have a multiple of 64 columns (whole bitmask words)."""
        parts = cls._check_parts(parts, cls, "BitmaskWeight.cat_cols")
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError("BitmaskWeight.cat_cols: parts must share the number of rows")
        if any(p.in_features % 64 for p in parts[:-1]):
            raise ValueError("BitmaskWeight.cat_cols: every part but the last needs a multiple of 64 columns")
        out = parts[0].shape[0]
        keep = torch.cat([unpack_bitmask(p.bitmask, p.in_features) for p in parts], 1)
        # Row-major order of the whole: sort the parts' values by (row, part), stably.
        rows = torch.arange(out, device=parts[0].device)
        key = torch.cat([torch.repeat_interleave(rows * len(parts) + i, p._row_starts().diff())
                         for i, p in enumerate(parts)])
        order = torch.sort(key, stable=True).indices
        return cls(torch.cat([p.values for p in parts])[order], torch.cat([p.bitmask for p in parts], 1),
                   cls._offsets_of(keep), sum(p.in_features for p in parts)).validate()


# ----------------------------------------------------------------------------- block
@dataclass(repr=False, eq=False)
class BlockWeight(_Format):
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    in_features: int
    scales: torch.Tensor | None = None  # quantized values only (sparsekern/precisions.py)
    precision: str = "fp"
    group_size: int = 0
    compute_dtype: torch.dtype | None = None

    OP = _OpName("block_linear", "block_linear_q")
    TENSOR_NAMES = ("crow_indices", "col_indices", "values")
    META_INTS = 1

    def kernel_args(self) -> tuple:
        if self.quantized:  # block_linear_q's: int8 values as stored and their row scales
            return (self.crow_indices, self.col_indices, self.values, self.scales, self.in_features)
        return (self.crow_indices, self.col_indices, self.values, self.in_features)

    def _block_rows(self) -> torch.Tensor:
        """int64 [blocks]: the block row of each kept block."""
        crow = self.crow_indices
        return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff(),
                                       output_size=self.values.shape[0])

    def _values_rows(self) -> torch.Tensor:
        nb, bh, bw = self.values.shape
        rows = self._block_rows()[:, None] * bh + torch.arange(bh, device=self.device)[None, :]
        return rows[:, :, None].expand(nb, bh, bw).reshape(-1)

    def _float_values(self) -> torch.Tensor:
        """As _Format's (stored * the row's scale, in fp32, then the compute dtype: the same
        numbers), with each block's bh row scales broadcast along its columns instead of an
        index per value (to_dense, and block_linear on int8 values off the CPU, per call)."""
        if not self.quantized:
            return self.values
        return reference.block_q_values(self.crow_indices, self.values, self.scales).to(self.compute_dtype)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int] = (32, 32),
                   mask: torch.Tensor | None = None, quantize: str | None = None) -> "BlockWeight":
        """Compress `weight` [out, in] to blocks of `block` = (rows, cols). A block is
        kept when `mask` (default: weight != 0) keeps anything in it; elements of a kept
        block that the mask drops are stored as zeros. quantize: None or "int8" (one scale
        per output row)."""
        precisions.precision(quantize, "BlockWeight.from_dense")
        _check_weight("BlockWeight.from_dense", weight, mask)
        bh, bw = cls.check_block(block, "BlockWeight.from_dense")
        if weight.shape[0] % bh or weight.shape[1] % bw:
            raise ValueError(f"BlockWeight.from_dense: weight shape {tuple(weight.shape)} must be divisible by "
                             f"block {block}")
        crow, col, values = ops.block_compress(weight.detach(), mask, bh, bw)
        return cls(crow, col, values, weight.shape[1])._valid().quantize(quantize)

    @staticmethod
    def check_block(block, where: str) -> tuple[int, int]:
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"{where}: block must be two positive ints (rows, cols), got {block!r}")
        return int(block[0]), int(block[1])

    def to_dense(self) -> torch.Tensor:
        return ops.block_decompress(self.crow_indices, self.col_indices, self._float_values(), self.in_features)

    def mask(self) -> torch.Tensor:
        """bool [out, in]: the kept blocks."""
        return ops.block_decompress(self.crow_indices, self.col_indices,
                                    torch.ones_like(self.values, dtype=torch.bool), self.in_features)

    @property
    def block(self) -> tuple[int, int]:
        return (self.values.shape[1], self.values.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        return ((self.crow_indices.numel() - 1) * self.values.shape[1], self.in_features)

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.values.numel() / total if total else 0.0

    @property
    def pattern(self) -> str:
        return f"block{self.block[0]}x{self.block[1]}"

    def meta(self) -> torch.Tensor:
        return _meta(self.in_features, *self._quant_meta())

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], validate: bool = True,
                     meta_ints: list[int] | None = None) -> "BlockWeight":
        ints = meta_ints or _meta_ints(d, 1, "BlockWeight")
        w = cls(d["crow_indices"], d["col_indices"], d["values"], ints[0], **_quant_fields(ints, 1, d, "BlockWeight"))
        return w.validate() if validate else w._valid()

    def validate(self) -> "BlockWeight":
        where = "BlockWeight"
        crow, col, v = self.crow_indices, self.col_indices, self._checked_values(where)
        if v.dim() != 3 or v.dtype not in _FLOAT_DTYPES or v.shape[1] <= 0 or v.shape[2] <= 0:
            raise ValueError(f"{where}: values must be float [nnz_blocks, bh, bw], got {tuple(v.shape)} {v.dtype}")
        if self.in_features <= 0 or self.in_features % v.shape[2]:
            raise ValueError(f"{where}: in_features ({self.in_features}) must be a multiple of the block width")
        if crow.dtype != torch.int64 or col.dtype != torch.int64 or crow.dim() != 1 or col.dim() != 1:
            raise ValueError(f"{where}: crow_indices and col_indices must be 1-D int64")
        if crow.numel() < 1 or int(crow[0]) != 0 or int(crow[-1]) != v.shape[0] or bool((crow.diff() < 0).any()):
            raise ValueError(f"{where}: crow_indices must start at 0, not decrease and end at {v.shape[0]}")
        if col.numel() != v.shape[0]:
            raise ValueError(f"{where}: col_indices must have one entry per block ({v.shape[0]})")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.in_features // v.shape[2]):
            raise ValueError(f"{where}: col_indices out of range [0, {self.in_features // v.shape[2]})")
        return self._valid()

    def slice_rows(self, start: int, stop: int) -> "BlockWeight":
        """Output rows [start, stop) of the weight; both ends on multiples of the block
        height, so no block is cut."""
        bh, bw = self.block
        self._check_cut(start, stop, 0, bh, f"a {bh}x{bw} block", "BlockWeight.slice_rows")
        crow = self.crow_indices[start // bh: stop // bh + 1]
        c0, c1 = int(crow[0]), int(crow[-1])
        return BlockWeight((crow - c0).contiguous(), self.col_indices[c0:c1].clone(), self.values[c0:c1].clone(),
                           self.in_features).validate()

    def slice_cols(self, start: int, stop: int) -> "BlockWeight":
        """Input columns [start, stop) of the weight; both ends on multiples of the block
        width, so no block is cut."""
        bh, bw = self.block
        self._check_cut(start, stop, 1, bw, f"a {bh}x{bw} block", "BlockWeight.slice_cols")
        col, crow = self.col_indices, self.crow_indices
        keep = (col >= start // bw) & (col < stop // bw)
        block_rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=col.device), crow.diff())
        counts = torch.bincount(block_rows[keep], minlength=crow.numel() - 1)
        new_crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return BlockWeight(new_crow, col[keep] - start // bw, self.values[keep], stop - start).validate()

    @classmethod
    def cat_rows(cls, parts) -> "BlockWeight":
        """The weight whose rows are the parts' rows in order (inverse of slice_rows)."""
        parts = cls._check_parts(parts, cls, "BlockWeight.cat_rows")
        if len({(p.in_features, p.block) for p in parts}) != 1:
            raise ValueError("BlockWeight.cat_rows: parts must share in_features and the block shape")
        crows, base = [parts[0].crow_indices[:1]], 0
        for p in parts:
            crows.append(p.crow_indices[1:] + base)
            base += p.values.shape[0]
        return cls(torch.cat(crows), torch.cat([p.col_indices for p in parts]),
                   torch.cat([p.values for p in parts]), parts[0].in_features).validate()

    @classmethod
    def cat_cols(cls, parts) -> "BlockWeight":
        """The weight whose columns are the parts' columns in order (inverse of slice_cols)."""
        parts = cls._check_parts(parts, cls, "BlockWeight.cat_cols")
        if len({(p.shape[0], p.block) for p in parts}) != 1:
            raise ValueError("BlockWeight.cat_cols: parts must share the number of rows and the block shape")
        bh, bw = parts[0].block
        nrows = parts[0].crow_indices.numel() - 1
        total_cols = sum(p.in_features for p in parts) // bw
        rows, cols, shift = [], [], 0
        for p in parts:
            rows.append(torch.repeat_interleave(torch.arange(nrows, device=p.device), p.crow_indices.diff()))
            cols.append(p.col_indices + shift)
            shift += p.in_features // bw
        row, col = torch.cat(rows), torch.cat(cols)
        order = torch.sort(row * total_cols + col).indices
        counts = torch.bincount(row, minlength=nrows)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(crow, col[order], torch.cat([p.values for p in parts])[order],
                   sum(p.in_features for p in parts)).validate()
