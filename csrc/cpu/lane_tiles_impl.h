// The x layout of the weight-stationary kernels (nm_gemm_impl.h and the AVX-512 ones):
// one tile holds L batch lanes as [K + 1][L] fp32, so a kept weight value multiplies a
// contiguous vector of lanes. Built here straight from row pointers, 8 lanes x 8 columns
// at a time with an in-register transpose. The linear ops pass the rows of x; the
// convolution passes, for each lane (output pixel) and kernel position, the input pixel's
// channels (null where the position falls in the zero padding), so its patches are
// gathered into the tile without an im2col matrix in between. Before this, the tiles were
// built with torch (zero fill, copy, then a 3-D transpose made contiguous): at 12544 rows
// of 256 columns that took three times as long as the multiply-adds it fed.
// Compiled inside sparse_rows_avx2.cpp (the rules in rows_common_impl.h).
#include "rows_common_impl.h"

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

inline void transpose8x8(__m256 (&v)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

}  // namespace

void lane_tile(const LaneTileArgs& a) {
  const int64_t C = a.C, L = a.L;
  const int64_t tail = C % 8;
  alignas(32) int32_t tail_mask[8];
  for (int i = 0; i < 8; ++i) tail_mask[i] = i < tail ? -1 : 0;
  const __m256i tmask = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail_mask));
  // Columns outer, lanes inner: each pass writes 8 whole tile rows (8 x L floats) at once,
  // and the 64-byte lines of the L source rows it reads 32 bytes of are read again, from the
  // L1, by the next pass. The other order wrote each tile line in halves a whole tile apart
  // (the tile exceeds the L1), and took a third of a convolution's time.
  for (int64_t p = 0; p < a.positions; ++p) {
    const float* const* rp = a.rows + p * L;
    float* dst = a.tile + p * C * L;
    for (int64_t c = 0; c < C; c += 8) {
      const bool full = c + 8 <= C;
      for (int64_t l0 = 0; l0 < L; l0 += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i) {
          const float* r = rp[l0 + i];
          // Masked loads on the last partial 8: nothing past a row's C values is read.
          v[i] = !r ? _mm256_setzero_ps() : full ? _mm256_loadu_ps(r + c) : _mm256_maskload_ps(r + c, tmask);
        }
        transpose8x8(v);
        const int n = full ? 8 : static_cast<int>(tail);
        for (int i = 0; i < n; ++i) _mm256_storeu_ps(dst + (c + i) * L + l0, v[i]);
      }
    }
  }
  std::memset(a.tile + a.positions * C * L, 0, L * sizeof(float));  // column K: the padding slots' zero
}

void lanes_to_rows(const float* acc, int64_t rows, int64_t L, int64_t lanes, float* out, int64_t ldo) {
  const int64_t r8 = rows / 8 * 8, j8 = lanes / 8 * 8;
  // Lanes outer: 8 output rows are written front to back, 32 bytes each per step.
  for (int64_t j = 0; j < j8; j += 8)
    for (int64_t r = 0; r < r8; r += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(acc + (r + i) * L + j);
      transpose8x8(v);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (j + i) * ldo + r, v[i]);
    }
  for (int64_t j = 0; j < lanes; ++j) {  // the tails: rows past r8 of every lane, lanes past j8
    float* o = out + j * ldo;
    for (int64_t r = j < j8 ? r8 : 0; r < rows; ++r) o[r] = acc[r * L + j];
  }
}

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
