// CUDA bitmask_linear (y = x @ W^T + b, W unstructured in the tiled bitmask format) and
// bitmask_decompress. Layout: sparsekern/formats.py (BitmaskWeight). Predictions:
// docs/GPU_KERNELS.md (nothing here has run on a GPU yet).
//
// BitmaskWarp, at any batch (in tiles of BT rows; which batch sizes run here at all is decided
// in Python: sparsekern/dispatch_rules.py CUDA_DECODE_MAX_ROWS): a CTA (4 warps) owns 16 output rows x one
// K slice x up to BT batch rows; x's slice sits in shared memory as fp32 [col][BT]. A warp
// takes a row and walks it in steps of 32 words (2048 columns): lane l loads word w0 + l
// (coalesced 8-byte loads), a warp prefix sum of the popcounts gives each lane the index of
// its first value, and the step's values -- one contiguous run starting at the tile offset --
// are copied by the whole warp with 16-byte loads into a per-warp shared buffer. Each lane
// then walks its word's set bits: value from the buffer, x from the slice, fp32 FMAs. Work
// and bytes scale with the kept elements, not with K. The next step's words are loaded
// before the current step's values are used, across rows too (the last step of a row
// fetches the next row's first words). K is split to fill the GPU, as in nm_linear.
//
// Larger batches run a GEMM on the decompressed weight, chosen by the dispatch.
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

using layout::kBitmaskStepCols;
using layout::kBitmaskStepWords;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;

template <int BT>
__device__ __forceinline__ void fma_x(float (&acc)[BT], float v, const float* __restrict__ xv) {
  if constexpr (BT % 4 == 0) {
#pragma unroll
    for (int b = 0; b < BT; b += 4) {
      const float4 t = *reinterpret_cast<const float4*>(xv + b);
      acc[b] += v * t.x;
      acc[b + 1] += v * t.y;
      acc[b + 2] += v * t.z;
      acc[b + 3] += v * t.w;
    }
  } else {
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] += v * xv[b];
  }
}

template <typename T, int BT>
__global__ void bitmask_warp_kernel(
    const T* __restrict__ x,              // [B, K]
    const T* __restrict__ values,         // [nnz]
    const int64_t* __restrict__ bitmask,  // [O, words]
    const int32_t* __restrict__ offsets,  // [O, tiles]
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial, int64_t B, int64_t O, int64_t K,
    int64_t KS, int64_t nnz, bool vec_values) {
  constexpr int EPV = 16 / sizeof(T);                  // elements per 16-byte load
  constexpr int VBUF = kBitmaskStepCols + 2 * EPV;     // a step's values plus alignment slack
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* vbuf_all = reinterpret_cast<T*>(smem_raw);
  float* xs = reinterpret_cast<float*>(smem_raw + kWarps * VBUF * sizeof(T));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* vbuf = vbuf_all + warp * VBUF;
  const int64_t words = (K + 63) / 64, tiles = (K + kBitmaskTileCols - 1) / kBitmaskTileCols;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * KS;
  const int64_t k1 = min(K, k0 + KS);
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * BT;
  const int64_t w_begin = k0 / 64, w_end = (k1 + 63) / 64;

  const int cols = static_cast<int>(k1 - k0);
  for (int i = threadIdx.x; i < cols * BT; i += blockDim.x) {
    const int c = i / BT, bl = i - c * BT;
    const int64_t b = b0 + bl;
    xs[i] = b < B ? static_cast<float>(x[b * K + k0 + c]) : 0.f;
  }
  __syncthreads();

  // The warp's rows one after another; the first step of the next row (its mask words and tile
  // offset) is loaded during the last step of this one, so no row starts with two dependent
  // round trips (words, then values): only the values' one.
  const int64_t r_first = static_cast<int64_t>(blockIdx.x) * kRows + warp * kRowsPerWarp;
  unsigned long long word = 0ull;
  int64_t base = 0;
  if (r_first < O) {
    word = w_begin + lane < w_end ? static_cast<unsigned long long>(bitmask[r_first * words + w_begin + lane]) : 0ull;
    base = offsets[r_first * tiles + w_begin / kBitmaskTileWords];  // w_begin is a multiple of 8: a tile start
  }
#pragma unroll 1
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = r_first + rr;
    if (r >= O) break;
    const bool has_next_row = rr + 1 < kRowsPerWarp && r + 1 < O;
    float acc[BT];
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = 0.f;
#pragma unroll 1
    for (int64_t w0 = w_begin; w0 < w_end; w0 += kBitmaskStepWords) {
      // Prefetch the next step's word and first-value offset (this row's next step, else the
      // next row's first) while this step's values travel.
      const int64_t wn = w0 + kBitmaskStepWords;
      const bool same_row = wn < w_end;
      const int64_t nr = same_row ? r : r + 1, nw = same_row ? wn : w_begin;
      const bool have_next = same_row || has_next_row;
      const unsigned long long next =
          have_next && nw + lane < w_end ? static_cast<unsigned long long>(bitmask[nr * words + nw + lane]) : 0ull;
      const int64_t next_base = have_next ? offsets[nr * tiles + nw / kBitmaskTileWords] : 0;
      const int cnt = __popcll(word);
      const int excl = warp_exclusive_scan(cnt, lane);
      const int total = __shfl_sync(0xffffffffu, excl + cnt, 31);
      // The warp copies values[base, base + total) into vbuf[pre, pre + total).
      if (vec_values) {
        const int64_t start = base / EPV * EPV;
        const int pre = static_cast<int>(base - start);
        for (int64_t e = start + static_cast<int64_t>(lane) * EPV; e < base + total; e += 32 * EPV) {
          T* dst = vbuf + (e - start);
          if (e + EPV <= nnz) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(values + e);
          } else {
            for (int t = 0; t < EPV && e + t < nnz; ++t) dst[t] = values[e + t];
          }
        }
        __syncwarp();
        unsigned long long bits = word;
        int k = pre + excl;
        const float* xw = xs + ((w0 + lane) * 64 - k0) * BT;
        while (bits) {
          const int bit = __ffsll(static_cast<long long>(bits)) - 1;
          bits &= bits - 1;
          fma_x<BT>(acc, static_cast<float>(vbuf[k++]), xw + bit * BT);
        }
      } else {  // values not 16-byte aligned: each lane reads its own run
        unsigned long long bits = word;
        int64_t k = base + excl;
        const float* xw = xs + ((w0 + lane) * 64 - k0) * BT;
        while (bits) {
          const int bit = __ffsll(static_cast<long long>(bits)) - 1;
          bits &= bits - 1;
          fma_x<BT>(acc, static_cast<float>(values[k++]), xw + bit * BT);
        }
      }
      __syncwarp();  // vbuf is rewritten by the next step
      word = next;
      base = next_base;
    }
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = warp_sum(acc[b]);
    if (lane < BT) {
      float v = 0.f;
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b == lane) v = acc[b];
      const int64_t b = b0 + lane;
      if (b < B) {
        if (gridDim.y == 1) {
          if (bias != nullptr) v += static_cast<float>(bias[r]);
          y[b * O + r] = static_cast<T>(v);
        } else {
          partial[(static_cast<int64_t>(blockIdx.y) * B + b) * O + r] = v;
        }
      }
    }
  }
}

// One thread per 64-bit word of rows [r_begin, r_begin + rows): its first value is the
// tile offset plus the popcounts of the earlier words of its tile. out is [rows, K].
template <typename T>
__global__ void bitmask_decompress_kernel(const T* __restrict__ values, const int64_t* __restrict__ bitmask,
                                          const int32_t* __restrict__ offsets, T* __restrict__ out, int64_t r_begin,
                                          int64_t rows, int64_t K) {
  const int64_t words = (K + 63) / 64, tiles = (K + kBitmaskTileCols - 1) / kBitmaskTileCols;
  const int64_t total = rows * words;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rl = i / words, w = i - rl * words, r = r_begin + rl;
    const int64_t* mrow = bitmask + r * words;
    int64_t k = offsets[r * tiles + w / kBitmaskTileWords];
    for (int64_t u = w / kBitmaskTileWords * kBitmaskTileWords; u < w; ++u)
      k += __popcll(static_cast<unsigned long long>(mrow[u]));
    const unsigned long long bits = static_cast<unsigned long long>(mrow[w]);
    T* o = out + rl * K + w * 64;
    const int ncols = K - w * 64 < 64 ? static_cast<int>(K - w * 64) : 64;
    for (int c = 0; c < ncols; ++c) {
      const bool keep = (bits >> c) & 1ull;
      o[c] = keep ? values[k] : static_cast<T>(0.f);
      k += keep;
    }
  }
}

template <typename T>
void launch_bitmask_decompress(const at::Tensor& v, const at::Tensor& bm, const at::Tensor& off, T* out,
                               int64_t r_begin, int64_t rows, int64_t K, cudaStream_t stream) {
  const int64_t total = rows * ((K + 63) / 64);
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, threads), 64 * 1024));
  bitmask_decompress_kernel<T><<<blocks, threads, 0, stream>>>(
      v.numel() ? v.data_ptr<T>() : nullptr, bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), out, r_begin, rows, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BT>
void launch_bitmask_warp(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& bm, const at::Tensor& off,
                         const T* bias, at::Tensor& out, int64_t B, int64_t O, int64_t K, cudaStream_t stream) {
  constexpr int EPV = 16 / sizeof(T);
  const size_t vbuf_bytes = static_cast<size_t>(kWarps) * (kBitmaskStepCols + 2 * EPV) * sizeof(T);
  const size_t x_budget = 64 * 1024;
  const int64_t quantum = kBitmaskStepCols;  // slices start on a step (and so a tile) boundary
  const int64_t max_ks = std::max<int64_t>(quantum, static_cast<int64_t>(x_budget / (BT * sizeof(float))));
  const int64_t row_tiles = ceil_div(O, kRows), batch_tiles = ceil_div(B, BT);
  // Four CTAs per SM: a warp has about one step's values (~1.2 KB at 30% density) in flight.
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  const int64_t want = std::max<int64_t>(1, ceil_div(target, row_tiles * batch_tiles));
  int64_t KS = ceil_div(ceil_div(K, want), quantum) * quantum;
  KS = std::min<int64_t>(KS, max_ks / quantum * quantum);
  KS = std::max<int64_t>(KS, quantum);
  const int64_t splits = ceil_div(K, KS);
  const size_t smem = vbuf_bytes + static_cast<size_t>(std::min<int64_t>(KS, K)) * BT * sizeof(float);
  auto kernel = bitmask_warp_kernel<T, BT>;
  ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, B, O}, x2.options().dtype(at::kFloat));
  const bool vec = v.numel() == 0 || aligned_to(v.data_ptr(), 16);
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits), static_cast<unsigned>(batch_tiles));
  kernel<<<grid, 32 * kWarps, smem, stream>>>(x2.data_ptr<T>(), v.numel() ? v.data_ptr<T>() : nullptr,
                                              bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), bias, out.data_ptr<T>(),
                                              splits > 1 ? partial.data_ptr<float>() : nullptr, B, O, K, KS, v.numel(),
                                              vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) launch_splitk_finalize<T>(partial, bias, out.data_ptr<T>(), splits, B, O, stream);
}

at::Tensor bitmask_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                               const at::Tensor& offsets, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  check_bitmask_linear_args(x, values, bitmask, offsets, in_features, bias, c10::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, O = bitmask.size(0);
  auto x2 = x.reshape({-1, K}).contiguous();
  auto v = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto bc = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const int64_t B = x2.size(0);
  // Batch tiles (8 rows above 4) go on the grid's z dimension, at most 65535 of them.
  TORCH_CHECK_VALUE(B <= 65535 * 8, "bitmask_linear: the CUDA kernel takes at most ", 65535 * 8,
                    " rows of x, got ", B);
  auto out = at::empty({B, O}, x2.options());
  if (B == 0 || O == 0) return reshape_output(out, x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPARSEKERN_CUDA_DISPATCH(x2.scalar_type(), "bitmask_linear", [&] {
    const scalar_t* b = bc.has_value() ? bc->data_ptr<scalar_t>() : nullptr;
    if (B == 1)
      launch_bitmask_warp<scalar_t, 1>(x2, v, bm, off, b, out, B, O, K, stream);
    else if (B <= 4)
      launch_bitmask_warp<scalar_t, 4>(x2, v, bm, off, b, out, B, O, K, stream);
    else
      launch_bitmask_warp<scalar_t, 8>(x2, v, bm, off, b, out, B, O, K, stream);
  });
  return reshape_output(out, x);
}

at::Tensor bitmask_decompress_cuda(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& offsets,
                                   int64_t in_features) {
  const char* op = "bitmask_decompress";
  TORCH_CHECK_VALUE(in_features > 0, op, ": in_features must be positive, got ", in_features);
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be float32, bfloat16 or float16");
  TORCH_CHECK_TYPE(bitmask.scalar_type() == at::kLong, op, ": bitmask must be int64");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32");
  const int64_t words = (in_features + 63) / 64, tiles = (in_features + kBitmaskTileCols - 1) / kBitmaskTileCols;
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D");
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(1) == words, op, ": bitmask must have shape [out, ", words, "]");
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == bitmask.size(0) && offsets.size(1) == tiles, op,
                    ": offsets must have shape [", bitmask.size(0), ", ", tiles, "]");
  TORCH_CHECK(bitmask.device() == values.device() && offsets.device() == values.device(), op,
              ": values, bitmask and offsets must be on one device");
  const c10::cuda::CUDAGuard guard(values.device());
  auto v = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  const int64_t O = bm.size(0);
  auto out = at::empty({O, in_features}, v.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPARSEKERN_CUDA_DISPATCH(v.scalar_type(), "bitmask_decompress", [&] {
    launch_bitmask_decompress<scalar_t>(v, bm, off, out.data_ptr<scalar_t>(), 0, O, in_features, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("bitmask_linear", &bitmask_linear_cuda);
  m.impl("bitmask_decompress", &bitmask_decompress_cuda);
}

}  // namespace cuda
}  // namespace sparsekern
