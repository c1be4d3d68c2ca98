"""Sparsity patterns: the words users write, the bit-level layout helpers every format
shares, and the 2-D view a convolution weight is pruned and compressed in.

The lowest layer of the package: it imports nothing from sparsekern.

Pattern kinds, their grammar and codes are registered in sparsekern/kinds.py (one entry per
kind); this module holds what every format shares below that registry.
"""
from __future__ import annotations

import torch

NM_GROUP_SIZES = (4, 8, 16)
BITMASK_TILE_COLS = 512  # columns per bitmask offset (csrc/common.h: kBitmaskTileCols)


def check_nm(n: int, m: int, where: str = "N:M") -> None:
    """n:m must keep 1 <= n < m of every m in {4, 8, 16} (what the kernels index)."""
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"{where}: m must be 4, 8 or 16, got {m}")
    if not (isinstance(n, int) and 1 <= n < m):
        raise ValueError(f"{where}: n must satisfy 1 <= n < m, got n={n}, m={m}")


# ------------------------------------------------------------------ 2-D weight views
def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (zero padding, as torch's)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def as_2d(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] -> [out, kh*kw*in] with input channels fastest, so N:M groups run
    along input channels at each kernel position; a 2-D weight is returned as is."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1)


def from_2d(t2: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of as_2d: a [out, kh*kw*in] tensor back to `shape` ([out, in, kh, kw])."""
    if len(shape) == 2:
        return t2
    out, cin, *k = shape
    return t2.reshape(out, *k, cin).permute(0, len(shape) - 1, *range(1, len(shape) - 1)).contiguous()


# -------------------------------------------------------------- bit-level layouts
def nm_index_bits(m: int) -> int:
    """Bits per packed in-group index: 2 for M=4, 4 for M=8 and M=16."""
    return 2 if m == 4 else 4


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, k] small ints (< 2**bits) -> uint8 [rows, ceil(k*bits/8)], little-endian
    within each byte: field s sits at bit (s*bits) % 8 of byte (s*bits) // 8."""
    rows, k = fields.shape
    per = 8 // bits
    pad = (-k) % per
    f = torch.nn.functional.pad(fields.to(torch.int32), (0, pad)).view(rows, -1, per)
    shifts = torch.arange(per, device=fields.device, dtype=torch.int32) * bits
    return (f << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [rows, bytes] -> int64 [rows, k]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    f = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return f.reshape(packed.shape[0], -1)[:, :k].to(torch.int64)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> int64 [out, ceil(in/64)]; bit j of word w is column 64*w + j."""
    rows, k = mask.shape
    pad = (-k) % 64
    bits = torch.nn.functional.pad(mask.to(torch.int64), (0, pad)).view(rows, -1, 64)
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    # Two's complement wrap-around makes bit 63 come out as the sign bit, as intended.
    return (bits << shifts).sum(-1)


def unpack_bitmask(words: torch.Tensor, in_features: int) -> torch.Tensor:
    """int64 [out, ceil(in/64)] -> bool [out, in]."""
    shifts = torch.arange(64, device=words.device, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :in_features].bool()


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 word (SWAR bit counting in int64 arithmetic), same shape."""
    w = words.to(torch.int64)
    w = w - ((w >> 1) & 0x5555555555555555)
    w = (w & 0x3333333333333333) + ((w >> 2) & 0x3333333333333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F0F0F0F0F
    # The byte sums fit in the top byte; >> is arithmetic in torch, so mask it after the shift.
    return ((w * 0x0101010101010101) >> 56) & 0xFF


# The 2:4 weight pre-packed for the CPU GEMM kernel (csrc/nm24_panels.h: layout and why).
NM24_PANEL_ROWS, NM24_PANEL_KT, NM24_PANEL_QUAD_BYTES = 96, 128, 72


def nm24_panels_bytes(out_features: int, in_features: int) -> int:
    """Bytes of a [out, in] 2:4 weight in the pre-packed layout of csrc/nm24_panels.h: per K
    tile of 128 columns and 3-row block, 16 quads of 72 bytes (6 bytes per kept value)."""
    k_tiles = -(-in_features // NM24_PANEL_KT)
    blocks = -(-out_features // 3)
    return k_tiles * blocks * (NM24_PANEL_KT // 8) * NM24_PANEL_QUAD_BYTES


def check_nm24_panels(x: torch.Tensor, n: int, m: int, out_features: int, in_features: int, panels,
                      op: str = "nm_linear") -> None:
    """The check of the optional `panels` argument of nm_linear and nm_conv2d, as the C++
    backends make it (csrc/common.h check_nm24_panels): for the Python backends, which do not
    read it."""
    if panels is None:
        return
    if (n, m) != (2, 4):
        raise ValueError(f"{op}: panels is a 2:4 layout, got {n}:{m}")
    if not isinstance(panels, torch.Tensor) or panels.dtype != torch.uint8:
        raise TypeError(f"{op}: panels must be uint8, got {getattr(panels, 'dtype', type(panels).__name__)}")
    if panels.device != x.device:
        raise RuntimeError(f"{op}: panels is on {panels.device} but x is on {x.device}")
    want = nm24_panels_bytes(out_features, in_features)
    if panels.dim() != 1 or panels.numel() != want:
        raise ValueError(f"{op}: panels must be 1-D with {want} bytes for a [{out_features}, {in_features}] "
                         f"weight, got {list(panels.shape)}")

