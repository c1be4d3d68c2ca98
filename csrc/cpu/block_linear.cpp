// CPU kernels of the block (BSR) family: block_linear, block_compress, block_decompress.
// Layout: sparsekern/formats.py (BlockWeight). Inner loops: block_rows_impl.h.
#include <torch/library.h>

#include <cstring>

#include "cpu_common.h"
#include "rows_q.h"  // kQAlgo*

namespace sparsekern {
namespace cpu {
namespace {

// crow must start at 0, never decrease and end at nnzb; col must stay inside the row.
void check_bsr_structure(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t nnzb,
                         int64_t block_cols_total) {
  auto c = crow.contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(cp[0] == 0 && cp[c.numel() - 1] == nnzb, op, ": crow_indices must start at 0 and end at ",
                    nnzb, " (the number of blocks)");
  for (int64_t i = 0; i + 1 < c.numel(); ++i)
    TORCH_CHECK_VALUE(cp[i] <= cp[i + 1], op, ": crow_indices must not decrease");
  if (nnzb > 0) {
    TORCH_CHECK_VALUE(col.min().item<int64_t>() >= 0 && col.max().item<int64_t>() < block_cols_total, op,
                      ": col_indices must lie in [0, ", block_cols_total, ")");
  }
}

// What block_linear and block_linear_q read, checked and made contiguous: the BSR structure
// (check_bsr_structure), the values, index tensors and x as fp32 [B, K], and the sizes.
struct BsrOperands {
  at::Tensor vals, crow, col, x2;
  int64_t bh, bw, K, nbr, O, B;
};

BsrOperands bsr_operands(const char* op, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, int64_t in_features) {
  const int64_t bh = values.size(1), bw = values.size(2), nbr = crow.size(0) - 1;
  check_bsr_structure(op, crow, col, values.size(0), in_features / bw);
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  return {values.contiguous(), crow.contiguous(), col.contiguous(), x2, bh, bw, in_features, nbr, nbr * bh, B};
}

// Output row r of a BSR weight, one kept block at a time: piece(col0, src) with src the block's
// bw values of that row (values [nnzb, bh, bw]), which land at columns [col0, col0 + bw).
template <typename T, typename Piece>
inline void for_each_row_piece(const int64_t* crow, const int64_t* col, const T* values, int64_t bh, int64_t bw,
                               int64_t r, const Piece& piece) {
  const int64_t br = r / bh, i = r % bh;
  for (int64_t blk = crow[br]; blk < crow[br + 1]; ++blk) piece(col[blk] * bw, values + (blk * bh + i) * bw);
}

// The algorithm of block_linear_cpu, chosen in Python (sparsekern/dispatch_rules.py
// BLOCK_ALGO_*, block_cpu_algo: which rows, densities and switches take which); the kernel runs
// what it is told and does not choose again.
constexpr int64_t kBlockAlgoRows = 0;     // the row kernel, one block row at a time (block_rows_impl.h)
constexpr int64_t kBlockAlgoRowGemm = 1;  // per block row, one BLAS GEMM over its kept blocks
constexpr int64_t kBlockAlgoTiles = 2;    // decompressed weight tiles into the BLAS GEMM (tiled_gemm)

at::Tensor block_linear_algo(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& values, int64_t in_features, const c10::optional<at::Tensor>& bias,
                             int64_t algo) {
  check_block_linear_args(x, crow, col, values, in_features, bias);
  TORCH_CHECK_VALUE(algo == kBlockAlgoRows || algo == kBlockAlgoRowGemm || algo == kBlockAlgoTiles,
                    "block_linear: algo must be 0 (row kernel), 1 (per-block-row GEMMs) or 2 (decompressed tiles), ",
                    "got ", algo);
  const auto [vals, cr, cl, x2, bh, bw, K, nbr, O, B] =
      bsr_operands("block_linear", x, crow, col, values, in_features);
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;  // what finish_linear still adds
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (algo == kBlockAlgoRowGemm) {
    // Per block row, one GEMM over its kept blocks only: the x columns they read gathered
    // side by side [B, n*bw], times their values side by side [bh, n*bw]. The multiply-adds
    // follow the kept blocks (the tiles below do the dense count).
    out = at::empty({B, O}, x2.options());
    auto v32 = vals.to(at::kFloat);
    auto lanes = at::arange(bw, cl.options());
    const int64_t* c = cr.data_ptr<int64_t>();
    at::parallel_for(0, nbr, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t br = b0; br < b1; ++br) {
        auto o = out.narrow(1, br * bh, bh);
        const int64_t n = c[br + 1] - c[br];
        if (n == 0) {
          o.zero_();
          continue;
        }
        auto cols = (cl.narrow(0, c[br], n).unsqueeze(1) * bw + lanes).reshape({-1});
        auto xg = x2.index_select(1, cols);
        auto wg = v32.narrow(0, c[br], n).permute({1, 0, 2}).reshape({bh, n * bw});
        at::mm_out(o, xg, wg.t());
      }
    });
  } else if (algo == kBlockAlgoTiles) {
    SPARSEKERN_DISPATCH_FLOATS(vals.scalar_type(), "block_linear", [&] {
      const scalar_t* v = vals.data_ptr<scalar_t>();
      const int64_t* c = cr.data_ptr<int64_t>();
      const int64_t* ci = cl.data_ptr<int64_t>();
      out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
        std::fill(buf, buf + (r1 - r0) * K, 0.f);
        for (int64_t r = r0; r < r1; ++r) {
          float* dst = buf + (r - r0) * K;
          for_each_row_piece(c, ci, v, bh, bw, r, [&](int64_t col0, const scalar_t* src) {
            for (int64_t j = 0; j < bw; ++j) dst[col0 + j] = static_cast<float>(src[j]);
          });
        }
      }, bias);
      bias_left = c10::nullopt;
    });
  } else {
    out = at::empty({B, O}, x2.options());
    BlockRowsArgs a{vals.data_ptr(), cr.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), vals.scalar_type(),
                    bh, bw, K, O, x2.data_ptr<float>(), B, out.data_ptr<float>()};
    const bool avx2 = cpu_has_avx2();
    parallel_rows(nbr, 1, [&](int64_t b0, int64_t b1) {
      if (avx2) avx2::block_rows(a, b0, b1);
      else generic::block_rows(a, b0, b1);
    });
  }
  return finish_linear(out, x, bias_left);
}

// block_linear_q_cpu (the schema in csrc/sparsekern.cpp): int8 values [nnzb, bh, bw], one
// float32 scale per output row. The algorithm is chosen in Python (sparsekern/dispatch_rules.py
// block_q_cpu_algo) and runs at any rows: algo 0 (rows_q.h kQAlgoExact) the row kernel reads
// the int8 values as stored (block_rows_impl.h, the scale on each finished row sum; as
// block_linear's row kernel it takes every batch at once); algo 4 (kQAlgoExactTiles) tiles of
// rows dequantized into the BLAS GEMM; algo 3 (kQAlgoInt8Expand) x quantized per row, the
// values expanded to a dense int8 weight, torch's int8 GEMM.
at::Tensor block_linear_q_algo(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const at::Tensor& scales, int64_t in_features,
                               const c10::optional<at::Tensor>& bias, int64_t algo) {
  check_block_linear_q_args(x, crow, col, values, scales, in_features, bias);
  TORCH_CHECK_VALUE(algo == kQAlgoExact || algo == kQAlgoExactTiles || algo == kQAlgoInt8Expand,
                    "block_linear_q: algo must be ", kQAlgoExact, " (x in fp32, the row kernel), ", kQAlgoExactTiles,
                    " (x in fp32, dequantized tiles into the BLAS GEMM) or ", kQAlgoInt8Expand,
                    " (int8 values expanded for torch's int8 GEMM), got ", algo);
  const auto [vals, cr, cl, x2, bh, bw, K, nbr, O, B] =
      bsr_operands("block_linear_q", x, crow, col, values, in_features);
  auto sc = scales.contiguous();
  const int8_t* v = vals.data_ptr<int8_t>();
  const int64_t* c = cr.data_ptr<int64_t>();
  const int64_t* ci = cl.data_ptr<int64_t>();
  const float* s = sc.data_ptr<float>();
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (algo == kQAlgoInt8Expand) {
    out = int8_expand_gemm(x2, sc, O, [&](int64_t r0, int64_t r1, int8_t* dst) {
      std::fill(dst + r0 * K, dst + r1 * K, int8_t(0));
      for (int64_t r = r0; r < r1; ++r) {  // each kept block's bw bytes of the row, as stored
        for_each_row_piece(c, ci, v, bh, bw, r, [&](int64_t col0, const int8_t* src) {
          std::memcpy(dst + r * K + col0, src, static_cast<size_t>(bw));
        });
      }
    });
  } else if (algo == kQAlgoExactTiles) {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
      std::fill(buf, buf + (r1 - r0) * K, 0.f);
      for (int64_t r = r0; r < r1; ++r) {  // row r dequantized at its columns
        float* dst = buf + (r - r0) * K;
        for_each_row_piece(c, ci, v, bh, bw, r, [&](int64_t col0, const int8_t* src) {
          for (int64_t j = 0; j < bw; ++j) dst[col0 + j] = src[j] * s[r];
        });
      }
    }, bias);
    bias_left = c10::nullopt;
  } else {
    out = at::empty({B, O}, x2.options());
    BlockRowsArgs a{v, c, ci, at::kChar, bh, bw, K, O, x2.data_ptr<float>(), B, out.data_ptr<float>(), s};
    const bool avx2 = cpu_has_avx2();
    parallel_rows(nbr, 1, [&](int64_t b0, int64_t b1) {
      if (avx2) avx2::block_rows(a, b0, b1);
      else generic::block_rows(a, b0, b1);
    });
  }
  return finish_linear(out, x, bias_left);
}

// The shared schema (every backend's): the row kernel at every batch (the ops layer runs
// block_linear_cpu with the algorithm dispatch_rules chose).
at::Tensor block_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  return block_linear_algo(x, crow, col, values, in_features, bias, kBlockAlgoRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_compress_cpu(const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  int64_t block_rows, int64_t block_cols) {
  const char* op = "block_compress";
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16 or float16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK_VALUE(block_rows > 0 && block_cols > 0, op, ": block shape must be positive, got (", block_rows, ", ",
                    block_cols, ")");
  const int64_t O = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(O % block_rows == 0 && K % block_cols == 0, op, ": weight shape [", O, ", ", K,
                    "] must be divisible by the block shape (", block_rows, ", ", block_cols, ")");
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), op,
                    ": weight has NaN or inf; sparse formats need finite weights");
  at::Tensor w = weight;
  at::Tensor keep;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == weight.sizes(), op, ": mask shape ", mask->sizes(),
                      " must equal weight shape ", weight.sizes());
    keep = *mask;
    w = weight.masked_fill(mask->logical_not(), 0);
  } else {
    keep = weight.ne(0);
  }
  const int64_t nbr = O / block_rows, nbc = K / block_cols;
  // [nbr, bh, nbc, bw] -> which blocks hold anything.
  auto block_keep = keep.reshape({nbr, block_rows, nbc, block_cols}).any(3).any(1);  // [nbr, nbc]
  auto crow = at::zeros({nbr + 1}, weight.options().dtype(at::kLong));
  crow.narrow(0, 1, nbr).copy_(block_keep.sum(1).cumsum(0));
  auto nz = block_keep.nonzero();  // row-major order: (block row, block col)
  auto col = nz.select(1, 1).clone(at::MemoryFormat::Contiguous);  // own storage, offset 0
  auto blocks = w.reshape({nbr, block_rows, nbc, block_cols}).permute({0, 2, 1, 3});  // [nbr, nbc, bh, bw]
  auto values = blocks.index({nz.select(1, 0), nz.select(1, 1)}).contiguous();
  return {crow, col, values};
}

at::Tensor block_decompress_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                                int64_t in_features) {
  const char* op = "block_decompress";
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be a float tensor");
  TORCH_CHECK_TYPE(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong, op,
                   ": crow_indices and col_indices must be int64");
  TORCH_CHECK_VALUE(values.dim() == 3 && crow.dim() == 1 && crow.numel() >= 1 && col.dim() == 1 &&
                        col.numel() == values.size(0),
                    op, ": expected crow_indices [nbr+1], col_indices [nnzb], values [nnzb, bh, bw]");
  const int64_t bh = values.size(1), bw = values.size(2);
  TORCH_CHECK_VALUE(bw > 0 && in_features % bw == 0, op, ": in_features (", in_features,
                    ") must be a multiple of the block width (", bw, ")");
  check_bsr_structure(op, crow, col, values.size(0), in_features / bw);
  const int64_t nbr = crow.numel() - 1;
  auto out = at::zeros({nbr, bh, in_features / bw, bw}, values.options());
  auto counts = crow.diff();
  auto rows = at::repeat_interleave(at::arange(nbr, crow.options()), counts);
  out.permute({0, 2, 1, 3}).index_put_({rows, col}, values);
  return out.reshape({nbr * bh, in_features});
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("block_linear", &block_linear_cpu);
  m.impl("block_linear_cpu", &block_linear_algo);
  m.impl("block_linear_q", [](const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, const at::Tensor& scales, int64_t in_features,
                              const c10::optional<at::Tensor>& bias) {
    return block_linear_q_algo(x, crow, col, values, scales, in_features, bias, kQAlgoExact);
  });
  m.impl("block_linear_q_cpu", &block_linear_q_algo);
  m.impl("block_compress", &block_compress_cpu);
  m.impl("block_decompress", &block_decompress_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
