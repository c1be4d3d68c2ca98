// AVX-512 build of the decode kernels of N:M (2:4; m = 8 or 16 with even n) and bitmask
// (unstructured), of their row decompression for the large-batch tiles, and of the
// weight-stationary large-batch kernels of 2:4 and bitmask. Only called when
// cpu_has_avx512() says the CPU has every extension of the target list below (F, VL, BW,
// DQ, VBMI2: Ice Lake and later Xeons, AMD Zen 4 and later).
//
// Why a separate build: the AVX2 kernels decode indices into column numbers (byte tables,
// gathers) and cost the same per 64-bit mask word at any density; on AVX-512 the mask
// itself drives the load. One 16-bit piece of a bitmask row is a k-register: an expanding
// load puts the row's next popcount(k) values into the kept lanes and zeros elsewhere, and
// one FMA with 16 contiguous x values finishes them. For 2:4, one permute picks the 16
// kept columns' x values out of 32 with lane numbers computed from the packed index word
// by a variable shift. Neither uses a gather or a per-element scalar step.
//
// Same include rules as sparse_rows_avx2.cpp (rows_common_impl.h): every header is
// included before the target pragma, and every helper lives in an unnamed namespace.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../common.h"  // kBitmaskTileCols
#include "sparse_rows.h"

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip this warning in
// its own headers (a known false positive), once per use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi2,avx2,fma,f16c,bmi,bmi2,popcnt")

#define SK_ISA_NS avx512
#include "ws_chunks_impl.h"
#undef SK_ISA_NS
#include "fma_probe_impl.h"

namespace sparsekern {
namespace cpu {
namespace avx512 {
namespace {

// ---- values as fp32 -----------------------------------------------------------------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The first `cnt` (<= 16) values, zeros after: never reads past them.
inline __m512 load16_first(const float* p, int cnt) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1), p);
}
inline __m512 load16_first(const c10::BFloat16* p, int cnt) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_first(const c10::Half* p, int cnt) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1), p));
}
// Expanding load: the next popcount(k) values into the lanes set in k, zeros elsewhere.
// Reads exactly popcount(k) values (masked-off lanes never touch memory).
inline __m512 expand16(__mmask16 k, const float* p) { return _mm512_maskz_expandloadu_ps(k, p); }
inline __m512 expand16(__mmask16 k, const c10::BFloat16* p) {
  const __m256i h = _mm256_maskz_expandloadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 expand16(__mmask16 k, const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_expandloadu_epi16(k, p));
}
// The same from a plain load of 16 values and an in-register expand. The caller must know
// that 16 values are readable at p (row_has_slack below). The memory form is microcoded
// on Intel cores: one-row bitmask decode at 30% kept spent most of its samples on it and
// ran at 17 GB/s with its weight hot in the L3, against dense torch's 36.
inline __m512 expand16_loaded(__mmask16 k, const float* p) { return _mm512_maskz_expand_ps(k, _mm512_loadu_ps(p)); }
inline __m512 expand16_loaded(__mmask16 k, const c10::BFloat16* p) {
  const __m256i h = _mm256_maskz_expand_epi16(k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 expand16_loaded(__mmask16 k, const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
template <bool Slack, typename VT>
inline __m512 expand_piece(__mmask16 k, const VT* p) {
  if constexpr (Slack) return expand16_loaded(k, p);
  else return expand16(k, p);
}

// Software prefetch this far ahead in the value and mask streams. The hardware prefetcher
// stops at 4 KiB page boundaries, and a decode kernel walks two or three streams at once:
// without it the kernels reached about half the DRAM bandwidth of dense torch's GEMV.
// (Prefetches never fault, so running past the end of a tensor is harmless.)
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const void* p, int64_t ahead_bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + ahead_bytes, _MM_HINT_T0);
}

inline __mmask16 first_lanes(int64_t cnt) {
  return cnt >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cnt) - 1);
}
inline uint16_t mask_piece(const int64_t* words, int64_t piece) {
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const uint8_t*>(words) + 2 * piece, 2);
  return v;
}
template <typename Word = uint32_t>
inline Word index_word(const uint8_t* ix, int64_t byte, int64_t row_bytes) {
  // sizeof(Word) index bytes (16 slots: 4 bytes at 2 bits, 8 at 4 bits); fewer at the end
  // of the row, never read past it. (A memcpy of run-time length would be a library call.)
  Word v = 0;
  if (row_bytes - byte >= static_cast<int64_t>(sizeof(Word))) {
    std::memcpy(&v, ix + byte, sizeof(Word));
    return v;
  }
  for (int64_t i = byte; i < row_bytes; ++i) v |= static_cast<Word>(ix[i]) << (8 * (i - byte));
  return v;
}

// ---- one dense fp32 row times B rows of x -------------------------------------------------
// row: [K] fp32 in L1; x: row-major [B, K]; out[b * O + r] for every b. Rows of x in
// groups of four, two 16-lane column blocks each: eight independent FMA chains.
void dense_row_times_x(const float* row, const float* x, int64_t B, int64_t K, float* out, int64_t O, int64_t r) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const int nb = static_cast<int>(B - b0 < 4 ? B - b0 : 4);
    const float* xb = x + b0 * K;
    __m512 acc[4][2];
    for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
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

// More batch rows than the direct kernels take: each weight row expanded once into an L1
// buffer by dense_row(r, buf), then dense dot products with every batch row.
template <typename DenseRow>
void expanded_rows_times_x(const float* x, int64_t B, int64_t K, float* out, int64_t O, int64_t r0, int64_t r1,
                           const DenseRow& dense_row) {
  const int64_t K16 = (K + 15) / 16 * 16;
  float* row = static_cast<float*>(std::aligned_alloc(64, K16 * sizeof(float)));
  for (int64_t r = r0; r < r1; ++r) {
    dense_row(r, row);
    dense_row_times_x(row, x, B, K, out, O, r);
  }
  std::free(row);
}

// ---- 2:4 ------------------------------------------------------------------------------------
// Slot t of a 16-slot piece (32 columns) sits in group t / 2, at in-group index bits
// [2t, 2t+2) of the piece's 32-bit index word: column (t / 2) * 4 + index.
inline __m512i nm24_piece_columns(uint32_t word) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                       _mm512_set1_epi32(3));
  return _mm512_add_epi32(idx, base);
}

// Kept-column mask of 8 columns (two groups) from one index byte (four slots).
struct Mask24 {
  uint8_t bits[256];
  Mask24() {
    for (int b = 0; b < 256; ++b) {
      int m = 0;
      for (int t = 0; t < 4; ++t) m |= 1 << ((t / 2) * 4 + ((b >> (2 * t)) & 3));
      bits[b] = static_cast<uint8_t>(m);
    }
  }
};
const Mask24& mask24() {
  static const Mask24 lut;
  return lut;
}

// Row r of a 2:4 weight as dense fp32 [K] (validated formats: the two in-group indices
// of a group differ, so each 32-column piece keeps exactly 16 columns in slot order).
template <typename VT>
void nm24_row_dense(const VT* v, const uint8_t* ix, int64_t kept, int64_t row_bytes, int64_t K, float* dst) {
  const Mask24& lut = mask24();
  int64_t s = 0, c = 0;
  for (; c + 32 <= K; c += 32, s += 16) {
    prefetch(v + s, kPrefetchBytes);
    if ((s & 127) == 0) prefetch(ix + s / 4, kPrefetchBytes / 8);
    const uint32_t w = index_word(ix, s / 4, row_bytes);
    const uint32_t m = uint32_t(lut.bits[w & 0xFF]) | uint32_t(lut.bits[(w >> 8) & 0xFF]) << 8 |
                       uint32_t(lut.bits[(w >> 16) & 0xFF]) << 16 | uint32_t(lut.bits[w >> 24]) << 24;
    const __m512 vals = load16(v + s);
    _mm512_storeu_ps(dst + c, _mm512_maskz_expand_ps(static_cast<__mmask16>(m), vals));
    _mm512_storeu_ps(dst + c + 16,
                     _mm512_maskz_expand_ps(static_cast<__mmask16>(m >> 16), _mm512_shuffle_f32x4(vals, vals, 0xEE)));
  }
  for (; c < K; c += 4, s += 2) {  // fewer than 32 columns left, whole groups
    const int i0 = (ix[s >> 2] >> ((s & 3) * 2)) & 3, i1 = (ix[(s + 1) >> 2] >> (((s + 1) & 3) * 2)) & 3;
    for (int j = 0; j < 4; ++j) dst[c + j] = 0.f;
    dst[c + i0] = static_cast<float>(v[s]);
    dst[c + i1] = static_cast<float>(v[s + 1]);
  }
  (void)kept;
}

// 1 to 4 batch rows of a pattern with 16 kept slots per 32 columns (2:4, and 4:8 and 8:16
// below), straight from the compressed row: per 32 columns the lane numbers are computed
// once (columns_of(row's indices, piece) -> 16 columns in 0..31; index_bytes per piece),
// then one permute per batch row picks its 16 kept columns' x values out of 32 and one FMA
// finishes them.
template <typename VT, int B, typename ColumnsOf>
void permute_rows_direct(const NmRowsArgs& a, int64_t r0, int64_t r1, int64_t index_bytes,
                         const ColumnsOf& columns_of) {
  const int64_t full = a.K / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m512 acc[2][B];
    for (int b = 0; b < B; ++b) acc[0][b] = acc[1][b] = _mm512_setzero_ps();
    int64_t p = 0;
    // Two pieces per step into two accumulator sets, indexed by constants so they stay
    // in registers (an index of p & 1 put them on the stack).
    auto piece = [&](int64_t q, __m512 (&acc_set)[B]) {
      const __m512i cols = columns_of(ix, q);
      const __m512 w = load16(v + 16 * q);
      for (int b = 0; b < B; ++b) {
        const float* xc = a.x + b * a.K + 32 * q;
        acc_set[b] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(xc), cols, _mm512_loadu_ps(xc + 16)),
                                     acc_set[b]);
      }
    };
    for (; p + 2 <= full; p += 2) {
      prefetch(v + 16 * p, kPrefetchBytes);  // 32 values (fp32: two lines)
      prefetch(v + 16 * p + 16, kPrefetchBytes);
      if (((p * index_bytes) & 63) == 0) prefetch(ix + p * index_bytes, kPrefetchBytes / 8);  // once per line
      piece(p, acc[0]);
      piece(p + 1, acc[1]);
    }
    if (p < full) piece(p++, acc[0]);
    const int64_t c0 = 32 * p;
    if (c0 < a.K) {  // whole groups left, fewer than 32 columns: x masked to them, later slots zero
      const int64_t cols_left = a.K - c0;
      const __m512i cols = columns_of(ix, p);
      const __m512 w = load16_first(v + 16 * p, static_cast<int>(cols_left / 2));
      for (int b = 0; b < B; ++b) {
        const float* xc = a.x + b * a.K + c0;
        const __m512 xlo = _mm512_maskz_loadu_ps(first_lanes(cols_left), xc);
        const __m512 xhi = _mm512_maskz_loadu_ps(first_lanes(cols_left > 16 ? cols_left - 16 : 0), xc + 16);
        acc[0][b] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xlo, cols, xhi), acc[0][b]);
      }
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][b], acc[1][b]));
  }
}

template <typename VT, int B>
void nm24_rows_direct(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  permute_rows_direct<VT, B>(a, r0, r1, 4, [&](const uint8_t* ix, int64_t q) {
    return nm24_piece_columns(index_word(ix, 4 * q, a.idx_row_bytes));
  });
}

// One batch row, four weight rows per step: eight streams (values and indices) in flight.
// Against two rows per step, on 4096x4096 fp32 with 2 threads and weights rotated through
// memory, in-process interleaved runs: 1.70-1.75x dense against 1.45-1.47x. (Two rows had
// replaced one for the same reason.)
// The software prefetch fetches the next step's rows into L2, each at the offset this step
// reads: a fixed distance ahead within a row (it was 8 KiB) lands in the rows this step
// is already reading whenever a row is shorter than the distance times the rows per step
// (a 2048-column row is 4 KiB), so the next step's last rows came from memory on demand.
// The 28 decode linears of the Llama-style decoder (hidden 2048), weights streaming from
// memory, processes alternated 5 times each: 1 thread 34.7-37.0 ms against 38.3-41.1 ms
// before, 2 threads 18.1-21.1 ms against 20.4-21.6 ms.
constexpr int kNm24B1Rows = 4;
template <typename VT, int R>
void nm24_rows_b1_step(const NmRowsArgs& a, int64_t r) {
  const int64_t full = a.K / 32;
  const VT* v[R];
  const uint8_t* ix[R];
  __m512 acc[R];
  for (int j = 0; j < R; ++j) {
    v[j] = static_cast<const VT*>(a.values) + (r + j) * a.kept;
    ix[j] = a.indices + (r + j) * a.idx_row_bytes;
    acc[j] = _mm512_setzero_ps();
  }
  int64_t p = 0;
  for (; p < full; ++p) {  // a full piece's 4 index bytes lie inside the row
    const __m512 xl = _mm512_loadu_ps(a.x + 32 * p), xh = _mm512_loadu_ps(a.x + 32 * p + 16);
    for (int j = 0; j < R; ++j) {
      // The next step's row j at this offset, into L2 (see kNm24B1Rows).
      _mm_prefetch(reinterpret_cast<const char*>(v[j] + R * a.kept + 16 * p), _MM_HINT_T1);
      if ((p & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(ix[j] + R * a.idx_row_bytes + 4 * p), _MM_HINT_T1);
      uint32_t word;
      std::memcpy(&word, ix[j] + 4 * p, 4);
      acc[j] = _mm512_fmadd_ps(load16(v[j] + 16 * p), _mm512_permutex2var_ps(xl, nm24_piece_columns(word), xh), acc[j]);
    }
  }
  const int64_t c0 = 32 * p;
  if (c0 < a.K) {  // 4..28 columns left: x masked to them, slots past the row read as zero
    const int64_t cols = a.K - c0;
    const int slots = static_cast<int>(cols / 2);
    const __m512 xl = _mm512_maskz_loadu_ps(first_lanes(cols), a.x + c0);
    const __m512 xh = _mm512_maskz_loadu_ps(first_lanes(cols > 16 ? cols - 16 : 0), a.x + c0 + 16);
    for (int j = 0; j < R; ++j)
      acc[j] = _mm512_fmadd_ps(load16_first(v[j] + 16 * p, slots),
                               _mm512_permutex2var_ps(xl, nm24_piece_columns(index_word(ix[j], 4 * p, a.idx_row_bytes)), xh),
                               acc[j]);
  }
  for (int j = 0; j < R; ++j) a.out[r + j] = _mm512_reduce_add_ps(acc[j]);
}

template <typename VT>
void nm24_rows_b1(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kNm24B1Rows <= r1; r += kNm24B1Rows) nm24_rows_b1_step<VT, kNm24B1Rows>(a, r);
  for (; r < r1; ++r) nm24_rows_b1_step<VT, 1>(a, r);
}

template <typename VT>
void nm24_rows_t(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: return nm24_rows_b1<VT>(a, r0, r1);
    case 2: return nm24_rows_direct<VT, 2>(a, r0, r1);
    case 3: return nm24_rows_direct<VT, 3>(a, r0, r1);
    case 4: return nm24_rows_direct<VT, 4>(a, r0, r1);
    default: break;
  }
  expanded_rows_times_x(a.x, a.B, a.K, a.out, a.O, r0, r1, [&](int64_t r, float* row) {
    nm24_row_dense(static_cast<const VT*>(a.values) + r * a.kept, a.indices + r * a.idx_row_bytes, a.kept,
                   a.idx_row_bytes, a.K, row);
  });
}

// ---- N:M with m = 8 or 16 and even n (4:8, 2:8, 8:16, ...) -------------------------------
// Two 4-bit indices per byte, both in one group when n is even: a 256-entry table gives a
// byte's two column bits within its group, and the OR over a 16-column piece's bytes is its
// kept-column mask, which drives the same expanding load as the bitmask kernels. Validated
// formats hold n distinct in-group indices in increasing order, so the piece's 16n/m values
// in slot order are its kept columns in column order.
struct PairBits {
  uint16_t bits[256];
  PairBits() {
    for (int b = 0; b < 256; ++b) bits[b] = static_cast<uint16_t>((1u << (b & 15)) | (1u << (b >> 4)));
  }
};
const PairBits& pair_bits() {
  static const PairBits lut;
  return lut;
}

// Kept-column mask of piece p (columns [16p, 16p + 16)); at the end of a row with m = 8 the
// piece may hold one group only.
inline __mmask16 nm_piece_mask(const uint8_t* ix, int64_t p, int64_t n, int64_t m, int64_t groups, const PairBits& pb) {
  const int64_t bpg = n / 2;  // index bytes per group
  if (m == 16) {
    uint32_t mk = 0;
    for (int64_t j = 0; j < bpg; ++j) mk |= pb.bits[ix[p * bpg + j]];
    return static_cast<__mmask16>(mk);
  }
  const int64_t g0 = 2 * p;
  uint32_t lo = 0, hi = 0;
  for (int64_t j = 0; j < bpg; ++j) lo |= pb.bits[ix[g0 * bpg + j]];
  if (g0 + 1 < groups)
    for (int64_t j = 0; j < bpg; ++j) hi |= pb.bits[ix[(g0 + 1) * bpg + j]];
  // Each group's bits kept to its 8 columns: with any index bytes at all, a piece then
  // never has more than its 16n/m kept columns, so the expanding load stays in its values.
  return static_cast<__mmask16>((lo & 0xFF) | (hi & 0xFF) << 8);
}

// Whether row r of an N:M weight may read its values 16 at a time (expand16_loaded): a load
// at any slot of the row stays inside the [O, kept] values unless the row is one of the last.
inline bool nm_row_has_slack(const NmRowsArgs& a, int64_t r) { return (r + 1) * a.kept + 16 <= a.O * a.kept; }

template <typename VT, bool Slack>
void nm_row_dense(const VT* v, const uint8_t* ix, int64_t n, int64_t m, int64_t K, float* dst) {
  const PairBits& pb = pair_bits();
  const int64_t groups = K / m, per_piece = 16 * n / m;
  for (int64_t c = 0, p = 0; c < K; c += 16, ++p) {
    if ((p & 3) == 0) prefetch(v + p * per_piece, kPrefetchBytes);
    const __mmask16 mk = nm_piece_mask(ix, p, n, m, groups, pb);
    const __m512 w = expand_piece<Slack>(mk, v + p * per_piece);
    if (c + 16 <= K) _mm512_storeu_ps(dst + c, w);
    else _mm512_mask_storeu_ps(dst + c, first_lanes(K - c), w);
  }
}

// Row r (m = 8 or 16) as dense fp32 [K] into dst, with the register expand where the row
// has the slack.
template <typename VT>
void nm_row_dense_at(const NmRowsArgs& a, int64_t r, float* dst) {
  const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  if (nm_row_has_slack(a, r)) nm_row_dense<VT, true>(v, ix, a.n, a.m, a.K, dst);
  else nm_row_dense<VT, false>(v, ix, a.n, a.m, a.K, dst);
}

// One batch row: per 16 columns the mask from the index table, an expanding load of the
// piece's values and one FMA with x loaded under the same mask.
template <typename VT, bool Slack>
void nm_row_b1(const NmRowsArgs& a, int64_t r) {
  const PairBits& pb = pair_bits();
  const int64_t pieces = (a.K + 15) / 16, groups = a.K / a.m, per_piece = 16 * a.n / a.m;
  const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= pieces; p += 2) {
    if ((p & 3) == 0) prefetch(v + p * per_piece, kPrefetchBytes);
    if ((p & 31) == 0) prefetch(ix + p * per_piece / 2, kPrefetchBytes / 8);
    const __mmask16 m0 = nm_piece_mask(ix, p, a.n, a.m, groups, pb);
    const __mmask16 m1 = nm_piece_mask(ix, p + 1, a.n, a.m, groups, pb);
    acc0 = _mm512_fmadd_ps(expand_piece<Slack>(m0, v + p * per_piece), _mm512_maskz_loadu_ps(m0, a.x + 16 * p), acc0);
    acc1 = _mm512_fmadd_ps(expand_piece<Slack>(m1, v + (p + 1) * per_piece),
                           _mm512_maskz_loadu_ps(m1, a.x + 16 * p + 16), acc1);
  }
  if (p < pieces) {
    const __mmask16 m0 = nm_piece_mask(ix, p, a.n, a.m, groups, pb);
    acc0 = _mm512_fmadd_ps(expand16(m0, v + p * per_piece), _mm512_maskz_loadu_ps(m0, a.x + 16 * p), acc0);
  }
  a.out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// ---- N:M with n = m / 2 and m = 8 or 16 (4:8, 8:16) at 1 to 4 batch rows ----------------
// 16 slots span 32 columns, like 2:4, so permute_rows_direct runs them: one permute of two
// x vectors per batch row brings the 16 kept columns' x values beside their values. The 16 in-group indices of a piece are
// its 8 index bytes (slot t at bits [4t, 4t + 4), little-endian): broadcast as a 64-bit word,
// each lane takes its half by a permute and its nibble by a variable shift. The index is
// kept inside its group (& (m - 1)): a raw call with indices no format holds reads the wrong
// column of x, never one outside the piece.

template <int64_t M>
inline __m512i nm_half_piece_columns(uint64_t word) {
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  // slot t's group starts at column (t / n) * m, n = M / 2
  const __m512i base = M == 8 ? _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24)
                              : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
  const __m512i w = _mm512_permutexvar_epi32(halves, _mm512_set1_epi64(static_cast<long long>(word)));
  const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32(static_cast<int>(M - 1)));
  return _mm512_add_epi32(idx, base);
}

template <typename VT, int64_t M, int B>
void nm_half_rows(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  permute_rows_direct<VT, B>(a, r0, r1, 8, [&](const uint8_t* ix, int64_t q) {
    return nm_half_piece_columns<M>(index_word<uint64_t>(ix, 8 * q, a.idx_row_bytes));
  });
}

template <typename VT, int64_t M>
bool nm_half_rows_t(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.B) {
    case 1: nm_half_rows<VT, M, 1>(a, r0, r1); return true;
    case 2: nm_half_rows<VT, M, 2>(a, r0, r1); return true;
    case 3: nm_half_rows<VT, M, 3>(a, r0, r1); return true;
    case 4: nm_half_rows<VT, M, 4>(a, r0, r1); return true;
    default: return false;
  }
}

template <typename VT>
void nm_rows_t(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.m == 8 && a.n == 4 && nm_half_rows_t<VT, 8>(a, r0, r1)) return;
  if (a.m == 16 && a.n == 8 && nm_half_rows_t<VT, 16>(a, r0, r1)) return;
  if (a.B == 1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (nm_row_has_slack(a, r)) nm_row_b1<VT, true>(a, r);
      else nm_row_b1<VT, false>(a, r);
    }
    return;
  }
  expanded_rows_times_x(a.x, a.B, a.K, a.out, a.O, r0, r1,
                        [&](int64_t r, float* row) { nm_row_dense_at<VT>(a, r, row); });
}

// ---- bitmask --------------------------------------------------------------------------------
// Whether row r of a bitmask weight may read its values 16 at a time (sparse_rows.h).
inline bool row_has_slack(const BitmaskRowsArgs& a, int64_t r) { return bitmask_row_has_slack(a, r, 16); }

template <typename VT, bool Slack>
void bitmask_row_dense(const VT* v, const int64_t* words, int64_t K, float* dst) {
  int64_t k = 0;
  for (int64_t c = 0, piece = 0; c < K; c += 16, ++piece) {
    if ((piece & 3) == 0) prefetch(v + k, kPrefetchBytes);
    if ((piece & 31) == 0) prefetch(words + piece / 4, kPrefetchBytes / 4);
    const __mmask16 m = mask_piece(words, piece);
    const __m512 w = expand_piece<Slack>(m, v + k);
    if (c + 16 <= K) _mm512_storeu_ps(dst + c, w);
    else _mm512_mask_storeu_ps(dst + c, first_lanes(K - c), w);
    k += _mm_popcnt_u32(m);
  }
}

// Row r as dense fp32 [K] into dst, with the register expand where the row has the slack.
template <typename VT>
void bitmask_row_dense_at(const BitmaskRowsArgs& a, int64_t r, float* dst) {
  const VT* v = static_cast<const VT*>(a.values) + a.offsets[r * a.tiles];
  if (row_has_slack(a, r)) bitmask_row_dense<VT, true>(v, a.bitmask + r * a.words, a.K, dst);
  else bitmask_row_dense<VT, false>(v, a.bitmask + r * a.words, a.K, dst);
}

// One batch row: per 16 columns an expanding load of the kept values and one FMA with x
// loaded under the same mask, two pieces per step into two named accumulators.
// The value stream is prefetched every step (32 columns: up to 128 bytes of fp32 values),
// 8 KiB ahead. Every other step, as the kernels of more rows do, left lines unfetched
// above 25% kept: at 30% and 50% kept (4096x4096 fp32, 2 threads, rotated, interleaved in
// one process) 1.77-2.01x and 1.28x dense against 1.73-1.86x and 1.13x.
constexpr int64_t kBitmaskB1PrefetchBytes = 8192;
template <typename VT, bool Slack>
float bitmask_row_b1(const int64_t* words, const VT* v, const float* x, int64_t K) {
  const int64_t pieces = (K + 15) / 16;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0, p = 0;
  for (; p + 2 <= pieces; p += 2) {
    prefetch(v + k, kBitmaskB1PrefetchBytes);
    if ((p & 31) == 0) prefetch(words + p / 4, kBitmaskB1PrefetchBytes / 4);
    uint32_t both;
    std::memcpy(&both, reinterpret_cast<const uint8_t*>(words) + 2 * p, 4);
    if (!both) continue;
    const uint32_t lo = both & 0xFFFFu, hi = both >> 16;
    const __mmask16 m0 = static_cast<__mmask16>(lo), m1 = static_cast<__mmask16>(hi);
    const int64_t k1 = k + _mm_popcnt_u32(lo);
    acc0 = _mm512_fmadd_ps(expand_piece<Slack>(m0, v + k), _mm512_maskz_loadu_ps(m0, x + 16 * p), acc0);
    acc1 = _mm512_fmadd_ps(expand_piece<Slack>(m1, v + k1), _mm512_maskz_loadu_ps(m1, x + 16 * p + 16), acc1);
    k = k1 + _mm_popcnt_u32(hi);
  }
  if (p < pieces) {
    const __mmask16 m0 = mask_piece(words, p);
    acc0 = _mm512_fmadd_ps(expand16(m0, v + k), _mm512_maskz_loadu_ps(m0, x + 16 * p), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <typename VT>
void bitmask_rows_b1(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    const VT* v = static_cast<const VT*>(a.values) + a.offsets[r * a.tiles];
    a.out[r] = row_has_slack(a, r) ? bitmask_row_b1<VT, true>(words, v, a.x, a.K)
                                   : bitmask_row_b1<VT, false>(words, v, a.x, a.K);
  }
}

// One batch row at low density (BitmaskRowsArgs.b1_indexed: bitmask_linear's algo 4, which
// sparsekern/dispatch_rules.py chooses up to BITMASK_B1_INDEXED_MAX_DENSITY): per 64-column
// word, one byte compress of the lane numbers 0..63 under the word's mask lists its kept
// columns; x's 64 columns sit in four registers, and two two-source permutes (bit 5 of the
// column picks the pair) bring the kept ones beside their values. A word then costs a fixed
// handful of shuffles for up to 16 kept values, instead of four expanding loads, which at
// 10% kept cost about twice as much (measured on this kernel's first host, Sapphire Rapids).
template <typename VT>
void bitmask_rows_b1_indexed(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  const __m512i lane_bytes = _mm512_set_epi8(
      63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36,
      35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7,
      6, 5, 4, 3, 2, 1, 0);
  const __m512i bit5 = _mm512_set1_epi32(32);
  const int64_t words_full = a.K / 64, tail_cols = a.K % 64;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    const VT* v = static_cast<const VT*>(a.values) + a.offsets[r * a.tiles];
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    // acc (+)= the kept values of one word times their x columns (x0..x3: the word's 64).
    auto word_dot = [&](uint64_t m, __m512 x0, __m512 x1, __m512 x2, __m512 x3) {
      const int n = static_cast<int>(_mm_popcnt_u64(m));
      const __m512i cols = _mm512_maskz_compress_epi8(m, lane_bytes);
      auto part = [&](__m128i col_bytes, int g, __m512& acc) {
        const __m512i c = _mm512_cvtepu8_epi32(col_bytes);
        const __m512 xv = _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, bit5), _mm512_permutex2var_ps(x0, c, x1),
                                               _mm512_permutex2var_ps(x2, c, x3));
        const int cnt = std::min(n - g, 16);
        // Lanes past the kept count keep acc: an inf or NaN in an unkept column of x
        // stays out, as in the other kernels.
        acc = _mm512_mask3_fmadd_ps(load16_first(v + k + g, cnt), xv, acc, first_lanes(cnt));
      };
      part(_mm512_castsi512_si128(cols), 0, acc0);
      if (n > 16) {
        part(_mm512_extracti32x4_epi32(cols, 1), 16, acc1);
        if (n > 32) {
          part(_mm512_extracti32x4_epi32(cols, 2), 32, acc0);
          if (n > 48) part(_mm512_extracti32x4_epi32(cols, 3), 48, acc1);
        }
      }
      k += n;
    };
    for (int64_t w = 0; w < words_full; ++w) {
      prefetch(v + k, kPrefetchBytes);
      if ((w & 7) == 0) prefetch(words + w, kPrefetchBytes / 4);
      const float* xw = a.x + 64 * w;
      word_dot(static_cast<uint64_t>(words[w]), _mm512_loadu_ps(xw), _mm512_loadu_ps(xw + 16),
               _mm512_loadu_ps(xw + 32), _mm512_loadu_ps(xw + 48));
    }
    if (tail_cols) {  // x ends inside this word: masked loads, never past column K
      const float* xw = a.x + 64 * words_full;
      auto lanes = [&](int64_t from) { return tail_cols > from ? first_lanes(tail_cols - from) : __mmask16(0); };
      word_dot(static_cast<uint64_t>(words[words_full]), _mm512_maskz_loadu_ps(lanes(0), xw),
               _mm512_maskz_loadu_ps(lanes(16), xw + 16), _mm512_maskz_loadu_ps(lanes(32), xw + 32),
               _mm512_maskz_loadu_ps(lanes(48), xw + 48));
    }
    a.out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
}

// 1 to 4 batch rows, given the column of every kept value (`columns`, 16 bits each; built
// by BitmaskWeight.column_index and passed by sparsekern.ops at low density): per 16 kept
// values one load of values and columns, then per batch row one gather of x and one FMA.
// Nothing is done per word or per piece of the mask, so the cost follows the kept values
// alone; the price is 2 more bytes streamed per kept value. Columns are clamped to K - 1:
// a raw call with columns that do not belong to the bitmask gets a wrong sum, never a read
// outside x.
template <typename VT, int B>
void bitmask_rows_by_columns(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  const __m512i last_col = _mm512_set1_epi32(static_cast<int>(a.K - 1));
  const VT* values = static_cast<const VT*>(a.values);
  const uint16_t* cols = reinterpret_cast<const uint16_t*>(a.columns);
  auto columns16 = [&](__m256i c16) { return _mm512_min_epu32(_mm512_cvtepu16_epi32(c16), last_col); };
  for (int64_t r = r0; r < r1; ++r) {
    const auto [start, end] = bitmask_kept_span(a, r);
    __m512 acc0[B], acc1[B];
    for (int b = 0; b < B; ++b) acc0[b] = acc1[b] = _mm512_setzero_ps();
    int64_t k = start;
    for (; k + 32 <= end; k += 32) {
      prefetch(values + k, kPrefetchBytes);
      prefetch(values + k + 16, kPrefetchBytes);
      prefetch(cols + k, kPrefetchBytes / 2);
      const __m512i c0 = columns16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + k)));
      const __m512i c1 = columns16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + k + 16)));
      const __m512 w0 = load16(values + k), w1 = load16(values + k + 16);
      for (int b = 0; b < B; ++b) {
        const float* xb = a.x + b * a.K;
        acc0[b] = _mm512_fmadd_ps(w0, _mm512_i32gather_ps(c0, xb, 4), acc0[b]);
        acc1[b] = _mm512_fmadd_ps(w1, _mm512_i32gather_ps(c1, xb, 4), acc1[b]);
      }
    }
    for (; k < end; k += 16) {
      const int cnt = static_cast<int>(std::min<int64_t>(end - k, 16));
      const __mmask16 lanes = first_lanes(cnt);
      const __m512i c0 = columns16(_mm256_maskz_loadu_epi16(lanes, cols + k));
      const __m512 w0 = load16_first(values + k, cnt);
      for (int b = 0; b < B; ++b) {
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, c0, a.x + b * a.K, 4);
        acc0[b] = _mm512_mask3_fmadd_ps(w0, xv, acc0[b], lanes);
      }
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b]));
  }
}

// 5 to 16 batch rows given the column index, x as lanes (xT [K][BP], BP = 8 or 16, lanes
// past B zero): per kept value one broadcast of the value and one FMA with its column's BP
// lanes of x, into eight accumulators in turn (each FMA waits on an L2 load of its x lanes:
// the lanes of all K columns are 128 or 256 KiB). Nothing is
// done per mask word, where the AVX2 kernel decodes every word's bytes at any density.
// Columns are clamped to K - 1, as in bitmask_rows_by_columns.
template <typename VT, int BP>
void bitmask_lanes_by_columns(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  using Vec = typename std::conditional<BP == 16, __m512, __m256>::type;
  auto fma = [](float w, const float* xc, Vec acc) {
    if constexpr (BP == 16) return _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(xc), acc);
    else return _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(xc), acc);
  };
  const VT* values = static_cast<const VT*>(a.values);
  const uint16_t* cols = reinterpret_cast<const uint16_t*>(a.columns);
  const uint32_t last_col = static_cast<uint32_t>(a.K - 1);
  auto col_lanes = [&](int64_t k) { return a.x + static_cast<int64_t>(std::min<uint32_t>(cols[k], last_col)) * BP; };
  for (int64_t r = r0; r < r1; ++r) {
    const auto [start, end] = bitmask_kept_span(a, r);
    Vec acc0{}, acc1{}, acc2{}, acc3{}, acc4{}, acc5{}, acc6{}, acc7{};
    int64_t k = start;
    for (; k + 8 <= end; k += 8) {
      prefetch(values + k, kPrefetchBytes);
      prefetch(cols + k, kPrefetchBytes / 2);
      acc0 = fma(static_cast<float>(values[k]), col_lanes(k), acc0);
      acc1 = fma(static_cast<float>(values[k + 1]), col_lanes(k + 1), acc1);
      acc2 = fma(static_cast<float>(values[k + 2]), col_lanes(k + 2), acc2);
      acc3 = fma(static_cast<float>(values[k + 3]), col_lanes(k + 3), acc3);
      acc4 = fma(static_cast<float>(values[k + 4]), col_lanes(k + 4), acc4);
      acc5 = fma(static_cast<float>(values[k + 5]), col_lanes(k + 5), acc5);
      acc6 = fma(static_cast<float>(values[k + 6]), col_lanes(k + 6), acc6);
      acc7 = fma(static_cast<float>(values[k + 7]), col_lanes(k + 7), acc7);
    }
    for (; k < end; ++k) acc0 = fma(static_cast<float>(values[k]), col_lanes(k), acc0);
    alignas(64) float sum[BP];
    if constexpr (BP == 16)
      _mm512_store_ps(sum, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)),
                                         _mm512_add_ps(_mm512_add_ps(acc4, acc5), _mm512_add_ps(acc6, acc7))));
    else
      _mm256_store_ps(sum, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)),
                                         _mm256_add_ps(_mm256_add_ps(acc4, acc5), _mm256_add_ps(acc6, acc7))));
    for (int64_t b = 0; b < a.B; ++b) a.out[b * a.O + r] = sum[b];
  }
}

// 2 to 8 batch rows, straight from the compressed row: per 16 columns one expanding
// load of the kept values, then per batch row one FMA with x loaded under the same mask.
// The cost follows the 16-column pieces (empty pairs of pieces are skipped).
template <typename VT, int B, bool Slack>
void bitmask_row_direct(const BitmaskRowsArgs& a, int64_t r) {
  const int64_t pieces = (a.K + 15) / 16;
  const int64_t* words = a.bitmask + r * a.words;
  const VT* v = static_cast<const VT*>(a.values) + a.offsets[r * a.tiles];
  __m512 acc[2][B];
  for (int b = 0; b < B; ++b) acc[0][b] = acc[1][b] = _mm512_setzero_ps();
  int64_t k = 0, p = 0;
  for (; p + 2 <= pieces; p += 2) {
    if ((p & 3) == 0) prefetch(v + k, kPrefetchBytes);
    if ((p & 31) == 0) prefetch(words + p / 4, kPrefetchBytes / 4);
    uint32_t both;
    std::memcpy(&both, reinterpret_cast<const uint8_t*>(words) + 2 * p, 4);
    if (!both) continue;
    const __mmask16 m0 = static_cast<__mmask16>(both), m1 = static_cast<__mmask16>(both >> 16);
    const __m512 w0 = expand_piece<Slack>(m0, v + k);
    k += _mm_popcnt_u32(m0);
    const __m512 w1 = expand_piece<Slack>(m1, v + k);
    k += _mm_popcnt_u32(m1);
    for (int b = 0; b < B; ++b) {
      const float* xc = a.x + b * a.K + 16 * p;
      acc[0][b] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, xc), acc[0][b]);
      acc[1][b] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, xc + 16), acc[1][b]);
    }
  }
  if (p < pieces) {
    const __mmask16 m0 = mask_piece(words, p);
    const __m512 w0 = expand16(m0, v + k);
    for (int b = 0; b < B; ++b)
      acc[0][b] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, a.x + b * a.K + 16 * p), acc[0][b]);
  }
  for (int b = 0; b < B; ++b) a.out[b * a.O + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][b], acc[1][b]));
}

template <typename VT, int B>
void bitmask_rows_direct(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (row_has_slack(a, r)) bitmask_row_direct<VT, B, true>(a, r);
    else bitmask_row_direct<VT, B, false>(a, r);
  }
}

template <typename VT>
void bitmask_rows_t(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.columns != nullptr && a.nnz > 0) {
    if (a.BP == 16) return bitmask_lanes_by_columns<VT, 16>(a, r0, r1);
    if (a.BP == 8) return bitmask_lanes_by_columns<VT, 8>(a, r0, r1);
    switch (a.B) {
      case 1: return bitmask_rows_by_columns<VT, 1>(a, r0, r1);
      case 2: return bitmask_rows_by_columns<VT, 2>(a, r0, r1);
      case 3: return bitmask_rows_by_columns<VT, 3>(a, r0, r1);
      case 4: return bitmask_rows_by_columns<VT, 4>(a, r0, r1);
      default: break;
    }
  }
  switch (a.B) {
    case 1:
      if (a.b1_indexed && a.nnz > 0) return bitmask_rows_b1_indexed<VT>(a, r0, r1);
      // Not bitmask_rows_direct<VT, 1>: the same scheme, but 3-4% slower at one row (50% kept,
      // three alternating runs, each faster with this one), and its own prefetch spacing.
      return bitmask_rows_b1<VT>(a, r0, r1);
    case 2: return bitmask_rows_direct<VT, 2>(a, r0, r1);
    case 3: return bitmask_rows_direct<VT, 3>(a, r0, r1);
    case 4: return bitmask_rows_direct<VT, 4>(a, r0, r1);
    case 5: return bitmask_rows_direct<VT, 5>(a, r0, r1);
    case 6: return bitmask_rows_direct<VT, 6>(a, r0, r1);
    case 7: return bitmask_rows_direct<VT, 7>(a, r0, r1);
    case 8: return bitmask_rows_direct<VT, 8>(a, r0, r1);
    default: break;
  }
  expanded_rows_times_x(a.x, a.B, a.K, a.out, a.O, r0, r1,
                        [&](int64_t r, float* row) { bitmask_row_dense_at<VT>(a, r, row); });
}

// ---- 2:4, large batches: weight-stationary kernel ------------------------------------------
// The AVX2 kernel of nm_gemm_impl.h (read its header for the scheme) with 16-lane vectors
// and x tiles of 64 batch lanes: per kept (row, slot) one offset load, one broadcast and
// four FMAs whose x operand is loaded from the tile (an L1 hit), 1.5 loads per FMA; the
// FMA count is half the dense GEMM's. Register block: 3 rows x 4 vectors, 12 accumulators.
constexpr int kW24Rows = 3;
constexpr int kW24Kt = 128;     // columns per K tile (64 kept slots per row); the x tile slice is 32 KiB
constexpr int kW24Chunk = 512;  // batch lanes per pass over a panel (8 tiles of 64)
constexpr int kW24Shift = 8;    // byte offset of column c in a tile: c * 64 lanes * 4 B

// The packers read each row of a panel in K-tile slices (a few hundred bytes per row and
// tile), one row block after another: too many streams for the hardware prefetcher, so
// every slice came from DRAM at full latency (a profile at 128 rows put most of the
// bitmask packer's time on its value loads). Each packer fetches the same rows' next slice
// while it packs this one; a whole panel's work passes before that slice is read.
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}


inline float value_f32(float v) { return v; }
inline float value_f32(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float value_f32(c10::Half v) { return _cvtsh_ss(v.x); }
// Four consecutive values as fp32 (one 128-bit store in the packers instead of four
// scalar copies).
inline __m128 load4_f32(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4_f32(const c10::BFloat16* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m128 load4_f32(const c10::Half* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// Rows [r0, r0 + rows) (rows <= 3; missing rows and slots: value 0 at the zero column K),
// slots [s0, s1) (s0 a multiple of 4), as quads of {int32 off[3][4]; float val[3][4]}.
template <typename VT>
void w24_pack(const Nm24GemmArgs& a, int64_t r0, int rows, int64_t s0, int64_t s1, int32_t* dst) {
  const Nm24SlotColumns& lut = nm24_slot_columns();
  const int32_t zero_col = static_cast<int32_t>(a.K << kW24Shift);
  int64_t q = 0;
  for (int64_t s = s0; s < s1; s += 4, ++q) {
    int32_t* o = dst + q * 24;
    float* w = reinterpret_cast<float*>(o + 12);
    for (int r = 0; r < kW24Rows; ++r) {
      if (r >= rows) {
        for (int t = 0; t < 4; ++t) { o[4 * r + t] = zero_col; w[4 * r + t] = 0.f; }
        continue;
      }
      const VT* v = static_cast<const VT*>(a.values) + (r0 + r) * a.kept;
      if (s == s0 && s1 < a.kept) {  // the next K tile's slice of this row
        prefetch_lines(v + s1, (s1 - s0) * static_cast<int64_t>(sizeof(VT)));
        _mm_prefetch(reinterpret_cast<const char*>(a.indices + (r0 + r) * a.idx_row_bytes + (s1 >> 2)), _MM_HINT_T0);
      }
      const uint8_t byte = a.indices[(r0 + r) * a.idx_row_bytes + (s >> 2)];
      if (s + 4 <= s1) {
        const __m128i cols = _mm_add_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[byte])),
                                           _mm_set1_epi32(static_cast<int32_t>(2 * s)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * r), _mm_slli_epi32(cols, kW24Shift));
        _mm_storeu_ps(w + 4 * r, load4_f32(v + s));
      } else {
        for (int t = 0; t < 4; ++t) {
          const bool in = s + t < s1;
          o[4 * r + t] = in ? static_cast<int32_t>((2 * s + lut.col[byte][t]) << kW24Shift) : zero_col;
          w[4 * r + t] = in ? value_f32(v[s + t]) : 0.f;
        }
      }
    }
  }
}

// The two quad kinds the core reads. PackedQuad: what w24_pack writes per call, int32
// offsets from the x tile's start (96 bytes). PanelQuad: Nm24Panels (nm24_panels.h), uint16
// offsets from the K tile's start, masked so that any bytes stay inside it (72 bytes).
struct PackedQuad {
  static constexpr int64_t kBytes = 96;
  static int32_t off(const uint8_t* q, int i) { return reinterpret_cast<const int32_t*>(q)[i]; }
  static const float* vals(const uint8_t* q) { return reinterpret_cast<const float*>(q + 48); }
};
struct PanelQuad {
  static constexpr int64_t kBytes = Nm24Panels::kQuadBytes;
  static int32_t off(const uint8_t* q, int i) { return reinterpret_cast<const uint16_t*>(q)[i] & Nm24Panels::kOffMask; }
  static const float* vals(const uint8_t* q) { return reinterpret_cast<const float*>(q + 24); }
};

// acc[r][16 v ..] (+)= sum over quads of val * xb[off + 64 v bytes]; acc is [3][64] floats,
// xb the x tile (PackedQuad) or its K tile (PanelQuad).
// Named accumulators, as in the AVX2 kernel, so GCC keeps them in registers.
template <int V, typename Q>
inline void w24_core(const uint8_t* pk, int64_t quads, const float* xt, float* acc, bool first) {
  constexpr int L = static_cast<int>(kG24Lanes512);
  __m512 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
#define SK_W24_LD(R, VV) c##R##VV = first || V <= VV ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + R * L + 16 * VV)
  SK_W24_LD(0, 0); SK_W24_LD(0, 1); SK_W24_LD(0, 2); SK_W24_LD(0, 3);
  SK_W24_LD(1, 0); SK_W24_LD(1, 1); SK_W24_LD(1, 2); SK_W24_LD(1, 3);
  SK_W24_LD(2, 0); SK_W24_LD(2, 1); SK_W24_LD(2, 2); SK_W24_LD(2, 3);
#undef SK_W24_LD
  const char* xb = reinterpret_cast<const char*>(xt);
#define SK_W24_ROW(R, T)                                                                   \
  {                                                                                        \
    const float* xp = reinterpret_cast<const float*>(xb + Q::off(pk, 4 * R + T));         \
    __asm__("" : "+r"(xp)); /* base+disp loads, no base+index: those un-laminate */        \
    const __m512 wb = _mm512_set1_ps(w[4 * R + T]);                                        \
    c##R##0 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xp), c##R##0);                           \
    if (V > 1) c##R##1 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xp + 16), c##R##1);           \
    if (V > 2) c##R##2 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xp + 32), c##R##2);           \
    if (V > 3) c##R##3 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xp + 48), c##R##3);           \
  }
  for (int64_t q = 0; q < quads; ++q, pk += Q::kBytes) {
    const float* w = Q::vals(pk);
    SK_W24_ROW(0, 0) SK_W24_ROW(1, 0) SK_W24_ROW(2, 0)
    SK_W24_ROW(0, 1) SK_W24_ROW(1, 1) SK_W24_ROW(2, 1)
    SK_W24_ROW(0, 2) SK_W24_ROW(1, 2) SK_W24_ROW(2, 2)
    SK_W24_ROW(0, 3) SK_W24_ROW(1, 3) SK_W24_ROW(2, 3)
  }
#undef SK_W24_ROW
#define SK_W24_ST(R, VV) if (V > VV) _mm512_storeu_ps(acc + R * L + 16 * VV, c##R##VV)
  SK_W24_ST(0, 0); SK_W24_ST(0, 1); SK_W24_ST(0, 2); SK_W24_ST(0, 3);
  SK_W24_ST(1, 0); SK_W24_ST(1, 1); SK_W24_ST(1, 2); SK_W24_ST(1, 3);
  SK_W24_ST(2, 0); SK_W24_ST(2, 1); SK_W24_ST(2, 2); SK_W24_ST(2, 3);
#undef SK_W24_ST
}

// One panel of output rows [r0, r1): for each pass over up to kW24Chunk batch lanes and
// each K tile, source(rr, nr, k0, k1, dst, quads) gives the quads (kind Q) of the row block
// starting at rr (nr <= 3 rows) for columns [k0, k1) and sets how many (at most
// kW24MaxQuads): a packer writes them at dst and returns dst, a pre-packed weight returns
// where they lie; then every x tile of the pass runs the core over every block.
constexpr int64_t kW24MaxQuads = kW24Kt / 4;  // a block row keeps at most kW24Kt values of a K tile
static_assert(Nm24Panels::kKt == kW24Kt && Nm24Panels::kBlockRows == kW24Rows && Nm24Panels::kRows <= 96,
              "the pre-packed layout follows this kernel's K tiles and row blocks");
template <typename Q, typename Source>
void w24_panel(int64_t B, int64_t K, int64_t O, const float* xT, float* out, int64_t r0, int64_t r1,
               const Source& source, int32_t* pack, float* acc) {
  constexpr int64_t L = kG24Lanes512;
  const int64_t rows = r1 - r0, blocks = (rows + kW24Rows - 1) / kW24Rows;
  const int64_t tiles = (B + L - 1) / L, chunk_tiles = kW24Chunk / L;
  int64_t quads[96 / kW24Rows];
  const uint8_t* where[96 / kW24Rows];
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk_tiles) {
    const int64_t t1 = t0 + chunk_tiles < tiles ? t0 + chunk_tiles : tiles;
    for (int64_t k0 = 0; k0 < K; k0 += kW24Kt) {
      const int64_t k1 = k0 + kW24Kt < K ? k0 + kW24Kt : K;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t rr = r0 + b * kW24Rows;
        uint8_t* dst = pack ? reinterpret_cast<uint8_t*>(pack + b * kW24MaxQuads * 24) : nullptr;  // none: pre-packed
        where[b] = source(rr, static_cast<int>(r1 - rr < kW24Rows ? r1 - rr : kW24Rows), k0, k1, dst, quads[b]);
      }
      for (int64_t t = t0; t < t1; ++t) {
        // PanelQuad offsets start at the K tile, PackedQuad ones at the x tile.
        const float* xt = xT + t * (K + 1) * L + (std::is_same<Q, PanelQuad>::value ? k0 * L : 0);
        const int64_t lanes = B - t * L;
        const int V = lanes >= L ? 4 : static_cast<int>((lanes + 15) / 16);
        float* at = acc + (t - t0) * blocks * kW24Rows * L;
        for (int64_t b = 0; b < blocks; ++b) {
          float* ab = at + b * kW24Rows * L;
          switch (V) {
            case 4: w24_core<4, Q>(where[b], quads[b], xt, ab, k0 == 0); break;
            case 3: w24_core<3, Q>(where[b], quads[b], xt, ab, k0 == 0); break;
            case 2: w24_core<2, Q>(where[b], quads[b], xt, ab, k0 == 0); break;
            default: w24_core<1, Q>(where[b], quads[b], xt, ab, k0 == 0); break;
          }
        }
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lanes = B - t * L < L ? B - t * L : L;
      avx2::lanes_to_rows(acc + (t - t0) * blocks * kW24Rows * L, rows, L, lanes, out + t * L * O + r0, O);
    }
  }
}

// Every calling thread takes panels from the shared counter until none is left, with one
// set of buffers per call (see the AVX2 kernel for why not per panel).
template <typename Q, typename Source>
void w24_panels(int64_t B, int64_t K, int64_t O, const float* xT, float* out, int64_t panel_rows, int64_t panels,
                int64_t* next_panel, const Source& source) {
  constexpr int64_t L = kG24Lanes512;
  const int64_t blocks = (panel_rows + kW24Rows - 1) / kW24Rows;
  const int64_t tiles = (B + L - 1) / L;
  const int64_t chunk_tiles = tiles < kW24Chunk / L ? tiles : kW24Chunk / L;
  // The packers' buffer (a pre-packed weight needs none).
  int32_t* pack = std::is_same<Q, PackedQuad>::value
                      ? static_cast<int32_t*>(std::aligned_alloc(64, blocks * kW24MaxQuads * 96)) : nullptr;
  float* acc = static_cast<float*>(std::aligned_alloc(64, chunk_tiles * blocks * kW24Rows * L * sizeof(float)));
  for (;;) {
    const int64_t p = __atomic_fetch_add(next_panel, 1, __ATOMIC_RELAXED);
    if (p >= panels) break;
    const int64_t r0 = p * panel_rows, r1 = r0 + panel_rows < O ? r0 + panel_rows : O;
    w24_panel<Q>(B, K, O, xT, out, r0, r1, source, pack, acc);
  }
  std::free(acc);
  std::free(pack);
}

// The kernel's packers as a w24_panel source: the quads are written at dst.
template <typename PackBlock>
auto packed_source(const PackBlock& pack_block) {
  return [&pack_block](int64_t rr, int nr, int64_t k0, int64_t k1, uint8_t* dst, int64_t& quads) -> const uint8_t* {
    quads = pack_block(rr, nr, k0, k1, reinterpret_cast<int32_t*>(dst));
    return dst;
  };
}

template <typename Args, typename PackBlock>
void w24_run(const Args& a, const PackBlock& pack_block) {
  const auto source = packed_source(pack_block);
  if (a.chunked.lanes) {  // ws_chunks_impl.h, with this kernel's panel
    constexpr int64_t L = kG24Lanes512;
    const int64_t blocks = (a.panel_rows + kW24Rows - 1) / kW24Rows;
    const int64_t tiles = a.chunked.chunk_lanes / L < kW24Chunk / L ? a.chunked.chunk_lanes / L : kW24Chunk / L;
    int32_t* pack = static_cast<int32_t*>(std::aligned_alloc(64, blocks * kW24MaxQuads * 96));
    float* acc = static_cast<float*>(std::aligned_alloc(64, tiles * blocks * kW24Rows * L * sizeof(float)));
    ws_chunks(a.K, a.O, L, a.panel_rows, a.chunked, a.out,
              [&](int64_t lanes, const float* xt, float* out, int64_t r0, int64_t r1) {
                w24_panel<PackedQuad>(lanes, a.K, a.O, xt, out, r0, r1, source, pack, acc);
              });
    std::free(acc);
    std::free(pack);
  } else {
    w24_panels<PackedQuad>(a.B, a.K, a.O, a.xT, a.out, a.panel_rows, a.panels, a.next_panel, source);
  }
}

// The pre-packed weight (Nm24Panels, nm24_panels.h) as a w24_panel source. Panels of the
// kernel lie inside the layout's panels (nm24_gemm_cpu picks panel rows dividing
// Nm24Panels::kRows; the chunk order takes 96, or all of O <= 96), so a panel's blocks of one
// K tile are contiguous: at its first block the next K tile's are fetched (one stream, read
// while this K tile runs).
void w24_run_panels(const Nm24GemmArgs& a) {
  const auto source = [&a](int64_t rr, int nr, int64_t k0, int64_t k1, uint8_t*, int64_t& quads) {
    const int64_t kt = k0 / kW24Kt;
    const uint8_t* where = a.prepacked + Nm24Panels::block_offset(a.O, a.K, rr, kt);
    const int64_t panel_end = std::min(a.O, (rr / a.panel_rows + 1) * a.panel_rows);
    if (rr % a.panel_rows == 0 && k1 < a.K)
      prefetch_lines(a.prepacked + Nm24Panels::block_offset(a.O, a.K, rr, kt + 1),
                     Nm24Panels::blocks(panel_end - rr) * Nm24Panels::kBlockBytes);
    (void)nr;
    quads = (k1 / 2 - k0 / 2 + 3) / 4;
    return where;
  };
  if (a.chunked.lanes) {  // ws_chunks_impl.h, each chunk's x tiles with the layout's extra columns
    constexpr int64_t L = kG24Lanes512;
    const int64_t blocks = (a.panel_rows + kW24Rows - 1) / kW24Rows;
    const int64_t tiles = a.chunked.chunk_lanes / L < kW24Chunk / L ? a.chunked.chunk_lanes / L : kW24Chunk / L;
    float* acc = static_cast<float*>(std::aligned_alloc(64, tiles * blocks * kW24Rows * L * sizeof(float)));
    ws_chunks(a.K, a.O, L, a.panel_rows, a.chunked, a.out,
              [&](int64_t lanes, const float* xt, float* out, int64_t r0, int64_t r1) {
                w24_panel<PanelQuad>(lanes, a.K, a.O, xt, out, r0, r1, source, nullptr, acc);
              },
              Nm24Panels::x_extra_cols(a.K));
    std::free(acc);
  } else {
    w24_panels<PanelQuad>(a.B, a.K, a.O, a.xT, a.out, a.panel_rows, a.panels, a.next_panel, source);
  }
}

template <typename VT>
struct W24Panels {
  static void run(const Nm24GemmArgs& a) {
    if (a.prepacked) return w24_run_panels(a);
    w24_run(a, [&](int64_t rr, int nr, int64_t k0, int64_t k1, int32_t* dst) {
      w24_pack<VT>(a, rr, nr, k0 / 2, k1 / 2, dst);
      return (k1 / 2 - k0 / 2 + 3) / 4;
    });
  }
};

// Bitmask rows [r0, r0 + rows) for columns [k0, k1) (k0 a multiple of kW24Kt, so of 64):
// each row's kept values in column order, rows padded to the block's longest with value 0
// at the zero column K. Returns the quads written. Vectorised (a compress of the column
// numbers per 16-column piece, the values copied as they lie): at 128 batch rows a scalar
// walk over the set bits cost as much as the multiply-adds it feeds.
template <typename VT>
int64_t wbm_pack(const BitmaskGemmArgs& a, int64_t r0, int rows, int64_t k0, int64_t k1, int32_t* dst) {
  constexpr int kSlack = 32;  // whole 16-lane stores past a row's last entry
  alignas(64) int32_t offs[kW24Rows][kW24Kt + kSlack];
  alignas(64) float vals[kW24Rows][kW24Kt + kSlack];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int count[kW24Rows] = {};
  int most = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t* words = a.bitmask + (r0 + r) * a.words;
    // Position of the row's first value at column k0: the offset of its 512-column tile,
    // plus the kept values of the words between.
    const int64_t w0 = k0 / 64, tile_w = (k0 / kBitmaskTileCols) * kBitmaskTileWords;
    int64_t pos = a.offsets[(r0 + r) * a.tiles + k0 / kBitmaskTileCols];
    for (int64_t wi = tile_w; wi < w0; ++wi) pos += _mm_popcnt_u64(static_cast<uint64_t>(words[wi]));
    int c = 0;
    for (int64_t col = k0; col < k1; col += 16) {
      const __mmask16 m = mask_piece(words, col / 16);
      const __m512i cols = _mm512_slli_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(col))), kW24Shift);
      _mm512_storeu_si512(offs[r] + c, _mm512_maskz_compress_epi32(m, cols));
      c += _mm_popcnt_u32(m);
    }
    const VT* v = static_cast<const VT*>(a.values) + pos;
    if (k1 < a.K) {  // the next K tile's slice of this row: about as many values, and its mask words
      prefetch_lines(v + c, (c + 16) * static_cast<int64_t>(sizeof(VT)));
      _mm_prefetch(reinterpret_cast<const char*>(words + k1 / 64), _MM_HINT_T0);
    }
    for (int j = 0; j < c; j += 16)
      _mm512_storeu_ps(vals[r] + j, c - j >= 16 ? load16(v + j) : load16_first(v + j, c - j));
    count[r] = c;
    most = c > most ? c : most;
  }
  const int64_t quads = (most + 3) / 4;
  const __m512i zero_col = _mm512_set1_epi32(static_cast<int32_t>(a.K << kW24Shift));
  for (int r = 0; r < kW24Rows; ++r)
    for (int64_t j = r < rows ? count[r] : 0; j < 4 * quads; j += 16) {
      _mm512_storeu_si512(offs[r] + j, zero_col);
      _mm512_storeu_ps(vals[r] + j, _mm512_setzero_ps());
    }
  for (int64_t q = 0; q < quads; ++q) {
    int32_t* o = dst + q * 24;
    for (int r = 0; r < kW24Rows; ++r) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * r), _mm_loadu_si128(reinterpret_cast<const __m128i*>(offs[r] + 4 * q)));
      _mm_storeu_ps(reinterpret_cast<float*>(o + 12) + 4 * r, _mm_loadu_ps(vals[r] + 4 * q));
    }
  }
  return quads;
}

template <typename VT>
struct WbmPanels {
  static void run(const BitmaskGemmArgs& a) {
    w24_run(a, [&](int64_t rr, int nr, int64_t k0, int64_t k1, int32_t* dst) {
      return wbm_pack<VT>(a, rr, nr, k0, k1, dst);
    });
  }
};

template <template <typename> class F, typename... Args>
void by_dtype(c10::ScalarType t, Args&&... args) {
  switch (t) {
    case c10::kFloat: return F<float>::run(args...);
    case c10::kBFloat16: return F<c10::BFloat16>::run(args...);
    case c10::kHalf: return F<c10::Half>::run(args...);
    default: break;
  }
}

template <typename VT>
struct NmRows {
  static void run(const NmRowsArgs& a, int64_t r0, int64_t r1) {
    if (a.n == 2 && a.m == 4) nm24_rows_t<VT>(a, r0, r1);
    else nm_rows_t<VT>(a, r0, r1);
  }
};
template <typename VT>
struct BitmaskRows {
  static void run(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { bitmask_rows_t<VT>(a, r0, r1); }
};
template <typename VT>
struct NmDense {
  static void run(const NmRowsArgs& a, int64_t r0, int64_t r1, float* dst) {
    for (int64_t r = r0; r < r1; ++r) {
      const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
      const uint8_t* ix = a.indices + r * a.idx_row_bytes;
      if (a.n == 2 && a.m == 4) nm24_row_dense(v, ix, a.kept, a.idx_row_bytes, a.K, dst + (r - r0) * a.K);
      else nm_row_dense_at<VT>(a, r, dst + (r - r0) * a.K);
    }
  }
};
template <typename VT>
struct BitmaskDense {
  static void run(const BitmaskRowsArgs& a, int64_t r0, int64_t r1, float* dst) {
    for (int64_t r = r0; r < r1; ++r) bitmask_row_dense_at<VT>(a, r, dst + (r - r0) * a.K);
  }
};

}  // namespace

void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<NmRows>(a.dtype, a, r0, r1); }
void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<BitmaskRows>(a.dtype, a, r0, r1); }
void nm_dense_rows(const NmRowsArgs& a, int64_t r0, int64_t r1, float* dst) {
  by_dtype<NmDense>(a.dtype, a, r0, r1, dst);
}
void bitmask_dense_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1, float* dst) {
  by_dtype<BitmaskDense>(a.dtype, a, r0, r1, dst);
}
void nm24_gemm(const Nm24GemmArgs& a) { by_dtype<W24Panels>(a.dtype, a); }
void bitmask_gemm(const BitmaskGemmArgs& a) { by_dtype<WbmPanels>(a.dtype, a); }
namespace {
struct Fma16 {
  using V = __m512;
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
};
}  // namespace
float fma_probe(int64_t iters) { return fma_probe_chains<Fma16>(iters); }

}  // namespace avx512
}  // namespace cpu
}  // namespace sparsekern
#pragma GCC pop_options
#else
// Without GCC's target pragma there are no AVX-512 kernels and cpu_has_avx512() is false;
// the entry points exist for the linker only and are never called.
namespace sparsekern {
namespace cpu {
namespace avx512 {
void nm_rows(const NmRowsArgs&, int64_t, int64_t) { std::abort(); }
void bitmask_rows(const BitmaskRowsArgs&, int64_t, int64_t) { std::abort(); }
void nm_dense_rows(const NmRowsArgs&, int64_t, int64_t, float*) { std::abort(); }
void bitmask_dense_rows(const BitmaskRowsArgs&, int64_t, int64_t, float*) { std::abort(); }
void nm24_gemm(const Nm24GemmArgs&) { std::abort(); }
void bitmask_gemm(const BitmaskGemmArgs&) { std::abort(); }
float fma_probe(int64_t) { std::abort(); }
}  // namespace avx512
}  // namespace cpu
}  // namespace sparsekern
#endif
