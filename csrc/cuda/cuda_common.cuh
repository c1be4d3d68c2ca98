// Shared pieces of the simple CUDA kernels: warp reduction, launch shapes, epilogue.
// These kernels are correct first; the tuned decode/GEMM kernels replace them later.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.h"

namespace sparsekern {
namespace cuda {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// One warp per (output row, batch row): grid.x covers rows, grid.y strides over batch.
inline dim3 warp_per_output_grid(int64_t O, int64_t B) {
  return dim3(static_cast<unsigned>((O + kWarpsPerBlock - 1) / kWarpsPerBlock),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(B, 1), kMaxGridY)));
}

// y [B, O] in x's dtype -> [..., O].
inline at::Tensor reshape_output(const at::Tensor& y, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.reshape(sizes);
}

#define SPARSEKERN_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace cuda
}  // namespace sparsekern
