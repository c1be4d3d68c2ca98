// The one place where sparsekern's operator schemas are declared.
// Device folders (csrc/cpu, csrc/cuda) only add TORCH_LIBRARY_IMPL blocks.
// Formats (layouts of the compressed tensors) are documented in sparsekern/formats.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common.h"
#include "kept_call_check.h"
#include "cpu/nm_gemm_int8.h"  // cpu_has_avx512_vnni

#ifndef SPARSEKERN_VERSION
#define SPARSEKERN_VERSION "unknown"
#endif
#ifndef SPARSEKERN_TORCH_VERSION
#define SPARSEKERN_TORCH_VERSION "unknown"
#endif
#ifndef SPARSEKERN_CUDA_ARCHS
#define SPARSEKERN_CUDA_ARCHS ""
#endif
#ifndef SPARSEKERN_CUDA_VERSION
#define SPARSEKERN_CUDA_VERSION ""
#endif

extern "C" {
// Importing sparsekern._C loads this library, whose static initialisers register
// the operators (pytorch/extension-cpp). Its one Python function is the per-call check of
// a layer's cached call (kept_call_check.cpp), which a torch operator's dispatch would cost
// more than it saves.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, sparsekern::python_methods()};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && sparsekern::add_python_constants(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace sparsekern {

// JSON text describing what this binary holds; sparsekern/_extension.py compares it
// with the running torch and GPU.
static std::string build_info() {
  std::string s = "{";
  s += "\"sparsekern_version\": \"" SPARSEKERN_VERSION "\", ";
  s += "\"torch_version\": \"" SPARSEKERN_TORCH_VERSION "\", ";
#ifdef SPARSEKERN_WITH_CUDA
  s += "\"with_cuda\": true, ";
#else
  s += "\"with_cuda\": false, ";
#endif
  s += "\"cuda_version\": \"" SPARSEKERN_CUDA_VERSION "\", ";
  s += "\"cuda_archs\": \"" SPARSEKERN_CUDA_ARCHS "\", ";
  s += std::string("\"cpu_avx2_runtime\": ") + (cpu_has_avx2() ? "true" : "false") + ", ";
  s += std::string("\"cpu_avx512_runtime\": ") + (cpu_has_avx512() ? "true" : "false") + ", ";
  s += std::string("\"cpu_avx512_bf16_runtime\": ") + (cpu_has_avx512_bf16() ? "true" : "false") + ", ";
  s += std::string("\"cpu_avx512_vnni_runtime\": ") + (cpu::cpu_has_avx512_vnni() ? "true" : "false");
  s += "}";
  return s;
}

TORCH_LIBRARY(sparsekern, m) {
  // ---- N:M (values [out, in*N/M] + packed in-group indices, see formats.py) ----
  // nm_linear and nm_conv2d: the schemas every backend (CPU, CUDA, Triton, the 2:4 GEMMs,
  // fakes) takes. Their CPU kernels run the row kernels (algo 0 below) at every batch.
  m.def("nm_linear(Tensor x, Tensor values, Tensor indices, int n, int m, int in_features, Tensor? bias) -> Tensor");
  m.def("nm24_pack_panels(Tensor values, Tensor indices, int in_features) -> Tensor");
  // Convolution [N, C, H, W] * N:M weight [out, kh*kw*C] (input channels fastest, patterns.as_2d)
  // -> [N, out, OH, OW] (CPU: channels-last memory).
  m.def("nm_conv2d(Tensor x, Tensor values, Tensor indices, int n, int m, int[] weight_shape, int[] stride, "
        "int[] padding, int[] dilation, Tensor? bias) -> Tensor");
  // CPU only: the same ops with the CPU's own arguments, which no other backend sees.
  // `algo` is the decision made in Python (sparsekern/dispatch_rules.py, nm_cpu_algo):
  // 0 = the row kernels (in batch tiles of 16 rows), 1 = the 2:4 weight-stationary GEMM kernel
  // (nm_gemm_impl.h, AVX2 and AVX-512), 2 = decompressed tiles into the BLAS GEMM; the kernel
  // does not choose again. `panels`: the 2:4 weight pre-packed for that GEMM
  // (nm24_pack_panels, layout in nm24_panels.h, NMWeight.gemm_panels), read with algo 1 only.
  m.def("nm_linear_cpu(Tensor x, Tensor values, Tensor indices, int n, int m, int in_features, Tensor? bias, "
        "int algo, Tensor? panels=None) -> Tensor");
  m.def("nm_conv2d_cpu(Tensor x, Tensor values, Tensor indices, int n, int m, int[] weight_shape, int[] stride, "
        "int[] padding, int[] dilation, Tensor? bias, int algo, Tensor? panels=None) -> Tensor");
  m.def("nm_compress(Tensor weight, Tensor? mask, int n, int m) -> (Tensor, Tensor)");
  m.def("nm_decompress(Tensor values, Tensor indices, int n, int m, int in_features) -> Tensor");
  // Score |w| * |grad| * act_norm[col] -> N:M mask -> compressed weight, in one pass.
  m.def("nm_score_compress(Tensor weight, Tensor? grad, Tensor? act_norm, int n, int m) -> (Tensor, Tensor)");
  // ---- Bitmask (unstructured): packed values + 64-bit mask words + per-tile offsets ----
  m.def("bitmask_linear(Tensor x, Tensor values, Tensor bitmask, Tensor offsets, int in_features, Tensor? bias) "
        "-> Tensor");
  // CPU only: the 16-bit column of each kept value (BitmaskWeight.column_index), which the row
  // kernels read instead of the mask where dispatch_rules says so, and `algo`, the decision
  // made in Python (sparsekern/dispatch_rules.py, bitmask_cpu_algo): 0 = the row kernels
  // (AVX-512 expanding loads on a batch of up to 4 rows, else the broadcast lanes kernels in
  // batch tiles of 16 rows), 1 = decompressed tiles into the BLAS GEMM, 2 = the AVX-512
  // weight-stationary kernel, 3 = the row kernels with the expanding loads up to 8 rows (AVX-512).
  // The shared schema above runs algo 0 without the columns.
  m.def("bitmask_linear_cpu(Tensor x, Tensor values, Tensor bitmask, Tensor offsets, int in_features, "
        "Tensor? bias, Tensor? columns, int algo=0) -> Tensor");
  m.def("bitmask_compress(Tensor weight, Tensor? mask) -> (Tensor, Tensor, Tensor)");
  m.def("bitmask_decompress(Tensor values, Tensor bitmask, Tensor offsets, int in_features) -> Tensor");
  // ---- Quantized values (sparsekern/precisions.py), read packed, dequantized in registers ----
  // N:M: bits 8: values int8 [out, kept], scales float32 [out] (group_size 0); bits 4: values
  // uint8 [out, ceil(kept / 2)] (low nibble first, q + 8), scales float32 [out, ceil(kept /
  // group_size)], group_size 32/64/128. x in the weight's compute dtype; fp32 accumulation.
  m.def("nm_linear_q(Tensor x, Tensor values, Tensor indices, Tensor scales, int n, int m, int in_features, "
        "int bits, int group_size, Tensor? bias) -> Tensor");
  // Bitmask: values int8 [nnz], scales float32 [out].
  m.def("bitmask_linear_q(Tensor x, Tensor values, Tensor bitmask, Tensor offsets, Tensor scales, int in_features, "
        "Tensor? bias) -> Tensor");
  // CPU only: `algo` chosen in Python (sparsekern/dispatch_rules.py, q_cpu_algo / nm_q_cpu_algo;
  // csrc/cpu/rows_q.h kQAlgo*), each at any rows (the kernel does not choose again): 0 = x in
  // fp32, the decode row kernels (in batch tiles of 16 rows), 1 = x quantized per row to int8
  // and integer dot products in the decode row kernels (batch tiles of 16 rows), 2 = 2:4 int8
  // weights through the int8 dot-product GEMM (csrc/cpu/nm_gemm_int8.h: x quantized per row,
  // int32 sums, AVX512_VNNI), 3 = int8 values expanded to a dense int8 weight for torch's int8
  // GEMM, 4 = x in fp32, the weight dequantized a tile at a time into the BLAS GEMM. The shared
  // schemas above run algo 0.
  m.def("nm_linear_q_cpu(Tensor x, Tensor values, Tensor indices, Tensor scales, int n, int m, int in_features, "
        "int bits, int group_size, Tensor? bias, int algo) -> Tensor");
  m.def("bitmask_linear_q_cpu(Tensor x, Tensor values, Tensor bitmask, Tensor offsets, Tensor scales, "
        "int in_features, Tensor? bias, int algo) -> Tensor");
  // ---- Block (BSR): crow_indices, col_indices, values [nnzb, bh, bw] ----
  m.def("block_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, int in_features, Tensor? bias) -> Tensor");
  // CPU only: `algo`, the decision made in Python (sparsekern/dispatch_rules.py, block_cpu_algo):
  // 0 = the row kernel, 1 = per block row one BLAS GEMM over its kept blocks, 2 = decompressed
  // tiles into the BLAS GEMM. The shared schema above runs algo 0.
  m.def("block_linear_cpu(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, int in_features, "
        "Tensor? bias, int algo) -> Tensor");
  // Block with int8 values [nnzb, bh, bw] and a float32 scale per output row (the CPU's kernels;
  // on other devices sparsekern runs block_linear on the dequantized values).
  m.def("block_linear_q(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales, "
        "int in_features, Tensor? bias) -> Tensor");
  // CPU only: a block weight with int8 values [nnzb, bh, bw] and a float32 scale per output row
  // (sparsekern/precisions.py), read as stored; `algo` as nm_linear_q_cpu's (rows_q.h kQAlgo*):
  // 0 = x in fp32, the row kernel (every batch at once), 3 = x quantized per row, the values
  // expanded to a dense int8 weight, torch's int8 GEMM, 4 = x in fp32, dequantized tiles into
  // the BLAS GEMM. The shared schema above runs algo 0.
  // Other devices run block_linear on the dequantized values.
  m.def("block_linear_q_cpu(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor scales, "
        "int in_features, Tensor? bias, int algo) -> Tensor");
  m.def("block_compress(Tensor weight, Tensor? mask, int block_rows, int block_cols) -> (Tensor, Tensor, Tensor)");
  m.def("block_decompress(Tensor crow_indices, Tensor col_indices, Tensor values, int in_features) -> Tensor");
  // ---- Masked dense weight (training): x @ (W*M)^T, its input and weight gradients ----
  m.def("masked_linear(Tensor x, Tensor weight, Tensor bitmask, Tensor? bias) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor bitmask) -> Tensor");
  // (grad_out^T @ x) * M [out, in] in x's dtype (CPU; on CUDA the Triton op of that name).
  m.def("masked_linear_grad_weight(Tensor grad_out, Tensor x, Tensor bitmask) -> Tensor");
  // ---- Fused scoring reductions (pruning toolkit) ----
  // Per (block_rows x block_cols) group of the score e = |w| * |grad| * act_norm[col]:
  // p=1 sum(e), p=2 sqrt(sum(e^2)); float32 [rows/block_rows, cols/block_cols].
  m.def("group_score(Tensor weight, Tensor? grad, Tensor? act_norm, int block_rows, int block_cols, int p) -> Tensor");
  // sumsq[j] += sum over all leading positions of x[..., j]^2 (activation norms for wanda).
  m.def("act_norm_accumulate(Tensor(a!) sumsq, Tensor x) -> ()");
  // hessian += x^T x over all leading positions of x [..., K] (SparseGPT's X^T X), in the
  // hessian's precision (float64 keeps long accumulations exact enough for the Cholesky).
  m.def("hessian_accumulate(Tensor(a!) hessian, Tensor x) -> ()");
  // ---- Build information ----
  m.def("build_info() -> str", &build_info);
  // The CPU's measured fp32 multiply-add roof: (seconds, FLOPs, lanes); see common.h.
  m.def("cpu_fma_probe(int iterations) -> (float, float, int)", &cpu_fma_probe);
  // The path measurement's cold start on a CPU: the tensors' bytes evicted from the caches.
  m.def("cpu_evict_from_cache(Tensor[] tensors) -> ()", &cpu_evict_from_cache);
  // Decode row chunks taken over from a parked pool worker since the process started (common.h).
  m.def("cpu_pool_takeovers() -> int", &cpu_pool_takeovers);
  // Storages held unresizable now for a worker still reading them after a takeover (common.h).
  m.def("cpu_pool_pinned_storages() -> int", &cpu_pool_pinned_storages);
  // Whether other processes now use the cores torch's threads need, and how many times the
  // throttle of libgomp's spinning was engaged for that since the process started (common.h).
  m.def("cpu_contention() -> (bool, int)", &cpu_contention);
}

}  // namespace sparsekern
