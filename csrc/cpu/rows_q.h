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

// The algorithms of the quantized ops, chosen in Python (sparsekern/dispatch_rules.py, Q_ALGO_* and
// q_cpu_algo) and passed as the CPU ops' `algo` argument; each runs at any rows of x (the rows
// decide in Python which one runs, never here):
//   kQAlgoExact    x stays fp32; the weights are dequantized to fp32 in registers by the decode
//                  row kernels below, in batch tiles of at most kDirectMaxBatch rows.
//   kQAlgoInt8Act  each row of x is quantized to int8 first, as torch's dynamic quantization
//                  does (symmetric, one scale per row: q = round(x * (127 / max|x|)), stored
//                  u8 = q + 128), and the products are integer dot products: on AVX-512 with
//                  VNNI and VBMI, vpdpbusd of the stored int8/int4 weights with the activation
//                  bytes of their columns (vpermt2b for 2:4, vpexpandb of the weights for the
//                  bitmask). Exact integer sums; the row's 128 offset is taken back per weight
//                  row (128 * sum of its weights, summed by the same instruction). Other CPUs
//                  and patterns run the portable integer loop (same numbers). The decode row
//                  kernels, in batch tiles of at most kDirectMaxBatch rows.
//   kQAlgoInt8Dot  2:4 int8 weights (chosen above the decode rows): x quantized per row, the
//                  int8 dot-product GEMM of nm_gemm_int8.h.
//   kQAlgoInt8Expand  int8 values (any N:M, the bitmask; chosen above the decode rows): x
//                  quantized per row to int8 (kQAlgoInt8Act's bytes less 128), the values
//                  expanded into a dense int8 weight for the call (q_rows_int8 below), torch's
//                  int8 GEMM (at::_int_mm), then x's and the row's scales.
//   kQAlgoExactTiles  x stays fp32; the weight dequantized a tile of output rows at a time
//                  (*_q_row_dense below) into the BLAS GEMM (cpu_common.h tiled_gemm; chosen
//                  above the decode rows where no int8 GEMM applies).
constexpr int64_t kQAlgoExact = 0;
constexpr int64_t kQAlgoInt8Act = 1;
constexpr int64_t kQAlgoInt8Dot = 2;
constexpr int64_t kQAlgoInt8Expand = 3;
constexpr int64_t kQAlgoExactTiles = 4;

// Activation rows quantized for kQAlgoInt8Act: u8 [B, ld], ld = q_act_row_bytes(K) (columns
// past K hold 128, the byte of 0.0, so a kernel may read whole 128-column steps), and the
// scale of each row (x ~ (u8 - 128) * scale; NaN when the row holds an inf or a NaN, so the
// output is NaN as the exact path's would be).
struct QuantizedActivations {
  const uint8_t* u8 = nullptr;
  const float* scale = nullptr;
  int64_t ld = 0;
};
inline int64_t q_act_row_bytes(int64_t K) { return (K + 127) / 128 * 128; }
// x fp32 [B, K] -> u8 [B, ld] and scale [B] (portable; every ISA's kernels read the same bytes).
void quantize_activation_rows(const float* x, int64_t B, int64_t K, uint8_t* u8, int64_t ld, float* scale);
// The same bytes and scales with AVX-512 (only called when cpu_has_avx512()).
namespace avx512 {
void quantize_activation_rows(const float* x, int64_t B, int64_t K, uint8_t* u8, int64_t ld, float* scale);
}

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
  QuantizedActivations xq{};  // the int8-activation algorithm only (kQAlgoInt8Act)
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
  QuantizedActivations xq{};  // the int8-activation algorithm only (kQAlgoInt8Act)
};

// Row r dequantized into dense fp32 [K] (the fill of kQAlgoExactTiles' tiles and the slow
// paths): shared by every ISA (rows_q_generic.cpp).
void nm_q_row_dense(const NmQRowsArgs& a, int64_t r, float* dst);
void bitmask_q_row_dense(const BitmaskQRowsArgs& a, int64_t r, float* dst);

// kQAlgoInt8Expand: rows [r0, r1) of an int8-valued weight (bits 8) written as dense int8 into
// dst [O, K] (row-major, 0 where pruned). Portable; the bitmask also with AVX-512 VBMI2
// (avx512::bitmask_q_rows_int8, when avx512_q_act_vector()). A tampered index or offset never
// reads outside the values nor writes outside the row.
void nm_q_rows_int8(const NmQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst);
void bitmask_q_rows_int8(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst);
namespace avx512 {
void bitmask_q_rows_int8(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst);
}

#define SPARSEKERN_DECLARE_Q_ROWS(NS)                                     \
  namespace NS {                                                         \
  /* output rows [r0, r1) of out, B <= kDirectMaxBatch */                \
  void nm_q_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1);          \
  void bitmask_q_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1); \
  /* kQAlgoInt8Act: the same rows from a.xq */                           \
  void nm_q_rows_act(const NmQRowsArgs& a, int64_t r0, int64_t r1);      \
  void bitmask_q_rows_act(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1); \
  }

// kQAlgoInt8Act's portable integer loops (any N:M, any bits, the bitmask): the generic and
// AVX2 builds, and the AVX-512 one where it has no vector kernel.
void nm_q_rows_act_portable(const NmQRowsArgs& a, int64_t r0, int64_t r1);
void bitmask_q_rows_act_portable(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1);

SPARSEKERN_DECLARE_Q_ROWS(avx512)  // 2:4 N:M only (other N:M: the AVX2 kernels), any bitmask
SPARSEKERN_DECLARE_Q_ROWS(avx2)
SPARSEKERN_DECLARE_Q_ROWS(generic)

inline bool avx512_nm_q_pattern(int64_t n, int64_t m) { return n == 2 && m == 4; }
// Whether the AVX-512 build's kQAlgoInt8Act kernels run here (VNNI and VBMI besides
// cpu_has_avx512()); otherwise its nm_q_rows_act / bitmask_q_rows_act run the portable loops.
bool avx512_q_act_vector();

}  // namespace cpu
}  // namespace sparsekern
