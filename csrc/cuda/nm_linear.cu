// CUDA nm_linear (y = x @ W^T + b, W in N:M format) and nm_decompress.
// Layout: sparsekern/formats.py (NMWeight). Index arithmetic: decode_layout.cuh.
// Predicted speeds and the arithmetic behind them: docs/GPU_KERNELS.md (nothing here has run
// on a GPU yet).
//
// Two kernels, chosen on the host per call by pattern and dtype (which batch sizes run here at
// all is decided in Python: sparsekern/dispatch_rules.py CUDA_DECODE_MAX_ROWS; above it the
// dispatch runs a GEMM on the decompressed weight instead, and 2:4 bf16/fp16 normally runs
// cuSPARSELt or CUTLASS there: sparsekern/semi_structured.py). Both take any batch, in tiles:
//   Nm24Mma   2:4, bf16/fp16, K % 64 == 0: the decode kernel. A CTA
//             (4 warps) owns 64 output rows x one K slice x up to 32 batch rows; x's slice is
//             staged in shared memory once; each warp streams its 16 rows' values and indices with
//             16-byte (values: a quad's four lanes read 64 adjacent bytes per load) and 8-byte
//             (indices, transposed in the quad by shuffles) loads, two 256-column super-steps in flight,
//             expands them in registers into bf16/fp16 tensor-core fragments and multiplies with
//             mma.sync m16n8k16 (fp32 accumulation; batch rows are the n = 8 side). K is split so
//             that a layer fills the GPU (>= 2 CTAs per SM); partial sums go to an fp32 buffer and
//             one small kernel adds them with the bias.
//   NmFma     every other N:M pattern and fp32: CUDA cores, x slice in
//             shared memory as fp32 [col][batch], lanes of a warp take consecutive groups of a
//             row, indexing by shifts (m = 4/8/16), fp32 accumulation, same split-K.
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekern {
namespace cuda {
namespace {

using layout::kSuperCols;
using layout::kXPad;

constexpr int kMmaWarps = 4;             // rows per CTA = 16 * kMmaWarps
constexpr int kMmaRows = 16 * kMmaWarps;
constexpr int kFmaWarps = 4;
constexpr int kFmaRowsPerWarp = 4;
constexpr int kFmaRows = kFmaWarps * kFmaRowsPerWarp;

// ------------------------------------------------------------------------ load helpers
// Streaming loads of the weight: read once, not kept in L1 (x lives in shared memory).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<at::BFloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaOp<at::Half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <int I>
__device__ __forceinline__ uint32_t word_of(const uint4 (&v)[4]) {
  constexpr int c = I & 3;
  const uint4& u = v[I >> 2];
  return c == 0 ? u.x : (c == 1 ? u.y : (c == 2 ? u.z : u.w));
}

// ----------------------------------------------------------------- Nm24Mma (2:4 decode)
// One super-step's weight registers of a lane: rows g (h = 0) and g + 8 (h = 1).
struct Nm24Stage {
  uint4 v[2][4];
  uint2 m[2];
};

template <typename T, int NT>
__global__ void __launch_bounds__(32 * kMmaWarps) nm24_mma_kernel(
    const T* __restrict__ x,          // [B, K]
    const T* __restrict__ values,     // [O, K/2]
    const uint8_t* __restrict__ idx,  // [O, K/8]
    const T* __restrict__ bias,       // [O] or null
    T* __restrict__ y,                // [B, O] (splits == 1)
    float* __restrict__ partial,      // [splits, B, O] (splits > 1)
    int64_t B, int64_t O, int64_t K, int64_t KS) {
  constexpr int BT = 8 * NT;  // batch rows per CTA
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int RS = static_cast<int>(KS) + kXPad;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t r_lo = static_cast<int64_t>(blockIdx.x) * kMmaRows + warp * 16 + g;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * KS;
  const int64_t k1 = min(K, k0 + KS);
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * BT;
  const int nss = static_cast<int>((k1 - k0 + kSuperCols - 1) / kSuperCols);
  const int64_t kept = K / 2, ib = K / 8;

  auto load = [&](Nm24Stage& s, int ss) {
    const int64_t c0 = k0 + static_cast<int64_t>(ss) * kSuperCols;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r_lo + 8 * h;
      const bool row_ok = r < O;
      const T* vrow = values + (row_ok ? r : 0) * kept;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        s.v[h][i] = row_ok && layout::nm24_chunk_ok(c0, i, k1)
                        ? ld_stream16(vrow + layout::nm24_value_offset(c0, q, i))
                        : make_uint4(0u, 0u, 0u, 0u);
      s.m[h] = row_ok && layout::nm24_chunk_ok(c0, q, k1) ? ld_stream8(idx + r * ib + layout::nm24_meta_offset(c0, q))
                                                          : make_uint2(0u, 0u);
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  auto compute = [&](const Nm24Stage& s, int ss) {
    // The quad's index bytes, transposed so that the lane holds its own groups' nibbles.
    uint32_t mlo[2] = {0u, 0u}, mhi[2] = {0u, 0u};
#pragma unroll
    for (int rd = 0; rd < 4; ++rd) {
      const int dst = layout::nm24_quad_dst(q, rd), src = layout::nm24_quad_src(q, rd);
      const uint32_t send = layout::nm24_meta_piece(s.m[0].x, s.m[0].y, dst) |
                            (layout::nm24_meta_piece(s.m[1].x, s.m[1].y, dst) << 16);
      const uint32_t got = rd == 0 ? send : __shfl_sync(0xffffffffu, send, (lane & ~3) | src);
      layout::nm24_meta_place(mlo[0], mhi[0], got & 0xffffu, src);
      layout::nm24_meta_place(mlo[1], mhi[1], got >> 16, src);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      uint32_t vlo, vhi;
      switch (j) {  // compile-time after unrolling
#define SK_WORD(J)                 \
  case J:                          \
    vlo = word_of<J>(s.v[0]);      \
    vhi = word_of<J>(s.v[1]);      \
    break;
        SK_WORD(0) SK_WORD(1) SK_WORD(2) SK_WORD(3) SK_WORD(4) SK_WORD(5) SK_WORD(6) SK_WORD(7)
        SK_WORD(8) SK_WORD(9) SK_WORD(10) SK_WORD(11) SK_WORD(12) SK_WORD(13) SK_WORD(14) SK_WORD(15)
#undef SK_WORD
        default:
          vlo = vhi = 0u;
      }
      const uint32_t nlo = layout::nm24_nibble(mlo[0], mhi[0], j);
      const uint32_t nhi = layout::nm24_nibble(mlo[1], mhi[1], j);
      const int cl = ss * kSuperCols + static_cast<int>(layout::nm24_group_col(0, q, j));  // slice column
      const uint32_t a[4] = {layout::nm24_dense_pair(vlo, nlo, 0), layout::nm24_dense_pair(vhi, nhi, 0),
                             layout::nm24_dense_pair(vlo, nlo, 1), layout::nm24_dense_pair(vhi, nhi, 1)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 bb = *reinterpret_cast<const uint2*>(xs + layout::xs_index(nt * 8 + g, cl, RS));
        MmaOp<T>::run(acc[nt], a, bb.x, bb.y);
      }
    }
  };

  // Weight loads for the first super-step go out before x is staged and the block syncs.
  Nm24Stage sa, sb;
  if (nss > 0) load(sa, 0);

  // Stage x[b0:b0+BT, k0:k0+KS] (zeros past B and past k1), 16 bytes per thread and step.
  const int chunks_per_row = static_cast<int>(KS / 8);
  for (int i = threadIdx.x; i < BT * chunks_per_row; i += blockDim.x) {
    const int bl = i / chunks_per_row, c = (i - bl * chunks_per_row) * 8;
    const int64_t b = b0 + bl, col = k0 + c;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (b < B && col < k1) v = *reinterpret_cast<const uint4*>(x + b * K + col);
    *reinterpret_cast<uint2*>(xs + layout::xs_index(bl, c, RS)) = make_uint2(v.x, v.y);
    *reinterpret_cast<uint2*>(xs + layout::xs_index(bl, c + 4, RS)) = make_uint2(v.z, v.w);
  }
  __syncthreads();

  // Two super-steps in flight: load the next while the tensor cores work on this one.
  for (int ss = 0; ss < nss; ss += 2) {
    if (ss + 1 < nss) load(sb, ss + 1);
    compute(sa, ss);
    if (ss + 1 >= nss) break;
    if (ss + 2 < nss) load(sa, ss + 2);
    compute(sb, ss + 1);
  }

  // Epilogue: c0, c1 -> row g, batch 2q, 2q+1; c2, c3 -> row g + 8.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t r = r_lo + (e >= 2 ? 8 : 0);
      const int64_t b = b0 + nt * 8 + 2 * q + (e & 1);
      if (r < O && b < B) {
        if (gridDim.y == 1) {
          float v = acc[nt][e];
          if (bias != nullptr) v += static_cast<float>(bias[r]);
          y[b * O + r] = static_cast<T>(v);
        } else {
          partial[(static_cast<int64_t>(blockIdx.y) * B + b) * O + r] = acc[nt][e];
        }
      }
    }
  }
}

// ------------------------------------------------------------------- NmFma (any N:M)
// x slice in shared memory as fp32 [KS][BT] (the BT batch values of a column side by side).
template <typename T, int BT>
__global__ void nm_fma_kernel(
    const T* __restrict__ x, const T* __restrict__ values, const uint8_t* __restrict__ idx,
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial, int64_t B, int64_t O, int64_t K,
    int64_t KS, int n, int m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* xs = reinterpret_cast<float*>(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * KS;
  const int64_t k1 = min(K, k0 + KS);
  const int64_t b0 = static_cast<int64_t>(blockIdx.z) * BT;
  const int bits = layout::nm_bits(m), lg = layout::nm_log2(m);
  const int64_t kept = (K >> lg) * n;
  const int64_t ib = (kept * bits + 7) / 8;

  const int cols = static_cast<int>(k1 - k0);
  for (int i = threadIdx.x; i < cols * BT; i += blockDim.x) {
    const int c = i / BT, bl = i - c * BT;
    const int64_t b = b0 + bl;
    xs[i] = b < B ? static_cast<float>(x[b * K + k0 + c]) : 0.f;
  }
  __syncthreads();

  // The warp's kFmaRowsPerWarp rows advance together: their loads are independent, so four
  // rows' values are in flight per lane instead of one.
  constexpr int R = kFmaRowsPerWarp;
  const int groups = cols >> lg;
  const int64_t g0 = k0 >> lg;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFmaRows + warp * R;
  if (r0 >= O) return;  // no barrier follows
  const T* vrow[R];
  const uint8_t* irow[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int64_t r = min(r0 + rr, O - 1);  // rows past O repeat the last one; not stored
    vrow[rr] = values + r * kept;
    irow[rr] = idx + r * ib;
  }
  float acc[R][BT];
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[rr][b] = 0.f;
  for (int gi = lane; gi < groups; gi += 32) {
    const int64_t s0 = (g0 + gi) * n;
    for (int t = 0; t < n; ++t) {
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const float v = static_cast<float>(vrow[rr][s0 + t]);
        const int col = (gi << lg) + layout::nm_index_at(irow[rr], s0 + t, bits);
        const float* xv = xs + col * BT;
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[rr][b] += v * xv[b];
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int64_t r = r0 + rr;
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[rr][b] = warp_sum(acc[rr][b]);
    if (r < O && lane < BT) {
      float v = 0.f;
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b == lane) v = acc[rr][b];
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

// --------------------------------------------------------------------- nm_decompress
// One thread per group of m columns of rows [r_begin, r_begin + rows): m outputs, zeros where
// no slot points. out is [rows, K] (row 0 = r_begin).
template <typename T, int M>
__global__ void nm_decompress_kernel(const T* __restrict__ values, const uint8_t* __restrict__ idx,
                                     T* __restrict__ out, int64_t r_begin, int64_t rows, int64_t K, int n) {
  constexpr int bits = M == 4 ? 2 : 4;
  const int64_t gpr = K / M;
  const int64_t kept = gpr * n, ib = (kept * bits + 7) / 8;
  const int64_t total = rows * gpr;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rl = i / gpr, gi = i - rl * gpr, r = r_begin + rl;
    T d[M];
#pragma unroll
    for (int j = 0; j < M; ++j) d[j] = static_cast<T>(0.f);
    for (int t = 0; t < n; ++t) {
      const int64_t s = gi * n + t;
      const T v = values[r * kept + s];
      const int j0 = layout::nm_index_at(idx + r * ib, s, bits);
#pragma unroll
      for (int j = 0; j < M; ++j)
        if (j == j0) d[j] = v;
    }
    T* o = out + rl * K + gi * M;
#pragma unroll
    for (int j = 0; j < M; ++j) o[j] = d[j];
  }
}

template <typename T>
void launch_nm_decompress(const at::Tensor& values, const at::Tensor& idx, T* out, int64_t r_begin, int64_t rows,
                          int64_t K, int64_t n, int64_t m, cudaStream_t stream) {
  const int64_t total = rows * (K / m);
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, threads), 64 * 1024));
  const T* v = values.data_ptr<T>();
  const uint8_t* ix = idx.data_ptr<uint8_t>();
  if (m == 4)
    nm_decompress_kernel<T, 4><<<blocks, threads, 0, stream>>>(v, ix, out, r_begin, rows, K, static_cast<int>(n));
  else if (m == 8)
    nm_decompress_kernel<T, 8><<<blocks, threads, 0, stream>>>(v, ix, out, r_begin, rows, K, static_cast<int>(n));
  else
    nm_decompress_kernel<T, 16><<<blocks, threads, 0, stream>>>(v, ix, out, r_begin, rows, K, static_cast<int>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------ launchers
// Splits of K: enough CTAs to give every SM two, each slice within the shared-memory budget
// (max_ks columns) and a multiple of `quantum` columns.
inline int64_t choose_ks(int64_t K, int64_t ctas_without_split, int64_t max_ks, int64_t quantum) {
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  const int64_t want_splits = std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(ctas_without_split, 1)));
  int64_t ks = ceil_div(ceil_div(K, want_splits), quantum) * quantum;
  ks = std::max<int64_t>(ks, quantum);
  ks = std::min<int64_t>(ks, std::max<int64_t>(quantum, max_ks / quantum * quantum));
  return std::min<int64_t>(ks, ceil_div(K, quantum) * quantum);
}

template <typename T, int NT>
void launch_nm24_mma(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& ix, const T* bias, at::Tensor& out,
                     int64_t B, int64_t O, int64_t K, cudaStream_t stream) {
  constexpr int BT = 8 * NT;
  const size_t smem_budget = NT == 4 ? 96 * 1024 : 48 * 1024;
  const int64_t max_ks = static_cast<int64_t>(smem_budget / (BT * sizeof(T))) - kXPad;
  const int64_t row_tiles = ceil_div(O, kMmaRows), batch_tiles = ceil_div(B, BT);
  const int64_t KS = choose_ks(K, row_tiles * batch_tiles, max_ks, kSuperCols);
  const int64_t splits = ceil_div(K, KS);
  const size_t smem = static_cast<size_t>(BT) * (KS + kXPad) * sizeof(T);
  auto kernel = nm24_mma_kernel<T, NT>;
  ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, B, O}, x2.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits), static_cast<unsigned>(batch_tiles));
  kernel<<<grid, 32 * kMmaWarps, smem, stream>>>(x2.data_ptr<T>(), v.data_ptr<T>(), ix.data_ptr<uint8_t>(), bias,
                                                 out.data_ptr<T>(), splits > 1 ? partial.data_ptr<float>() : nullptr,
                                                 B, O, K, KS);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) launch_splitk_finalize<T>(partial, bias, out.data_ptr<T>(), splits, B, O, stream);
}

template <typename T, int BT>
void launch_nm_fma(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& ix, const T* bias, at::Tensor& out,
                   int64_t B, int64_t O, int64_t K, int64_t n, int64_t m, cudaStream_t stream) {
  const size_t smem_budget = 48 * 1024;
  const int64_t max_ks = static_cast<int64_t>(smem_budget / (BT * sizeof(float)));
  const int64_t row_tiles = ceil_div(O, kFmaRows), batch_tiles = ceil_div(B, BT);
  const int64_t KS = choose_ks(K, row_tiles * batch_tiles, max_ks, 64);  // a multiple of every m
  const int64_t splits = ceil_div(K, KS);
  const size_t smem = static_cast<size_t>(BT) * KS * sizeof(float);
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, B, O}, x2.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits), static_cast<unsigned>(batch_tiles));
  nm_fma_kernel<T, BT><<<grid, 32 * kFmaWarps, smem, stream>>>(
      x2.data_ptr<T>(), v.data_ptr<T>(), ix.data_ptr<uint8_t>(), bias, out.data_ptr<T>(),
      splits > 1 ? partial.data_ptr<float>() : nullptr, B, O, K, KS, static_cast<int>(n), static_cast<int>(m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) launch_splitk_finalize<T>(partial, bias, out.data_ptr<T>(), splits, B, O, stream);
}

at::Tensor nm_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                          int64_t m, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  check_nm_linear_args(x, values, indices, n, m, in_features, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, O = values.size(0);
  TORCH_CHECK_VALUE(K < (int64_t{1} << 31), "nm_linear: in_features must be below 2^31, got ", K);
  auto x2 = x.reshape({-1, K}).contiguous();
  if (!aligned_to(x2.data_ptr(), 16)) x2 = x2.clone();
  auto v = values.contiguous();
  auto ix = indices.contiguous();
  auto bc = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const int64_t B = x2.size(0);
  // Batch tiles (8 to 32 rows) go on the grid's z dimension, at most 65535 of them.
  TORCH_CHECK_VALUE(B <= 65535 * 8, "nm_linear: the CUDA kernels take at most ", 65535 * 8,
                    " rows of x, got ", B);
  auto out = at::empty({B, O}, x2.options());
  if (B == 0 || O == 0) return reshape_output(out, x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool lowp = x2.scalar_type() != at::kFloat;
  const bool mma_ok = lowp && n == 2 && m == 4 && K % 64 == 0 && aligned_to(v.data_ptr(), 16) &&
                      aligned_to(ix.data_ptr(), 8);
  SPARSEKERN_CUDA_DISPATCH(x2.scalar_type(), "nm_linear", [&] {
    const scalar_t* b = bc.has_value() ? bc->data_ptr<scalar_t>() : nullptr;
    if (mma_ok) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        TORCH_CHECK(false, "nm_linear: internal error, fp32 on the tensor-core path");
      } else {
        if (B <= 8)
          launch_nm24_mma<scalar_t, 1>(x2, v, ix, b, out, B, O, K, stream);
        else if (B <= 16)
          launch_nm24_mma<scalar_t, 2>(x2, v, ix, b, out, B, O, K, stream);
        else
          launch_nm24_mma<scalar_t, 4>(x2, v, ix, b, out, B, O, K, stream);
      }
    } else if (B == 1) {
      launch_nm_fma<scalar_t, 1>(x2, v, ix, b, out, B, O, K, n, m, stream);
    } else if (B <= 4) {
      launch_nm_fma<scalar_t, 4>(x2, v, ix, b, out, B, O, K, n, m, stream);
    } else {
      launch_nm_fma<scalar_t, 8>(x2, v, ix, b, out, B, O, K, n, m, stream);
    }
  });
  return reshape_output(out, x);
}

at::Tensor nm_decompress_cuda(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m,
                              int64_t in_features) {
  const char* op = "nm_decompress";
  check_nm_params(op, n, m);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % m == 0, op, ": in_features (", in_features,
                    ") must be a positive multiple of m (", m, ")");
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be float32, bfloat16 or float16");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op, ": indices must be uint8");
  const int64_t kept = in_features / m * n;
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == kept, op, ": values must have shape [out, ", kept, "]");
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == values.size(0) &&
                        indices.size(1) == nm_index_row_bytes(kept, m),
                    op, ": indices must have shape [", values.size(0), ", ", nm_index_row_bytes(kept, m), "]");
  TORCH_CHECK(indices.device() == values.device(), op, ": indices and values must be on one device");
  const c10::cuda::CUDAGuard guard(values.device());
  auto v = values.contiguous();
  auto ix = indices.contiguous();
  const int64_t O = v.size(0);
  auto out = at::empty({O, in_features}, v.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPARSEKERN_CUDA_DISPATCH(v.scalar_type(), "nm_decompress", [&] {
    launch_nm_decompress<scalar_t>(v, ix, out.data_ptr<scalar_t>(), 0, O, in_features, n, m, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("nm_linear", &nm_linear_cuda);
  m.impl("nm_decompress", &nm_decompress_cuda);
}

}  // namespace cuda
}  // namespace sparsekern
