// AVX2 + FMA + F16C build of the sparse-row inner loops (see sparse_rows_impl.h).
// Only called when cpu_has_avx2() says the CPU runs these instructions.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>

#include "sparse_rows.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define SK_AVX2 1
#define SK_ISA_NS avx2
#include "sparse_rows_impl.h"
#pragma GCC pop_options
#else
// Without GCC's target pragma (clang, non-x86) the "avx2" entry points are the
// portable loops under another name; cpu_has_avx2() is false there anyway.
#define SK_ISA_NS avx2
#include "sparse_rows_impl.h"
#endif
