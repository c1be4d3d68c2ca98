// Simple CUDA bitmask_linear: one warp per (output row, batch row); each lane takes whole
// 512-column tiles, starting at the tile's offset and walking the set bits of its words.
// Layout: sparsekern/formats.py (BitmaskWeight).
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

template <typename T>
__global__ void bitmask_linear_kernel(const T* __restrict__ x, const T* __restrict__ values,
                                      const int64_t* __restrict__ bitmask, const int32_t* __restrict__ offsets,
                                      const T* __restrict__ bias, T* __restrict__ out, int64_t B, int64_t O,
                                      int64_t K, int64_t words, int64_t tiles) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= O) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* xb = x + b * K;
    float acc = 0.f;
    for (int64_t t = lane; t < tiles; t += 32) {
      int64_t k = offsets[r * tiles + t];
      const int64_t w_end = min(words, (t + 1) * kBitmaskTileWords);
      for (int64_t wi = t * kBitmaskTileWords; wi < w_end; ++wi) {
        unsigned long long bits = static_cast<unsigned long long>(bitmask[r * words + wi]);
        while (bits) {
          const int c = __ffsll(static_cast<long long>(bits)) - 1;
          acc += static_cast<float>(values[k++]) * static_cast<float>(xb[wi * 64 + c]);
          bits &= bits - 1;
        }
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += static_cast<float>(bias[r]);
      out[b * O + r] = static_cast<T>(acc);
    }
  }
}

at::Tensor bitmask_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                               const at::Tensor& offsets, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  check_bitmask_linear_args(x, values, bitmask, offsets, in_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, O = bitmask.size(0);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto v = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t B = x2.size(0);
  auto out = at::empty({B, O}, x2.options());
  if (B > 0 && O > 0) {
    SPARSEKERN_CUDA_DISPATCH(x2.scalar_type(), "bitmask_linear", [&] {
      bitmask_linear_kernel<scalar_t><<<warp_per_output_grid(O, B), kWarpsPerBlock * 32, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
          x2.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(),
          bc.defined() ? bc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, O, K, bm.size(1),
          off.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return reshape_output(out, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("bitmask_linear", &bitmask_linear_cuda); }

}  // namespace cuda
}  // namespace sparsekern
