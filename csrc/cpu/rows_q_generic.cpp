// Portable build of the quantized decode kernels (rows_q_impl.h), and the row
// dequantization every ISA shares (rows_q.h).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common.h"  // nm_index_bits
#include "rows_q.h"

namespace sparsekern {
namespace cpu {

void nm_q_row_dense(const NmQRowsArgs& a, int64_t r, float* dst) {
  std::fill(dst, dst + a.K, 0.f);
  const uint8_t* v = a.values + r * a.val_row_bytes;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  const int bits = nm_index_bits(a.m);
  for (int64_t s = 0; s < a.kept; ++s) {
    // & (m - 1): an index past the group stays in it (the row is never written past).
    const int idx = (bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15) & (a.m - 1);
    const float q = a.bits == 8 ? static_cast<float>(static_cast<int8_t>(v[s]))
                                : static_cast<float>(((v[s >> 1] >> ((s & 1) * 4)) & 15) - 8);
    const float sc = a.bits == 8 ? a.scales[r] : a.scales[r * a.groups + s / a.group_size];
    dst[(s / a.n) * a.m + idx] = q * sc;
  }
}

void bitmask_q_row_dense(const BitmaskQRowsArgs& a, int64_t r, float* dst) {
  std::fill(dst, dst + a.K, 0.f);
  int64_t p = a.tiles ? a.offsets[r * a.tiles] : 0;
  const float sc = a.scales[r];
  const int64_t* words = a.bitmask + r * a.words;
  for (int64_t w = 0; w < a.words; ++w) {
    uint64_t bits = static_cast<uint64_t>(words[w]);
    while (bits) {
      const int64_t c = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      // A tampered mask or offsets never read outside values nor write past the row.
      if (c < a.K && p >= 0 && p < a.nnz) dst[c] = static_cast<float>(a.values[p]) * sc;
      ++p;
    }
  }
}

}  // namespace cpu
}  // namespace sparsekern

#define SK_ISA_NS generic
#include "rows_q_impl.h"
