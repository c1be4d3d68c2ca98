// AVX2 + FMA build of the quantized decode kernels (rows_q_impl.h). Only called when
// cpu_has_avx2() says the CPU runs these instructions.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "rows_q.h"

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define SK_AVX2 1
#define SK_ISA_NS avx2
#include "rows_q_impl.h"
#pragma GCC pop_options
#else
namespace sparsekern {
namespace cpu {
namespace avx2 {
void nm_q_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1) { generic::nm_q_rows(a, r0, r1); }
void bitmask_q_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) { generic::bitmask_q_rows(a, r0, r1); }
void nm_q_rows_act(const NmQRowsArgs& a, int64_t r0, int64_t r1) { nm_q_rows_act_portable(a, r0, r1); }
void bitmask_q_rows_act(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) { bitmask_q_rows_act_portable(a, r0, r1); }
}  // namespace avx2
}  // namespace cpu
}  // namespace sparsekern
#endif
