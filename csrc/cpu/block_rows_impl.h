// Block (BSR) rows: the direct kernel of block_linear (B <= kDirectMaxBatch, row-major
// x), one block row (bh output rows) at a time. Compiled twice, see rows_common_impl.h
// for the rules; the loop is the same in both builds, compiled with and without AVX2 and
// FMA.
#include "rows_common_impl.h"

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

// For each kept block, bh dot products of length bw per batch row; the block's values
// and the activations it meets are both contiguous, so the compiler vectorises the
// multiplies. The adds stay in source order (two chains, s0 and s1): without
// -ffast-math it may not reorder floating-point sums.
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
      for (int64_t i = 0; i < bh; ++i)
        a.out[b * a.O + br * bh + i] = a.scales ? acc[b * bh + i] * a.scales[br * bh + i] : acc[b * bh + i];
  }
  delete[] wrow;
  delete[] acc;
}

template <typename VT>
struct BlockF {
  static void run(const BlockRowsArgs& a, int64_t br0, int64_t br1) { block_rows_t<VT>(a, br0, br1); }
};

}  // namespace

void block_rows(const BlockRowsArgs& a, int64_t br0, int64_t br1) {
  if (a.dtype == c10::kChar) return block_rows_t<int8_t>(a, br0, br1);  // int8 values, row scales
  by_dtype<BlockF>(a.dtype, a, br0, br1);
}

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
