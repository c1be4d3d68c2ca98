"""The registry of value precisions: how a format stores its kept values, declared once.

Every format (N:M, bitmask, block) keeps a list of values, one per kept weight, in an order
of its own (sparsekern/formats.py). A precision says how those values are stored; the
format hands it its values as a 2-D [rows, k] view (one row per output row; the bitmask
format's rows are ragged and handled by the format) and stores what it returns:

  fp    the values in a float dtype (the weight's, or another with Format.to(dtype=...)):
        no scales. Code 0.
  int8  symmetric, one scale per output row: q = round(v / s) in [-127, 127], s =
        max|v| / 127 over the row's kept values (s = 1 for a row with none). Stored
        int8, same shape as the fp values; scales float32 [rows]. v ~ q * s. Code 1.
  int4  symmetric, one scale per group of `group_size` (32, 64 or 128) consecutive kept
        values of a row (a row's last group may be shorter): q = round(v / s) in [-7, 7],
        s = max|v| / 7 over the group. Stored two per byte, low nibble first, as q + 8
        (so 0 is the byte value 8; the nibble 0 is never written): uint8
        [rows, ceil(k / 2)] (a row with odd k pads its last high nibble with 8); scales
        float32 [rows, ceil(k / group_size)]. Code 2.

Pruned weights are not stored at all, so the grid need not contain an exact zero for them;
symmetric grids do anyway (q = 0), which keeps padding slots of N:M exactly zero.

The lowest layer: it imports nothing from sparsekern. `quantize` / `dequantize` are the
pure-torch definitions every kernel and test is checked against.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)


class Precision:
    """One value precision (module docstring)."""

    name: str = ""
    code: int = 0
    bits: int = 32
    grouped: bool = False  # takes a group_size
    storage: torch.dtype | None = None  # dtype of the stored values (None: a float dtype)
    qmax: int = 0  # integer precisions: the grid is [-qmax, qmax]

    def check_group_size(self, group_size: int, where: str) -> int:
        if not self.grouped:
            if group_size not in (0, None):
                raise ValueError(f"{where}: group_size applies to int4 only, got {group_size} with {self.name}")
            return 0
        if group_size not in GROUP_SIZES:
            raise ValueError(f"{where}: group_size must be one of {GROUP_SIZES} for {self.name}, got {group_size!r}")
        return int(group_size)

    def stored_shape(self, rows: int, k: int) -> tuple[int, int]:
        return (rows, k)

    def scales_shape(self, rows: int, k: int, group_size: int) -> tuple[int, ...]:
        return (0,)

    def quantize(self, values: torch.Tensor, group_size: int = 0,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float [rows, k] -> (stored values, scales). `scales` (float32, scales_shape): use
        these instead of the values' max (SparseGPT's joint quantization fixes them while it
        sweeps); values beyond the grid are clamped."""
        raise NotImplementedError

    def dequantize(self, stored: torch.Tensor, scales: torch.Tensor, k: int, dtype: torch.dtype,
                   group_size: int = 0) -> torch.Tensor:
        """(stored values, scales) -> float [rows, k] in `dtype`."""
        raise NotImplementedError

    def round_trip(self, values: torch.Tensor, group_size: int = 0) -> torch.Tensor:
        """values as this precision stores them (quantize then dequantize), in their dtype:
        what SparseGPT's joint quantization compensates for."""
        q, s = self.quantize(values, group_size)
        return self.dequantize(q, s, values.shape[1], values.dtype, group_size)

    def check(self, stored: torch.Tensor, scales: torch.Tensor | None, rows: int, k: int, group_size: int,
              where: str) -> None:
        """Raises ValueError unless (stored, scales) is a well-formed [rows, k] of this precision."""
        want = self.stored_shape(rows, k)
        if stored.dtype != self.storage or tuple(stored.shape) != want:
            raise ValueError(f"{where}: {self.name} values must be {self.storage} of shape {list(want)}, got "
                             f"{stored.dtype} {list(stored.shape)}")
        swant = self.scales_shape(rows, k, group_size)
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != swant:
            raise ValueError(f"{where}: {self.name} scales must be float32 of shape {list(swant)}, got "
                             f"{getattr(scales, 'dtype', type(scales).__name__)} {list(getattr(scales, 'shape', []))}")
        if scales.device != stored.device:
            raise ValueError(f"{where}: scales are on {scales.device} but values on {stored.device}")
        if scales.numel() and not bool((torch.isfinite(scales) & (scales > 0)).all()):
            raise ValueError(f"{where}: {self.name} scales must be finite and positive (corrupt)")

    def __repr__(self) -> str:
        return f"<precision {self.name}>"


class FloatValues(Precision):
    name, code, bits = "fp", 0, 32

    def quantize(self, values, group_size=0, scales=None):
        return values, torch.empty(0, dtype=torch.float32, device=values.device)

    def dequantize(self, stored, scales, k, dtype, group_size=0):
        return stored.to(dtype)

    def round_trip(self, values, group_size=0):
        return values

    def check(self, stored, scales, rows, k, group_size, where):
        if not stored.is_floating_point() or tuple(stored.shape) != (rows, k):
            raise ValueError(f"{where}: values must be a float tensor of shape [{rows}, {k}], got "
                             f"{stored.dtype} {list(stored.shape)}")


def _given(scales: torch.Tensor, shape: tuple, device) -> torch.Tensor:
    """Scales a caller fixed, checked: float, `shape`, finite and positive."""
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != tuple(shape):
        raise ValueError(f"quantize: scales must be a tensor of shape {list(shape)}, got "
                         f"{list(getattr(scales, 'shape', [])) or type(scales).__name__}")
    s = scales.to(device=device, dtype=torch.float32)
    if s.numel() and not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError("quantize: scales must be finite and positive")
    return s


def scale_for(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The float32 symmetric scale of values whose largest magnitude is `amax` on a grid of
    [-qmax, qmax] (1 where amax is 0); SparseGPT's joint quantization fixes its scales with
    it too."""
    # An all-zero row or group gets scale 1 (any scale gives q = 0).
    s = amax.to(torch.float32) / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


class Int8Values(Precision):
    name, code, bits, storage = "int8", 1, 8, torch.int8
    qmax = 127

    def scales_shape(self, rows, k, group_size):
        return (rows,)

    def quantize(self, values, group_size=0, scales=None):
        v = values.to(torch.float32)
        if scales is not None:
            s = _given(scales, (v.shape[0],), v.device)
        elif v.shape[1]:
            # max |v| from the row's min and max: no temporary |v| the size of the values
            lo, hi = torch.aminmax(v, dim=1)
            s = scale_for(torch.maximum(lo.neg_(), hi), self.qmax)
        else:
            s = scale_for(v.new_zeros(v.shape[0]), self.qmax)
        q = torch.div(v, s[:, None]).round_().clamp_(-self.qmax, self.qmax).to(torch.int8)  # one temporary
        return q, s

    def dequantize(self, stored, scales, k, dtype, group_size=0):
        return (stored.to(torch.float32) * scales[:, None]).to(dtype)


class Int4Values(Precision):
    name, code, bits, storage = "int4", 2, 4, torch.uint8
    qmax = 7
    grouped = True

    def stored_shape(self, rows, k):
        return (rows, (k + 1) // 2)

    def scales_shape(self, rows, k, group_size):
        return (rows, -(-k // group_size))

    def quantize(self, values, group_size=128, scales=None):
        rows, k = values.shape
        groups = -(-k // group_size)
        v = torch.nn.functional.pad(values.to(torch.float32), (0, groups * group_size - k))
        v = v.view(rows, groups, group_size)
        s = _given(scales, (rows, groups), v.device) if scales is not None else scale_for(v.abs().amax(2), self.qmax)
        q = torch.round(v / s[:, :, None]).clamp_(-self.qmax, self.qmax).to(torch.int32).view(rows, -1)[:, :k] + 8
        q = torch.nn.functional.pad(q, (0, k % 2), value=8).view(rows, -1, 2)
        return (q[:, :, 0] | (q[:, :, 1] << 4)).to(torch.uint8), s

    def dequantize(self, stored, scales, k, dtype, group_size=128):
        rows = stored.shape[0]
        b = stored.to(torch.int32)
        q = torch.stack([b & 15, b >> 4], -1).view(rows, -1)[:, :k] - 8
        s = scales.repeat_interleave(group_size, 1)[:, :k]
        return (q.to(torch.float32) * s).to(dtype)

    def check(self, stored, scales, rows, k, group_size, where):
        super().check(stored, scales, rows, k, group_size, where)
        if stored.numel() and bool(((stored & 15) == 0).any() | ((stored >> 4) == 0).any()):
            raise ValueError(f"{where}: int4 values hold the nibble 0 (-8), which the symmetric grid never "
                             "writes (corrupt)")


PRECISIONS: dict[str, Precision] = {p.name: p for p in (FloatValues(), Int8Values(), Int4Values())}
PRECISION_OF_CODE: dict[int, Precision] = {p.code: p for p in PRECISIONS.values()}


def precision(name, where: str = "quantize") -> Precision:
    """The entry of a precision name; None means "fp" (values in a float dtype)."""
    if name is None:
        return PRECISIONS["fp"]
    if not isinstance(name, str) or name.lower() not in PRECISIONS:
        raise ValueError(f"{where}: unknown value precision {name!r}; one of None, "
                         + ", ".join(repr(n) for n in PRECISIONS if n != "fp"))
    return PRECISIONS[name.lower()]


def precision_of_code(code: int, where: str = "meta") -> Precision:
    p = PRECISION_OF_CODE.get(int(code))
    if p is None:
        raise ValueError(f"{where}: unknown value precision code {int(code)} (known: {sorted(PRECISION_OF_CODE)})")
    return p


# Compute dtypes a quantized format records in its meta ints (codes never change).
FLOAT_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
FLOAT_DTYPE_OF_CODE = {v: k for k, v in FLOAT_DTYPE_CODES.items()}


def quantize_ragged_int8(values: torch.Tensor, rows_of: torch.Tensor, rows: int,
                         scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 with one scale per output row for values in any order: `rows_of` [numel] gives
    each value's row. -> (int8 values, float32 scales [rows]); `scales` as in quantize."""
    v = values.to(torch.float32)
    if scales is not None:
        s = _given(scales, (rows,), v.device)
    else:
        amax = torch.zeros(rows, dtype=torch.float32, device=v.device).scatter_reduce_(0, rows_of, v.abs(), "amax")
        s = scale_for(amax, Int8Values.qmax)
    return torch.round(v / s[rows_of]).clamp_(-Int8Values.qmax, Int8Values.qmax).to(torch.int8), s


def dequantize_ragged_int8(stored: torch.Tensor, scales: torch.Tensor, rows_of: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    return (stored.to(torch.float32) * scales[rows_of]).to(dtype)


def check_ragged_int8(stored: torch.Tensor, scales, rows: int, numel: int, where: str) -> None:
    if stored.dtype != torch.int8 or stored.numel() != numel:
        raise ValueError(f"{where}: int8 values must be int8 with {numel} elements, got {stored.dtype} "
                         f"{list(stored.shape)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
        raise ValueError(f"{where}: int8 scales must be float32 of shape [{rows}], got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} {list(getattr(scales, 'shape', []))}")
    if scales.device != stored.device:
        raise ValueError(f"{where}: scales are on {scales.device} but values on {stored.device}")
    if scales.numel() and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError(f"{where}: int8 scales must be finite and positive (corrupt)")


def round_activation_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] with each row (last dimension) rounded to the symmetric int8 grid of its own
    scale, in x's dtype: q = round(x * 127 / max|x|) in [-127, 127], times max|x| / 127 (a
    row of zeros stays zero), computed in fp32 as the int8-activation kernels quantize x
    (csrc/cpu/rows_q.h, nm_gemm_int8.h). A product with it is the kernels' integer product up
    to fp32 rounding, so paths that multiply x in floats (tiles, a dense copy, the training
    forward) give what the integer kernels give. The gradient passes straight through."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp_(-127, 127)
    rounded = (q * torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))).to(x.dtype)
    return x + (rounded - x).detach() if x.requires_grad else rounded
