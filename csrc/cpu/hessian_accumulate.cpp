// CPU kernel of hessian_accumulate: SparseGPT's H += X^T X (sparsekern/sparsegpt.py), one BLAS
// call in the hessian's precision.
#include <torch/library.h>

#include "cpu_common.h"

namespace sparsekern {
namespace cpu {
namespace {

void hessian_accumulate_cpu(at::Tensor& hessian, const at::Tensor& x) {
  const char* op = "hessian_accumulate";
  TORCH_CHECK_TYPE(hessian.scalar_type() == at::kFloat || hessian.scalar_type() == at::kDouble, op,
                   ": hessian must be float32 or float64, got ", hessian.scalar_type());
  TORCH_CHECK_VALUE(hessian.dim() == 2 && hessian.size(0) == hessian.size(1), op,
                    ": hessian must be square [K, K], got ", hessian.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == hessian.size(0), op, ": x.shape[-1] (", x.size(-1),
                    ") must equal the hessian's size (", hessian.size(0), ")");
  TORCH_CHECK(x.device() == hessian.device(), op, ": x is on ", x.device(), " but hessian is on ", hessian.device());
  auto x2 = x.reshape({-1, x.size(-1)}).to(hessian.scalar_type());
  if (x2.size(0) == 0) return;
  hessian.addmm_(x2.t(), x2);  // one BLAS call: H += X^T X
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("hessian_accumulate", &hessian_accumulate_cpu); }

}  // namespace cpu
}  // namespace sparsekern
