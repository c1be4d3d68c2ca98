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
// A warp owns 16 output rows and walks K in super-steps of 256 dense columns. Lane = 4*g + q
// (g = groupID 0..7, q = thread in group 0..3). In a super-step starting at column c0, lane
// (g, q) loads, for rows g and g+8, the 64 contiguous bytes of values of groups
// [c0/4 + 16q, c0/4 + 16q + 16) (four 16-byte loads) and the 8 bytes of their packed indices
// (one 8-byte load). Group j of that run (j = 0..15) feeds k16-block j of the super-step:
// the thread's logical k columns {2q, 2q+1, 2q+8, 2q+9} of the block are the group's physical
// columns {P, P+1, P+2, P+3}, P = c0 + 64q + 4j. The same mapping is used for x (the B
// operand), so the product over a block is the product over those 16 physical columns.
constexpr int kSuperCols = 256;
// Padding (elements) after each batch row of the x slice in shared memory: with it and the
// swizzle below, the 8-byte B-fragment reads of a half warp hit 16 different banks.
constexpr int kXPad = 16;

// Element offset in the shared x slice of column c (c % 4 == 0 for a fragment read) of slice
// row b. 8-byte units are XOR-swizzled with bits 4..5 of the unit index, which for a fragment
// read equal q, so the four q of one g fall on four different units of a 128-byte line.
SK_HD int xs_index(int b, int c, int row_stride) {
  const int u = c >> 2;
  return b * row_stride + ((u ^ ((u >> 4) & 3)) << 2) + (c & 3);
}

// Offsets inside one row of the NMWeight (2:4): first value element of the thread's
// 16-byte chunk i (0..3), and first byte of its 8 bytes of indices, for the super-step at c0.
SK_HD int64_t nm24_value_offset(int64_t c0, int q, int i) { return c0 / 2 + 32 * q + 8 * i; }
SK_HD int64_t nm24_meta_offset(int64_t c0, int q) { return c0 / 8 + 8 * q; }
// First physical column of group j of lane (., q) in the super-step at c0.
SK_HD int64_t nm24_group_col(int64_t c0, int q, int j) { return c0 + 64 * q + 4 * j; }

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

// The 4-bit nibble of group j (0..15) from the thread's 8 bytes of indices (lo, hi words).
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
