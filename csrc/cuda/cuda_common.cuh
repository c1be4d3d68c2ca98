// Shared pieces of the CUDA kernels: launch-shape helpers, warp reductions, the split-K
// finalize kernel, the epilogue reshape and the dtype dispatch. Index arithmetic that the
// host-side layout test (tests/test_gpu_layout.py) also runs lives in decode_layout.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../common.h"
#include "decode_layout.cuh"

namespace sparsekern {
namespace cuda {

constexpr int kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (132 on an H100 SXM), read once per device.
// Not from ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers a bare toolkit
// may lack.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cached[dev] > 0) return cached[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cached[dev] = n;
  return n;
}

// Raises a kernel's dynamic shared-memory limit past the default 48 KiB, once per (kernel,
// device): the first call of a shape does it (eagerly), so a CUDA-graph capture of later
// calls records no attribute change.
inline void ensure_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> raised;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = raised[{kernel, dev}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Exclusive prefix sum over the 32 lanes of a warp (Hillis-Steele with shuffles).
__device__ __forceinline__ int warp_exclusive_scan(int v, int lane) {
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  return inc - v;
}

// y [B, O] -> [..., O] with x's leading shape.
inline at::Tensor reshape_output(const at::Tensor& y, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.reshape(sizes);
}

// Split-K epilogue: y[b, r] = sum_s partial[s, b, r] + bias[r], in T. One thread per output.
template <typename T>
__global__ void splitk_finalize_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                                       T* __restrict__ y, int64_t splits, int64_t BO, int64_t O) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BO;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = bias != nullptr ? static_cast<float>(bias[i % O]) : 0.f;
    for (int64_t s = 0; s < splits; ++s) acc += partial[s * BO + i];
    y[i] = static_cast<T>(acc);
  }
}

template <typename T>
inline void launch_splitk_finalize(const at::Tensor& partial, const T* bias, T* y, int64_t splits, int64_t B,
                                   int64_t O, cudaStream_t stream) {
  const int64_t BO = B * O;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(BO, threads), 4 * 1024));
  splitk_finalize_kernel<T><<<blocks, threads, 0, stream>>>(partial.data_ptr<float>(), bias, y, splits, BO, O);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned_to(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// float32, bfloat16, float16 only (float64 never reaches a kernel: the checks refuse it), so
// no double instantiation is compiled.
#define SPARSEKERN_CUDA_DISPATCH(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace cuda
}  // namespace sparsekern
