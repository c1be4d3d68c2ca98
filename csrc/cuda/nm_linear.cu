// Simple CUDA nm_linear: one warp per (output row, batch row), lanes stride over the
// kept values, fp32 accumulation, fused bias. Layout: sparsekern/formats.py (NMWeight).
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

template <typename T>
__global__ void nm_linear_kernel(const T* __restrict__ x, const T* __restrict__ values,
                                 const uint8_t* __restrict__ indices, const T* __restrict__ bias,
                                 T* __restrict__ out, int64_t B, int64_t O, int64_t K, int64_t kept,
                                 int64_t idx_row_bytes, int n, int m, int bits) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= O) return;
  const T* v = values + r * kept;
  const uint8_t* ix = indices + r * idx_row_bytes;
  const int mask = (1 << bits) - 1;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* xb = x + b * K;
    float acc = 0.f;
    for (int64_t s = lane; s < kept; s += 32) {
      const int64_t bit = s * bits;
      const int j = (ix[bit >> 3] >> (bit & 7)) & mask;
      acc += static_cast<float>(v[s]) * static_cast<float>(xb[(s / n) * m + j]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += static_cast<float>(bias[r]);
      out[b * O + r] = static_cast<T>(acc);
    }
  }
}

at::Tensor nm_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                          int64_t m, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  check_nm_linear_args(x, values, indices, n, m, in_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, O = values.size(0), kept = values.size(1);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto v = values.contiguous();
  auto ix = indices.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t B = x2.size(0);
  auto out = at::empty({B, O}, x2.options());
  if (B > 0 && O > 0) {
    SPARSEKERN_CUDA_DISPATCH(x2.scalar_type(), "nm_linear", [&] {
      nm_linear_kernel<scalar_t><<<warp_per_output_grid(O, B), kWarpsPerBlock * 32, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
          x2.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ix.data_ptr<uint8_t>(),
          bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, O, K, kept, ix.size(1),
          static_cast<int>(n), static_cast<int>(m), nm_index_bits(m));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return reshape_output(out, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("nm_linear", &nm_linear_cuda); }

}  // namespace cuda
}  // namespace sparsekern
