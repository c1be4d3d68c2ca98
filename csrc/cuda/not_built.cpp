// Compiled only when the extension is built without CUDA (no toolkit, a CPU build of
// torch, or SPARSEKERN_FORCE_CPU=1). The CUDA entries stay registered and say why they
// cannot run, instead of a dispatcher "no kernel" or a missing-symbol error.
#include <torch/library.h>

#include <ATen/core/Tensor.h>

namespace sparsekern {
namespace {

[[noreturn]] void not_built(const char* op) {
  TORCH_CHECK(false, op,
              ": sparsekern was built without CUDA kernels. Rebuild with a CUDA toolkit and a CUDA build of torch "
              "(pip install --no-build-isolation -e . with CUDA_HOME set, SPARSEKERN_FORCE_CPU unset); "
              "`python -m sparsekern info` shows what this build holds.");
}

at::Tensor nm_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                     const c10::optional<at::Tensor>&) { not_built("nm_linear"); }
at::Tensor bitmask_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                          const c10::optional<at::Tensor>&) {
  not_built("bitmask_linear");
}
at::Tensor masked_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) {
  not_built("masked_linear");
}
at::Tensor masked_linear_grad_input(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  not_built("masked_linear_grad_input");
}
at::Tensor nm_decompress(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t) {
  not_built("nm_decompress");
}
at::Tensor bitmask_decompress(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t) {
  not_built("bitmask_decompress");
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("bitmask_linear", &bitmask_linear);
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input);
  m.impl("nm_decompress", &nm_decompress);
  m.impl("bitmask_decompress", &bitmask_decompress);
}

}  // namespace sparsekern
