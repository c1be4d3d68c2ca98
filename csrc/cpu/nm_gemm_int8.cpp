// The 2:4 GEMM with int8 dot products (vpdpbusd): the scheme and the numerics are in
// nm_gemm_int8.h. Only called when cpu_has_avx512_vnni() says the CPU has every extension of
// the target list below (AVX-512 F/VL/BW/DQ and VNNI: AMD Zen 4 and later, Intel Cascade Lake,
// Ice Lake, Sapphire Rapids and later).
//
// Same include rules as sparse_rows_avx2.cpp (rows_common_impl.h): every header is included
// before the target pragma, nothing from a shared header (c10, std templates) is first
// instantiated under it, and every helper lives in an unnamed namespace.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common.h"  // cpu_has_avx512
#include "nm_gemm_int8.h"
#include "sparse_rows.h"  // SPARSEKERN_AVX2_KERNELS

namespace sparsekern {
namespace cpu {

bool cpu_has_avx512_vnni() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace sparsekern

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip this warning in its
// own headers (a known false positive; -Wuninitialized from _mm512_reduce_add_epi32).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace sparsekern {
namespace cpu {
namespace avx512vnni {
namespace {

constexpr int64_t kBlockRows = 16;               // output rows per vector
constexpr int kBlocks = kPanelRows / kBlockRows; // row blocks per panel (2: the core's register block)
static_assert(kBlocks == 2, "the core holds two row blocks");

// A panel decoded for the core: per group pair its kPanelRows value dwords and byte-shuffle
// controls, and each row's compensation -128 * (sum of its values).
struct Panel {
  int32_t* w;     // [G2][kPanelRows]
  int32_t* ctrl;  // [G2][kPanelRows]
  alignas(64) int32_t comp[kPanelRows];
};

// 16 x 16 int32 transpose: r[i] holds row i's 16 entries; afterwards r[c] holds column c.
inline void transpose16x16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
  for (int k = 0; k < 4; ++k) {
    const __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// Index bytes (one per dword lane, i0 | i1 << 2 | i2 << 4 | i3 << 6) -> the vpshufb control
// that picks x bytes i0, i1, 4 + i2, 4 + i3 of the group pair's 8.
inline __m512i shuffle_control(__m512i b) {
  const __m512i i0 = _mm512_and_si512(b, _mm512_set1_epi32(0x3));
  const __m512i i1 = _mm512_and_si512(_mm512_slli_epi32(b, 6), _mm512_set1_epi32(0x300));
  const __m512i i2 = _mm512_and_si512(_mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x30000));
  const __m512i i3 = _mm512_and_si512(_mm512_slli_epi32(b, 18), _mm512_set1_epi32(0x3000000));
  return _mm512_or_si512(_mm512_or_si512(_mm512_or_si512(i0, i1), _mm512_or_si512(i2, i3)),
                         _mm512_set1_epi32(0x04040000));
}

// Rows [r0, r0 + kPanelRows) (those past O as zeros) into p. Group pairs 16 at a time: each
// row's 64 value bytes and 16 index bytes (masked loads: nothing past the row is read), the
// 16 x 16 blocks transposed to group-pair order.
void decode_panel(const Nm24Int8Args& a, int64_t r0, Panel* p) {
  const int64_t G2 = (a.K + 7) / 8;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sums[kPanelRows];
  for (int j = 0; j < kPanelRows; ++j) sums[j] = _mm512_setzero_si512();
  for (int64_t g0 = 0; g0 < G2; g0 += 16) {
    const int64_t vbytes = a.kept - 4 * g0 < 64 ? a.kept - 4 * g0 : 64;
    const int64_t ibytes = a.idx_row_bytes - g0 < 16 ? a.idx_row_bytes - g0 : 16;
    const __mmask64 vmask = vbytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << vbytes) - 1;
    const __mmask16 imask = static_cast<__mmask16>((1u << ibytes) - 1);
    const int64_t pairs = G2 - g0 < 16 ? G2 - g0 : 16;
    for (int blk = 0; blk < kBlocks; ++blk) {
      __m512i w[16], c[16];
      for (int i = 0; i < 16; ++i) {
        const int j = blk * 16 + i;
        const int64_t r = r0 + j;
        if (r >= a.O) {
          w[i] = c[i] = _mm512_setzero_si512();
          continue;
        }
        w[i] = _mm512_maskz_loadu_epi8(vmask, a.values + r * a.kept + 4 * g0);
        const __m128i ib = _mm_maskz_loadu_epi8(imask, a.indices + r * a.idx_row_bytes + g0);
        c[i] = shuffle_control(_mm512_cvtepu8_epi32(ib));
        sums[j] = _mm512_dpbusd_epi32(sums[j], ones, w[i]);
      }
      transpose16x16(w);
      transpose16x16(c);
      for (int64_t q = 0; q < pairs; ++q) {
        _mm512_store_si512(p->w + (g0 + q) * kPanelRows + blk * 16, w[q]);
        _mm512_store_si512(p->ctrl + (g0 + q) * kPanelRows + blk * 16, c[q]);
      }
    }
  }
  for (int j = 0; j < kPanelRows; ++j) p->comp[j] = -128 * _mm512_reduce_add_epi32(sums[j]);
}

// The core loops of both kernels (core, core4), for batch row I of 10: accumulators a0I/a1I
// (the panel's two 16-row blocks) started from the compensation comp0/comp1, and one step of
// group pair `pair`: the row's 8 x bytes broadcast, each lane's 4 picked by the shuffle
// controls c0/c1, multiplied with the value dwords w0/w1. Macros, not functions: the 20
// accumulators must stay in registers (a helper call made GCC spill them).
#define SK_DOT_ACC(I) __m512i a0##I = comp0, a1##I = comp1;
#define SK_DOT_STEP(I, pair)                                                                  \
  {                                                                                          \
    int64_t q8;                                                                              \
    std::memcpy(&q8, xr[I] + 8 * (pair), 8);                                                 \
    const __m512i xb = _mm512_set1_epi64(q8);                                                \
    a0##I = _mm512_dpbusd_epi32(a0##I, _mm512_shuffle_epi8(xb, c0), w0);                     \
    a1##I = _mm512_dpbusd_epi32(a1##I, _mm512_shuffle_epi8(xb, c1), w1);                     \
  }

// Batch rows [b0, b0 + kBatchRows) (rows at or past b_end repeat the last before it; never
// stored) of the panel at output row r0: 2 x 10 int32 accumulators over every group pair, then
// scaled into out. Not inlined: inlined into nm24_gemm's loop over the work units, GCC kept
// fewer of the 20 accumulators and the panel's vectors in registers and ran at half the speed.
__attribute__((noinline)) void core(const Nm24Int8Args& a, const Panel* p, int64_t r0, int64_t b0, int64_t b_end) {
  const int64_t G2 = (a.K + 7) / 8;
  const uint8_t* xr[kBatchRows];
  for (int i = 0; i < kBatchRows; ++i) xr[i] = a.xq + (b0 + i < b_end ? b0 + i : b_end - 1) * a.xq_stride;
  const __m512i comp0 = _mm512_load_si512(p->comp), comp1 = _mm512_load_si512(p->comp + 16);
  SK_DOT_ACC(0) SK_DOT_ACC(1) SK_DOT_ACC(2) SK_DOT_ACC(3) SK_DOT_ACC(4)
  SK_DOT_ACC(5) SK_DOT_ACC(6) SK_DOT_ACC(7) SK_DOT_ACC(8) SK_DOT_ACC(9)
  const int32_t* wp = p->w;
  const int32_t* cp = p->ctrl;
  for (int64_t g = 0; g < G2; ++g, wp += kPanelRows, cp += kPanelRows) {
    const __m512i w0 = _mm512_load_si512(wp), w1 = _mm512_load_si512(wp + 16);
    const __m512i c0 = _mm512_load_si512(cp), c1 = _mm512_load_si512(cp + 16);
    SK_DOT_STEP(0, g) SK_DOT_STEP(1, g) SK_DOT_STEP(2, g) SK_DOT_STEP(3, g) SK_DOT_STEP(4, g)
    SK_DOT_STEP(5, g) SK_DOT_STEP(6, g) SK_DOT_STEP(7, g) SK_DOT_STEP(8, g) SK_DOT_STEP(9, g)
  }
  const int64_t rows = a.O - r0;
  const __mmask16 m0 = rows >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1);
  const __mmask16 m1 = rows >= 32 ? __mmask16(0xFFFF) : rows <= 16 ? __mmask16(0)
                                                                   : static_cast<__mmask16>((1u << (rows - 16)) - 1);
  const __m512 s0 = _mm512_maskz_loadu_ps(m0, a.scales + r0), s1 = _mm512_maskz_loadu_ps(m1, a.scales + r0 + 16);
  const __m512 c0 = a.bias ? _mm512_maskz_loadu_ps(m0, a.bias + r0) : _mm512_setzero_ps();
  const __m512 c1 = a.bias ? _mm512_maskz_loadu_ps(m1, a.bias + r0 + 16) : _mm512_setzero_ps();
  auto finish = [&](int i, __m512i v0, __m512i v1) {
    if (b0 + i >= b_end) return;
    const __m512 xs = _mm512_set1_ps(a.x_scales[b0 + i]);
    float* o = a.out + (b0 + i) * a.O + r0;
    _mm512_mask_storeu_ps(o, m0, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_mul_ps(s0, xs), c0));
    if (m1) _mm512_mask_storeu_ps(o + 16, m1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_mul_ps(s1, xs), c1));
  };
  finish(0, a00, a10); finish(1, a01, a11); finish(2, a02, a12); finish(3, a03, a13); finish(4, a04, a14);
  finish(5, a05, a15); finish(6, a06, a16); finish(7, a07, a17); finish(8, a08, a18); finish(9, a09, a19);
}

// ------------------------------------------------------------------ int4 values
static_assert(kBatchRows == 10, "core and core4 name their 2 x 10 accumulators");

// A panel of int4 rows decoded for the core: the int8 panel's value dwords (nibbles expanded to
// signed int8) and shuffle controls, and per scale group the 32 rows' compensations and scales.
struct Panel4 {
  int32_t* w;      // [G2][kPanelRows]
  int32_t* ctrl;   // [G2][kPanelRows]
  int32_t* comp;   // [groups][kPanelRows]: -128 * (sum of the group's values)
  float* scale;    // [groups][kPanelRows] (0 past O)
};

// 32 packed bytes (64 nibbles, low first, stored q + 8) -> 64 signed int8 q in slot order; the
// slots past `valid` (a mask of the 64) are 0, so they add nothing and compensate nothing.
inline __m512i expand_nibbles(__m256i packed, __mmask64 valid) {
  const __m512i w16 = _mm512_cvtepu8_epi16(packed);  // byte i in word i
  const __m512i lo = _mm512_and_si512(w16, _mm512_set1_epi16(0x000F));
  const __m512i hi = _mm512_and_si512(_mm512_slli_epi16(w16, 4), _mm512_set1_epi16(0x0F00));
  return _mm512_maskz_sub_epi8(valid, _mm512_or_si512(lo, hi), _mm512_set1_epi8(8));
}

// Rows [r0, r0 + kPanelRows) (those past O as zeros) into p, 16 group pairs (64 kept values,
// 32 packed bytes) of every row at a time, as decode_panel.
void decode_panel4(const Nm24Int4Args& a, int64_t r0, Panel4* p) {
  const int64_t G2 = (a.K + 7) / 8, pairs_per_group = a.group_size / 4;
  const __m512i ones = _mm512_set1_epi8(1);
  std::memset(p->comp, 0, a.groups * kPanelRows * sizeof(int32_t));
  for (int j = 0; j < kPanelRows; ++j) {
    const int64_t r = r0 + j;
    for (int64_t g = 0; g < a.groups; ++g) p->scale[g * kPanelRows + j] = r < a.O ? a.scales[r * a.groups + g] : 0.f;
  }
  for (int64_t g0 = 0; g0 < G2; g0 += 16) {
    const int64_t vals = a.kept - 4 * g0 < 64 ? a.kept - 4 * g0 : 64;
    const int64_t vbytes = a.val_row_bytes - 2 * g0 < 32 ? a.val_row_bytes - 2 * g0 : 32;
    const int64_t ibytes = a.idx_row_bytes - g0 < 16 ? a.idx_row_bytes - g0 : 16;
    const __mmask64 valid = vals >= 64 ? ~__mmask64(0) : (__mmask64(1) << vals) - 1;
    const __mmask32 vmask = vbytes >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << vbytes) - 1);
    const __mmask16 imask = static_cast<__mmask16>((1u << ibytes) - 1);
    const int64_t pairs = G2 - g0 < 16 ? G2 - g0 : 16;
    for (int blk = 0; blk < kBlocks; ++blk) {
      __m512i w[16], c[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = r0 + blk * 16 + i;
        if (r >= a.O) {
          w[i] = c[i] = _mm512_setzero_si512();
          continue;
        }
        w[i] = expand_nibbles(_mm256_maskz_loadu_epi8(vmask, a.values + r * a.val_row_bytes + 2 * g0), valid);
        const __m128i ib = _mm_maskz_loadu_epi8(imask, a.indices + r * a.idx_row_bytes + g0);
        c[i] = shuffle_control(_mm512_cvtepu8_epi32(ib));
      }
      transpose16x16(w);
      transpose16x16(c);
      for (int64_t q = 0; q < pairs; ++q) {
        _mm512_store_si512(p->w + (g0 + q) * kPanelRows + blk * 16, w[q]);
        _mm512_store_si512(p->ctrl + (g0 + q) * kPanelRows + blk * 16, c[q]);
        int32_t* cg = p->comp + (g0 + q) / pairs_per_group * kPanelRows + blk * 16;
        _mm512_store_si512(cg, _mm512_dpbusd_epi32(_mm512_load_si512(cg), ones, w[q]));
      }
    }
  }
  const __m512i shift = _mm512_set1_epi32(-128);
  for (int64_t i = 0; i < a.groups * kPanelRows; i += 16)
    _mm512_store_si512(p->comp + i, _mm512_mullo_epi32(_mm512_load_si512(p->comp + i), shift));
}

// Batch rows [b0, b0 + kBatchRows) (as core(): rows at or past b_end repeat, never stored) of
// the int4 panel at output row r0: one loop over the group pairs as core(), 2 x 10 int32 sums started
// from each group's compensation and, at the group's last pair, converted, multiplied by the
// group's scales and added into fp32 sums [10][32] held in L1; x's scale at the end. (A loop
// over the groups around a loop over their pairs makes GCC copy every accumulator each step.)
__attribute__((noinline)) void core4(const Nm24Int4Args& a, const Panel4* p, int64_t r0, int64_t b0, int64_t b_end) {
  const int64_t G2 = (a.K + 7) / 8, pairs_per_group = a.group_size / 4;
  const uint8_t* xr[kBatchRows];
  for (int i = 0; i < kBatchRows; ++i) xr[i] = a.xq + (b0 + i < b_end ? b0 + i : b_end - 1) * a.xq_stride;
  alignas(64) float sums[kBatchRows][kPanelRows];
  std::memset(sums, 0, sizeof(sums));
  __m512i comp0 = _mm512_load_si512(p->comp), comp1 = _mm512_load_si512(p->comp + 16);
  SK_DOT_ACC(0) SK_DOT_ACC(1) SK_DOT_ACC(2) SK_DOT_ACC(3) SK_DOT_ACC(4)
  SK_DOT_ACC(5) SK_DOT_ACC(6) SK_DOT_ACC(7) SK_DOT_ACC(8) SK_DOT_ACC(9)
  const int32_t* wp = p->w;
  const int32_t* cp = p->ctrl;
  int64_t group = 0, group_end = pairs_per_group < G2 ? pairs_per_group : G2;
  for (int64_t q = 0; q < G2; ++q, wp += kPanelRows, cp += kPanelRows) {
    const __m512i w0 = _mm512_load_si512(wp), w1 = _mm512_load_si512(wp + 16);
    const __m512i c0 = _mm512_load_si512(cp), c1 = _mm512_load_si512(cp + 16);
    SK_DOT_STEP(0, q) SK_DOT_STEP(1, q) SK_DOT_STEP(2, q) SK_DOT_STEP(3, q) SK_DOT_STEP(4, q)
    SK_DOT_STEP(5, q) SK_DOT_STEP(6, q) SK_DOT_STEP(7, q) SK_DOT_STEP(8, q) SK_DOT_STEP(9, q)
    if (q + 1 == group_end) {
      const __m512 s0 = _mm512_load_ps(p->scale + group * kPanelRows);
      const __m512 s1 = _mm512_load_ps(p->scale + group * kPanelRows + 16);
#define SK_I4_FLUSH(I)                                                                                 \
  _mm512_store_ps(sums[I], _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0##I), s0, _mm512_load_ps(sums[I])));  \
  _mm512_store_ps(sums[I] + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1##I), s1, _mm512_load_ps(sums[I] + 16)));
      SK_I4_FLUSH(0) SK_I4_FLUSH(1) SK_I4_FLUSH(2) SK_I4_FLUSH(3) SK_I4_FLUSH(4)
      SK_I4_FLUSH(5) SK_I4_FLUSH(6) SK_I4_FLUSH(7) SK_I4_FLUSH(8) SK_I4_FLUSH(9)
#undef SK_I4_FLUSH
      ++group;
      group_end = group_end + pairs_per_group < G2 ? group_end + pairs_per_group : G2;
      if (group < a.groups) {
        comp0 = _mm512_load_si512(p->comp + group * kPanelRows);
        comp1 = _mm512_load_si512(p->comp + group * kPanelRows + 16);
      }
#define SK_I4_RESET(I) a0##I = comp0; a1##I = comp1;
      SK_I4_RESET(0) SK_I4_RESET(1) SK_I4_RESET(2) SK_I4_RESET(3) SK_I4_RESET(4)
      SK_I4_RESET(5) SK_I4_RESET(6) SK_I4_RESET(7) SK_I4_RESET(8) SK_I4_RESET(9)
#undef SK_I4_RESET
    }
  }
  const int64_t rows = a.O - r0;
  const __mmask16 m0 = rows >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1);
  const __mmask16 m1 = rows >= 32 ? __mmask16(0xFFFF) : rows <= 16 ? __mmask16(0)
                                                                   : static_cast<__mmask16>((1u << (rows - 16)) - 1);
  const __m512 c0 = a.bias ? _mm512_maskz_loadu_ps(m0, a.bias + r0) : _mm512_setzero_ps();
  const __m512 c1 = a.bias ? _mm512_maskz_loadu_ps(m1, a.bias + r0 + 16) : _mm512_setzero_ps();
  for (int i = 0; i < kBatchRows && b0 + i < b_end; ++i) {
    const __m512 xs = _mm512_set1_ps(a.x_scales[b0 + i]);
    float* o = a.out + (b0 + i) * a.O + r0;
    _mm512_mask_storeu_ps(o, m0, _mm512_fmadd_ps(_mm512_load_ps(sums[i]), xs, c0));
    if (m1) _mm512_mask_storeu_ps(o + 16, m1, _mm512_fmadd_ps(_mm512_load_ps(sums[i] + 16), xs, c1));
  }
}

}  // namespace

void quantize_rows(const float* x, int64_t K, int64_t b0, int64_t b1, uint8_t* xq, float* x_scales) {
  const int64_t stride = xq_stride(K);
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = b0; b < b1; ++b) {
    const float* xr = x + b * K;
    uint8_t* q = xq + b * stride;
    __m512 mx = _mm512_setzero_ps();
    // vmaxps drops a NaN operand, so non-finite values are counted on their own (fpclass:
    // QNaN 0x01, +inf 0x08, -inf 0x10, SNaN 0x80)
    __mmask16 nonfinite = 0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 v = _mm512_loadu_ps(xr + k);
      nonfinite |= _mm512_fpclass_ps_mask(v, 0x99);
      mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, v));
    }
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    if (K > k) {
      const __m512 v = _mm512_maskz_loadu_ps(tail, xr + k);
      nonfinite |= _mm512_fpclass_ps_mask(v, 0x99);
      mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, v));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    // scale amax / 127; the multiplier 127 / amax (0 for a row of zeros: every q is 0). A row
    // holding an inf or a NaN: every q 0 and the scale NaN, so its outputs are NaN, as the
    // exact path's (and rows_q.h quantize_activation_rows') would be.
    x_scales[b] = nonfinite ? __builtin_nanf("") : amax / 127.f;
    const __m512 inv = _mm512_set1_ps(!nonfinite && amax > 0.f ? 127.f / amax : 0.f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
    auto quant = [&](__m512 v) {
      // vcvtps2dq rounds half to even (the default MXCSR mode)
      const __m512i i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lo), hi);
      return _mm512_cvtepi32_epi8(_mm512_add_epi32(i, off));
    };
    // 64 values at a time: the same integers, clamped after two saturating packs (int32 ->
    // int16 -> int8 saturate to [-128, 127]; the max with -127 then gives what the clamp to
    // [-127, 127] gives: the only value below -127 is vcvtps2dq's 0x80000000 for a NaN), the
    // packs' lane interleave undone by one dword permute, + 128 as a flip of the sign bit.
    // Three vpmovdb (2 uops each) and most clamps fewer per 64 values than quant().
    const __m512i lo8 = _mm512_set1_epi8(-127), flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (k = 0; k + 64 <= K; k += 64) {
      const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv));
      const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k + 16), inv));
      const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k + 32), inv));
      const __m512i d = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k + 48), inv));
      const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
      const __m512i q8 = _mm512_xor_si512(_mm512_max_epi8(_mm512_permutexvar_epi32(order, bytes), lo8), flip);
      _mm512_storeu_si512(q + k, q8);
    }
    for (; k + 16 <= K; k += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), quant(_mm512_loadu_ps(xr + k)));
    if (K > k) _mm_mask_storeu_epi8(q + k, tail, quant(_mm512_maskz_loadu_ps(tail, xr + k)));
    for (int64_t c = K; c < stride; ++c) q[c] = 128;  // x = 0 past K (its weights are 0 too)
  }
}

namespace {

// QuantizeJob's chunks taken until none is left, then a wait until every chunk is done (by
// whichever thread took it).
void quantize_in_chunks(const QuantizeJob& j, int64_t K, int64_t B) {
  for (int64_t c = __atomic_fetch_add(j.next, 1, __ATOMIC_RELAXED); c < j.chunks;
       c = __atomic_fetch_add(j.next, 1, __ATOMIC_RELAXED)) {
    const int64_t b0 = c * j.chunk_rows;
    quantize_rows(j.x, K, b0, b0 + j.chunk_rows < B ? b0 + j.chunk_rows : B, j.xq, j.x_scales);
    __atomic_fetch_add(j.done, 1, __ATOMIC_RELEASE);
  }
  while (__atomic_load_n(j.done, __ATOMIC_ACQUIRE) < j.chunks) _mm_pause();
}

}  // namespace

void nm24_gemm(const Nm24Int8Args& a, int64_t thread) {
  quantize_in_chunks(a.quantize, a.K, a.B);
  const int64_t G2 = (a.K + 7) / 8;
  Panel p;
  p.w = static_cast<int32_t*>(std::aligned_alloc(64, G2 * kPanelRows * sizeof(int32_t)));
  p.ctrl = static_cast<int32_t*>(std::aligned_alloc(64, G2 * kPanelRows * sizeof(int32_t)));
  for_each_range_unit(a.ranges, a.B, a.panels, thread, [&](int64_t panel, int64_t b_lo, int64_t b_hi) {
    const int64_t r0 = panel * kPanelRows;
    decode_panel(a, r0, &p);
    for (int64_t b0 = b_lo; b0 < b_hi; b0 += kBatchRows) core(a, &p, r0, b0, b_hi);
  });
  std::free(p.ctrl);
  std::free(p.w);
}

void nm24_int4_gemm(const Nm24Int4Args& a, int64_t thread) {
  quantize_in_chunks(a.quantize, a.K, a.B);
  const int64_t G2 = (a.K + 7) / 8;
  Panel4 p;
  p.w = static_cast<int32_t*>(std::aligned_alloc(64, G2 * kPanelRows * sizeof(int32_t)));
  p.ctrl = static_cast<int32_t*>(std::aligned_alloc(64, G2 * kPanelRows * sizeof(int32_t)));
  p.comp = static_cast<int32_t*>(std::aligned_alloc(64, a.groups * kPanelRows * sizeof(int32_t)));
  p.scale = static_cast<float*>(std::aligned_alloc(64, a.groups * kPanelRows * sizeof(float)));
  for_each_range_unit(a.ranges, a.B, a.panels, thread, [&](int64_t panel, int64_t b_lo, int64_t b_hi) {
    const int64_t r0 = panel * kPanelRows;
    decode_panel4(a, r0, &p);
    for (int64_t b0 = b_lo; b0 < b_hi; b0 += kBatchRows) core4(a, &p, r0, b0, b_hi);
  });
  std::free(p.scale);
  std::free(p.comp);
  std::free(p.ctrl);
  std::free(p.w);
}

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace sparsekern

#pragma GCC pop_options

#else  // no AVX-512 build: cpu_has_avx512_vnni() is false and these are never called

namespace sparsekern {
namespace cpu {
namespace avx512vnni {
void quantize_rows(const float*, int64_t, int64_t, int64_t, uint8_t*, float*) { std::abort(); }
void nm24_gemm(const Nm24Int8Args&, int64_t) { std::abort(); }
void nm24_int4_gemm(const Nm24Int4Args&, int64_t) { std::abort(); }
}  // namespace avx512vnni
}  // namespace cpu
}  // namespace sparsekern

#undef SK_DOT_STEP
#undef SK_DOT_ACC

#endif
