// Portable build of the sparse-row inner loops (nm_rows_impl.h, bitmask_rows_impl.h,
// block_rows_impl.h; the rules in rows_common_impl.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

#include "sparse_rows.h"

#define SK_ISA_NS generic
#include "nm_rows_impl.h"
#include "bitmask_rows_impl.h"
#include "block_rows_impl.h"

namespace sparsekern {
namespace cpu {
namespace generic {
float fma_probe(int64_t iters) {
  float acc[kFmaProbeChains];
  for (int64_t c = 0; c < kFmaProbeChains; ++c) acc[c] = 1e-3f * float(c);
  for (int64_t i = 0; i < iters; ++i)
    for (int64_t c = 0; c < kFmaProbeChains; ++c) acc[c] = std::fma(acc[c], 0.9999f, 1e-7f);
  float total = 0.f;
  for (float v : acc) total += v;
  return total;
}
}  // namespace generic
}  // namespace cpu
}  // namespace sparsekern
