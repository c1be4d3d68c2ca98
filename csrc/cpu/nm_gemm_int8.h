// The 2:4 int8 GEMM with int8 dot products (AVX-512 VNNI `vpdpbusd`), nm_gemm_int8.cpp:
// nm_linear_q's algorithm 2 (sparsekern/dispatch_rules.py Q_ALGO_INT8_DOT) for 2:4 weights
// with int8 values, taken where cpu_has_avx512_vnni() says the CPU runs it. linear_q.cpp owns
// the threading and calls the entry points below from every intra-op thread.
//
// Numerics (as torch's dynamic quantization, with a finer activation scale):
//   x is quantized per row on the fly: s_x[b] = max_k |x[b, k]| / 127, q = round-half-even(x *
//   (127 / max)) in [-127, 127] (fp32 multiply, then vcvtps2dq), stored as u8 q + 128 (the
//   unsigned operand of vpdpbusd). Each output is the exact int32 sum over the kept values
//   sum_k (q + 128) * w - 128 * sum_k w, the compensation precomputed per output row, then
//   y = float(acc) * (s_x[b] * s_w[o]) + bias[o] in fp32 (one FMA; no bias: + 0). A row of
//   zeros gives the bias; a row holding an inf or a NaN gives NaN (its scale is NaN, as
//   rows_q.h's quantizer makes it). int32 cannot wrap
//   below 2^31 / (255 * 128) = 65793 kept values per row (in_features 131586).
//
// The scheme: vpdpbusd adds 4 u8 x s8 products into each int32 lane. A 2:4 group pair (8
// columns) of one row keeps 4 int8 values, stored side by side in NMWeight.values: one dword.
// Its partner is the 4 x bytes its indices pick out of the 8, which depends on the row. So
// the vector runs over 16 output rows:
//   decode (per panel of 32 rows, once per range of batch rows: WorkRanges): each group pair's 32
//     value dwords and 32 byte-shuffle controls (the row's index byte i0 | i1 << 2 | i2 << 4 |
//     i3 << 6 becomes the bytes i0, i1, 4 + i2, 4 + i3), group pair by group pair, [G2][32]
//     int32 each;
//   core: per group pair and batch row, the row's 8 x bytes broadcast to every qword
//     (vpbroadcastq, one load), one vpshufb per 16 output rows puts each row's 4 x bytes
//     in its lane, one vpdpbusd: 2 row blocks x 10 batch rows in 20 int32 accumulators held
//     over all of K; the finished vectors are 16 consecutive outputs of a batch row, stored
//     straight into out [B, O] (scales applied in fp32).
// The indices of a group must increase (every validated NMWeight); other indices read other
// bytes of the same 8 columns, never outside x.
//
// int4 values (the same algorithm, nm24_int4_gemm): the panel decode expands each row's
// nibbles (stored q + 8, low nibble first) to signed int8 q in registers, so the panel and the
// vpshufb / vpdpbusd core are the int8 kernel's. The scale changes every group of 32/64/128
// kept values (8/16/32 group pairs; a row's last group may be shorter), so the int32 sums run
// per group: each starts from the group's compensation -128 * (sum of its values), and at the
// group's end is converted and multiplied by the group scales of the 16 rows into fp32
// accumulators (one FMA); the row's activation scale multiplies the finished sum. int32
// cannot wrap: a group's sum is at most 128 * 255 * 8 in magnitude. The int32 sums of 2 row
// blocks x 10 batch rows live in registers, their fp32 sums in L1.
#pragma once

#include <cstdint>

#include "work_ranges.h"

namespace sparsekern {
namespace cpu {

// True when nm_gemm_int8.cpp's kernels can run here: the AVX-512 kernels can
// (cpu_has_avx512(), so SPARSEKERN_CPU_ISA=avx2|generic turns it off too) and the CPU has
// AVX512_VNNI (Zen 4 and later, Cascade Lake, Ice Lake, Sapphire Rapids and later).
bool cpu_has_avx512_vnni();

// x quantized by the GEMM's own threads before their first panel (quantize_rows, rows in chunks
// from a shared counter; each thread then waits until every chunk is done), not on the calling
// thread before the others start: that was a serial step in every call, longest against the
// GEMM at MiniLM's small layers (and a second fork for it cost more than it saved on a busy
// machine). A thread the OS parks inside a chunk holds the others until it resumes,
// as one parked inside a panel does.
struct QuantizeJob {
  const float* x;        // [B, K] fp32, row-major
  uint8_t* xq;           // [B, xq_stride(K)]: what the args' xq reads
  float* x_scales;       // [B]: what the args' x_scales reads
  int64_t chunk_rows, chunks;
  int64_t* next;         // chunks claimed, 0 before the call
  int64_t* done;         // chunks finished, 0 before the call
};

struct Nm24Int8Args {
  const int8_t* values;    // [O, kept] int8, kept = K / 2: group pair p's four values at 4p
  const uint8_t* indices;  // [O, idx_row_bytes], 2 bits per slot: group pair p's byte at p
  const float* scales;     // [O] the weight's row scales
  int64_t kept, idx_row_bytes, K, O;
  const uint8_t* xq;       // [B, xq_stride] u8 (quantize_rows), columns past K hold 128
  const float* x_scales;   // [B]
  int64_t xq_stride, B;
  float* out;              // [B, O] fp32
  int64_t panels;          // ceil(O / kPanelRows)
  WorkRanges ranges;       // the work units (work_ranges.h): (range of batch rows, panel)
  QuantizeJob quantize;    // fills xq and x_scales first
  const float* bias;       // [O] fp32 added to every row of out (one FMA with the scales), or null
};

// 2:4 weights with int4 values (sparsekern/precisions.py): as Nm24Int8Args, values packed two
// per byte and one scale per group of group_size kept values.
struct Nm24Int4Args {
  const uint8_t* values;   // [O, val_row_bytes]: slot s in byte s / 2, low nibble first, stored q + 8
  const uint8_t* indices;  // [O, idx_row_bytes], 2 bits per slot: group pair p's byte at p
  const float* scales;     // [O, groups]: slot s scaled by scales[r, s / group_size]
  int64_t kept, val_row_bytes, idx_row_bytes, K, O, group_size, groups;
  const uint8_t* xq;       // [B, xq_stride] u8 (quantize_rows), columns past K hold 128
  const float* x_scales;   // [B]
  int64_t xq_stride, B;
  float* out;              // [B, O] fp32
  int64_t panels;          // ceil(O / kPanelRows)
  WorkRanges ranges;       // as Nm24Int8Args.ranges
  QuantizeJob quantize;    // as Nm24Int8Args.quantize
  const float* bias;       // as Nm24Int8Args.bias
};

namespace avx512vnni {
constexpr int64_t kPanelRows = 32;  // output rows per panel (two 16-row blocks)
// Row stride of the quantized x: K rounded up to a group pair (8 columns).
inline int64_t xq_stride(int64_t K) { return (K + 7) / 8 * 8; }
// Rows [b0, b1) of fp32 x [B, K] (row-major) quantized as above into xq [B, xq_stride(K)]
// and x_scales [B].
void quantize_rows(const float* x, int64_t K, int64_t b0, int64_t b1, uint8_t* xq, float* x_scales);
constexpr int64_t kBatchRows = 10;  // batch rows per core pass (2 x 10 int32 accumulators)
// A range's threads decode every panel for themselves, so more ranges repeat the panel decode
// (about one core pass of work per panel): at least this many batch rows per range. Timed on
// the Zen 4 machine, 2 threads, each call with a residual add + layer norm after it, one range
// per thread against one range: 1-4% faster at MiniLM's 960 rows, 20% at 640, from 5% slower
// to 5% faster at ViT-B's 788, 3% slower at 320 and 10% slower at Llama's 128-row prefill
// (bench/results/cpu-gemm-int8-ranges-20261207).
constexpr int64_t kMinRangeRows = 320;
// Ranges for B batch rows and `threads` threads: one per thread where each gets kMinRangeRows.
inline int64_t ranges_for(int64_t B, int64_t threads) {
  const int64_t r = B / kMinRangeRows;
  return r < 1 ? 1 : r < threads ? r : threads;
}
// Rows per quantization chunk for K columns: about 32 Ki elements (a few microseconds).
inline int64_t quantize_chunk_rows(int64_t K) { return K >= 32768 ? 1 : 32768 / (K > 0 ? K : 1); }
// Batch rows per range for B rows over `ranges` ranges: whole core passes, the fewest rows that
// cover B (the elementwise op after the layer splits at B / threads: they differ by under a pass).
inline int64_t range_rows_for(int64_t B, int64_t ranges) {
  const int64_t passes = (B + kBatchRows - 1) / kBatchRows;
  return (passes + ranges - 1) / ranges * kBatchRows;
}
// x quantized (QuantizeJob), then work units (range of batch rows, panel) as a.ranges says,
// until all are done; call it from every thread, with `thread` its index among them (a range's
// own thread when below the count).
void nm24_gemm(const Nm24Int8Args& a, int64_t thread);
// The same for int4 values (group sizes 32, 64 and 128).
void nm24_int4_gemm(const Nm24Int4Args& a, int64_t thread);
}  // namespace avx512vnni

}  // namespace cpu
}  // namespace sparsekern
