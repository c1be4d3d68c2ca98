// AVX-512 build of the quantized decode kernels (rows_q.h): 2:4 with int8 or int4 values,
// and bitmask with int8 values. Only called when cpu_has_avx512() (F/VL/BW/DQ/VBMI2).
//
// 2:4, 1 to 4 batch rows: per 16 kept slots (32 columns) the stored bytes (16 for int8, 8
// for int4) become 16 fp32 weights in registers (sign extension, or nibble split and
// re-centring, then a conversion), the 16 columns' x values come out of 32 by one permute
// per batch row (lane numbers from the 32-bit index word by a variable shift, as the fp 2:4
// kernel), and one FMA finishes them. int8's row scale multiplies the finished sum; int4's
// group scale (groups of 32/64/128 slots, so a piece never straddles two) each 16 weights.
// One batch row takes four weight rows per step (eight streams in flight, x loaded once).
// Bitmask int8, 1 to 4 batch rows: per 16 columns the mask piece expands the row's next
// popcount values into their lanes (an in-register expand of a 16-byte load where the row
// has the slack, else the expanding load), then conversion and one FMA per batch row.
// 5 to 16 batch rows: each weight row dequantized into an L1 buffer by the same vector
// steps, then dense dot products with every batch row.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common.h"
#include "rows_q.h"

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi2,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace sparsekern {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const void* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
}
inline __mmask16 first_lanes(int64_t cnt) {
  return cnt >= 16 ? static_cast<__mmask16>(0xFFFF) : cnt <= 0 ? 0 : static_cast<__mmask16>((1u << cnt) - 1);
}

// Slot t of a 16-slot piece (32 columns): column (t / 2) * 4 + bits [2t, 2t+2) of the word.
// (index & 3) | base in one ternary-logic step (base has its low two bits clear).
inline __m512i nm24_piece_columns(uint32_t word) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i sh = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts);
  // f(a = sh, b = 3, c = base) = (a & b) | c: truth table 0xEA
  return _mm512_ternarylogic_epi32(sh, _mm512_set1_epi32(3), base, 0xEA);
}

// 4 index bytes of piece q (fewer at the row's end: never read past it).
inline uint32_t index_word(const uint8_t* ix, int64_t byte, int64_t row_bytes) {
  uint32_t v = 0;
  if (row_bytes - byte >= 4) {
    std::memcpy(&v, ix + byte, 4);
    return v;
  }
  for (int64_t i = byte; i < row_bytes; ++i) v |= static_cast<uint32_t>(ix[i]) << (8 * (i - byte));
  return v;
}

// 16 values of slots [s0, s0 + 16) as signed int8 lanes; `cnt` < 16 reads only cnt slots
// (cnt even for int4: a 2:4 row keeps an even number of slots).
inline __m128i q16_epi8(const uint8_t* vrow, int64_t s0, int64_t bits, int64_t cnt = 16) {
  if (bits == 8)
    return cnt >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(vrow + s0))
                     : _mm_maskz_loadu_epi8(first_lanes(cnt), vrow + s0);
  const __m128i b = cnt >= 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vrow + s0 / 2))
                              : _mm_maskz_loadu_epi8(first_lanes(cnt / 2), vrow + s0 / 2);
  const __m128i low = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
  // Slots past cnt hold byte 0 -> -8 after re-centring; their x lanes are masked to zero.
  return _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));
}
inline __m512 q16_ps(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

// Weights of piece p of row r (fp32, int4 scaled by its group; int8 unscaled).
inline __m512 nm_q_piece(const NmQRowsArgs& a, const uint8_t* v, int64_t r, int64_t p, int64_t cnt = 16) {
  __m512 w = q16_ps(q16_epi8(v, 16 * p, a.bits, cnt));
  if (a.bits == 4) w = _mm512_mul_ps(w, _mm512_set1_ps(a.scales[r * a.groups + 16 * p / a.group_size]));
  return w;
}
inline float nm_q_row_scale(const NmQRowsArgs& a, int64_t r) { return a.bits == 8 ? a.scales[r] : 1.f; }

// ---- 2:4, one batch row, R weight rows per step -------------------------------------------
constexpr int kQB1Rows = 4;
constexpr int64_t kQB1PrefetchBytes = 4096;
template <int R, int Bits>
void nm24_q_b1_step(const NmQRowsArgs& a, int64_t r) {
  const int64_t full = a.K / 32;
  const uint8_t* v[R];
  const uint8_t* ix[R];
  __m512 acc[R];
  for (int j = 0; j < R; ++j) {
    v[j] = a.values + (r + j) * a.val_row_bytes;
    ix[j] = a.indices + (r + j) * a.idx_row_bytes;
    acc[j] = _mm512_setzero_ps();
  }
  constexpr int64_t kPieceBytes = Bits == 8 ? 16 : 8;
  constexpr int64_t kPiecesPerLine = 64 / kPieceBytes;
  int64_t p = 0;
  for (; p < full; ++p) {
    const __m512 xl = _mm512_loadu_ps(a.x + 32 * p), xh = _mm512_loadu_ps(a.x + 32 * p + 16);
    for (int j = 0; j < R; ++j) {
      if ((p & (kPiecesPerLine - 1)) == 0) prefetch(v[j] + kPieceBytes * p, kQB1PrefetchBytes);
      if ((p & 15) == 0) prefetch(ix[j] + 4 * p, kQB1PrefetchBytes / 4);
      uint32_t word;
      std::memcpy(&word, ix[j] + 4 * p, 4);
      __m512 w;
      if constexpr (Bits == 8) {
        w = q16_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v[j] + 16 * p)));
      } else {
        w = _mm512_mul_ps(q16_ps(q16_epi8(v[j], 16 * p, 4)),
                          _mm512_set1_ps(a.scales[(r + j) * a.groups + 16 * p / a.group_size]));
      }
      acc[j] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xl, nm24_piece_columns(word), xh), acc[j]);
    }
  }
  const int64_t c0 = 32 * p;
  if (c0 < a.K) {  // 4..28 columns left: x masked to them, slots past the row read nothing
    const int64_t cols = a.K - c0;
    const __m512 xl = _mm512_maskz_loadu_ps(first_lanes(cols), a.x + c0);
    const __m512 xh = _mm512_maskz_loadu_ps(first_lanes(cols - 16), a.x + c0 + 16);
    for (int j = 0; j < R; ++j)
      acc[j] = _mm512_fmadd_ps(nm_q_piece(a, v[j], r + j, p, cols / 2),
                               _mm512_permutex2var_ps(xl, nm24_piece_columns(index_word(ix[j], 4 * p, a.idx_row_bytes)),
                                                      xh),
                               acc[j]);
  }
  for (int j = 0; j < R; ++j) a.out[r + j] = _mm512_reduce_add_ps(acc[j]) * nm_q_row_scale(a, r + j);
}

template <int Bits>
void nm24_q_b1(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kQB1Rows <= r1; r += kQB1Rows) nm24_q_b1_step<kQB1Rows, Bits>(a, r);
  for (; r < r1; ++r) nm24_q_b1_step<1, Bits>(a, r);
}

// ---- 2:4, 2 to 4 batch rows ---------------------------------------------------------------
template <int B>
void nm24_q_direct(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  const int64_t full = a.K / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* v = a.values + r * a.val_row_bytes;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m512 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p < full; ++p) {
      if ((p & 3) == 0) prefetch(v + 16 * p, kPrefetchBytes);
      if ((p & 15) == 0) prefetch(ix + 4 * p, kPrefetchBytes / 4);
      uint32_t word;
      std::memcpy(&word, ix + 4 * p, 4);
      const __m512i cols = nm24_piece_columns(word);
      const __m512 w = nm_q_piece(a, v, r, p);
      for (int b = 0; b < B; ++b) {
        const float* xc = a.x + b * a.K + 32 * p;
        acc[b] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(xc), cols, _mm512_loadu_ps(xc + 16)), acc[b]);
      }
    }
    const int64_t c0 = 32 * p;
    if (c0 < a.K) {
      const int64_t cl = a.K - c0;
      const __m512i cols = nm24_piece_columns(index_word(ix, 4 * p, a.idx_row_bytes));
      const __m512 w = nm_q_piece(a, v, r, p, cl / 2);
      for (int b = 0; b < B; ++b) {
        const float* xc = a.x + b * a.K + c0;
        acc[b] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(first_lanes(cl), xc), cols,
                                                           _mm512_maskz_loadu_ps(first_lanes(cl - 16), xc + 16)),
                                 acc[b]);
      }
    }
    const float s = nm_q_row_scale(a, r);
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = _mm512_reduce_add_ps(acc[b]) * s;
  }
}

// ---- dense rows for 5 to 16 batch rows ----------------------------------------------------
// Kept-column mask of 8 columns (two groups) from one index byte (four slots).
struct QMask24 {
  uint8_t bits[256];
  QMask24() {
    for (int b = 0; b < 256; ++b) {
      int m = 0;
      for (int t = 0; t < 4; ++t) m |= 1 << ((t / 2) * 4 + ((b >> (2 * t)) & 3));
      bits[b] = static_cast<uint8_t>(m);
    }
  }
};
const QMask24& qmask24() {
  static const QMask24 lut;
  return lut;
}

// Row r of a 2:4 weight dequantized into dense fp32 [K] (validated formats: a group's two
// indices differ, so each 32-column piece keeps 16 columns in slot order; a tampered row
// with a repeated index writes fewer columns, never outside the piece).
void nm24_q_row_dense(const NmQRowsArgs& a, int64_t r, float* dst) {
  const QMask24& lut = qmask24();
  const uint8_t* v = a.values + r * a.val_row_bytes;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  const float s = nm_q_row_scale(a, r);
  const int64_t full = a.K / 32;
  for (int64_t p = 0; p < full; ++p) {
    uint32_t w;
    std::memcpy(&w, ix + 4 * p, 4);
    const uint32_t m = uint32_t(lut.bits[w & 0xFF]) | uint32_t(lut.bits[(w >> 8) & 0xFF]) << 8 |
                       uint32_t(lut.bits[(w >> 16) & 0xFF]) << 16 | uint32_t(lut.bits[w >> 24]) << 24;
    const __m512 vals = _mm512_mul_ps(nm_q_piece(a, v, r, p), _mm512_set1_ps(s));
    _mm512_storeu_ps(dst + 32 * p, _mm512_maskz_expand_ps(static_cast<__mmask16>(m), vals));
    _mm512_storeu_ps(dst + 32 * p + 16,
                     _mm512_maskz_expand_ps(static_cast<__mmask16>(m >> 16), _mm512_shuffle_f32x4(vals, vals, 0xEE)));
  }
  if (32 * full < a.K) {  // whole groups left: the shared scalar row (its tail only)
    for (int64_t c = 32 * full; c < a.K; ++c) dst[c] = 0.f;
    for (int64_t sl = 16 * full; sl < a.kept; ++sl) {
      const int idx = (ix[sl >> 2] >> ((sl & 3) * 2)) & 3;
      const float q = a.bits == 8 ? static_cast<float>(static_cast<int8_t>(v[sl]))
                                  : static_cast<float>(((v[sl >> 1] >> ((sl & 1) * 4)) & 15) - 8);
      const float sc = a.bits == 8 ? s : a.scales[r * a.groups + sl / a.group_size];
      dst[(sl / 2) * 4 + idx] = q * sc;
    }
  }
}

// out[b * O + r] = row . x[b] for every batch row b (row fp32 [K] in L1).
void dense_row_times_x(const float* row, const float* x, int64_t B, int64_t K, float* out, int64_t O, int64_t r) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const int nb = static_cast<int>(B - b0 < 4 ? B - b0 : 4);
    const float* xb = x + b0 * K;
    __m512 acc[4][2];
    for (auto& t : acc) t[0] = t[1] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= K; c += 32) {
      const __m512 w0 = _mm512_loadu_ps(row + c), w1 = _mm512_loadu_ps(row + c + 16);
      for (int b = 0; b < nb; ++b) {
        acc[b][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + b * K + c), acc[b][0]);
        acc[b][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + b * K + c + 16), acc[b][1]);
      }
    }
    for (; c < K; c += 16) {
      const __mmask16 k = first_lanes(K - c);
      const __m512 w0 = _mm512_maskz_loadu_ps(k, row + c);
      for (int b = 0; b < nb; ++b) acc[b][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(k, xb + b * K + c), acc[b][0]);
    }
    for (int b = 0; b < nb; ++b) out[(b0 + b) * O + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
  }
}

template <typename DenseRow>
void expanded_rows(const float* x, int64_t B, int64_t K, float* out, int64_t O, int64_t r0, int64_t r1,
                   const DenseRow& dense_row) {
  const int64_t K16 = (K + 15) / 16 * 16;
  float* row = static_cast<float*>(std::aligned_alloc(64, K16 * sizeof(float)));
  for (int64_t r = r0; r < r1; ++r) {
    dense_row(r, row);
    dense_row_times_x(row, x, B, K, out, O, r);
  }
  std::free(row);
}

// ---- bitmask int8 ---------------------------------------------------------------------------
inline uint16_t mask_piece(const int64_t* words, int64_t piece) {
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const uint8_t*>(words) + 2 * piece, 2);
  return v;
}

// The next popcount(k) int8 values into the lanes of k (zeros elsewhere), as fp32.
template <bool Slack>
inline __m512 bitmask_q_piece(__mmask16 k, const int8_t* p) {
  __m128i q;
  if constexpr (Slack) q = _mm_maskz_expand_epi8(k, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else q = _mm_maskz_expandloadu_epi8(k, p);
  return q16_ps(q);
}

template <int B, bool Slack>
void bitmask_q_row(const BitmaskQRowsArgs& a, int64_t r) {
  const int64_t* words = a.bitmask + r * a.words;
  const int8_t* p = a.values + a.offsets[r * a.tiles];
  const int64_t pieces = (a.K + 15) / 16;
  __m512 acc[B];
  for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pieces; ++q) {
    if ((q & 3) == 0) prefetch(words + q / 4, kPrefetchBytes / 4);
    if ((q & 3) == 0) prefetch(p, kPrefetchBytes / 4);
    const __mmask16 k = static_cast<__mmask16>(mask_piece(words, q)) & first_lanes(a.K - 16 * q);
    if (!k) continue;
    const __m512 w = bitmask_q_piece<Slack>(k, p);
    p += __builtin_popcount(static_cast<unsigned>(k));
    for (int b = 0; b < B; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, a.x + b * a.K + 16 * q), acc[b]);
  }
  const float s = a.scales[r];
  for (int b = 0; b < B; ++b) a.out[b * a.O + r] = _mm512_reduce_add_ps(acc[b]) * s;
}

// Whether row r may load 16 values at any of its positions: its values start at
// offsets[r, 0] and number at most K.
inline bool bitmask_q_slack(const BitmaskQRowsArgs& a, int64_t r) {
  const int64_t start = a.offsets[r * a.tiles];
  return start >= 0 && start + a.K + 16 <= a.nnz;
}

template <int B>
void bitmask_q_rows_b(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (bitmask_q_slack(a, r)) bitmask_q_row<B, true>(a, r);
    else bitmask_q_row<B, false>(a, r);
  }
}

void bitmask_q_row_dense_512(const BitmaskQRowsArgs& a, int64_t r, float* dst) {
  if (!bitmask_q_slack(a, r)) return bitmask_q_row_dense(a, r, dst);
  const int64_t* words = a.bitmask + r * a.words;
  const int8_t* p = a.values + a.offsets[r * a.tiles];
  const __m512 s = _mm512_set1_ps(a.scales[r]);
  for (int64_t q = 0; 16 * q < a.K; ++q) {
    const __mmask16 lanes = first_lanes(a.K - 16 * q);
    const __mmask16 k = static_cast<__mmask16>(mask_piece(words, q)) & lanes;
    _mm512_mask_storeu_ps(dst + 16 * q, lanes, _mm512_mul_ps(bitmask_q_piece<true>(k, p), s));
    p += __builtin_popcount(static_cast<unsigned>(k));
  }
}

}  // namespace

void nm_q_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: return a.bits == 8 ? nm24_q_b1<8>(a, r0, r1) : nm24_q_b1<4>(a, r0, r1);
    case 2: return nm24_q_direct<2>(a, r0, r1);
    case 3: return nm24_q_direct<3>(a, r0, r1);
    case 4: return nm24_q_direct<4>(a, r0, r1);
    default: break;
  }
  expanded_rows(a.x, a.B, a.K, a.out, a.O, r0, r1, [&](int64_t r, float* row) { nm24_q_row_dense(a, r, row); });
}

void bitmask_q_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: return bitmask_q_rows_b<1>(a, r0, r1);
    case 2: return bitmask_q_rows_b<2>(a, r0, r1);
    case 3: return bitmask_q_rows_b<3>(a, r0, r1);
    case 4: return bitmask_q_rows_b<4>(a, r0, r1);
    default: break;
  }
  expanded_rows(a.x, a.B, a.K, a.out, a.O, r0, r1, [&](int64_t r, float* row) { bitmask_q_row_dense_512(a, r, row); });
}

}  // namespace avx512
}  // namespace cpu
}  // namespace sparsekern
#pragma GCC pop_options
#else
namespace sparsekern {
namespace cpu {
namespace avx512 {
// Never called: cpu_has_avx512() is false without these kernels.
void nm_q_rows(const NmQRowsArgs&, int64_t, int64_t) { std::abort(); }
void bitmask_q_rows(const BitmaskQRowsArgs&, int64_t, int64_t) { std::abort(); }
}  // namespace avx512
}  // namespace cpu
}  // namespace sparsekern
#endif
