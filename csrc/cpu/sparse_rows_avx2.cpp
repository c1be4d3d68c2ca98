// AVX2 + FMA + F16C build of the sparse-row inner loops (nm_rows_impl.h,
// bitmask_rows_impl.h, block_rows_impl.h; the rules in rows_common_impl.h), the 2:4
// weight-stationary kernel (nm_gemm_impl.h) and the x tiles every weight-stationary kernel
// reads (lane_tiles_impl.h). Only called when cpu_has_avx2() says the CPU runs these
// instructions.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "sparse_rows.h"

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define SK_AVX2 1
#define SK_ISA_NS avx2
#include "nm_rows_impl.h"
#include "bitmask_rows_impl.h"
#include "block_rows_impl.h"
#include "ws_chunks_impl.h"
#include "nm_gemm_impl.h"
#include "lane_tiles_impl.h"
#include "fma_probe_impl.h"
namespace sparsekern {
namespace cpu {
namespace avx2 {
namespace {
struct Fma8 {
  using V = __m256;
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V a) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a);
    float total = 0.f;
    for (float v : lanes) total += v;
    return total;
  }
};
}  // namespace
float fma_probe(int64_t iters) { return fma_probe_chains<Fma8>(iters); }
}  // namespace avx2
}  // namespace cpu
}  // namespace sparsekern
#pragma GCC pop_options
#else
// Without GCC's target pragma (clang, non-x86) there are no AVX2 kernels and
// cpu_has_avx2() is false; the entry points exist for the linker only.
namespace sparsekern {
namespace cpu {
namespace avx2 {
void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1) { generic::nm_rows(a, r0, r1); }
void bitmask_rows(const BitmaskRowsArgs& a, int64_t r0, int64_t r1) { generic::bitmask_rows(a, r0, r1); }
void block_rows(const BlockRowsArgs& a, int64_t br0, int64_t br1) { generic::block_rows(a, br0, br1); }
// Never called: nm_linear takes this kernel only when cpu_has_avx2().
void nm24_gemm(const Nm24GemmArgs&) { std::abort(); }
void lane_tile(const LaneTileArgs&) { std::abort(); }  // callers check cpu_has_avx2()
void lanes_to_rows(const float*, int64_t, int64_t, int64_t, float*, int64_t) { std::abort(); }
float fma_probe(int64_t iters) { return generic::fma_probe(iters); }
}  // namespace avx2
}  // namespace cpu
}  // namespace sparsekern
#endif
