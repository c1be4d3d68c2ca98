// CPU kernels of masked fine-tuning (the training-time ops), with M a packed bitmask
// [out, ceil(in/64)] (bit j of word w is column 64w+j):
//
//   masked_linear             y  = x @ (W*M)^T + b   one masking pass builds W*M (fp32; bf16 for bf16
//                                                     operands where the CPU has bf16 dot products), one addmm
//   masked_linear_grad_input  gx = g @ (W*M)         the same pass again, one mm
//   masked_linear_grad_weight gw = (g^T @ x) * M     one mm, then the mask applied in place
//
// As on the GPU path (csrc/cuda/masked_linear.cu), every product is one BLAS call on the
// whole weight and the mask costs one pass over [out, in]. The earlier kernel multiplied
// 128-row tiles of W*M into the BLAS (grad_input as 64 rank-128 updates of gx on an 8192-row
// weight) and masked the weight gradient with a bool mask unpacked in torch (four passes);
// bench/results/cpu-training-20261206 has the training step before and after. W*M is not
// kept from the forward to the backward: the ops keep their schemas, and the recomputation is
// one more pass over the weight, small against the step's three GEMMs at training batches.
#include <torch/library.h>

#include <cstring>

#include "cpu_common.h"

namespace sparsekern {
namespace cpu {
namespace {

// For each byte of a mask word, the 8 lanes it selects as all-ones / all-zero masks of the
// element's width (U: uint32_t for fp32, uint16_t for bf16): a row is then masked by AND, 8
// lanes at a time, which the compiler vectorises on any x86 target (a per-bit select through
// variable shifts does not vectorise before AVX2).
template <typename U>
struct ByteLaneMasks {
  alignas(32) U lanes[256][8];
  ByteLaneMasks() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) lanes[b][j] = ((b >> j) & 1) ? static_cast<U>(~U(0)) : U(0);
  }
};

template <typename U>
const ByteLaneMasks<U>& byte_lane_masks() {
  static const ByteLaneMasks<U> table;
  return table;
}

// Whether column c is kept: bit c of the row's mask words.
inline bool mask_bit(const int64_t* words, int64_t c) { return (static_cast<uint64_t>(words[c >> 6]) >> (c & 63)) & 1; }

// dst[c] = src[c] if bit c of the row's mask words is set, else 0, for c < K, on the bit
// patterns of the elements (fp32 as uint32_t, bf16 as uint16_t; dst may be src: each element
// is read before it is written).
template <typename U>
void mask_row_bits(const U* src, const int64_t* words, int64_t K, U* dst, const ByteLaneMasks<U>& t) {
  int64_t c0 = 0;
  for (; c0 + 64 <= K; c0 += 64) {
    const uint64_t word = static_cast<uint64_t>(words[c0 >> 6]);
    for (int byte = 0; byte < 8; ++byte) {
      const U* m = t.lanes[(word >> (8 * byte)) & 0xff];
      const int64_t c = c0 + 8 * byte;
      U v[8];
      std::memcpy(v, src + c, sizeof(v));
      for (int j = 0; j < 8; ++j) v[j] &= m[j];
      std::memcpy(dst + c, v, sizeof(v));
    }
  }
  for (int64_t c = c0; c < K; ++c) dst[c] = mask_bit(words, c) ? src[c] : U(0);
}

template <typename T>
void mask_row_convert(const T* src, const int64_t* words, int64_t K, float* dst) {
  for (int64_t c = 0; c < K; ++c) dst[c] = mask_bit(words, c) ? static_cast<float>(src[c]) : 0.f;
}

// Rows per task of a masking pass: about 64K elements, so a small layer stays on one thread.
int64_t mask_grain(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K)); }

// dst rows = src rows masked by M ([O, K] contiguous, U the element's bit pattern; dst may be
// src), in one parallel pass.
template <typename U>
void mask_rows(const U* src, const int64_t* bp, int64_t O, int64_t K, int64_t nw, U* dst) {
  const auto& t = byte_lane_masks<U>();
  at::parallel_for(0, O, mask_grain(K), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) mask_row_bits(src + r * K, bp + r * nw, K, dst + r * K, t);
  });
}

// W*M as a new contiguous fp32 [O, K] tensor, in one parallel pass over the weight.
at::Tensor masked_weight_f32(const at::Tensor& w, const at::Tensor& bm) {
  const int64_t O = w.size(0), K = w.size(1), nw = bm.size(1);
  auto out = at::empty({O, K}, w.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  float* op = out.data_ptr<float>();
  const int64_t* bp = bm.data_ptr<int64_t>();
  if (w.scalar_type() == at::kFloat) {
    mask_rows(reinterpret_cast<const uint32_t*>(w.data_ptr<float>()), bp, O, K, nw, reinterpret_cast<uint32_t*>(op));
  } else {
    SPARSEKERN_DISPATCH_FLOATS(w.scalar_type(), "masked_linear", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      at::parallel_for(0, O, mask_grain(K), [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) mask_row_convert(wp + r * K, bp + r * nw, K, op + r * K);
      });
    });
  }
  return out;
}

// W*M as a new contiguous bf16 [O, K] tensor (w bf16), in one parallel pass.
at::Tensor masked_weight_bf16(const at::Tensor& w, const at::Tensor& bm) {
  auto out = at::empty({w.size(0), w.size(1)}, w.options());
  if (out.numel() == 0) return out;
  mask_rows(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), bm.data_ptr<int64_t>(), w.size(0),
            w.size(1), bm.size(1), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// g [O, K] contiguous (fp32 or bf16) *= M, in place.
void mask_in_place(at::Tensor& g, const at::Tensor& bm) {
  if (g.numel() == 0) return;
  const int64_t O = g.size(0), K = g.size(1), nw = bm.size(1);
  const int64_t* bp = bm.data_ptr<int64_t>();
  if (g.scalar_type() == at::kBFloat16) {
    auto* gp = reinterpret_cast<uint16_t*>(g.data_ptr<at::BFloat16>());
    mask_rows(gp, bp, O, K, nw, gp);
  } else {
    auto* gp = reinterpret_cast<uint32_t*>(g.data_ptr<float>());
    mask_rows(gp, bp, O, K, nw, gp);
  }
}

// bf16 operands on a CPU with bf16 dot products (AVX512_BF16; AMX parts have it too): the
// products run in bf16 through oneDNN, accumulating in fp32 as F.linear does on bf16 tensors,
// instead of converting both operands to fp32 first. The rounding points are the same (bf16
// in, bf16 out); only the order of the fp32 sums differs. This is what makes a training step
// under autocast (recover(autocast=torch.bfloat16)) faster: at MiniLM's shapes a bf16 GEMM
// ran 2.3x faster than the fp32 one here (Zen 4). Elsewhere oneDNN would emulate bf16, so
// the fp32 path stays. A capability, not a threshold: nothing here depends on shapes.
bool bf16_products(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16();
}

at::Tensor bf16_2d(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bitmask,
                             const c10::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, bitmask, 1);
  check_bias("masked_linear", x, bias, weight.size(0));
  const bool bf16 = bf16_products(x, weight);
  auto x2 = bf16 ? bf16_2d(x) : x_float_2d(x);
  auto wm = bf16 ? masked_weight_bf16(weight.contiguous(), bitmask.contiguous())
                 : masked_weight_f32(weight.contiguous(), bitmask.contiguous());
  at::Tensor out;
  if (bias.has_value()) out = at::addmm(bias->to(x2.scalar_type()), x2, wm.t());  // as F.linear adds it
  else out = at::mm(x2, wm.t());
  return finish_linear(out, x, c10::nullopt);
}

at::Tensor masked_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& bitmask) {
  check_masked_linear_args("masked_linear_grad_input", grad_out, weight, bitmask, 0);
  const bool bf16 = bf16_products(grad_out, weight);
  auto g2 = bf16 ? bf16_2d(grad_out) : x_float_2d(grad_out);
  auto wm = bf16 ? masked_weight_bf16(weight.contiguous(), bitmask.contiguous())
                 : masked_weight_f32(weight.contiguous(), bitmask.contiguous());
  return finish_linear(at::mm(g2, wm), grad_out, c10::nullopt);
}

at::Tensor masked_linear_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bitmask) {
  const char* op = "masked_linear_grad_weight";
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && x.dim() >= 1, op, ": grad_out and x must have at least one dimension");
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), op,
                    ": grad_out ", grad_out.sizes(), " and x ", x.sizes(), " must share their leading shape");
  check_same(op, x, grad_out, "grad_out");
  check_index_tensor(op, x, bitmask, "bitmask", c10::kLong);
  const int64_t O = grad_out.size(-1), K = x.size(-1);
  TORCH_CHECK_VALUE(bitmask.dim() == 2 && bitmask.size(0) == O && bitmask.size(1) == (K + 63) / 64, op,
                    ": bitmask must have shape [", O, ", ", (K + 63) / 64, "] (one bit per weight element), got ",
                    bitmask.sizes());
  const bool bf16 = bf16_products(grad_out, x);
  auto g2 = bf16 ? bf16_2d(grad_out) : x_float_2d(grad_out);
  auto x2 = bf16 ? bf16_2d(x) : x_float_2d(x);
  auto gw = at::mm(g2.t(), x2);  // [O, K], fresh and contiguous
  mask_in_place(gw, bitmask.contiguous());
  return gw.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_cpu);
  m.impl("masked_linear_grad_weight", &masked_linear_grad_weight_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
