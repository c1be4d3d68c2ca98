// Portable build of the sparse-row inner loops (nm_rows_impl.h, bitmask_rows_impl.h,
// block_rows_impl.h; the rules in rows_common_impl.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "sparse_rows.h"

#define SK_ISA_NS generic
#include "nm_rows_impl.h"
#include "bitmask_rows_impl.h"
#include "block_rows_impl.h"
#include "fma_probe_impl.h"

namespace sparsekern {
namespace cpu {
namespace generic {
namespace {
struct Fma1 {
  using V = float;
  static V set1(float v) { return v; }
  // A multiply and an add, as the portable kernels do: std::fma without FMA instructions is
  // a library call, not the CPU's rate.
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static float sum(V a) { return a; }
};
}  // namespace
float fma_probe(int64_t iters) { return fma_probe_chains<Fma1>(iters); }
}  // namespace generic
}  // namespace cpu
}  // namespace sparsekern
