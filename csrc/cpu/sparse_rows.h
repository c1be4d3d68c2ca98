// Inner loops of the CPU sparse-linear kernels, compiled twice: once for AVX2+FMA+F16C
// (sparse_rows_avx2.cpp) and once for the portable baseline (sparse_rows_generic.cpp),
// one header per family (nm_rows_impl.h, bitmask_rows_impl.h, block_rows_impl.h). The op
// files (nm_linear.cpp, bitmask_linear.cpp, block_linear.cpp) pick one at run time with
// cpu_has_avx2(), so a single build runs on any x86-64 (and non-x86) CPU.
//
// Everything here works on raw pointers: the op files validate arguments, convert the
// activations to fp32 and own the threading (at::parallel_for over output rows).
#pragma once

#include "../nm24_panels.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <utility>

// 1 where sparse_rows_avx2.cpp compiles the AVX2 kernels (GCC's target pragma on x86-64);
// elsewhere its entry points forward to the portable ones and cpu_has_avx2() is false.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEKERN_AVX2_KERNELS 1
#else
#define SPARSEKERN_AVX2_KERNELS 0
#endif

namespace sparsekern {
namespace cpu {

// The direct kernels read activations in one of two fp32 layouts:
//   x  : row-major [B, K]: block kernels always, AVX2 N:M kernels always (tiles of 8
//        batch rows), portable N:M and all bitmask kernels for B <= kRowMajorMaxBatch;
//   xT : [K, BP], BP = 8 or 16 lanes holding batch rows, unused lanes zero
//        (the "broadcast" kernels: one weight value times a whole batch vector).
constexpr int64_t kRowMajorMaxBatch = 4;
// The widest batch the row kernels take: the op files run them in batch tiles of at most this
// many rows. Which algorithm runs at which rows (the row kernels, tiles into the BLAS GEMM, a
// GEMM kernel) is sparsekern/dispatch_rules.py's choice (CPU_ROWS_MAX_ROWS and the *_cpu_algo
// rules), passed to the ops as `algo`.
constexpr int64_t kDirectMaxBatch = 16;

// 2:4: index byte (4 slots, 2 groups, 8 columns) -> the column of each slot within those 8
// columns. One table (cpu_common.cpp) for every 2:4 kernel of every instruction set.
struct Nm24SlotColumns {
  alignas(16) int32_t col[256][4];
};
const Nm24SlotColumns& nm24_slot_columns();

struct NmRowsArgs {
  const void* values;       // [O, kept] in `dtype`
  const uint8_t* indices;   // [O, idx_row_bytes], packed in-group indices
  const int32_t* slot_base; // [kept]: (s / n) * m, slot s's group start column (same for all rows)
  c10::ScalarType dtype;
  int64_t kept, idx_row_bytes, n, m, K, O;
  const float* x;           // row-major [B, K] or xT [K, BP]
  int64_t B, BP;            // BP == 0: x is row-major
  float* out;               // [B, O] fp32
};

struct BitmaskRowsArgs {
  const void* values;       // [nnz] in `dtype`
  const int64_t* bitmask;   // [O, words]
  const int32_t* offsets;   // [O, tiles]
  c10::ScalarType dtype;
  int64_t words, tiles, K, O;
  const float* x;           // row-major [B, K] or xT [K, BP]
  int64_t B, BP;            // BP == 0: x is row-major
  float* out;               // [B, O] fp32
  int64_t nnz = 0;          // kept values in all O rows, or 0 if unknown (a kernel that picks by density then takes its default)
  const int16_t* columns = nullptr;  // [nnz] column of each kept value (read as uint16), or null; needs nnz
  bool b1_indexed = false;  // one row on AVX-512: the indexed kernel (bitmask_linear's algo 4); needs nnz
};

// Whether row r of a bitmask weight may read its values `lanes` at a time from anywhere in
// the row: its values start at offsets[r, 0] and number at most K, so such a load stays in
// the buffer when start + K + lanes <= nnz (the values' length; 0 when not given). True for
// every row but those whose values start within K + lanes of the end (a few rows, dozens at
// 2% kept), and for offsets no format would hold it still bounds the read.
inline bool bitmask_row_has_slack(const BitmaskRowsArgs& a, int64_t r, int64_t lanes) {
  const int64_t start = a.offsets[r * a.tiles];
  return start >= 0 && start + a.K + lanes <= a.nnz;
}

// Row r's kept values are values[start, end): the row's first tile offset, and the next
// row's (the last row ends at nnz). The column-index kernels need no per-word walk.
inline std::pair<int64_t, int64_t> bitmask_kept_span(const BitmaskRowsArgs& a, int64_t r) {
  return {a.offsets[r * a.tiles], r + 1 < a.O ? a.offsets[(r + 1) * a.tiles] : a.nnz};
}

struct BlockRowsArgs {
  const void* values;       // [nnzb, bh, bw] in `dtype` (a float dtype, or int8 with `scales`)
  const int64_t* crow;      // [O/bh + 1]
  const int64_t* col;       // [nnzb]
  c10::ScalarType dtype;
  int64_t bh, bw, K, O;
  const float* x;           // row-major [B, K]
  int64_t B;
  float* out;               // [B, O] fp32, O = (crow entries - 1) * bh
  const float* scales = nullptr;  // int8 values: [O], each output row's sum times its scale
};

// One x tile of the weight-stationary kernels ([K + 1][L] fp32, K = positions * C, L a
// multiple of 8) from row pointers: rows[p * L + l] is the start of lane l's C values at
// position p (column p * C + c of the tile), or null for zeros. The linear ops have one
// position (C = K, a lane per batch row, null past B); the convolution has one per kernel
// tap (a lane per output pixel, null in the zero padding). Column K is written zero.
struct LaneTileArgs {
  const float* const* rows;  // [positions][L]
  int64_t positions, C, L;
  float* tile;               // [positions * C + 1][L]
};
namespace avx2 {
void lane_tile(const LaneTileArgs& a);  // AVX2 only (lane_tiles_impl.h)
// The way back: out[j * ldo + r] = acc[r * L + j] for rows r < rows and lanes j < lanes (the
// weight-stationary kernels' partial sums [rows][L] into output rows [lanes][ldo]).
void lanes_to_rows(const float* acc, int64_t rows, int64_t L, int64_t lanes, float* out, int64_t ldo);
}  // namespace avx2

// Where each lane's values start, per kernel position, for building x tiles chunk by chunk.
// Linear: positions 1, C = K, lane b is row b of x [B, K]. Convolution: x is the NHWC input
// [N, H, W, C], lane b the output pixel (n, oh, ow) of [N, OH, OW], positions the kh x kw
// taps in (i, j) order, tap (i, j) of pixel b reads input pixel (oh * sh - ph + i * dh,
// ow * sw - pw + j * dw), zeros outside the input.
struct LaneRows {
  const float* x;
  int64_t B, positions, C;
  int64_t H = 1, W = 1, OH = 1, OW = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
};
// rows[p * L + l] = start of lane b0 + l at position p, null past B or in the padding.
void lane_rows(const LaneRows& s, int64_t b0, int64_t L, const float** rows);

// The order of the weight-stationary kernels. Without `lanes`: panels of output rows, each
// over every x tile of the prebuilt xT (the weight is read once; xT is re-read per panel,
// cheap while it sits in the L2). With `lanes`: chunks of chunk_lanes lanes taken from
// *next_chunk; a thread builds its chunk's tiles (lane_rows + lane_tile) and runs every
// output row over them (x is read once, the weight once per chunk), the order for a small
// weight and many rows (convolutions). ws_plan (cpu_common.h) picks.
struct WsChunks {
  const LaneRows* lanes = nullptr;
  int64_t chunk_lanes = 0, chunks = 0;
  int64_t* next_chunk = nullptr;
};

// 2:4 large-batch kernel (nm_gemm_impl.h, AVX2 only): x as tiles of kG24Lanes batch
// lanes, tile t = xT + t * (K + 1) * kG24Lanes holding [K + 1][kG24Lanes] fp32 (lanes
// past B zero, column K zero: padding slots point at it).
constexpr int64_t kG24Lanes = 32;
struct Nm24GemmArgs {
  const void* values;       // [O, kept] in `dtype`, kept = K / 2
  const uint8_t* indices;   // [O, idx_row_bytes], 2 bits per slot
  c10::ScalarType dtype;
  int64_t kept, idx_row_bytes, K, O;
  const float* xT;          // ceil(B / kG24Lanes) tiles of [K + 1][kG24Lanes]
  int64_t B;
  float* out;               // [B, O] fp32
  int64_t panel_rows;       // rows per panel (the xT tile of a K tile is reused by all of them)
  int64_t panels;           // ceil(O / panel_rows)
  int64_t* next_panel;      // shared counter, 0 before the first call
  WsChunks chunked = {};    // lanes set: the chunk order (xT unused)
  const uint8_t* prepacked = nullptr;  // the weight pre-packed (Nm24Panels, nm24_panels.h), read by
                                       // both kernels; xT (or each chunk's tiles) with x_extra_cols(K) more columns
};
namespace avx2 {
// Output panels taken from *a.next_panel until all are done; call it from every thread.
void nm24_gemm(const Nm24GemmArgs& a);
}  // namespace avx2

// Nm24Panels (the pre-packed layout of `prepacked`): ../nm24_panels.h.

#define SPARSEKERN_DECLARE_ROWS(NS)                                                           \
  namespace NS {                                                                             \
  /* output rows [r0, r1) of out */                                                          \
  void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1);                                 \
  void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1);                       \
  /* block rows [br0, br1), i.e. output rows [br0 * bh, br1 * bh) */                         \
  void block_rows(const BlockRowsArgs& a, int64_t br0, int64_t br1);                         \
  }

SPARSEKERN_DECLARE_ROWS(avx2)
SPARSEKERN_DECLARE_ROWS(generic)

// AVX-512 decode kernels (sparse_rows_avx512.cpp), called only when cpu_has_avx512().
// They read row-major x [B, K] at any B (no lanes layout) and handle bitmask and the N:M
// patterns of avx512_nm_pattern; the *_dense_rows functions write rows [r0, r1) as dense
// fp32 [r1 - r0, K] into dst (the fill of the large-batch tiles).
inline bool avx512_nm_pattern(int64_t n, int64_t m) { return (n == 2 && m == 4) || ((m == 8 || m == 16) && n % 2 == 0); }
namespace avx512 {
void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1);
// With a.columns: 1-4 rows of row-major x, or any batch tile as lanes (BP 8 or 16). Without
// it: row-major x only.
void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1);
void nm_dense_rows(const NmRowsArgs& a, int64_t r0, int64_t r1, float* dst);
void bitmask_dense_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1, float* dst);
// The 2:4 weight-stationary kernel with 16-lane vectors: same arguments as avx2::nm24_gemm
// but x tiles of kG24Lanes512 batch lanes ([K + 1][64] fp32 each).
constexpr int64_t kG24Lanes512 = 64;
void nm24_gemm(const Nm24GemmArgs& a);
}  // namespace avx512

// Bitmask large-batch kernel (AVX-512 only): the same weight-stationary scheme over the same
// x tiles ([K + 1][kG24Lanes512]), one multiply-add per kept value and 16 batch lanes.
struct BitmaskGemmArgs {
  const void* values;       // [nnz] in `dtype`
  const int64_t* bitmask;   // [O, words]
  const int32_t* offsets;   // [O, tiles]
  c10::ScalarType dtype;
  int64_t words, tiles, K, O;
  const float* xT;
  int64_t B;
  float* out;               // [B, O] fp32
  int64_t panel_rows, panels;
  int64_t* next_panel;      // shared counter, 0 before the first call
  WsChunks chunked = {};    // lanes set: the chunk order (xT unused)
};
namespace avx512 {
void bitmask_gemm(const BitmaskGemmArgs& a);
}  // namespace avx512

// Roofline probe (bench: the compute roof the CPU limits run compares kernels with):
// `iters` rounds of kFmaProbeChains independent multiply-adds on the ISA's widest fp32
// vector, enough chains to cover the FMA latency on every port, so the loop runs at the
// core's FMA throughput. Returns a value that depends on every lane (kept by the compiler).
constexpr int64_t kFmaProbeChains = 12;
namespace avx512 { float fma_probe(int64_t iters); }  // 16 lanes
namespace avx2 { float fma_probe(int64_t iters); }    // 8 lanes
namespace generic { float fma_probe(int64_t iters); } // 1 lane (what the compiler makes of it)

}  // namespace cpu
}  // namespace sparsekern
