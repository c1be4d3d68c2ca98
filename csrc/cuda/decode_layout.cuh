// Index arithmetic of the CUDA decode kernels, written once for the device and the host.
//
// The kernels (nm_linear.cu, bitmask_linear.cu) call these functions; tests/test_gpu_layout.py
// compiles them into a host program that plays a warp's 32 lanes through the documented
// fragment layout of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16 with
// floating point type") and checks the result against a dense product, so the mapping from
// the compressed formats to tensor-core fragments is tested without a GPU.
//
// Formats: sparsekern/formats.py (NMWeight, BitmaskWeight).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sparsekern {
namespace layout {

// ------------------------------------------------------------ 2:4 tensor-core decode (Nm24Mma)
// A warp owns 16 output rows and walks K in super-steps of 256 dense columns (64 groups of 4,
// 128 kept values = 256 bytes of a bf16/fp16 row). Lane = 4*g + q (g = groupID 0..7, q =
// thread in group 0..3); the quad of lanes with one g reads one row (g, then g + 8).
//
// Values: load i (0..3) of lane q is the 16-byte chunk 4i + q of the super-step's 256 bytes,
// so each load instruction of a quad covers 64 contiguous bytes (two whole 32-byte sectors;
// no sector is fetched from L2 twice although the loads do not allocate in L1). The chunk
// holds groups 16i + 4q + t (t = 0..3); the lane's group j = 4i + t (its j-th 32-bit value
// word) feeds k16-block j of the super-step: the thread's logical k columns {2q, 2q+1, 2q+8,
// 2q+9} of the block are the group's physical columns {P, P+1, P+2, P+3},
// P = c0 + 64i + 16q + 4t (nm24_group_col). The same mapping is used for x (the B operand),
// so the product over a block is the product over those 16 physical columns, and the 16
// blocks of the four lanes cover the super-step's 64 groups once.
//
// Indices: lane q loads 8 bytes at byte 8q of the super-step's 32 (one 32-byte sector per
// quad and load): the nibbles of groups [16q, 16q + 16). The lane needs the nibbles of its own
// groups, 2 bytes from each lane of its quad, so the quad transposes them with 3 shuffles of
// 16-bit pieces (nm24_meta_piece on the sender, nm24_meta_place on the receiver, both rows
// packed in one 32-bit shuffle); after that nm24_nibble(lo, hi, j) is group j's nibble.
constexpr int kSuperCols = 256;
// Padding (elements) after each batch row of the x slice in shared memory: 8 bytes, so batch
// row b starts b 8-byte units into a 128-byte bank cycle (KS is a multiple of 256 columns)
// and the B-fragment reads of a half warp (units b + 4q + t for its 4 rows x 4 lanes) hit 16
// different 8-byte slots (the host emulation asserts it).
constexpr int kXPad = 4;

// Element offset in the shared x slice of column c of slice row b.
SK_HD int xs_index(int b, int c, int row_stride) { return b * row_stride + c; }

// Offsets inside one row of the NMWeight (2:4) for the super-step at c0: first value element
// of the lane's 16-byte load i (0..3), and first byte of its 8 bytes of indices.
SK_HD int64_t nm24_value_offset(int64_t c0, int q, int i) { return c0 / 2 + 32 * i + 8 * q; }
SK_HD int64_t nm24_meta_offset(int64_t c0, int q) { return c0 / 8 + 8 * q; }
// First physical column of the lane's group j (0..15) in the super-step at c0.
SK_HD int64_t nm24_group_col(int64_t c0, int q, int j) { return c0 + 64 * (j >> 2) + 16 * q + 4 * (j & 3); }
// Load i of a lane is inside the K slice when the super-step's columns [c0 + 64i, c0 + 64i + 64)
// are (k1 - c0 is a multiple of 64); the lane's index load when [c0 + 64q, c0 + 64q + 64) are.
SK_HD bool nm24_chunk_ok(int64_t c0, int i, int64_t k1) { return c0 + 64 * i + 64 <= k1; }

// Index transpose within a quad, round r = 1..3 (round 0 is the lane's own piece): lane q
// sends to lane nm24_quad_dst(q, r) and receives from lane nm24_quad_src(q, r).
SK_HD int nm24_quad_src(int q, int round) { return (q + round) & 3; }
SK_HD int nm24_quad_dst(int q, int round) { return (q + 4 - round) & 3; }
// The 16 bits of a lane's 8 index bytes (lo = bytes 0..3, hi = 4..7) that lane dst_q needs:
// bytes 2 dst_q and 2 dst_q + 1 (the nibbles of groups 16 q + 4 dst_q + 0..3).
SK_HD uint32_t nm24_meta_piece(uint32_t lo, uint32_t hi, int dst_q) {
  return ((dst_q < 2 ? lo : hi) >> (16 * (dst_q & 1))) & 0xffffu;
}
// Puts the piece received from lane src_q where nm24_nibble looks for groups 4 src_q + 0..3.
SK_HD void nm24_meta_place(uint32_t& lo, uint32_t& hi, uint32_t piece, int src_q) {
  const uint32_t v = (piece & 0xffffu) << (16 * (src_q & 1));
  if (src_q < 2)
    lo |= v;
  else
    hi |= v;
}

// Two dense 16-bit elements (columns 2*half and 2*half+1 of a 2:4 group) packed in 32 bits,
// lower column in the low half, from the group's two kept values (`vals`: slot 0 low, slot 1
// high) and its 4-bit index nibble (idx0 | idx1 << 2). Positions neither index names are +0.
SK_HD uint32_t nm24_dense_pair(uint32_t vals, uint32_t nib, int half) {
  const uint32_t i0 = nib & 3u, i1 = (nib >> 2) & 3u;
  const uint32_t v0 = vals & 0xffffu, v1 = vals >> 16;
  const uint32_t c = 2u * static_cast<uint32_t>(half);
  const uint32_t lo = (i1 == c) ? v1 : ((i0 == c) ? v0 : 0u);
  const uint32_t hi = (i1 == c + 1u) ? v1 : ((i0 == c + 1u) ? v0 : 0u);
  return lo | (hi << 16);
}

// The 4-bit nibble of the lane's group j (0..15) from its transposed indices (lo, hi words).
SK_HD uint32_t nm24_nibble(uint32_t meta_lo, uint32_t meta_hi, int j) {
  return ((j < 8 ? meta_lo : meta_hi) >> (4 * (j & 7))) & 15u;
}

// ------------------------------------------------------------------ generic N:M (NmFma)
// Bits per packed in-group index (2 for m = 4, 4 for m = 8, 16) and log2(m).
SK_HD int nm_bits(int m) { return m == 4 ? 2 : 4; }
SK_HD int nm_log2(int m) { return m == 4 ? 2 : (m == 8 ? 3 : 4); }
// In-group index of slot s of a row whose packed indices start at `row`.
SK_HD int nm_index_at(const uint8_t* row, int64_t s, int bits) {
  const int64_t bit = s * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// ------------------------------------------------------------------------------- bitmask
// Decode steps cover 32 consecutive 64-bit words (2048 columns) of a row: lane l takes word
// w0 + l. A step starts on a 512-column tile boundary, so its first value is offsets[tile].
constexpr int kBitmaskStepWords = 32;
constexpr int kBitmaskStepCols = 64 * kBitmaskStepWords;

}  // namespace layout
}  // namespace sparsekern
