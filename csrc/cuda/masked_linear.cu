// CUDA masked_linear and its input gradient (masked fine-tuning): the mask is the packed
// bitmask [out, ceil(in/64)] (bit j of word w is column 64w + j).
//
// Both run on cuBLAS: one pass builds W*M (a kernel that reads the weight and the bitmask
// once and writes the masked copy, 16 bytes per thread), then at::linear / at::matmul. The
// weight gradient, (g^T x) * M, is sparsekern/triton/masked_linear.py's cuBLAS product with
// the mask applied by a Triton kernel (or the reference), chosen in sparsekern/ops.py.
// The masked copy costs one extra read and write of the weight per call; against the GEMM of
// a training batch (thousands of rows) that is a few percent (docs/GPU_KERNELS.md).
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

// out = w * M. Vector path: each thread takes 16 bytes of a row (VEC elements inside one
// 64-bit word, since VEC divides 64 and rows start on a word); the scalar path one element.
template <typename T, int VEC>
__global__ void apply_bitmask_kernel(const T* __restrict__ w, const int64_t* __restrict__ bitmask,
                                     T* __restrict__ out, int64_t O, int64_t K, int64_t words) {
  const int64_t per_row = (K + VEC - 1) / VEC;
  const int64_t total = O * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const unsigned long long word = static_cast<unsigned long long>(bitmask[r * words + (c >> 6)]);
    const unsigned bits = static_cast<unsigned>(word >> (c & 63));
    if constexpr (VEC == 1) {
      out[r * K + c] = (bits & 1u) ? w[r * K + c] : static_cast<T>(0.f);
    } else {
      union {
        uint4 u;
        T e[VEC];
      } in, res;
      in.u = *reinterpret_cast<const uint4*>(w + r * K + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) res.e[j] = ((bits >> j) & 1u) ? in.e[j] : static_cast<T>(0.f);
      *reinterpret_cast<uint4*>(out + r * K + c) = res.u;
    }
  }
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& bitmask) {
  auto w = weight.contiguous();
  auto bm = bitmask.contiguous();
  const int64_t O = w.size(0), K = w.size(1);
  auto out = at::empty_like(w);
  if (w.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPARSEKERN_CUDA_DISPATCH(w.scalar_type(), "masked_linear", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const bool vec = K % VEC == 0 && aligned_to(w.data_ptr(), 16) && aligned_to(out.data_ptr(), 16);
    const int64_t items = vec ? O * (K / VEC) : O * K;
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(items, threads), 64 * 1024));
    if (vec)
      apply_bitmask_kernel<scalar_t, VEC><<<blocks, threads, 0, stream>>>(
          w.data_ptr<scalar_t>(), bm.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), O, K, bm.size(1));
    else
      apply_bitmask_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(
          w.data_ptr<scalar_t>(), bm.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), O, K, bm.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bitmask,
                              const c10::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, bitmask, 1);
  check_bias("masked_linear", x, bias, weight.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, masked_weight(weight, bitmask), bias);
}

at::Tensor masked_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                         const at::Tensor& bitmask) {
  check_masked_linear_args("masked_linear_grad_input", grad_out, weight, bitmask, 0);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return at::matmul(grad_out, masked_weight(weight, bitmask));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_cuda);
}

}  // namespace cuda
}  // namespace sparsekern
