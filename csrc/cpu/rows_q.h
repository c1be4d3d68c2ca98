// Decode kernels of the quantized linear ops nm_linear_q and bitmask_linear_q (linear_q.cpp):
// the packed int8 / int4 values are read as stored and dequantized in registers, so a decode
// call streams the quantized bytes (1 byte per int8 value, half a byte per int4 value) plus
// the index and the scales, never a dequantized copy.
//
// Compiled three times like sparse_rows.h's kernels: rows_q_avx512.cpp (AVX-512 F/VL/BW/DQ/
// VBMI2, taken when cpu_has_avx512()), rows_q_avx2.cpp and rows_q_generic.cpp (the template
// rows_q_impl.h under SK_AVX2 or not, picked by cpu_has_avx2()). Everything works on raw
// pointers: linear_q.cpp checks the arguments, converts x to row-major fp32 [B, K] and owns
// the threading. Value layouts: sparsekern/precisions.py.
#pragma once

#include <cstdint>

#include "sparse_rows.h"  // SPARSEKERN_AVX2_KERNELS

namespace sparsekern {
namespace cpu {

// N:M weight [O, K] with quantized values.
//   bits 8: values int8 [O, kept], scales float32 [O] (v = q * s[r]).
//   bits 4: values uint8 [O, ceil(kept / 2)], slot s in byte s / 2, low nibble first, stored
//           q + 8; scales float32 [O, groups], groups = ceil(kept / group_size), slot s uses
//           scale s / group_size of its row (v = (nibble - 8) * s[r, s / group_size]).
struct NmQRowsArgs {
  const uint8_t* values;    // int8 or packed int4, rows of val_row_bytes
  const uint8_t* indices;   // [O, idx_row_bytes], packed in-group indices
  const float* scales;      // [O] (bits 8) or [O, groups] (bits 4)
  int64_t bits, group_size, groups;
  int64_t n, m, kept, val_row_bytes, idx_row_bytes, K, O;
  const float* x;           // row-major [B, K] fp32
  int64_t B;
  float* out;               // [B, O] fp32
};

// Bitmask weight with int8 values [nnz] (row-major order of the kept elements) and one
// float32 scale per output row.
struct BitmaskQRowsArgs {
  const int8_t* values;     // [nnz]
  const int64_t* bitmask;   // [O, words]
  const int32_t* offsets;   // [O, tiles]: index in values of each 512-column tile's first kept value
  const float* scales;      // [O]
  int64_t words, tiles, K, O, nnz;
  const float* x;           // row-major [B, K] fp32
  int64_t B;
  float* out;               // [B, O] fp32
};

// Row r dequantized into dense fp32 [K] (the fill of the large-batch tiles and the slow
// paths): shared by every ISA (rows_q_generic.cpp).
void nm_q_row_dense(const NmQRowsArgs& a, int64_t r, float* dst);
void bitmask_q_row_dense(const BitmaskQRowsArgs& a, int64_t r, float* dst);

#define SPARSEKERN_DECLARE_Q_ROWS(NS)                                     \
  namespace NS {                                                         \
  /* output rows [r0, r1) of out, B <= kDirectMaxBatch */                \
  void nm_q_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1);          \
  void bitmask_q_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1); \
  }

SPARSEKERN_DECLARE_Q_ROWS(avx512)  // 2:4 N:M only (other N:M: the AVX2 kernels), any bitmask
SPARSEKERN_DECLARE_Q_ROWS(avx2)
SPARSEKERN_DECLARE_Q_ROWS(generic)

inline bool avx512_nm_q_pattern(int64_t n, int64_t m) { return n == 2 && m == 4; }

}  // namespace cpu
}  // namespace sparsekern
