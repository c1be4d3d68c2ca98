// Simple CUDA masked_linear and its input gradient; the mask is the packed bitmask
// [out, ceil(in/64)] (bit j of word w is column 64w+j). W*M is never materialised.
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

__device__ __forceinline__ bool mask_bit(const int64_t* __restrict__ row_words, int64_t c) {
  return (static_cast<unsigned long long>(row_words[c >> 6]) >> (c & 63)) & 1ull;
}

// y[b, r] = sum_c x[b, c] * W[r, c] * M[r, c] (+ bias): one warp per (r, b).
template <typename T>
__global__ void masked_linear_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                     const int64_t* __restrict__ bitmask, const T* __restrict__ bias,
                                     T* __restrict__ out, int64_t B, int64_t O, int64_t K, int64_t words) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= O) return;
  const T* wr = w + r * K;
  const int64_t* mr = bitmask + r * words;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* xb = x + b * K;
    float acc = 0.f;
    for (int64_t c = lane; c < K; c += 32)
      if (mask_bit(mr, c)) acc += static_cast<float>(wr[c]) * static_cast<float>(xb[c]);
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += static_cast<float>(bias[r]);
      out[b * O + r] = static_cast<T>(acc);
    }
  }
}

// gx[b, c] = sum_r g[b, r] * W[r, c] * M[r, c]: one thread per (b, c), coalesced along c.
template <typename T>
__global__ void masked_linear_grad_input_kernel(const T* __restrict__ g, const T* __restrict__ w,
                                                const int64_t* __restrict__ bitmask, T* __restrict__ gx, int64_t B,
                                                int64_t O, int64_t K, int64_t words) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * K) return;
  const int64_t b = i / K, c = i % K;
  float acc = 0.f;
  for (int64_t r = 0; r < O; ++r)
    if (mask_bit(bitmask + r * words, c)) acc += static_cast<float>(g[b * O + r]) * static_cast<float>(w[r * K + c]);
  gx[i] = static_cast<T>(acc);
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bitmask,
                              const c10::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, bitmask, 1);
  check_bias("masked_linear", x, bias, weight.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t O = weight.size(0), K = weight.size(1);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto w = weight.contiguous();
  auto bm = bitmask.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t B = x2.size(0);
  auto out = at::empty({B, O}, x2.options());
  if (B > 0 && O > 0) {
    SPARSEKERN_CUDA_DISPATCH(x2.scalar_type(), "masked_linear", [&] {
      masked_linear_kernel<scalar_t><<<warp_per_output_grid(O, B), kWarpsPerBlock * 32, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
          x2.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bm.data_ptr<int64_t>(),
          bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, O, K, bm.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return reshape_output(out, x);
}

at::Tensor masked_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                         const at::Tensor& bitmask) {
  check_masked_linear_args("masked_linear_grad_input", grad_out, weight, bitmask, 0);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t O = weight.size(0), K = weight.size(1);
  auto g2 = grad_out.reshape({-1, O}).contiguous();
  auto w = weight.contiguous();
  auto bm = bitmask.contiguous();
  const int64_t B = g2.size(0);
  auto gx = at::empty({B, K}, g2.options());
  if (B > 0 && K > 0) {
    const int threads = 256;
    const int64_t blocks = (B * K + threads - 1) / threads;
    SPARSEKERN_CUDA_DISPATCH(g2.scalar_type(), "masked_linear_grad_input", [&] {
      masked_linear_grad_input_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0,
                                                  c10::cuda::getCurrentCUDAStream()>>>(
          g2.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bm.data_ptr<int64_t>(), gx.data_ptr<scalar_t>(), B, O,
          K, bm.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sizes = grad_out.sizes().vec();
  sizes.back() = K;
  return gx.reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_cuda);
}

}  // namespace cuda
}  // namespace sparsekern
