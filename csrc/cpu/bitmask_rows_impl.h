// Bitmask rows: the direct kernels of bitmask_linear (batch tiles of at most
// kDirectMaxBatch rows), one output row at a time. Compiled twice, see
// rows_common_impl.h for the rules. The values of row r start at offsets[r, 0] and
// follow in column order.
//   AVX2:     one batch row: each mask byte expands its values by a permute (no
//             gathers); more rows: mask bytes become column numbers through a table,
//             then broadcast FMAs (xT, B = 5..16) or gathers from row-major x (B = 2..4).
//   portable: set bits walked one by one, then the same two multiply-add shapes.
#include "rows_common_impl.h"

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

#ifdef SK_AVX2
// Broadcast kernel (B = 5..16): one weight times a BP-lane column of xT, with four
// independent accumulator chains (FMA latency is 4-5 cycles, throughput 2 per cycle).
template <int BP, typename VT>
inline void bcast_chunk_avx2(const int32_t* cols, const VT* w, int cnt, const float* xT, __m256 (&acc)[4][BP / 8]) {
  int j = 0;
  for (; j + 4 <= cnt; j += 4) {
    for (int u = 0; u < 4; ++u) {
      const __m256 wv = _mm256_set1_ps(to_f32(w[j + u]));
      const float* xr = xT + static_cast<int64_t>(cols[j + u]) * BP;
      for (int h = 0; h < BP / 8; ++h) acc[u][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * h), acc[u][h]);
    }
  }
  for (; j < cnt; ++j) {
    const __m256 wv = _mm256_set1_ps(to_f32(w[j]));
    const float* xr = xT + static_cast<int64_t>(cols[j]) * BP;
    for (int h = 0; h < BP / 8; ++h) acc[0][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * h), acc[0][h]);
  }
}

template <int BP>
inline void bcast_store(__m256 (&acc)[4][BP / 8], int64_t B, float* out, int64_t O, int64_t r) {
  alignas(32) float tmp[BP];
  for (int h = 0; h < BP / 8; ++h)
    _mm256_store_ps(tmp + 8 * h, _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[1][h]), _mm256_add_ps(acc[2][h], acc[3][h])));
  for (int64_t b = 0; b < B; ++b) out[b * O + r] = tmp[b];
}

// Gather kernel (B = 2..kRowMajorMaxBatch): eight kept values at once, their columns
// gathered from x.
template <int B, typename VT>
inline void gather_chunk_avx2(const int32_t* cols, const VT* w, int cnt, const float* x, int64_t K,
                              __m256 (&acc)[B], float (&tail)[B]) {
  int j = 0;
  for (; j + 8 <= cnt; j += 8) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j));
    const __m256 wv = load8(w + j);
    for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(wv, _mm256_i32gather_ps(x + b * K, c, 4), acc[b]);
  }
  for (; j < cnt; ++j)
    for (int b = 0; b < B; ++b) tail[b] += to_f32(w[j]) * x[b * K + cols[j]];
}

// Each mask byte becomes up to 8 column numbers through a 256-entry table (no
// data-dependent branches), in chunks; the chunk's values are contiguous in `values`,
// so the multiply loops read them in place.
struct ByteLut {
  alignas(16) uint8_t pos[256][8];
  uint8_t cnt[256];
  ByteLut() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      for (int i = 0; i < 8; ++i) {
        pos[b][i] = 0;
        if (b >> i & 1) pos[b][c++] = static_cast<uint8_t>(i);
      }
      cnt[b] = static_cast<uint8_t>(c);
    }
  }
};
const ByteLut& byte_lut() {
  static const ByteLut lut;
  return lut;
}

// BP > 0: broadcast kernel on xT; BP == 0: gather kernel on row-major x with B rows.
template <typename VT, int BP, int B>
void bitmask_rows_avx2(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  const ByteLut& lut = byte_lut();
  // Fewer than kChunk columns wait before a word, which adds at most 64, and each byte
  // stores 8 lanes however few of them count.
  alignas(64) int32_t cols[kChunk + 64 + 8];
  const VT* vals = static_cast<const VT*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    int64_t k = a.offsets[r * a.tiles];
    __m256 accb[4][BP > 0 ? BP / 8 : 1];
    __m256 accr[B > 0 ? B : 1];
    float tail[B > 0 ? B : 1] = {};
    for (auto& u : accb)
      for (auto& h : u) h = _mm256_setzero_ps();
    for (auto& h : accr) h = _mm256_setzero_ps();
    int cnt = 0;
    for (int64_t wi = 0; wi < a.words; ++wi) {
      const uint64_t bits = static_cast<uint64_t>(words[wi]);
      if (!bits) continue;
      for (int t = 0; t < 8; ++t) {
        const unsigned byte = (bits >> (8 * t)) & 0xFF;
        const __m256i c = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lut.pos[byte]))),
                                           _mm256_set1_epi32(static_cast<int>(wi * 64 + 8 * t)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + cnt), c);
        cnt += lut.cnt[byte];
      }
      if (cnt >= kChunk) {
        if constexpr (BP > 0) bcast_chunk_avx2<BP>(cols, vals + k, cnt, a.x, accb);
        else gather_chunk_avx2<B>(cols, vals + k, cnt, a.x, a.K, accr, tail);
        k += cnt;
        cnt = 0;
      }
    }
    if constexpr (BP > 0) {
      bcast_chunk_avx2<BP>(cols, vals + k, cnt, a.x, accb);
      bcast_store<BP>(accb, a.B, a.out, a.O, r);
    } else {
      gather_chunk_avx2<B>(cols, vals + k, cnt, a.x, a.K, accr, tail);
      for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(accr[b]) + tail[b];
    }
  }
}

// One batch row, expanding per mask byte: the 8 values from the row's next kept one are
// loaded as they lie and a permute from a 256-entry table puts value rank(j) into lane j;
// the table entry's sign bits (set in the kept lanes) then zero the other lanes of the
// weights and of x (an AND, or a masked load in the word that holds K, so x is never read
// past K), so an inf or NaN in an unkept column or a neighbouring row's value stays out.
// Its cost follows the bytes, not the kept values, but it has no gathers and no scalar
// step. Against the gather kernel below (4096x4096 fp32, 2 threads, weights rotated,
// SPARSEKERN_CPU_ISA=avx2 and MKL pinned to AVX2 on an AVX-512 Xeon, interleaved in one
// process), x dense: 50% kept 0.75 against 0.50, 30% 0.97-1.03 against 0.70-0.75, 10%
// 1.67-1.75 against 1.30-1.45. Still about 8 cycles a byte; where it loses, the layers'
// measured dispatch keeps dense.
struct ExpandByteLut {
  alignas(32) int32_t lanes[256][8];
  ExpandByteLut() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        const bool kept = b >> j & 1;
        lanes[b][j] = kept ? static_cast<int32_t>(0x80000000u | static_cast<uint32_t>(rank++)) : 0;
      }
    }
  }
};
const ExpandByteLut& expand_byte_lut() {
  static const ExpandByteLut lut;
  return lut;
}

// The first cnt (<= 8) values as fp32, zeros after; reads only those.
template <typename VT>
inline __m256 first8(const VT* p, int cnt) {
  alignas(32) float buf[8] = {};
  for (int j = 0; j < cnt; ++j) buf[j] = to_f32(p[j]);
  return _mm256_load_ps(buf);
}

// Slack: 8 values are readable from anywhere in the row (bitmask_row_has_slack); without
// it (the last rows of the weight) the byte's values are copied to a buffer first.
template <typename VT, bool Slack>
float bitmask_row_b1_avx2(const int64_t* words, int64_t nwords, const VT* v, const float* x, int64_t K) {
  const ExpandByteLut& lut = expand_byte_lut();
  // One accumulator per byte of the word: eight independent FMA chains.
  __m256 acc[8];
  for (auto& h : acc) h = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t wi = 0; wi < nwords; ++wi) {
    uint64_t bits = static_cast<uint64_t>(words[wi]);
    // Columns past K (bits no valid bitmask sets) never count, and in the word that holds
    // K the x loads are masked (x may end at K on the edge of a mapped page).
    const bool last = K - 64 * wi < 64;
    if (last) bits &= (uint64_t{1} << (K - 64 * wi)) - 1;
    if (!bits) continue;
    const float* xw = x + 64 * wi;
    for (int t = 0; t < 8; ++t) {  // every byte, kept or not: no branch to mispredict
      const unsigned byte = (bits >> (8 * t)) & 0xFF;
      const __m256i e = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.lanes[byte]));
      const int cnt = _mm_popcnt_u32(byte);
      const __m256 w8 = Slack ? load8(v + k) : first8(v + k, cnt);
      const __m256 keep = _mm256_castsi256_ps(_mm256_srai_epi32(e, 31));
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(w8, e), keep);
      const __m256 xv = last ? _mm256_maskload_ps(xw + 8 * t, e) : _mm256_and_ps(_mm256_loadu_ps(xw + 8 * t), keep);
      acc[t] = _mm256_fmadd_ps(w, xv, acc[t]);
      k += cnt;
    }
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
                             _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]))));
}

// 1 to 4 batch rows given the column of every kept value (`columns`, 16 bits each, built by
// BitmaskWeight.column_index and passed by sparsekern.ops at low density, as for the
// AVX-512 kernel of the same name): per 16 kept values two loads of values and columns, then
// per batch row two gathers of x and two FMAs. The cost follows the kept values, not the
// mask words. Columns are clamped to K - 1: a raw call with columns that do not belong to
// the bitmask gets a wrong sum, never a read outside x.
template <typename VT, int B>
void bitmask_rows_by_columns_avx2(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  const __m256i last_col = _mm256_set1_epi32(static_cast<int>(a.K - 1));
  const VT* values = static_cast<const VT*>(a.values);
  const uint16_t* cols = reinterpret_cast<const uint16_t*>(a.columns);
  auto columns8 = [&](const uint16_t* c) {
    return _mm256_min_epu32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))), last_col);
  };
  for (int64_t r = r0; r < r1; ++r) {
    const auto [start, end] = bitmask_kept_span(a, r);
    __m256 acc0[B], acc1[B];
    for (int b = 0; b < B; ++b) acc0[b] = acc1[b] = _mm256_setzero_ps();
    int64_t k = start;
    for (; k + 16 <= end; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(values + k) + 4096, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(cols + k) + 2048, _MM_HINT_T0);
      const __m256i c0 = columns8(cols + k), c1 = columns8(cols + k + 8);
      const __m256 w0 = load8(values + k), w1 = load8(values + k + 8);
      for (int b = 0; b < B; ++b) {
        const float* xb = a.x + b * a.K;
        acc0[b] = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(xb, c0, 4), acc0[b]);
        acc1[b] = _mm256_fmadd_ps(w1, _mm256_i32gather_ps(xb, c1, 4), acc1[b]);
      }
    }
    float tail[B] = {};
    for (; k < end; ++k) {
      const int64_t c = cols[k] < a.K ? cols[k] : a.K - 1;
      for (int b = 0; b < B; ++b) tail[b] += to_f32(values[k]) * a.x[b * a.K + c];
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(_mm256_add_ps(acc0[b], acc1[b])) + tail[b];
  }
}

template <typename VT>
void bitmask_rows_b1_avx2(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    const VT* v = static_cast<const VT*>(a.values) + a.offsets[r * a.tiles];
    a.out[r] = bitmask_row_has_slack(a, r, 8) ? bitmask_row_b1_avx2<VT, true>(words, a.words, v, a.x, a.K)
                                              : bitmask_row_b1_avx2<VT, false>(words, a.words, v, a.x, a.K);
  }
}

template <typename VT>
void bitmask_rows_dispatch(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.BP == 8) return bitmask_rows_avx2<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return bitmask_rows_avx2<VT, 16, 0>(a, r0, r1);
  if (a.columns != nullptr && a.nnz > 0) {
    switch (a.B) {
      case 1: return bitmask_rows_by_columns_avx2<VT, 1>(a, r0, r1);
      case 2: return bitmask_rows_by_columns_avx2<VT, 2>(a, r0, r1);
      case 3: return bitmask_rows_by_columns_avx2<VT, 3>(a, r0, r1);
      case 4: return bitmask_rows_by_columns_avx2<VT, 4>(a, r0, r1);
      default: break;
    }
  }
  switch (a.B) {
    case 1: return bitmask_rows_b1_avx2<VT>(a, r0, r1);
    case 2: return bitmask_rows_avx2<VT, 0, 2>(a, r0, r1);
    case 3: return bitmask_rows_avx2<VT, 0, 3>(a, r0, r1);
    default: return bitmask_rows_avx2<VT, 0, 4>(a, r0, r1);
  }
}
#else
// ---- Portable ----------------------------------------------------------------------------
// Walks the set bits of each 64-bit word (count trailing zeros, clear lowest bit).
template <typename VT, int BP, int BR>
void bitmask_rows_t(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  // Fewer than kChunk columns wait before a word, which adds at most 64.
  alignas(64) int32_t cols[kChunk + 64];
  alignas(64) float w[kChunk + 64];
  const VT* vals = static_cast<const VT*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    int64_t k = a.offsets[r * a.tiles];
    float accb[4][BP > 0 ? BP : 1] = {};
    float accr[2][kRowMajorMaxBatch] = {};
    int cnt = 0;
    auto flush = [&]() {
      if constexpr (BP > 0) bcast_chunk<BP>(cols, w, cnt, a.x, accb);
      else rowmajor_chunk<BR>(cols, w, cnt, a.x, a.K, accr);
      cnt = 0;
    };
    for (int64_t wi = 0; wi < a.words; ++wi) {
      uint64_t bits = static_cast<uint64_t>(words[wi]);
      const int32_t base = static_cast<int32_t>(wi * 64);
      while (bits) {
        cols[cnt] = base + __builtin_ctzll(bits);
        w[cnt] = to_f32(vals[k++]);
        ++cnt;
        bits &= bits - 1;
      }
      if (cnt >= kChunk) flush();
    }
    if (cnt) flush();
    if constexpr (BP > 0) {
      for (int64_t b = 0; b < a.B; ++b) a.out[b * a.O + r] = (accb[0][b] + accb[1][b]) + (accb[2][b] + accb[3][b]);
    } else {
      for (int64_t b = 0; b < BR; ++b) a.out[b * a.O + r] = accr[0][b] + accr[1][b];
    }
  }
}

template <typename VT>
void bitmask_rows_dispatch(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.BP == 8) return bitmask_rows_t<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return bitmask_rows_t<VT, 16, 0>(a, r0, r1);
  switch (a.B) {
    case 1: return bitmask_rows_t<VT, 0, 1>(a, r0, r1);
    case 2: return bitmask_rows_t<VT, 0, 2>(a, r0, r1);
    case 3: return bitmask_rows_t<VT, 0, 3>(a, r0, r1);
    default: return bitmask_rows_t<VT, 0, 4>(a, r0, r1);
  }
}
#endif

template <typename VT>
struct BitmaskF {
  static void run(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { bitmask_rows_dispatch<VT>(a, r0, r1); }
};

}  // namespace

void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<BitmaskF>(a.dtype, a, r0, r1); }

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
