// What the three kernel families (nm_rows_impl.h, bitmask_rows_impl.h,
// block_rows_impl.h) share: value conversion, the chunk size, the fp32 multiply-add
// loops over a decoded chunk and the dtype switch.
//
// The *_rows_impl.h headers are included by sparse_rows_avx2.cpp and
// sparse_rows_generic.cpp after every other header (and, in the AVX2 file, inside
// `#pragma GCC target`); SK_ISA_NS names the namespace (avx2 / generic) and SK_AVX2
// enables the intrinsics paths. They include nothing else: an inline function of a
// shared header (c10, the standard library) first seen under the target pragma would be
// compiled with AVX2 instructions, and the linker keeps one copy of an inline function
// for the whole library, so the portable build could end up running it. Helpers live in
// an unnamed namespace; only the entry points (nm_rows, bitmask_rows, block_rows) leave
// the file.
#pragma once

#ifndef SK_ISA_NS
#error "define SK_ISA_NS before including rows_common_impl.h"
#endif

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
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

#ifdef SK_AVX2
// Eight values of any supported dtype as one fp32 register.
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
#else
// Portable multiply-add loops over a decoded chunk (the N:M and bitmask kernels).

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
#endif

// F<VT>::run(a, r0, r1) for the values' dtype; the op files have already refused any
// other dtype.
template <template <typename> class F, typename Args>
void by_dtype(c10::ScalarType t, const Args& a, int64_t r0, int64_t r1) {
  switch (t) {
    case c10::kFloat: return F<float>::run(a, r0, r1);
    case c10::kBFloat16: return F<c10::BFloat16>::run(a, r0, r1);
    case c10::kHalf: return F<c10::Half>::run(a, r0, r1);
    default: break;
  }
}

}  // namespace
}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
