// CPU kernels of the fused scoring ops of the pruning toolkit (sparsekern/prune/scores.py):
// group_score (element score + group L1/L2 reduction in one pass) and act_norm_accumulate.
// nm_score_compress lives with the N:M family in nm_linear.cpp.
#include <torch/library.h>

#include <cmath>

#include "cpu_common.h"

namespace sparsekern {
namespace cpu {
namespace {

template <typename T>
inline double elem_score(const T* w, const float* g, const float* an, int64_t r, int64_t c, int64_t K) {
  double e = std::fabs(static_cast<double>(static_cast<float>(w[r * K + c])));
  if (g) e *= std::fabs(static_cast<double>(g[r * K + c]));
  if (an) e *= static_cast<double>(an[c]);
  return e;
}

at::Tensor group_score_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& grad,
                          const c10::optional<at::Tensor>& act_norm, int64_t block_rows, int64_t block_cols,
                          int64_t p) {
  const char* op = "group_score";
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()) || weight.scalar_type() == at::kDouble, op,
                   ": weight must be a floating tensor, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [rows, cols], got ", weight.sizes());
  TORCH_CHECK_VALUE(p == 1 || p == 2, op, ": p must be 1 (L1) or 2 (L2), got ", p);
  const int64_t O = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(block_rows > 0 && block_cols > 0 && O % block_rows == 0 && K % block_cols == 0, op,
                    ": group shape (", block_rows, ", ", block_cols, ") must divide the weight shape ",
                    weight.sizes());
  at::Tensor g, an;
  if (grad.has_value()) {
    TORCH_CHECK_VALUE(grad->sizes() == weight.sizes(), op, ": grad shape ", grad->sizes(),
                      " must equal weight shape ", weight.sizes());
    TORCH_CHECK(grad->device() == weight.device(), op, ": grad must be on the weight's device");
    g = grad->to(at::kFloat).contiguous();
  }
  if (act_norm.has_value()) {
    TORCH_CHECK_VALUE(act_norm->dim() == 1 && act_norm->size(0) == K, op, ": act_norm must have shape [", K, "], got ",
                      act_norm->sizes());
    TORCH_CHECK(act_norm->device() == weight.device(), op, ": act_norm must be on the weight's device");
    an = act_norm->to(at::kFloat).contiguous();
  }
  auto w = weight.contiguous();
  const int64_t nbr = O / block_rows, nbc = K / block_cols;
  auto acc = at::zeros({nbr, nbc}, w.options().dtype(at::kDouble));
  double* ap = acc.data_ptr<double>();
  const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
  const float* anp = an.defined() ? an.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "group_score", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    // Threads own disjoint outputs: block rows when there are enough, else block columns.
    if (nbr >= 2 * at::get_num_threads()) {
      at::parallel_for(0, nbr, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t br = b0; br < b1; ++br)
          for (int64_t r = br * block_rows; r < (br + 1) * block_rows; ++r)
            for (int64_t c = 0; c < K; ++c) {
              const double e = elem_score(wp, gp, anp, r, c, K);
              ap[br * nbc + c / block_cols] += p == 1 ? e : e * e;
            }
      });
    } else {
      at::parallel_for(0, nbc, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t r = 0; r < O; ++r)
          for (int64_t c = c0 * block_cols; c < c1 * block_cols; ++c) {
            const double e = elem_score(wp, gp, anp, r, c, K);
            ap[(r / block_rows) * nbc + c / block_cols] += p == 1 ? e : e * e;
          }
      });
    }
  });
  if (p == 2) acc.sqrt_();
  return acc.to(at::kFloat);
}

void act_norm_accumulate_cpu(at::Tensor& sumsq, const at::Tensor& x) {
  const char* op = "act_norm_accumulate";
  TORCH_CHECK_TYPE(sumsq.scalar_type() == at::kFloat || sumsq.scalar_type() == at::kDouble, op,
                   ": sumsq must be float32 or float64, got ", sumsq.scalar_type());
  TORCH_CHECK_VALUE(sumsq.dim() == 1 && sumsq.is_contiguous(), op, ": sumsq must be a contiguous 1-D tensor");
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == sumsq.size(0), op, ": x.shape[-1] (", x.size(-1),
                    ") must equal sumsq's length (", sumsq.size(0), ")");
  TORCH_CHECK(x.device() == sumsq.device(), op, ": x is on ", x.device(), " but sumsq is on ", sumsq.device());
  const int64_t K = x.size(-1);
  auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t R = x2.size(0);
  if (R == 0) return;
  const float* xp = x2.data_ptr<float>();
  // One pass over x; each thread owns a range of columns, so no reduction across threads.
  auto part = at::zeros({K}, x2.options().dtype(at::kDouble));
  double* pp = part.data_ptr<double>();
  at::parallel_for(0, K, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        const double v = xp[r * K + c];
        pp[c] += v * v;
      }
  });
  sumsq.add_(part.to(sumsq.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("group_score", &group_score_cpu);
  m.impl("act_norm_accumulate", &act_norm_accumulate_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
