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

#include "transpose8x8_impl.h"

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
