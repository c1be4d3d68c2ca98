// Argument checks shared by every device's implementation of an op, so the CPU and
// CUDA kernels refuse exactly the same inputs with the same messages. Each message
// names the op and the argument (the project's convention).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

#include "nm24_panels.h"

namespace sparsekern {

// Runtime CPU feature test (csrc/cpu/cpu_common.cpp). The AVX2 kernels are compiled
// with function target attributes and picked at run time, so one binary runs anywhere.
bool cpu_has_avx2();
// True when the AVX-512 decode kernels (csrc/cpu/sparse_rows_avx512.cpp) can run here: the
// CPU has AVX-512 F/VL/BW/DQ/VBMI2 and SPARSEKERN_CPU_ISA does not ask for "avx2" or
// "generic".
bool cpu_has_avx512();
// True when the bf16 dot-product 2:4 GEMM (nm_gemm_bf16.cpp, vdpbf16ps) can run here: the
// AVX-512 kernels can (cpu_has_avx512(), so SPARSEKERN_CPU_ISA=avx2|generic turns it off too)
// and the CPU has AVX512_BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids and later).
bool cpu_has_avx512_bf16();
// The CPU's fp32 multiply-add roof, measured (csrc/cpu/cpu_common.cpp): every intra-op thread
// runs `iterations` rounds of independent multiply-adds on the widest vector the kernels use
// here (16, 8 or 1 lanes). Returns (seconds, fp32 FLOPs done, lanes); the bench's limits
// suite divides the two for the compute roof it compares kernels and MKL with.
std::tuple<double, double, int64_t> cpu_fma_probe(int64_t iterations);
// Writes back and evicts the bytes of each CPU tensor's storage from every cache level (one
// CLFLUSH per 64-byte line): the cold start of the per-bucket path measurement
// (sparsekern/nn.py measure_paths). Only the weight then comes from memory, as it does in a
// model larger than the last-level cache, while the code, the input and the threads stay as
// warm as between two layers (a flush buffer written instead evicts them all).
void cpu_evict_from_cache(const std::vector<at::Tensor>& tensors);
// Chunks of the CPU decode row kernels that a calling thread took over from a pool worker
// the OS had parked (cpu_common.h, parallel_out_rows), since the process started.
int64_t cpu_pool_takeovers();
// Storages that a parked worker may still read after its chunk was taken over, held not
// resizable until it finishes (chunk_pool.cpp): 0 once every abandoned chunk has ended.
int64_t cpu_pool_pinned_storages();
// (the machine is contended now, times the spin throttle engaged): contention.cpp.
std::tuple<bool, int64_t> cpu_contention();

// Bits used per in-group index in the N:M format: 2 for M=4, 4 for M=8 and M=16.
inline int nm_index_bits(int64_t m) { return m == 4 ? 2 : 4; }
// Bytes per row of packed indices for `kept` kept values per row.
inline int64_t nm_index_row_bytes(int64_t kept, int64_t m) {
  return (kept * nm_index_bits(m) + 7) / 8;
}
// Columns covered by one bitmask tile offset (8 words of 64 bits).
constexpr int64_t kBitmaskTileCols = 512;
constexpr int64_t kBitmaskTileWords = kBitmaskTileCols / 64;

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

inline void check_nm_params(const char* op, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(m == 4 || m == 8 || m == 16, op, ": m must be 4, 8 or 16, got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n < m, op, ": n must satisfy 1 <= n < m, got n=", n, " m=", m);
}

inline void check_x(const char* op, const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op,
                   ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(x.size(-1) == in_features, op, ": x.shape[-1] (", x.size(-1),
                    ") must equal in_features (", in_features, ")");
}

inline void check_same(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype (", t.scalar_type(),
                   ") must match x dtype (", x.scalar_type(), ")");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_index_tensor(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name,
                               c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// A 2-D convolution's geometry, checked: x [N, C, H, W], weight_shape [O, C, kh, kw],
// stride, padding and dilation of two ints each; the output [N, O, OH, OW] must not be empty
// in its spatial dimensions.
struct ConvGeometry {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
};
inline ConvGeometry check_conv_geometry(const char* op, const at::Tensor& x, c10::IntArrayRef weight_shape,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                                        c10::IntArrayRef dilation) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK_VALUE(weight_shape.size() == 4 && weight_shape[0] > 0 && weight_shape[1] > 0 && weight_shape[2] > 0 &&
                        weight_shape[3] > 0,
                    op, ": weight_shape must be 4 positive ints [out, in, kh, kw], got ", weight_shape);
  TORCH_CHECK_VALUE(x.size(1) == weight_shape[1], op, ": x has ", x.size(1), " channels but weight_shape ",
                    weight_shape, " takes ", weight_shape[1]);
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
                    ": stride must be two ints >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
                    ": padding must be two ints >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, op,
                    ": dilation must be two ints >= 1, got ", dilation);
  // Far beyond any image, and small enough that the size arithmetic below cannot overflow.
  constexpr int64_t kMaxGeometry = int64_t(1) << 30;
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK_VALUE(stride[i] <= kMaxGeometry && padding[i] <= kMaxGeometry && dilation[i] <= kMaxGeometry &&
                          weight_shape[2 + i] <= kMaxGeometry,
                      op, ": stride, padding, dilation and kernel size must be at most 2^30");
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight_shape[0], weight_shape[2], weight_shape[3],
                 stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1, op,
                    ": input ", g.H, "x", g.W, " with padding ", padding, " is smaller than the dilated kernel ",
                    g.dh * (g.kh - 1) + 1, "x", g.dw * (g.kw - 1) + 1);
  return g;
}

inline void check_bias(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  if (!bias.has_value()) return;
  check_same(op, x, *bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape [",
                    out_features, "], got ", bias->sizes());
}

// The optional `panels` of the CPU-only ops nm_linear_cpu and nm_conv2d_cpu: the weight [O, K]
// pre-packed for the CPU 2:4 GEMM kernel (nm24_panels.h, NMWeight.gemm_panels). Not part of
// the shared schemas: no other backend sees it.
inline void check_nm24_panels(const char* op, const at::Tensor& x, int64_t n, int64_t m, int64_t O, int64_t K,
                              const c10::optional<at::Tensor>& panels) {
  if (!panels.has_value()) return;
  TORCH_CHECK_VALUE(n == 2 && m == 4, op, ": panels is a 2:4 layout, got ", n, ":", m);
  check_index_tensor(op, x, *panels, "panels", c10::kByte);
  const int64_t bytes = Nm24Panels::bytes(O, K);
  TORCH_CHECK_VALUE(panels->dim() == 1 && panels->numel() == bytes, op, ": panels must be 1-D with ", bytes,
                    " bytes for a [", O, ", ", K, "] weight, got ", panels->sizes());
}

inline void check_nm_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                 int64_t n, int64_t m, int64_t in_features,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& panels = c10::nullopt) {
  const char* op = "nm_linear";
  check_nm_params(op, n, m);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % m == 0, op, ": in_features (", in_features,
                    ") must be a positive multiple of m (", m, ")");
  check_x(op, x, in_features);
  check_same(op, x, values, "values");
  check_index_tensor(op, x, indices, "indices", c10::kByte);
  const int64_t kept = in_features / m * n;
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == kept, op, ": values must have shape [out, ", kept,
                    "] for in_features=", in_features, " and ", n, ":", m, ", got ", values.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == values.size(0) &&
                        indices.size(1) == nm_index_row_bytes(kept, m),
                    op, ": indices must have shape [", values.size(0), ", ", nm_index_row_bytes(kept, m),
                    "], got ", indices.sizes());
  check_bias(op, x, bias, values.size(0));
  check_nm24_panels(op, x, n, m, values.size(0), in_features, panels);
}

// The bitmask [out, ceil(in/64)] and offsets [out, ceil(in/512)] of a bitmask weight
// (sparsekern/formats.py: BitmaskWeight), for every op that reads one.
inline void check_bitmask_shapes(const char* op, const at::Tensor& bitmask, const at::Tensor& offsets,
                                 int64_t in_features) {
  const int64_t words = (in_features + 63) / 64;
  const int64_t tiles = (in_features + kBitmaskTileCols - 1) / kBitmaskTileCols;
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(1) == words, op, ": bitmask must have shape [out, ", words,
                    "], got ", bitmask.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == bitmask.size(0) && offsets.size(1) == tiles, op,
                    ": offsets must have shape [", bitmask.size(0), ", ", tiles, "], got ", offsets.sizes());
}

inline void check_bitmask_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                      const at::Tensor& offsets, int64_t in_features,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& columns = c10::nullopt) {
  const char* op = "bitmask_linear";
  TORCH_CHECK_VALUE(in_features > 0, op, ": in_features must be positive, got ", in_features);
  check_x(op, x, in_features);
  check_same(op, x, values, "values");
  check_index_tensor(op, x, bitmask, "bitmask", c10::kLong);
  check_index_tensor(op, x, offsets, "offsets", c10::kInt);
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  check_bitmask_shapes(op, bitmask, offsets, in_features);
  check_bias(op, x, bias, bitmask.size(0));
  if (columns.has_value()) {
    // The index (BitmaskWeight.column_index) that the CPU kernels may read instead of the
    // bitmask: an argument of the CPU-only op bitmask_linear_cpu, not of the shared schema.
    check_index_tensor(op, x, *columns, "columns", c10::kShort);
    TORCH_CHECK_VALUE(columns->dim() == 1 && columns->numel() == values.numel(), op,
                      ": columns must be 1-D with one entry per kept value (", values.numel(), "), got ",
                      columns->sizes());
    TORCH_CHECK_VALUE(in_features <= 32768, op, ": columns (int16) address at most 32768 in_features, got ",
                      in_features);
  }
}

// The BSR index tensors and the values' shape, shared by block_linear and block_linear_q.
inline void check_bsr_args(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features) {
  check_index_tensor(op, x, crow, "crow_indices", c10::kLong);
  check_index_tensor(op, x, col, "col_indices", c10::kLong);
  TORCH_CHECK_VALUE(values.dim() == 3, op, ": values must have shape [nnz_blocks, block_rows, block_cols], got ",
                    values.sizes());
  TORCH_CHECK_VALUE(crow.dim() == 1 && crow.size(0) >= 1, op, ": crow_indices must be 1-D and non-empty");
  TORCH_CHECK_VALUE(col.dim() == 1 && col.size(0) == values.size(0), op, ": col_indices must have ",
                    values.size(0), " entries (one per block), got ", col.sizes());
  TORCH_CHECK_VALUE(values.size(1) > 0 && values.size(2) > 0 && in_features % values.size(2) == 0, op,
                    ": in_features (", in_features, ") must be a multiple of the block width (", values.size(2), ")");
}

inline void check_block_linear_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                    const at::Tensor& values, int64_t in_features,
                                    const c10::optional<at::Tensor>& bias) {
  const char* op = "block_linear";
  check_x(op, x, in_features);
  check_same(op, x, values, "values");
  check_bsr_args(op, x, crow, col, values, in_features);
  check_bias(op, x, bias, (crow.size(0) - 1) * values.size(1));
}

// block_linear_q_cpu: a block weight with int8 values [nnzb, bh, bw] and scales float32 [out].
inline void check_block_linear_q_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                      const at::Tensor& values, const at::Tensor& scales, int64_t in_features,
                                      const c10::optional<at::Tensor>& bias) {
  const char* op = "block_linear_q";
  check_x(op, x, in_features);
  check_index_tensor(op, x, values, "values", c10::kChar);
  check_index_tensor(op, x, scales, "scales", c10::kFloat);
  check_bsr_args(op, x, crow, col, values, in_features);
  const int64_t out = (crow.size(0) - 1) * values.size(1);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == out, op, ": scales must have shape [", out, "], got ",
                    scales.sizes());
  check_bias(op, x, bias, out);
}

// nm_linear_q: an N:M weight with quantized values (sparsekern/precisions.py). bits 8: values
// int8 [out, kept], scales float32 [out]; bits 4: values uint8 [out, ceil(kept / 2)] (two
// per byte, low nibble first, stored q + 8), scales float32 [out, ceil(kept / group_size)],
// group_size 32, 64 or 128 kept values of a row.
inline void check_nm_linear_q_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                   const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                                   int64_t group_size, const c10::optional<at::Tensor>& bias) {
  const char* op = "nm_linear_q";
  check_nm_params(op, n, m);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % m == 0, op, ": in_features (", in_features,
                    ") must be a positive multiple of m (", m, ")");
  check_x(op, x, in_features);
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": bits must be 8 (int8) or 4 (int4), got ", bits);
  const int64_t kept = in_features / m * n;
  const int64_t O = indices.dim() == 2 ? indices.size(0) : -1;
  check_index_tensor(op, x, indices, "indices", c10::kByte);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) == nm_index_row_bytes(kept, m), op,
                    ": indices must have shape [out, ", nm_index_row_bytes(kept, m), "], got ", indices.sizes());
  if (bits == 8) {
    TORCH_CHECK_VALUE(group_size == 0, op, ": group_size must be 0 for bits 8 (one scale per row), got ", group_size);
    check_index_tensor(op, x, values, "values", c10::kChar);
    TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == O && values.size(1) == kept, op,
                      ": values must be int8 of shape [", O, ", ", kept, "], got ", values.sizes());
    check_index_tensor(op, x, scales, "scales", c10::kFloat);
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == O, op, ": scales must have shape [", O, "], got ",
                      scales.sizes());
  } else {
    TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128, op,
                      ": group_size must be 32, 64 or 128 for bits 4, got ", group_size);
    check_index_tensor(op, x, values, "values", c10::kByte);
    TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == O && values.size(1) == (kept + 1) / 2, op,
                      ": values must be uint8 of shape [", O, ", ", (kept + 1) / 2, "] (two int4 per byte), got ",
                      values.sizes());
    const int64_t groups = (kept + group_size - 1) / group_size;
    check_index_tensor(op, x, scales, "scales", c10::kFloat);
    TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == O && scales.size(1) == groups, op,
                      ": scales must have shape [", O, ", ", groups, "], got ", scales.sizes());
  }
  check_bias(op, x, bias, O);
}

// bitmask_linear_q: a bitmask weight with int8 values [nnz] and float32 scales [out].
inline void check_bitmask_linear_q_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                        const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                        const c10::optional<at::Tensor>& bias) {
  const char* op = "bitmask_linear_q";
  TORCH_CHECK_VALUE(in_features > 0, op, ": in_features must be positive, got ", in_features);
  check_x(op, x, in_features);
  check_index_tensor(op, x, values, "values", c10::kChar);
  check_index_tensor(op, x, bitmask, "bitmask", c10::kLong);
  check_index_tensor(op, x, offsets, "offsets", c10::kInt);
  check_index_tensor(op, x, scales, "scales", c10::kFloat);
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  check_bitmask_shapes(op, bitmask, offsets, in_features);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == bitmask.size(0), op, ": scales must have shape [",
                    bitmask.size(0), "], got ", scales.sizes());
  check_bias(op, x, bias, bitmask.size(0));
}

// x_features: which weight dimension x's last dimension must match (1 for the forward
// x @ W^T, 0 for the input gradient grad_out @ W).
inline void check_masked_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bitmask, int x_features) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  check_x(op, x, weight.size(x_features));
  check_same(op, x, weight, "weight");
  check_index_tensor(op, x, bitmask, "bitmask", c10::kLong);
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(0) == weight.size(0) &&
                        bitmask.size(1) == (weight.size(1) + 63) / 64,
                    op, ": bitmask must have shape [", weight.size(0), ", ", (weight.size(1) + 63) / 64,
                    "] (one bit per weight element), got ", bitmask.sizes());
}

}  // namespace sparsekern
