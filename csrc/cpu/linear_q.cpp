// CPU kernels of the quantized linear ops nm_linear_q and bitmask_linear_q: x @ W^T + b with
// W's kept values stored int8 (or int4 for N:M) and dequantized in registers (rows_q.h).
// Layouts: sparsekern/precisions.py, sparsekern/formats.py.
//
// Up to kDirectMaxBatch rows of x: the decode kernels (AVX-512 for 2:4 and bitmask where the
// CPU has it, else AVX2, else portable), which stream the packed bytes. Above: tiles of
// output rows dequantized into fp32 and multiplied by the BLAS GEMM (cpu_common.h
// tiled_gemm), as the fp kernels' large-batch path ("load as sparse, compute as dense").
#include <torch/library.h>

#include <utility>

#include "cpu_common.h"
#include "rows_q.h"

namespace sparsekern {
namespace cpu {
namespace {

// kQAlgoInt8Act (rows_q.h): x's rows quantized to int8 once, before the threads split the
// output rows. Returns the tensors that own the bytes and scales.
std::pair<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x2, QuantizedActivations& q) {
  const int64_t B = x2.size(0), K = x2.size(1);
  q.ld = q_act_row_bytes(K);
  auto u8 = at::empty({B, q.ld}, x2.options().dtype(at::kByte));
  auto scale = at::empty({B}, x2.options());
  quantize_activation_rows(x2.data_ptr<float>(), B, K, u8.data_ptr<uint8_t>(), q.ld, scale.data_ptr<float>());
  q.u8 = u8.data_ptr<uint8_t>();
  q.scale = scale.data_ptr<float>();
  return {u8, scale};
}

void check_q_algo(const char* op, int64_t algo) {
  TORCH_CHECK_VALUE(algo == kQAlgoExact || algo == kQAlgoInt8Act, op, ": algo must be ", kQAlgoExact,
                    " (exact) or ", kQAlgoInt8Act, " (int8 activations), got ", algo);
}

at::Tensor nm_linear_q_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                           int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t algo = kQAlgoExact) {
  check_q_algo("nm_linear_q", algo);
  check_nm_linear_q_args(x, values, indices, scales, n, m, in_features, bits, group_size, bias);
  const int64_t K = in_features, O = indices.size(0), kept = K / m * n;
  auto vals = values.contiguous();
  auto idx = indices.contiguous();
  auto sc = scales.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  NmQRowsArgs a{reinterpret_cast<const uint8_t*>(vals.data_ptr()), idx.data_ptr<uint8_t>(), sc.data_ptr<float>(),
                bits, bits == 4 ? group_size : 0, bits == 4 ? (kept + group_size - 1) / group_size : 1,
                n, m, kept, vals.size(1), idx.size(1), K, O, x2.data_ptr<float>(), B, nullptr};
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (B > kDirectMaxBatch) {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
      for (int64_t r = r0; r < r1; ++r) nm_q_row_dense(a, r, buf + (r - r0) * K);
    }, bias);
    bias_left = c10::nullopt;
  } else {
    out = at::empty({B, O}, x2.options());
    a.out = out.data_ptr<float>();
    const bool wide = avx512_nm_q_pattern(n, m) && cpu_has_avx512();
    const bool avx2 = cpu_has_avx2();
    if (algo == kQAlgoInt8Act) {
      const auto held = quantize_activations(x2, a.xq);
      const bool vnni = cpu_has_avx512() && avx512_q_act_vector();
      parallel_rows(O, rows_grain(K, B), [&](int64_t r0, int64_t r1) {
        if (vnni) avx512::nm_q_rows_act(a, r0, r1);
        else if (avx2) avx2::nm_q_rows_act(a, r0, r1);
        else generic::nm_q_rows_act(a, r0, r1);
      });
      return finish_linear(out, x, bias_left);
    }
    parallel_rows(O, rows_grain(K, B), [&](int64_t r0, int64_t r1) {
      if (wide) avx512::nm_q_rows(a, r0, r1);
      else if (avx2) avx2::nm_q_rows(a, r0, r1);
      else generic::nm_q_rows(a, r0, r1);
    });
  }
  return finish_linear(out, x, bias_left);
}

at::Tensor bitmask_linear_q_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                const c10::optional<at::Tensor>& bias, int64_t algo = kQAlgoExact) {
  check_q_algo("bitmask_linear_q", algo);
  check_bitmask_linear_q_args(x, values, bitmask, offsets, scales, in_features, bias);
  check_bitmask_tail_bits("bitmask_linear_q", bitmask, in_features);
  const int64_t K = in_features, O = bitmask.size(0);
  auto vals = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto sc = scales.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  BitmaskQRowsArgs a{vals.data_ptr<int8_t>(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), sc.data_ptr<float>(),
                     bm.size(1), off.size(1), K, O, vals.numel(), x2.data_ptr<float>(), B, nullptr};
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;
  if (B == 0 || O == 0 || vals.numel() == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (B > kDirectMaxBatch) {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
      for (int64_t r = r0; r < r1; ++r) bitmask_q_row_dense(a, r, buf + (r - r0) * K);
    }, bias);
    bias_left = c10::nullopt;
  } else {
    out = at::empty({B, O}, x2.options());
    a.out = out.data_ptr<float>();
    const bool wide = cpu_has_avx512(), avx2 = cpu_has_avx2();
    if (algo == kQAlgoInt8Act) {
      const auto held = quantize_activations(x2, a.xq);
      const bool vnni = wide && avx512_q_act_vector();
      parallel_rows(O, rows_grain(K, B), [&](int64_t r0, int64_t r1) {
        if (vnni) avx512::bitmask_q_rows_act(a, r0, r1);
        else if (avx2) avx2::bitmask_q_rows_act(a, r0, r1);
        else generic::bitmask_q_rows_act(a, r0, r1);
      });
      return finish_linear(out, x, bias_left);
    }
    parallel_rows(O, rows_grain(K, B), [&](int64_t r0, int64_t r1) {
      if (wide) avx512::bitmask_q_rows(a, r0, r1);
      else if (avx2) avx2::bitmask_q_rows(a, r0, r1);
      else generic::bitmask_q_rows(a, r0, r1);
    });
  }
  return finish_linear(out, x, bias_left);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("nm_linear_q", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                           int64_t group_size, const c10::optional<at::Tensor>& bias) {
    return nm_linear_q_cpu(x, values, indices, scales, n, m, in_features, bits, group_size, bias);
  });
  m.impl("bitmask_linear_q", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                const c10::optional<at::Tensor>& bias) {
    return bitmask_linear_q_cpu(x, values, bitmask, offsets, scales, in_features, bias);
  });
  // The CPU-only ops with the decode algorithm chosen in Python (rows_q.h kQAlgo*): it
  // applies up to kDirectMaxBatch rows; larger batches take the tiles either way.
  m.impl("nm_linear_q_cpu", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                               int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t algo) {
    return nm_linear_q_cpu(x, values, indices, scales, n, m, in_features, bits, group_size, bias, algo);
  });
  m.impl("bitmask_linear_q_cpu", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                    const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                    const c10::optional<at::Tensor>& bias, int64_t algo) {
    return bitmask_linear_q_cpu(x, values, bitmask, offsets, scales, in_features, bias, algo);
  });
}

}  // namespace cpu
}  // namespace sparsekern
