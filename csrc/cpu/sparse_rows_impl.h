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

template <typename VT, int B>
void nm24_rows_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const Lut24& lut = lut24();
  const int64_t chunks = a.kept / 8;  // full 8-slot chunks; the rest goes the scalar way
  alignas(64) int32_t cols[8];
  alignas(64) float w[8];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m256 acc0[B], acc1[B];
    for (int b = 0; b < B; ++b) acc0[b] = acc1[b] = _mm256_setzero_ps();
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
        acc0[b] = _mm256_fmadd_ps(w0, s0, acc0[b]);
        acc1[b] = _mm256_fmadd_ps(w1, s1, acc1[b]);
      }
    }
    float tail[B] = {};
    for (int64_t s0 = 8 * c; s0 < a.kept; s0 += 8) {
      const int cnt = static_cast<int>((a.kept - s0 < 8 ? a.kept - s0 : 8));
      nm_decode(v, ix, s0, cnt, 2, 4, 2, cols, w);
      for (int j = 0; j < cnt; ++j)
        for (int b = 0; b < B; ++b) tail[b] += w[j] * a.x[b * a.K + cols[j]];
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(_mm256_add_ps(acc0[b], acc1[b])) + tail[b];
  }
}
#endif

template <typename VT>
void nm_rows_dispatch(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.BP == 8) return nm_rows_t<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return nm_rows_t<VT, 16, 0>(a, r0, r1);
#ifdef SK_AVX2
  if (a.n == 2 && a.m == 4) {
    switch (a.B) {
      case 1: return nm24_rows_avx2<VT, 1>(a, r0, r1);
      case 2: return nm24_rows_avx2<VT, 2>(a, r0, r1);
      case 3: return nm24_rows_avx2<VT, 3>(a, r0, r1);
      case 4: return nm24_rows_avx2<VT, 4>(a, r0, r1);
    }
  }
#endif
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
