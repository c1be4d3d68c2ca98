// Included by sparse_rows_avx2.cpp and sparse_rows_generic.cpp after their standard
// headers; SK_ISA_NS names the namespace (avx2 / generic) and SK_AVX2 enables the
// intrinsics paths. No headers may be included below this point in those files: a
// header pulled in under `#pragma GCC target` would give AVX2 versions of shared
// inline functions and break the generic build at link time (one definition rule).
#ifndef SK_ISA_NS
#error "define SK_ISA_NS before including sparse_rows_impl.h"
#endif

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {

namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
#ifdef SK_AVX2
inline float to_f32(c10::Half v) { return _cvtsh_ss(v.x); }
#else
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
#endif

// Decoded chunk of one output row: absolute columns and fp32 weights of up to kChunk
// kept elements. Decoding first, then a tight multiply-add loop over the chunk, keeps
// the index arithmetic out of the dependent accumulator chains.
constexpr int kChunk = 64;

// acc[u][b] += w[j] * xT[col[j]][b] for the chunk, four independent accumulators so
// that consecutive multiply-adds do not wait on each other's latency.
template <int BP>
inline void bcast_chunk(const int32_t* cols, const float* w, int cnt, const float* xT, float (&acc)[4][BP]) {
  int j = 0;
  for (; j + 4 <= cnt; j += 4) {
    const float* x0 = xT + static_cast<int64_t>(cols[j]) * BP;
    const float* x1 = xT + static_cast<int64_t>(cols[j + 1]) * BP;
    const float* x2 = xT + static_cast<int64_t>(cols[j + 2]) * BP;
    const float* x3 = xT + static_cast<int64_t>(cols[j + 3]) * BP;
    const float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
    for (int b = 0; b < BP; ++b) {
      acc[0][b] += w0 * x0[b];
      acc[1][b] += w1 * x1[b];
      acc[2][b] += w2 * x2[b];
      acc[3][b] += w3 * x3[b];
    }
  }
  for (; j < cnt; ++j) {
    const float* xr = xT + static_cast<int64_t>(cols[j]) * BP;
    for (int b = 0; b < BP; ++b) acc[0][b] += w[j] * xr[b];
  }
}

// Same for row-major x with a handful of batch rows (B <= kRowMajorMaxBatch).
template <int B>
inline void rowmajor_chunk(const int32_t* cols, const float* w, int cnt, const float* x, int64_t K,
                           float (&acc)[2][kRowMajorMaxBatch]) {
  int j = 0;
  for (; j + 2 <= cnt; j += 2) {
    for (int b = 0; b < B; ++b) {
      acc[0][b] += w[j] * x[b * K + cols[j]];
      acc[1][b] += w[j + 1] * x[b * K + cols[j + 1]];
    }
  }
  for (; j < cnt; ++j)
    for (int b = 0; b < B; ++b) acc[0][b] += w[j] * x[b * K + cols[j]];
}

inline int nm_index_at(const uint8_t* ix, int64_t s, int bits) {
  return bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15;
}

// Decodes kept slots [s0, s0+cnt) of one N:M row into columns and fp32 weights.
template <typename VT>
inline void nm_decode(const VT* v, const uint8_t* ix, int64_t s0, int cnt, int64_t n, int64_t m, int bits,
                      int32_t* cols, float* w) {
  int64_t g = s0 / n, t = s0 % n;
  for (int j = 0; j < cnt; ++j) {
    const int64_t s = s0 + j;
    cols[j] = static_cast<int32_t>(g * m + nm_index_at(ix, s, bits));
    w[j] = to_f32(v[s]);
    if (++t == n) { t = 0; ++g; }
  }
}

// Generic N:M rows: decode chunks, then broadcast (BP lanes) or row-major (B <= 4) FMAs.
template <typename VT, int BP, int BR>
void nm_rows_t(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const int bits = a.m == 4 ? 2 : 4;
  alignas(64) int32_t cols[kChunk];
  alignas(64) float w[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    if constexpr (BP > 0) {
      float acc[4][BP] = {};
      for (int64_t s0 = 0; s0 < a.kept; s0 += kChunk) {
        const int cnt = static_cast<int>((a.kept - s0 < kChunk ? a.kept - s0 : kChunk));
        nm_decode(v, ix, s0, cnt, a.n, a.m, bits, cols, w);
        bcast_chunk<BP>(cols, w, cnt, a.x, acc);
      }
      for (int64_t b = 0; b < a.B; ++b) a.out[b * a.O + r] = (acc[0][b] + acc[1][b]) + (acc[2][b] + acc[3][b]);
    } else {
      float acc[2][kRowMajorMaxBatch] = {};
      for (int64_t s0 = 0; s0 < a.kept; s0 += kChunk) {
        const int cnt = static_cast<int>((a.kept - s0 < kChunk ? a.kept - s0 : kChunk));
        nm_decode(v, ix, s0, cnt, a.n, a.m, bits, cols, w);
        rowmajor_chunk<BR>(cols, w, cnt, a.x, a.K, acc);
      }
      for (int64_t b = 0; b < BR; ++b) a.out[b * a.O + r] = acc[0][b] + acc[1][b];
    }
  }
}

#ifdef SK_AVX2
// ---- 2:4 fast path for B <= 4, row-major x -------------------------------------------
// Eight kept values cover 16 columns (4 groups). One index byte holds 4 slots = 2
// groups; kLut24[byte] gives the 4 source lanes (0..7) of those slots within the 8
// columns the byte covers. Lanes 0-3 gather from x[c0, c0+8) and lanes 4-7 from
// x[c0+8, c0+16) with one permute each, then a blend: no gathers, no scalar decode.
struct Lut24 {
  alignas(16) int32_t lanes[256][4];
  Lut24() {
    for (int byte = 0; byte < 256; ++byte)
      for (int t = 0; t < 4; ++t) lanes[byte][t] = (t / 2) * 4 + ((byte >> (2 * t)) & 3);
  }
};
const Lut24& lut24() {
  static const Lut24 lut;
  return lut;
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 2:4 with several batch rows: expand each 8-slot chunk once into the dense weights of
// its 16 columns (two registers, zeros in the pruned lanes), then every batch row costs
// two loads and two FMAs with no shuffles; the shuffle port is what limits the permute
// kernel above once B > 1. Twice the multiply-adds, but FMAs have two ports to spare.
struct Expand24 {
  alignas(32) int32_t lo[256][8];    // lane of the compressed 8 (0..3) feeding column j of the first 8
  alignas(32) int32_t hi[256][8];    // same for the second 8 columns (lanes 4..7)
  alignas(32) int32_t keep[256][8];  // -1 where column j holds a kept value, else 0
  Expand24() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int j = 0; j < 8; ++j) { lo[byte][j] = 0; hi[byte][j] = 4; keep[byte][j] = 0; }
      for (int t = 0; t < 4; ++t) {
        const int col = (t / 2) * 4 + ((byte >> (2 * t)) & 3);
        lo[byte][col] = t;
        hi[byte][col] = t + 4;
        keep[byte][col] = -1;
      }
    }
  }
};
const Expand24& expand24() {
  static const Expand24 lut;
  return lut;
}

template <typename VT, int B>
void nm24_rows_expand_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const Expand24& e = expand24();
  const int64_t chunks = a.kept / 8;
  alignas(64) int32_t cols[8];
  alignas(64) float w[8];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t b0 = ix[2 * c], b1 = ix[2 * c + 1];
      const __m256 w8 = load8(v + 8 * c);
      const __m256 wlo = _mm256_and_ps(
          _mm256_permutevar8x32_ps(w8, _mm256_load_si256(reinterpret_cast<const __m256i*>(e.lo[b0]))),
          _mm256_load_ps(reinterpret_cast<const float*>(e.keep[b0])));
      const __m256 whi = _mm256_and_ps(
          _mm256_permutevar8x32_ps(w8, _mm256_load_si256(reinterpret_cast<const __m256i*>(e.hi[b1]))),
          _mm256_load_ps(reinterpret_cast<const float*>(e.keep[b1])));
      for (int b = 0; b < B; ++b) {
        const float* xb = a.x + b * a.K + 16 * c;
        acc[b] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xb), acc[b]);
        acc[b] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xb + 8), acc[b]);
      }
    }
    float tail[B] = {};
    for (int64_t s0 = 8 * chunks; s0 < a.kept; s0 += 8) {
      const int cnt = static_cast<int>(a.kept - s0 < 8 ? a.kept - s0 : 8);
      nm_decode(v, ix, s0, cnt, 2, 4, 2, cols, w);
      for (int j = 0; j < cnt; ++j)
        for (int b = 0; b < B; ++b) tail[b] += w[j] * a.x[b * a.K + cols[j]];
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(acc[b]) + tail[b];
  }
}

template <typename VT, int B>
void nm24_rows_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  // Two accumulator chains per batch row up to B = 4; above that the B rows' chains are
  // independent enough on their own and 16 accumulators would not fit the registers.
  constexpr int kChains = B <= 4 ? 2 : 1;
  const Lut24& lut = lut24();
  const int64_t chunks = a.kept / 8;  // full 8-slot chunks; the rest goes the scalar way
  alignas(64) int32_t cols[8];
  alignas(64) float w[8];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m256 acc[kChains][B];
    for (int u = 0; u < kChains; ++u)
      for (int b = 0; b < B; ++b) acc[u][b] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      const __m256i p0 = _mm256_set_m128i(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.lanes[ix[2 * c + 1]])),
                                          _mm_load_si128(reinterpret_cast<const __m128i*>(lut.lanes[ix[2 * c]])));
      const __m256i p1 = _mm256_set_m128i(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.lanes[ix[2 * c + 3]])),
                                          _mm_load_si128(reinterpret_cast<const __m128i*>(lut.lanes[ix[2 * c + 2]])));
      const __m256 w0 = load8(v + 8 * c), w1 = load8(v + 8 * c + 8);
      for (int b = 0; b < B; ++b) {
        const float* xb = a.x + b * a.K + 16 * c;
        const __m256 s0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xb), p0),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 8), p0), 0xF0);
        const __m256 s1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 16), p1),
                                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 24), p1), 0xF0);
        acc[0][b] = _mm256_fmadd_ps(w0, s0, acc[0][b]);
        acc[kChains - 1][b] = _mm256_fmadd_ps(w1, s1, acc[kChains - 1][b]);
      }
    }
    float tail[B] = {};
    for (int64_t s0 = 8 * c; s0 < a.kept; s0 += 8) {
      const int cnt = static_cast<int>(a.kept - s0 < 8 ? a.kept - s0 : 8);
      nm_decode(v, ix, s0, cnt, 2, 4, 2, cols, w);
      for (int j = 0; j < cnt; ++j)
        for (int b = 0; b < B; ++b) tail[b] += w[j] * a.x[b * a.K + cols[j]];
    }
    for (int b = 0; b < B; ++b) {
      const __m256 t = kChains == 2 ? _mm256_add_ps(acc[0][b], acc[kChains - 1][b]) : acc[0][b];
      a.out[b * a.O + r] = hsum8(t) + tail[b];
    }
  }
}
#endif

#ifdef SK_AVX2
// ---- AVX2 kernels for every pattern ------------------------------------------------
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

// Gather kernel (B <= 4): eight kept values at once, their columns gathered from x.
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

template <typename VT, int BP>
void nm_rows_bcast_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const int bits = a.m == 4 ? 2 : 4;
  alignas(64) int32_t cols[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m256 acc[4][BP / 8];
    for (auto& u : acc)
      for (auto& h : u) h = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 < a.kept; s0 += kChunk) {
      const int cnt = static_cast<int>(a.kept - s0 < kChunk ? a.kept - s0 : kChunk);
      for (int j = 0; j < cnt; ++j) cols[j] = a.slot_base[s0 + j] + nm_index_at(ix, s0 + j, bits);
      bcast_chunk_avx2<BP>(cols, v + s0, cnt, a.x, acc);
    }
    bcast_store<BP>(acc, a.B, a.out, a.O, r);
  }
}

// Any N:M with up to 8 batch rows: scatter the row's kept values into a dense fp32 row
// held in L1 (indices decoded eight at a time), then a dense dot product per batch row
// with contiguous loads. Gathers are slow on many x86 cores; scalar stores are not.
template <typename VT, int B>
void nm_rows_densify_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const int bits = a.m == 4 ? 2 : 4;
  const int64_t K8 = (a.K + 7) / 8 * 8;
  float* row = static_cast<float*>(std::aligned_alloc(32, K8 * sizeof(float)));
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    for (int64_t c = 0; c < K8; c += 8) _mm256_store_ps(row + c, _mm256_setzero_ps());
    int64_t s = 0;
    for (; s + 8 <= a.kept; s += 8) {
      uint32_t packed = 0;
      if (bits == 2) {  // constant sizes: a run-time memcpy length would become a library call
        uint16_t p16;
        std::memcpy(&p16, ix + s / 4, 2);
        packed = p16;
      } else {
        std::memcpy(&packed, ix + s / 2, 4);
      }
      // Scalar decode from one packed word: a vector decode stored and reloaded lane by
      // lane stalls on store-to-load forwarding.
      const int32_t* base = a.slot_base + s;
      for (int j = 0; j < 8; ++j) row[base[j] + ((packed >> (j * bits)) & ((1u << bits) - 1))] = to_f32(v[s + j]);
    }
    for (; s < a.kept; ++s) row[a.slot_base[s] + nm_index_at(ix, s, bits)] = to_f32(v[s]);
    __m256 acc[B];
    float tail[B] = {};
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= a.K; c += 8) {
      const __m256 wv = _mm256_load_ps(row + c);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + b * a.K + c), acc[b]);
    }
    for (; c < a.K; ++c)
      for (int b = 0; b < B; ++b) tail[b] += row[c] * a.x[b * a.K + c];
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(acc[b]) + tail[b];
  }
  std::free(row);
}

// Bitmask: each mask byte becomes up to 8 column numbers through a 256-entry table
// (no data-dependent branches), in chunks; the chunk's values are contiguous in
// `values`, so the multiply loops read them in place.
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

template <typename VT, int BP, int B>
void bitmask_rows_avx2(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
  const ByteLut& lut = byte_lut();
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
#endif

template <typename VT>
void nm_rows_dispatch(const NmRowsArgs& a, int64_t r0, int64_t r1) {
#ifdef SK_AVX2
  if (a.B > 8 && a.B <= kNmRowMajorMaxBatch) {
    // Batch tiles of at most 8 rows (the accumulators must stay in registers).
    for (int64_t b0 = 0; b0 < a.B; b0 += 8) {
      NmRowsArgs t = a;
      t.x = a.x + b0 * a.K;
      t.out = a.out + b0 * a.O;
      t.B = a.B - b0 < 8 ? a.B - b0 : 8;
      nm_rows_dispatch<VT>(t, r0, r1);
    }
    return;
  }
  if (a.n == 2 && a.m == 4) {  // row-major x up to kNmRowMajorMaxBatch (see nm_linear.cpp)
    switch (a.B) {
      case 1: return nm24_rows_avx2<VT, 1>(a, r0, r1);
      case 2: return nm24_rows_expand_avx2<VT, 2>(a, r0, r1);
      case 3: return nm24_rows_expand_avx2<VT, 3>(a, r0, r1);
      case 4: return nm24_rows_expand_avx2<VT, 4>(a, r0, r1);
      case 5: return nm24_rows_expand_avx2<VT, 5>(a, r0, r1);
      case 6: return nm24_rows_expand_avx2<VT, 6>(a, r0, r1);
      case 7: return nm24_rows_expand_avx2<VT, 7>(a, r0, r1);
      default: return nm24_rows_expand_avx2<VT, 8>(a, r0, r1);
    }
  }
  if (a.BP == 8) return nm_rows_bcast_avx2<VT, 8>(a, r0, r1);
  if (a.BP == 16) return nm_rows_bcast_avx2<VT, 16>(a, r0, r1);
  switch (a.B) {
    case 1: return nm_rows_densify_avx2<VT, 1>(a, r0, r1);
    case 2: return nm_rows_densify_avx2<VT, 2>(a, r0, r1);
    case 3: return nm_rows_densify_avx2<VT, 3>(a, r0, r1);
    case 4: return nm_rows_densify_avx2<VT, 4>(a, r0, r1);
    case 5: return nm_rows_densify_avx2<VT, 5>(a, r0, r1);
    case 6: return nm_rows_densify_avx2<VT, 6>(a, r0, r1);
    case 7: return nm_rows_densify_avx2<VT, 7>(a, r0, r1);
    default: return nm_rows_densify_avx2<VT, 8>(a, r0, r1);
  }
#endif
  if (a.BP == 8) return nm_rows_t<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return nm_rows_t<VT, 16, 0>(a, r0, r1);
  switch (a.B) {
    case 1: return nm_rows_t<VT, 0, 1>(a, r0, r1);
    case 2: return nm_rows_t<VT, 0, 2>(a, r0, r1);
    case 3: return nm_rows_t<VT, 0, 3>(a, r0, r1);
    default: return nm_rows_t<VT, 0, 4>(a, r0, r1);
  }
}

// ---- Bitmask rows ----------------------------------------------------------------------
// Walks the set bits of each 64-bit word (count trailing zeros, clear lowest bit); the
// values of a row start at offsets[r, 0] and follow in column order.
template <typename VT, int BP, int BR>
void bitmask_rows_t(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) {
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
#ifdef SK_AVX2
  if (a.BP == 8) return bitmask_rows_avx2<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return bitmask_rows_avx2<VT, 16, 0>(a, r0, r1);
  switch (a.B) {
    case 1: return bitmask_rows_avx2<VT, 0, 1>(a, r0, r1);
    case 2: return bitmask_rows_avx2<VT, 0, 2>(a, r0, r1);
    case 3: return bitmask_rows_avx2<VT, 0, 3>(a, r0, r1);
    default: return bitmask_rows_avx2<VT, 0, 4>(a, r0, r1);
  }
#endif
  if (a.BP == 8) return bitmask_rows_t<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return bitmask_rows_t<VT, 16, 0>(a, r0, r1);
  switch (a.B) {
    case 1: return bitmask_rows_t<VT, 0, 1>(a, r0, r1);
    case 2: return bitmask_rows_t<VT, 0, 2>(a, r0, r1);
    case 3: return bitmask_rows_t<VT, 0, 3>(a, r0, r1);
    default: return bitmask_rows_t<VT, 0, 4>(a, r0, r1);
  }
}

// ---- Block rows ------------------------------------------------------------------------
// For each kept block, bh dot products of length bw per batch row; the block's values
// and the activations it meets are both contiguous, so the inner loop vectorises.
template <typename VT>
void block_rows_t(const BlockRowsArgs& a, int64_t br0, int64_t br1) {
  const VT* vals = static_cast<const VT*>(a.values);
  const int64_t bh = a.bh, bw = a.bw;
  // Raw arrays rather than std::vector: a std template instantiated in the AVX2 file
  // must not be able to stand in for the generic file's copy at link time.
  float* wrow = new float[bw];
  float* acc = new float[bh * a.B];
  for (int64_t br = br0; br < br1; ++br) {
    for (int64_t i = 0; i < bh * a.B; ++i) acc[i] = 0.f;
    for (int64_t blk = a.crow[br]; blk < a.crow[br + 1]; ++blk) {
      const float* xc = a.x + a.col[blk] * bw;
      const VT* vb = vals + blk * bh * bw;
      for (int64_t i = 0; i < bh; ++i) {
        for (int64_t j = 0; j < bw; ++j) wrow[j] = to_f32(vb[i * bw + j]);
        for (int64_t b = 0; b < a.B; ++b) {
          const float* xb = xc + b * a.K;
          float s0 = 0.f, s1 = 0.f;
          int64_t j = 0;
          for (; j + 16 <= bw; j += 16) {
            for (int t = 0; t < 8; ++t) s0 += wrow[j + t] * xb[j + t];
            for (int t = 8; t < 16; ++t) s1 += wrow[j + t] * xb[j + t];
          }
          for (; j < bw; ++j) s0 += wrow[j] * xb[j];
          acc[b * bh + i] += s0 + s1;
        }
      }
    }
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t i = 0; i < bh; ++i) a.out[b * a.O + br * bh + i] = acc[b * bh + i];
  }
  delete[] wrow;
  delete[] acc;
}

template <template <typename> class F, typename Args>
void by_dtype(c10::ScalarType t, const Args& a, int64_t r0, int64_t r1) {
  switch (t) {
    case c10::kFloat: return F<float>::run(a, r0, r1);
    case c10::kBFloat16: return F<c10::BFloat16>::run(a, r0, r1);
    case c10::kHalf: return F<c10::Half>::run(a, r0, r1);
    default: break;
  }
}
template <typename VT> struct NmF { static void run(const NmRowsArgs& a, int64_t r0, int64_t r1) { nm_rows_dispatch<VT>(a, r0, r1); } };
template <typename VT> struct BitmaskF { static void run(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { bitmask_rows_dispatch<VT>(a, r0, r1); } };
template <typename VT> struct BlockF { static void run(const BlockRowsArgs& a, int64_t r0, int64_t r1) { block_rows_t<VT>(a, r0, r1); } };

}  // namespace

void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<NmF>(a.dtype, a, r0, r1); }
void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<BitmaskF>(a.dtype, a, r0, r1); }
void block_rows(const BlockRowsArgs& a, int64_t br0, int64_t br1) { by_dtype<BlockF>(a.dtype, a, br0, br1); }

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
