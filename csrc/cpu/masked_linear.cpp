// CPU kernels of masked_linear (training-time op): x @ (W*M)^T and its input gradient,
// with M a packed bitmask [out, ceil(in/64)] (bit j of word w is column 64w+j). W*M is
// never built whole: one tile of masked rows at a time meets the BLAS GEMM.
#include <torch/library.h>

#include "cpu_common.h"

namespace sparsekern {
namespace cpu {
namespace {

constexpr int64_t kMaskTile = 128;

template <typename T>
void masked_row(const T* w, const int64_t* words, int64_t K, float* dst) {
  for (int64_t c = 0; c < K; ++c) {
    const bool keep = (static_cast<uint64_t>(words[c >> 6]) >> (c & 63)) & 1;
    dst[c] = keep ? static_cast<float>(w[c]) : 0.f;
  }
}

// Fills buf [r1-r0, K] with rows r0..r1 of W*M in fp32.
void masked_tile(const at::Tensor& w, const at::Tensor& bm, int64_t r0, int64_t r1, float* buf) {
  const int64_t K = w.size(1), nw = bm.size(1);
  SPARSEKERN_DISPATCH_FLOATS(w.scalar_type(), "masked_linear", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* bp = bm.data_ptr<int64_t>();
    at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) masked_row(wp + r * K, bp + r * nw, K, buf + (r - r0) * K);
    });
  });
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bitmask,
                             const c10::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, bitmask, 1);
  check_bias("masked_linear", x, bias, weight.size(0));
  auto w = weight.contiguous();
  auto bm = bitmask.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t O = w.size(0);
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;  // what finish_linear still adds
  if (x2.size(0) == 0 || O == 0) {
    out = at::zeros({x2.size(0), O}, x2.options());
  } else {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) { masked_tile(w, bm, r0, r1, buf); }, bias);
    bias_left = c10::nullopt;
  }
  return finish_linear(out, x, bias_left);
}

at::Tensor masked_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& bitmask) {
  check_masked_linear_args("masked_linear_grad_input", grad_out, weight, bitmask, 0);
  auto w = weight.contiguous();
  auto bm = bitmask.contiguous();
  auto g2 = x_float_2d(grad_out);
  const int64_t O = w.size(0), K = w.size(1);
  auto gx = at::zeros({g2.size(0), K}, g2.options());
  if (g2.size(0) > 0) {
    auto buf = at::empty({std::min(kMaskTile, O), K}, g2.options());
    for (int64_t r0 = 0; r0 < O; r0 += kMaskTile) {
      const int64_t r1 = std::min(O, r0 + kMaskTile);
      auto part = buf.narrow(0, 0, r1 - r0);
      masked_tile(w, bm, r0, r1, part.data_ptr<float>());
      gx.addmm_(g2.narrow(1, r0, r1 - r0), part);
    }
  }
  auto sizes = grad_out.sizes().vec();
  sizes.back() = K;
  at::Tensor r = gx.to(grad_out.scalar_type());
  r.resize_(sizes);  // not a view of a temporary (see finish_linear)
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
