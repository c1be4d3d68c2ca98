// The loop of the FMA roof probe (cpu_fma_probe, csrc/cpu/cpu_common.cpp), one template for
// every instruction-set file: Ops gives that file's vector type V and set1 / fma / add / sum.
// Included after the file's target pragma, so the loop is compiled for its instructions.
#pragma once

#include <cstdint>

#include "sparse_rows.h"  // kFmaProbeChains

namespace sparsekern {
namespace cpu {

// kFmaProbeChains independent chains acc = acc * mul + add (|acc| stays below
// 1e-3 / (1 - mul)), `iters` rounds; the sum of every lane keeps the work observable.
template <typename Ops>
inline float fma_probe_chains(int64_t iters) {
  typename Ops::V acc[kFmaProbeChains];
  for (int64_t c = 0; c < kFmaProbeChains; ++c) acc[c] = Ops::set1(1e-3f * float(c));
  const typename Ops::V mul = Ops::set1(0.9999f), add = Ops::set1(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int64_t c = 0; c < kFmaProbeChains; ++c) acc[c] = Ops::fma(acc[c], mul, add);
  typename Ops::V sum = acc[0];
  for (int64_t c = 1; c < kFmaProbeChains; ++c) sum = Ops::add(sum, acc[c]);
  return Ops::sum(sum);
}

}  // namespace cpu
}  // namespace sparsekern
