#include "cpu_common.h"

#include <cstdlib>
#include <cstring>

namespace sparsekern {

// True when sparse_rows_avx2.cpp holds AVX2 kernels and this CPU has every extension it
// was compiled for (its `#pragma GCC target` list).
// SPARSEKERN_CPU_ISA (read once): "generic" (or "portable") forces the portable kernels;
// "avx2": the AVX2 kernels only (no AVX-512 ones); unset: the best the CPU runs.
bool cpu_has_avx2() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = [] {
    const char* isa = std::getenv("SPARSEKERN_CPU_ISA");
    if (isa && (std::strcmp(isa, "generic") == 0 || std::strcmp(isa, "portable") == 0)) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = [] {
    const char* isa = std::getenv("SPARSEKERN_CPU_ISA");
    if (isa && std::strcmp(isa, "avx512") != 0) return false;  // "avx2", "generic", "portable"
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("popcnt");
  }();
  return has;
#else
  return false;
#endif
}

namespace cpu {

const Nm24SlotColumns& nm24_slot_columns() {
  static const Nm24SlotColumns table = [] {
    Nm24SlotColumns t;
    for (int byte = 0; byte < 256; ++byte)
      for (int s = 0; s < 4; ++s) t.col[byte][s] = (s / 2) * 4 + ((byte >> (2 * s)) & 3);
    return t;
  }();
  return table;
}

at::Tensor x_float_2d(const at::Tensor& x) {
  const int64_t K = x.size(-1);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

at::Tensor x_lanes(const at::Tensor& x2, int64_t BP) {
  auto xT = at::zeros({x2.size(1), BP}, x2.options());
  xT.narrow(1, 0, x2.size(0)).copy_(x2.t());
  return xT;
}

at::Tensor x_lane_tiles(const at::Tensor& x2, int64_t L) {
  const int64_t B = x2.size(0), K = x2.size(1), tiles = (B + L - 1) / L;
  auto xp = at::zeros({tiles * L, K + 1}, x2.options());
  xp.narrow(0, 0, B).narrow(1, 0, K).copy_(x2);
  return xp.view({tiles, L, K + 1}).transpose(1, 2).contiguous();
}

at::Tensor tiled_gemm(const at::Tensor& x2, int64_t O, const FillRows& fill) {
  const int64_t B = x2.size(0), K = x2.size(1);
  auto out = at::empty({B, O}, x2.options());
  // Tiles of about 4 MiB (at least 128 rows): large enough for an efficient GEMM, small
  // enough to stay in cache and never hold the whole dense weight.
  const int64_t tile = std::max<int64_t>(128, (int64_t(4) << 20) / (K * int64_t(sizeof(float))));
  auto buf = at::empty({std::min(tile, O), K}, x2.options());
  for (int64_t r0 = 0; r0 < O; r0 += tile) {
    const int64_t r1 = std::min(O, r0 + tile);
    auto part = buf.narrow(0, 0, r1 - r0);
    float* p = part.data_ptr<float>();
    at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b) { fill(a, b, p + (a - r0) * K); });
    // Straight into the output's columns (BLAS writes with leading dimension O): no
    // temporary, no copy.
    auto cols = out.narrow(1, r0, r1 - r0);
    at::mm_out(cols, x2, part.t());
  }
  return out;
}

at::Tensor finish_linear(const at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = out;
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  // resize_, not reshape: the result must not be a view of a temporary (autograd and FSDP2
  // warn about custom ops returning views, and in-place ops on a view skip their hooks).
  at::Tensor r = y.to(x.scalar_type());
  r.resize_(sizes);
  return r;
}

}  // namespace cpu
}  // namespace sparsekern
