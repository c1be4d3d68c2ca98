// The layout of a 2:4 weight pre-packed for the CPU weight-stationary kernel, shared by the
// op checks (common.h: every backend of nm_linear and nm_conv2d checks the optional `panels`
// argument the same way) and the kernels (cpu/sparse_rows_avx512.cpp, cpu/nm_gemm_impl.h). Plain C++, no ATen.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparsekern {

// A 2:4 weight pre-packed for the weight-stationary kernels (nm24_pack_panels, once
// per weight; NMWeight.gemm_panels on the Python side). The kernel otherwise packs every
// (panel, K tile) of the weight at every call, reading 96 rows' slices at once; packed ahead
// it reads one stream. Layout, uint8 [bytes()]:
//   for each panel of kRows output rows, each K tile kt of kKt columns, each 3-row block of
//   the panel: kQuads quads of {uint16 off[3][4]; float val[3][4]} (kQuadBytes), the block's
//   rows x 4 consecutive kept slots. off = (column - kt * kKt) << 8, the byte offset of the
//   column inside the K tile of a 64-lane x tile (the AVX2 kernel, with 32-lane tiles, halves
//   it); val in fp32. Rows past O: off 0, val 0.
//   Slots past the row's end (a last K tile holding a partial quad): the zero column K,
//   which lies inside that K tile. Quads past the K tile's end are zero.
// The kernel masks every offset with kOffMask, so any bytes (a tampered or stale buffer)
// read inside the K tile's 128 columns, which the x tiles hold (x_extra_cols): never out of
// bounds.
struct Nm24Panels {
  static constexpr int64_t kRows = 96, kBlockRows = 3, kKt = 128, kQuads = kKt / 8, kQuadBytes = 72;
  static constexpr int64_t kBlockBytes = kQuads * kQuadBytes;  // one block's quads of one K tile
  static constexpr uint16_t kOffMask = 0x7F00;                  // 127 << 8
  static int64_t k_tiles(int64_t K) { return (K + kKt - 1) / kKt; }
  static int64_t blocks(int64_t O) { return (O + kBlockRows - 1) / kBlockRows; }
  static int64_t bytes(int64_t O, int64_t K) { return k_tiles(K) * blocks(O) * kBlockBytes; }
  // Where the quads of the block starting at row rr (a multiple of 3) for K tile kt start.
  static int64_t block_offset(int64_t O, int64_t K, int64_t rr, int64_t kt) {
    const int64_t p = rr / kRows, first = p * (kRows / kBlockRows);
    const int64_t in_panel = std::min(kRows / kBlockRows, blocks(O) - first);
    return (first * k_tiles(K) + kt * in_panel + (rr - p * kRows) / kBlockRows) * kBlockBytes;
  }
  // Columns an x tile needs past its K + 1 so that every masked offset of the last K tile reads inside it.
  static int64_t x_extra_cols(int64_t K) { return std::max<int64_t>(0, k_tiles(K) * kKt - (K + 1)); }
};

}  // namespace sparsekern
