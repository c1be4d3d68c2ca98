// AVX-512 build of the quantized decode kernels (rows_q.h): 2:4 with int8 or int4 values,
// and bitmask with int8 values. Only called when cpu_has_avx512() (F/VL/BW/DQ/VBMI2).
//
// 2:4, 1 to 4 batch rows: per 16 kept slots (32 columns) the stored bytes (16 for int8, 8
// for int4) become 16 fp32 weights in registers (sign extension, or nibble split and
// re-centring, then a conversion), the 16 columns' x values come out of 32 by one permute
// per batch row (lane numbers from the 32-bit index word by a variable shift, as the fp 2:4
// kernel), and one FMA finishes them. int8's row scale multiplies the finished sum; int4's
// group scale (groups of 32/64/128 slots, so a piece never straddles two) each 16 weights.
// One batch row takes one weight row at a time (kQB1Rows: four interleaved rows' streams read
// memory more slowly, see kActPrefetchBytes' note).
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
constexpr int kQB1Rows = 1;  // weight rows per step (one: see the file's note)
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

// ---- kQAlgoInt8Act: int8 activations, integer dot products (VNNI + VBMI) -------------------
// Each 64-lane step pairs 64 stored weights (bytes, signed) with the 64 activation bytes (u8 =
// q + 128) of their columns and adds 4-product groups into 16 int32 lanes (vpdpbusd). The same
// instruction with all-ones activations sums the weights; 128 times that sum is taken back at
// the end, which also cancels any step lane whose activation is the padding byte 128. So a
// step costs the weight load and its lane work once per weight row, then one permute (2:4) or
// load (bitmask) and one vpdpbusd per batch row: a handful of instructions per 64 weights,
// where the exact path spends about seven per 16.
//   2:4: one step is 64 kept slots = 128 columns = two zmm of activation bytes; the lane of slot
//     t is (t / 2) * 4 + its 2-bit index, built from the step's 16 index bytes (vpmultishiftqb
//     puts each slot's bits at the bottom of its byte, then (& 3) | base), and vpermt2b picks
//     the bytes. int4 unpacks 32 bytes into low nibbles (even slots) then high nibbles (odd
//     slots) and builds its lanes in that order, so nothing is interleaved.
//   Bitmask: one step is one 64-column mask word; vpexpandb spreads the word's popcount kept
//     values into their columns, and the activation bytes are read as they lie.
//     One batch row (bitmask_act_b1_row): four steps per iteration into their own accumulators,
//     and the weight sum from the row's contiguous values once per row instead of a vpdpbusd
//     per step. vpexpandb with a mask from memory costs about 3 cycles per step on Zen 4
//     (measured), the largest part of the step: the per-step work left around it is what
//     this path trims.
// int32 lanes: a step adds at most 4 * 255 * 127 to one, so the sums go to fp64 every
// kActFlushSteps steps (far below 2^31). int4 folds each group's int32 sums into fp32 with
// the group scale (groups of 32 slots share a step: lanes 0-3 and 8-11 are the even and odd
// slots of its first 32, lanes 4-7 and 12-15 of its second).
#pragma GCC push_options
// gcc's _mm512_reduce_add_ps starts from _mm256_undefined_pd (a false alarm)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi,avx512vbmi2,avx512vnni,bmi,bmi2,popcnt")

namespace sparsekern {
namespace cpu {
namespace avx512 {
namespace {

constexpr int64_t kActFlushSteps = 8192;
// One weight row at a time, also for one batch row: interleaving 4 rows (8 streams: values and
// indexes) streamed 0.6x the bytes per second of one row at a time from memory (8192 x 4096,
// one thread, bench/results/cpu-decode-q-20261206/README.md), though it ran faster from cache.
constexpr int64_t kActPrefetchBytes = 2048;
constexpr int kActBatchTile = 4;  // batch rows per pass over a weight row (it stays in L1)

struct ActLaneTables {
  alignas(64) uint8_t base8[64], shift8[64], base4[64], shift4[64];
  alignas(64) int32_t dword4[16];
  ActLaneTables() {
    for (int p = 0; p < 64; ++p) {
      base8[p] = static_cast<uint8_t>((p / 2) * 4);         // slot p
      shift8[p] = static_cast<uint8_t>(2 * (p % 8));        // qword p / 8 = index bytes 2(p/8), +1
      base4[p] = static_cast<uint8_t>(4 * (p % 32));        // slot 2p, or 2(p - 32) + 1
      shift4[p] = static_cast<uint8_t>(4 * (p % 8) + (p >= 32 ? 2 : 0));  // qword: index dword (p/8)&3
    }
    for (int d = 0; d < 16; ++d) dword4[d] = (d / 2) & 3;
  }
};
const ActLaneTables& act_lane_tables() {
  static const ActLaneTables t;
  return t;
}

inline __mmask64 low_bytes(int64_t cnt) {
  return cnt >= 64 ? ~__mmask64{0} : cnt <= 0 ? __mmask64{0} : _bzhi_u64(~0ull, static_cast<unsigned>(cnt));
}

// vpermt2b lanes of one 2:4 step from its 16 index bytes (natural slot order for int8; even
// slots then odd slots for int4).
template <int Bits>
inline __m512i nm24_act_lanes(__m128i idx16, const ActLaneTables& t) {
  __m512i ctl, sel;
  if constexpr (Bits == 8) {
    ctl = _mm512_cvtepu16_epi64(idx16);
    sel = _mm512_multishift_epi64_epi8(_mm512_load_si512(t.shift8), ctl);
    return _mm512_ternarylogic_epi32(sel, _mm512_set1_epi8(3), _mm512_load_si512(t.base8), 0xEA);
  } else {
    // dword4 reads dwords 0-3 only: the cast's upper lanes (undefined) are never used, and
    // a zero extension would cost a shuffle.
    ctl = _mm512_permutexvar_epi32(_mm512_load_si512(t.dword4), _mm512_castsi128_si512(idx16));
    sel = _mm512_multishift_epi64_epi8(_mm512_load_si512(t.shift4), ctl);
    return _mm512_ternarylogic_epi32(sel, _mm512_set1_epi8(3), _mm512_load_si512(t.base4), 0xEA);
  }
}

// The 64 weights of step s as signed bytes, in the lane order of nm24_act_lanes<Bits>. Tail:
// only `bytes` stored bytes are read (the rest 0, whose slots' lanes point at padding).
template <int Bits, bool Tail>
inline __m512i nm24_act_weights(const uint8_t* v, int64_t s, int64_t bytes) {
  if constexpr (Bits == 8) {
    return Tail ? _mm512_maskz_loadu_epi8(low_bytes(bytes), v + 64 * s) : _mm512_loadu_si512(v + 64 * s);
  } else {
    constexpr int64_t kNib = 0x0004000400040004;  // a 4-bit shift in each 16-bit lane
    // The 32 bytes in both halves (a broadcast load: no shuffle), the upper half shifted down
    // a nibble by a per-lane shift.
    const __m512i b = Tail ? _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(static_cast<__mmask32>(low_bytes(bytes)), v + 32 * s))
                           : _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * s)));
    const __m512i w = _mm512_srlv_epi16(b, _mm512_set_epi64(kNib, kNib, kNib, kNib, 0, 0, 0, 0));
    return _mm512_sub_epi8(_mm512_and_si512(w, _mm512_set1_epi8(15)), _mm512_set1_epi8(8));
  }
}

// sum(w * u) - 128 * sum(w) per lane, as fp32.
inline __m512 act_lanes_sum(__m512i acc, __m512i comp) {
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_slli_epi32(comp, 7)));
}

// Output rows [r, r + R) for batch rows [b0, b0 + B) of a 2:4 weight.
template <int R, int B, int Bits>
void nm24_act_step(const NmQRowsArgs& a, int64_t r, int64_t b0) {
  const ActLaneTables& t = act_lane_tables();
  const int64_t full = a.K / 128, steps = (a.K + 127) / 128;
  constexpr int64_t kStepBytes = Bits == 8 ? 64 : 32;
  const uint8_t* v[R];
  const uint8_t* ix[R];
  for (int j = 0; j < R; ++j) {
    v[j] = a.values + (r + j) * a.val_row_bytes;
    ix[j] = a.indices + (r + j) * a.idx_row_bytes;
  }
  const uint8_t* xb[B];
  for (int b = 0; b < B; ++b) xb[b] = a.xq.u8 + (b0 + b) * a.xq.ld;
  const __m512i ones = _mm512_set1_epi8(1);
  double total[R][B] = {};
  __m512 facc[R][B];  // int4: group-scaled sums
  for (int j = 0; j < R; ++j)
    for (int b = 0; b < B; ++b) facc[j][b] = _mm512_setzero_ps();
  const int64_t gs = a.group_size;

  auto step = [&](int64_t s, auto tail_tag, __m512i(&acc)[R][B], __m512i(&comp)[R]) {
    constexpr bool Tail = decltype(tail_tag)::value;
    for (int j = 0; j < R; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(v[j] + kStepBytes * s) + kActPrefetchBytes, _MM_HINT_T0);
      if ((s & (Bits == 4 ? 1 : 3)) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(ix[j] + 16 * s) + kActPrefetchBytes / 4, _MM_HINT_T0);
      const __m128i idx16 = Tail ? _mm_maskz_loadu_epi8(static_cast<__mmask16>(low_bytes(a.idx_row_bytes - 16 * s)),
                                                        ix[j] + 16 * s)
                                 : _mm_loadu_si128(reinterpret_cast<const __m128i*>(ix[j] + 16 * s));
      const __m512i lanes = nm24_act_lanes<Bits>(idx16, t);
      const __m512i w = nm24_act_weights<Bits, Tail>(v[j], s, a.val_row_bytes - kStepBytes * s);
      comp[j] = _mm512_dpbusd_epi32(comp[j], ones, w);
      for (int b = 0; b < B; ++b) {
        const __m512i xs = _mm512_permutex2var_epi8(_mm512_loadu_si512(xb[b] + 128 * s), lanes,
                                                    _mm512_loadu_si512(xb[b] + 128 * s + 64));
        acc[j][b] = _mm512_dpbusd_epi32(acc[j][b], xs, w);
      }
    }
  };
  auto run_steps = [&](int64_t s0, int64_t s1, __m512i(&acc)[R][B], __m512i(&comp)[R]) {
    const int64_t f = std::min(s1, full);
    for (int64_t s = s0; s < f; ++s) step(s, std::false_type{}, acc, comp);
    for (int64_t s = std::max(s0, f); s < s1; ++s) step(s, std::true_type{}, acc, comp);
  };
  auto zero = [&](__m512i(&acc)[R][B], __m512i(&comp)[R]) {
    for (int j = 0; j < R; ++j) {
      comp[j] = _mm512_setzero_si512();
      for (int b = 0; b < B; ++b) acc[j][b] = _mm512_setzero_si512();
    }
  };

  __m512i acc[R][B], comp[R];
  if constexpr (Bits == 8) {
    for (int64_t s0 = 0; s0 < steps; s0 += kActFlushSteps) {
      zero(acc, comp);
      run_steps(s0, std::min(steps, s0 + kActFlushSteps), acc, comp);
      for (int j = 0; j < R; ++j)
        for (int b = 0; b < B; ++b) total[j][b] += _mm512_reduce_add_ps(act_lanes_sum(acc[j][b], comp[j]));
    }
  } else {
    // One fold per group (gs 64, 128: one or two steps) or per step (gs 32: two groups).
    const int64_t per_fold = gs >= 64 ? gs / 64 : 1;
    for (int64_t s0 = 0; s0 < steps; s0 += per_fold) {
      zero(acc, comp);
      run_steps(s0, std::min(steps, s0 + per_fold), acc, comp);
      for (int j = 0; j < R; ++j) {
        const float* sc = a.scales + (r + j) * a.groups;
        __m512 scale;
        if (gs >= 64) {
          scale = _mm512_set1_ps(sc[s0 * 64 / gs]);
        } else {  // the step's second group may not exist (its slots are then padding)
          const int64_t g = 2 * s0;
          scale = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(sc[g]), _mm512_set1_ps(sc[std::min(g + 1, a.groups - 1)]));
        }
        for (int b = 0; b < B; ++b) facc[j][b] = _mm512_fmadd_ps(act_lanes_sum(acc[j][b], comp[j]), scale, facc[j][b]);
      }
    }
    for (int j = 0; j < R; ++j)
      for (int b = 0; b < B; ++b) total[j][b] = _mm512_reduce_add_ps(facc[j][b]);
  }
  for (int j = 0; j < R; ++j) {
    const double row_scale = Bits == 8 ? a.scales[r + j] : 1.0;
    for (int b = 0; b < B; ++b)
      a.out[(b0 + b) * a.O + r + j] = static_cast<float>(total[j][b] * row_scale * a.xq.scale[b0 + b]);
  }
}

// ---- 2:4 int4, one batch row ---------------------------------------------------------------
// nm24_act_step's step for one batch row, two steps per iteration with their own int32
// accumulators, folded into fp32 per group (64 or 128 slots: one or two steps). From memory it
// streamed 2:4 int4 about 10% faster than nm24_act_step<1, 1, 4> (one thread, 2048 x 2048, this
// commit's README in bench/results/cpu-decode-q-20261206b); 2:4 int8 ran slower that way, so
// it keeps nm24_act_step. Step s of row (v, ix) into (acc, comp); Tail: the row's last, partial
// step (masked loads).
template <bool Tail>
inline void nm24_q4_act_b1_one(const NmQRowsArgs& a, const uint8_t* v, const uint8_t* ix, const uint8_t* xb,
                               int64_t s, const ActLaneTables& t, __m512i& acc, __m512i& comp) {
  _mm_prefetch(reinterpret_cast<const char*>(v + 32 * s) + kActPrefetchBytes, _MM_HINT_T0);
  if ((s & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(ix + 16 * s) + kActPrefetchBytes / 4, _MM_HINT_T0);
  const __m128i idx16 = Tail ? _mm_maskz_loadu_epi8(static_cast<__mmask16>(low_bytes(a.idx_row_bytes - 16 * s)), ix + 16 * s)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(ix + 16 * s));
  const __m512i lanes = nm24_act_lanes<4>(idx16, t);
  const __m512i w = nm24_act_weights<4, Tail>(v, s, a.val_row_bytes - 32 * s);
  comp = _mm512_dpbusd_epi32(comp, _mm512_set1_epi8(1), w);
  const __m512i xs = _mm512_permutex2var_epi8(_mm512_loadu_si512(xb + 128 * s), lanes, _mm512_loadu_si512(xb + 128 * s + 64));
  acc = _mm512_dpbusd_epi32(acc, xs, w);
}

// sum(w * u) - 128 * sum(w) of step s (s < steps), as fp32 lanes.
inline __m512 nm24_q4_act_b1_sum(const NmQRowsArgs& a, const uint8_t* v, const uint8_t* ix, const uint8_t* xb,
                                 int64_t s, int64_t full, const ActLaneTables& t) {
  __m512i acc = _mm512_setzero_si512(), comp = _mm512_setzero_si512();
  if (s < full) nm24_q4_act_b1_one<false>(a, v, ix, xb, s, t, acc, comp);
  else nm24_q4_act_b1_one<true>(a, v, ix, xb, s, t, acc, comp);
  return act_lanes_sum(acc, comp);
}

// Output row r for batch row 0; groups of 64 or 128 slots.
void nm24_q4_act_b1_row(const NmQRowsArgs& a, int64_t r) {
  const ActLaneTables& t = act_lane_tables();
  const int64_t full = a.K / 128, steps = (a.K + 127) / 128;
  const uint8_t* v = a.values + r * a.val_row_bytes;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  const uint8_t* xb = a.xq.u8;
  const float* sc = a.scales + r * a.groups;
  __m512 facc0 = _mm512_setzero_ps(), facc1 = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; s += 2) {
    const __m512 sum0 = nm24_q4_act_b1_sum(a, v, ix, xb, s, full, t);
    const __m512 sum1 = s + 1 < steps ? nm24_q4_act_b1_sum(a, v, ix, xb, s + 1, full, t) : _mm512_setzero_ps();
    if (a.group_size == 128) {  // one group: steps s and s + 1 (the row's last group may be one step)
      facc0 = _mm512_fmadd_ps(_mm512_add_ps(sum0, sum1), _mm512_set1_ps(sc[s / 2]), facc0);
    } else {  // 64: a group per step
      facc0 = _mm512_fmadd_ps(sum0, _mm512_set1_ps(sc[s]), facc0);
      if (s + 1 < steps) facc1 = _mm512_fmadd_ps(sum1, _mm512_set1_ps(sc[s + 1]), facc1);
    }
  }
  a.out[r] = _mm512_reduce_add_ps(_mm512_add_ps(facc0, facc1)) * a.xq.scale[0];
}

template <int Bits>
void nm24_act_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  if (Bits == 4 && a.B == 1 && (a.group_size == 64 || a.group_size == 128)) {
    for (int64_t r = r0; r < r1; ++r) nm24_q4_act_b1_row(a, r);
    return;
  }
  if (a.B == 1) {
    for (int64_t r = r0; r < r1; ++r) nm24_act_step<1, 1, Bits>(a, r, 0);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < a.B; b0 += kActBatchTile) {
      switch (std::min<int64_t>(kActBatchTile, a.B - b0)) {
        case 1: nm24_act_step<1, 1, Bits>(a, r, b0); break;
        case 2: nm24_act_step<1, 2, Bits>(a, r, b0); break;
        case 3: nm24_act_step<1, 3, Bits>(a, r, b0); break;
        default: nm24_act_step<1, 4, Bits>(a, r, b0); break;
      }
    }
  }
}

// Output rows [r, r + R) for batch rows [b0, b0 + B) of an int8 bitmask weight. The mask's
// bits past K are zero (check_bitmask_tail_bits). Slack: every row may load 64 values at any
// of its positions (bitmask_act_slack), so the loads need no mask; else each load is masked
// to the values that exist (the last rows of the weight).
template <int R, int B, bool Slack>
void bitmask_act_step(const BitmaskQRowsArgs& a, int64_t r, int64_t b0) {
  const uint64_t* words[R];
  const int8_t* p[R];
  for (int j = 0; j < R; ++j) {
    words[j] = reinterpret_cast<const uint64_t*>(a.bitmask + (r + j) * a.words);
    p[j] = a.values + a.offsets[(r + j) * a.tiles];
  }
  const uint8_t* xb[B];
  for (int b = 0; b < B; ++b) xb[b] = a.xq.u8 + (b0 + b) * a.xq.ld;
  const int8_t* const end = a.values + a.nnz;
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t steps = (a.K + 63) / 64;
  double total[R][B] = {};
  for (int64_t s0 = 0; s0 < steps; s0 += kActFlushSteps) {
    const int64_t s1 = std::min(steps, s0 + kActFlushSteps);
    __m512i acc[R][B], comp[R];
    for (int j = 0; j < R; ++j) {
      comp[j] = _mm512_setzero_si512();
      for (int b = 0; b < B; ++b) acc[j][b] = _mm512_setzero_si512();
    }
    for (int64_t s = s0; s < s1; ++s) {
      __m512i x[B];
      for (int b = 0; b < B; ++b) x[b] = _mm512_loadu_si512(xb[b] + 64 * s);
      for (int j = 0; j < R; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(p[j]) + kActPrefetchBytes, _MM_HINT_T0);
        const uint64_t k = words[j][s];
        __m512i v;
        if constexpr (Slack) v = _mm512_loadu_si512(p[j]);
        else v = _mm512_maskz_loadu_epi8(low_bytes(end - p[j]), p[j]);
        const __m512i w = _mm512_maskz_expand_epi8(k, v);
        p[j] += _mm_popcnt_u64(k);
        comp[j] = _mm512_dpbusd_epi32(comp[j], ones, w);
        for (int b = 0; b < B; ++b) acc[j][b] = _mm512_dpbusd_epi32(acc[j][b], x[b], w);
      }
    }
    for (int j = 0; j < R; ++j)
      for (int b = 0; b < B; ++b) total[j][b] += _mm512_reduce_add_ps(act_lanes_sum(acc[j][b], comp[j]));
  }
  for (int j = 0; j < R; ++j)
    for (int b = 0; b < B; ++b)
      a.out[(b0 + b) * a.O + r + j] = static_cast<float>(total[j][b] * a.scales[r + j] * a.xq.scale[b0 + b]);
}

// One batch row of an int8 bitmask weight, output row r: four steps per iteration into their
// own accumulators (vpdpbusd's 4-cycle chains overlap), and no weight-sum vpdpbusd per step:
// the row's values lie contiguous in [start, p), so 128 * their sum is taken back once per row
// (one vpsadbw per 64 values, about a third of the steps at 70% sparsity). Integer sums are
// exact (int32 lanes flushed to int64 every kActFlushSteps steps), so the result is the
// portable loop's to the last bit. Slack as bitmask_act_step. Measured against
// bitmask_act_step<1, 1, true>: bench/results/cpu-decode-q-20261206b/README.md.
template <bool Slack>
void bitmask_act_b1_row(const BitmaskQRowsArgs& a, int64_t r) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(a.bitmask + r * a.words);
  const int8_t* const start = a.values + a.offsets[r * a.tiles];
  const int8_t* const end = a.values + a.nnz;
  const int8_t* p = start;
  const uint8_t* xb = a.xq.u8;
  const int64_t steps = (a.K + 63) / 64;
  auto weights = [&](const int8_t* q, uint64_t k) {
    const __m512i v = Slack ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8(low_bytes(end - q), q);
    return _mm512_maskz_expand_epi8(k, v);
  };
  auto widen_sum = [](__m512i acc) {  // int32 lanes -> their int64 sum
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc)),
                                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc, 1))));
  };
  int64_t dot = 0;  // sum over kept columns of w * (q + 128)
  for (int64_t s0 = 0; s0 < steps; s0 += kActFlushSteps) {
    const int64_t s1 = std::min(steps, s0 + kActFlushSteps);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512(), acc2 = acc0, acc3 = acc0;
    int64_t s = s0;
    for (; s + 4 <= s1; s += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + kActPrefetchBytes, _MM_HINT_T0);
      const uint64_t k0 = words[s], k1 = words[s + 1], k2 = words[s + 2], k3 = words[s + 3];
      const int8_t* p1 = p + _mm_popcnt_u64(k0);
      const int8_t* p2 = p1 + _mm_popcnt_u64(k1);
      const int8_t* p3 = p2 + _mm_popcnt_u64(k2);
      acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(xb + 64 * s), weights(p, k0));
      acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(xb + 64 * s + 64), weights(p1, k1));
      acc2 = _mm512_dpbusd_epi32(acc2, _mm512_loadu_si512(xb + 64 * s + 128), weights(p2, k2));
      acc3 = _mm512_dpbusd_epi32(acc3, _mm512_loadu_si512(xb + 64 * s + 192), weights(p3, k3));
      p = p3 + _mm_popcnt_u64(k3);
    }
    for (; s < s1; ++s) {
      const uint64_t k0 = words[s];
      acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(xb + 64 * s), weights(p, k0));
      p += _mm_popcnt_u64(k0);
    }
    acc0 = _mm512_add_epi32(acc0, acc2);
    acc1 = _mm512_add_epi32(acc1, acc3);
    dot += widen_sum(_mm512_add_epi32(acc0, acc1));
  }
  // The row's weight sum: its values [start, p) (all inside values: Slack, or the masked loads
  // of the non-Slack rows read no further than end).
  // vpsadbw of the bytes flipped to u8 (w + 128) sums them into int64 lanes (a one-cycle add
  // chain); each 64-byte chunk, the masked tail's zeros included, adds 64 * 128 too much.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  __m512i wsum = zero;
  const int64_t n = std::min<int64_t>(p - start, end - start);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    wsum = _mm512_add_epi64(wsum, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(start + i), flip), zero));
  if (i < n) {
    wsum = _mm512_add_epi64(
        wsum, _mm512_sad_epu8(_mm512_xor_si512(_mm512_maskz_loadu_epi8(low_bytes(n - i), start + i), flip), zero));
    i += 64;
  }
  const int64_t wtotal = _mm512_reduce_add_epi64(wsum) - 128 * i;
  a.out[r] = static_cast<float>(static_cast<double>(dot - 128 * wtotal) * a.scales[r] * a.xq.scale[0]);
}

// Rows [r, r + R) may each load 64 values at any of their positions: a row's values start at
// offsets[row, 0] and number at most K, so [start, start + K + 64) inside values is enough
// whatever the mask says.
inline bool bitmask_act_slack(const BitmaskQRowsArgs& a, int64_t r, int R) {
  for (int j = 0; j < R; ++j) {
    const int64_t start = a.offsets[(r + j) * a.tiles];
    if (start < 0 || start + a.K + 64 > a.nnz) return false;
  }
  return true;
}

template <int R, int B>
void bitmask_act_rows_of(const BitmaskQRowsArgs& a, int64_t r, int64_t b0) {
  if (bitmask_act_slack(a, r, R)) {
    if (R == 1 && B == 1 && a.B == 1) bitmask_act_b1_row<true>(a, r);
    else bitmask_act_step<R, B, true>(a, r, b0);
    return;
  }
  // Near the end of values (or tampered offsets): masked loads, and a start outside values
  // reads nothing (the portable loop, which checks every value).
  for (int j = 0; j < R; ++j) {
    const int64_t start = a.offsets[(r + j) * a.tiles];
    if (start < 0 || start > a.nnz) {
      BitmaskQRowsArgs one = a;
      one.B = B;
      one.xq.u8 = a.xq.u8 + b0 * a.xq.ld;
      one.xq.scale = a.xq.scale + b0;
      one.out = a.out + b0 * a.O;
      bitmask_q_rows_act_portable(one, r, r + R);
      return;
    }
  }
  if (R == 1 && B == 1 && a.B == 1) bitmask_act_b1_row<false>(a, r);
  else bitmask_act_step<R, B, false>(a, r, b0);
}

void bitmask_act_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.B == 1) {
    for (int64_t r = r0; r < r1; ++r) bitmask_act_rows_of<1, 1>(a, r, 0);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < a.B; b0 += kActBatchTile) {
      switch (std::min<int64_t>(kActBatchTile, a.B - b0)) {
        case 1: bitmask_act_rows_of<1, 1>(a, r, b0); break;
        case 2: bitmask_act_rows_of<1, 2>(a, r, b0); break;
        case 3: bitmask_act_rows_of<1, 3>(a, r, b0); break;
        default: bitmask_act_rows_of<1, 4>(a, r, b0); break;
      }
    }
  }
}

}  // namespace

// quantize_activation_rows (rows_q_generic.cpp) with 16 lanes: the same fp32 multiply and
// round-half-to-even conversion (vcvtps2dq under the default rounding mode is what the portable
// loop's nearbyint does), so the bytes are the same; the portable loop calls libm's nearbyintf
// per value, which cost about as much as streaming a 2048-column layer's weights.
void quantize_activation_rows(const float* x, int64_t B, int64_t K, uint8_t* u8, int64_t ld, float* scale) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    uint8_t* qb = u8 + b * ld;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 non_finite = 0;
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 k = first_lanes(K - c);
      const __m512 v = _mm512_maskz_loadu_ps(k, xb + c);
      non_finite |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | SNaN | +inf | -inf
      amax = _mm512_max_ps(amax, _mm512_and_ps(v, abs_mask));
    }
    const bool finite = non_finite == 0;
    const float m = finite ? _mm512_reduce_max_ps(amax) : 0.f;
    const float inv = finite && m > 0.f ? 127.f / m : 0.f;
    scale[b] = finite ? (m > 0.f ? m / 127.f : 0.f) : std::nanf("");
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), offset = _mm512_set1_epi32(128);
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 k = first_lanes(K - c);
      // a non-finite row's bytes are never used (its scale is NaN): inv 0 makes them 128 here
      const __m512 v = finite ? _mm512_maskz_loadu_ps(k, xb + c) : _mm512_setzero_ps();
      const __m512i q = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv))));
      _mm_mask_storeu_epi8(qb + c, k, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)));
    }
    std::memset(qb + K, 128, static_cast<size_t>(ld - K));
  }
}

// One vpexpandb load per 64 columns: the word's kept values land on its set bits, zeros
// elsewhere (what the portable loop writes one value at a time). A word whose values would
// reach past the stored ones (a tampered offset or mask) takes the portable, bounded loop.
void bitmask_q_rows_int8(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst) {
  if (!avx512_q_act_vector()) return cpu::bitmask_q_rows_int8(a, r0, r1, dst);
  for (int64_t r = r0; r < r1; ++r) {
    int8_t* row = dst + r * a.K;
    int64_t p = a.tiles ? a.offsets[r * a.tiles] : 0;
    const int64_t* words = a.bitmask + r * a.words;
    for (int64_t w = 0; w < a.words && w * 64 < a.K; ++w) {
      const uint64_t bits = static_cast<uint64_t>(words[w]);
      const int64_t count = __builtin_popcountll(bits);
      const int64_t left = a.K - w * 64;
      const __mmask64 cols = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      if (p >= 0 && p + count <= a.nnz) {
        _mm512_mask_storeu_epi8(row + w * 64, cols, _mm512_maskz_expandloadu_epi8(bits, a.values + p));
      } else {
        _mm512_mask_storeu_epi8(row + w * 64, cols, _mm512_setzero_si512());
        uint64_t b = bits;
        for (int64_t q = p; b; ++q) {
          const int64_t c = w * 64 + __builtin_ctzll(b);
          b &= b - 1;
          if (c < a.K && q >= 0 && q < a.nnz) row[c] = a.values[q];
        }
      }
      p += count;
    }
  }
}

void nm_q_rows_act(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  if (!avx512_q_act_vector() || !avx512_nm_q_pattern(a.n, a.m)) return nm_q_rows_act_portable(a, r0, r1);
  if (a.bits == 8) nm24_act_rows<8>(a, r0, r1);
  else nm24_act_rows<4>(a, r0, r1);
}

void bitmask_q_rows_act(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  if (!avx512_q_act_vector()) return bitmask_q_rows_act_portable(a, r0, r1);
  bitmask_act_rows(a, r0, r1);
}

}  // namespace avx512

bool avx512_q_act_vector() {
  static const bool has = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512vbmi2");
  return has;
}
}  // namespace cpu
}  // namespace sparsekern
#pragma GCC pop_options
#pragma GCC pop_options
#else
namespace sparsekern {
namespace cpu {
namespace avx512 {
// Never called: cpu_has_avx512() is false without these kernels.
void nm_q_rows(const NmQRowsArgs&, int64_t, int64_t) { std::abort(); }
void bitmask_q_rows(const BitmaskQRowsArgs&, int64_t, int64_t) { std::abort(); }
void nm_q_rows_act(const NmQRowsArgs&, int64_t, int64_t) { std::abort(); }
void bitmask_q_rows_act(const BitmaskQRowsArgs&, int64_t, int64_t) { std::abort(); }
void quantize_activation_rows(const float*, int64_t, int64_t, uint8_t*, int64_t, float*) { std::abort(); }
void bitmask_q_rows_int8(const BitmaskQRowsArgs&, int64_t, int64_t, int8_t*) { std::abort(); }
}  // namespace avx512
bool avx512_q_act_vector() { return false; }
}  // namespace cpu
}  // namespace sparsekern
#endif
