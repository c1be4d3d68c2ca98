// CPU kernels of the bitmask (unstructured) family: bitmask_linear, bitmask_compress,
// bitmask_decompress. Layout: sparsekern/formats.py (BitmaskWeight). Inner loops:
// bitmask_rows_impl.h.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu_common.h"

namespace sparsekern {
namespace cpu {
namespace {

template <typename VT, typename OutT>
void bitmask_decompress_row(const VT* vals, const int64_t* words, int64_t nwords, int64_t k, int64_t K, OutT* dst) {
  std::fill(dst, dst + K, OutT(0));
  for (int64_t wi = 0; wi < nwords; ++wi) {
    uint64_t bits = static_cast<uint64_t>(words[wi]);
    while (bits) {
      const int64_t c = wi * 64 + __builtin_ctzll(bits);
      if (c < K) dst[c] = static_cast<OutT>(static_cast<float>(vals[k]));
      ++k;
      bits &= bits - 1;
    }
  }
}

// The algorithm of bitmask_linear_cpu, chosen in Python (sparsekern/dispatch_rules.py
// BITMASK_ALGO_*, bitmask_cpu_algo: which rows, densities, CPUs and switches take which); the
// kernel runs what it is told and does not choose again.
constexpr int64_t kBitmaskAlgoRows = 0;   // the row kernels, AVX-512 expanding loads up to 4 rows
constexpr int64_t kBitmaskAlgoTiles = 1;  // decompressed weight tiles into the BLAS GEMM (tiled_gemm)
constexpr int64_t kBitmaskAlgoGemm = 2;   // the AVX-512 weight-stationary kernel (bitmask_gemm)
constexpr int64_t kBitmaskAlgoRowsExpand8 = 3;  // the row kernels, AVX-512 expanding loads up to 8 rows
constexpr int64_t kBitmaskAlgoRowsB1Indexed = 4;  // as algo 0, and one row runs the indexed kernel

// The row kernels of algo 0 and 3 (kBitmaskAlgoRows / kBitmaskAlgoRowsExpand8) on a whole
// batch of at most this many rows: the AVX-512 expanding loads on row-major x (one kernel per
// row count, bitmask_rows_direct up to 8). Past it, and on CPUs without AVX-512, the broadcast
// lanes kernels in batch tiles of kDirectMaxBatch rows. The algorithm's definition, not a
// threshold: which of the two runs is dispatch_rules' choice (BITMASK_EXPAND_8_MIN_DENSITY).
int64_t expanding_rows_max(int64_t algo) { return algo == kBitmaskAlgoRowsExpand8 ? 8 : 4; }

void check_bitmask_algo(const char* op, int64_t algo) {
  TORCH_CHECK_VALUE(algo == kBitmaskAlgoRows || algo == kBitmaskAlgoTiles || algo == kBitmaskAlgoGemm ||
                        algo == kBitmaskAlgoRowsExpand8 || algo == kBitmaskAlgoRowsB1Indexed,
                    op, ": algo must be 0 (row kernels, expanding loads up to 4 rows), 1 (decompressed tiles), "
                    "2 (the weight-stationary GEMM), 3 (row kernels, expanding loads up to 8 rows) or 4 (as 0, "
                    "one row on the indexed kernel), got ", algo);
  TORCH_CHECK(algo != kBitmaskAlgoGemm || cpu_has_avx512(), op,
              ": algo 2 (the weight-stationary GEMM kernel) needs an AVX-512 CPU (SPARSEKERN_CPU_ISA may cap it); "
              "pass algo 0 or 1");
  TORCH_CHECK(algo != kBitmaskAlgoRowsExpand8 || cpu_has_avx512(), op,
              ": algo 3 (the AVX-512 expanding-load row kernels up to 8 rows) needs an AVX-512 CPU "
              "(SPARSEKERN_CPU_ISA may cap it); pass algo 0 or 1");
  TORCH_CHECK(algo != kBitmaskAlgoRowsB1Indexed || cpu_has_avx512(), op,
              ": algo 4 (the AVX-512 one-row indexed kernel) needs an AVX-512 CPU "
              "(SPARSEKERN_CPU_ISA may cap it); pass algo 0 or 1");
}

// Output rows [r0, r1) of a bitmask decode job into dst: a pool worker's (dst its own buffer:
// the calling thread may abandon its chunk, then edit the weight in place while the worker
// still runs) on a checked copy of the rows' mask, offsets and columns (snapshot_bitmask_rows),
// the calling thread's (dst is a.out) on the weight itself. A copy that fails its check (the
// weight was edited while the call ran) gives NaN rows.
template <typename Kernel>
void bitmask_block(const BitmaskRowsArgs& a, float* dst, int64_t r0, int64_t r1, Kernel kernel) {
  BitmaskRowsArgs t = a;
  t.out = dst;
  if (dst == a.out) {
    kernel(t, r0, r1);
    return;
  }
  const BitmaskRowsSnapshot snap =
      snapshot_bitmask_rows(a.bitmask, a.offsets, a.columns, a.words, a.tiles, a.K, a.nnz, r0, r1);
  if (!snap.valid) {
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t r = r0; r < r1; ++r) dst[b * a.O + r] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  t.values = static_cast<const char*>(a.values) + snap.first * int64_t(c10::elementSize(a.dtype));
  t.bitmask = snap.bitmask;
  t.offsets = snap.offsets;
  t.columns = snap.columns;
  t.nnz = snap.nnz;
  t.out = dst + r0;
  kernel(t, 0, r1 - r0);
}

at::Tensor bitmask_linear_columns(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                  const at::Tensor& offsets, int64_t in_features,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& columns,
                                  int64_t algo) {
  check_bitmask_linear_args(x, values, bitmask, offsets, in_features, bias, columns);
  check_bitmask_algo("bitmask_linear", algo);
  // Formats refuse bits past in_features; a raw call with them would unmask x past its end
  // in the AVX-512 kernels. Free when in_features is a multiple of 64.
  check_bitmask_tail_bits("bitmask_linear", bitmask, in_features);
  const int64_t K = in_features, O = bitmask.size(0);
  auto vals = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  // The column index (BitmaskWeight.column_index) is read by the AVX-512 kernels and the
  // AVX2 ones of 1-4 rows; the other AVX2 and the portable kernels walk the bitmask.
  at::Tensor cols;
  if (columns.has_value() && cpu_has_avx2() && vals.numel() > 0) cols = columns->contiguous();
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;  // what finish_linear still adds
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (algo == kBitmaskAlgoGemm) {
    // Weight-stationary AVX-512 kernel: one multiply-add per kept value and 16 batch lanes.
    out = at::empty({B, O}, x2.options());
    const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
    const LaneRows src{x2.data_ptr<float>(), B, 1, K};
    const WsPlan plan = ws_plan(B, K, O, vals.nbytes() + bm.nbytes() + off.nbytes(), nth);
    at::Tensor xT;
    if (!plan.chunked) xT = lane_tiles(src, avx512::kG24Lanes512, x2.options());
    int64_t next = 0, next_chunk = 0;
    BitmaskGemmArgs g{vals.data_ptr(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), vals.scalar_type(),
                      bm.size(1), off.size(1), K, O, xT.defined() ? xT.data_ptr<float>() : nullptr, B,
                      out.data_ptr<float>(), plan.panel_rows, plan.panels, &next};
    if (plan.chunked) g.chunked = WsChunks{&src, plan.chunk_lanes, plan.chunks, &next_chunk};
    parallel_chunks(nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) avx512::bitmask_gemm(g);
    });
  } else if (algo == kBitmaskAlgoTiles) {
    // Dense enough that a dense GEMM over decompressed tiles beats B/16 sparse passes.
    SPARSEKERN_DISPATCH_FLOATS(vals.scalar_type(), "bitmask_linear", [&] {
      const scalar_t* v = vals.data_ptr<scalar_t>();
      const int64_t* w = bm.data_ptr<int64_t>();
      const int32_t* o = off.data_ptr<int32_t>();
      const int64_t nw = bm.size(1), nt = off.size(1);
      if (cpu_has_avx512()) {
        BitmaskRowsArgs a{vals.data_ptr(), w, o, vals.scalar_type(), nw, nt, K, O, nullptr, 0, 0, nullptr, vals.numel()};
        out = tiled_gemm(
            x2, O, [&](int64_t r0, int64_t r1, float* buf) { avx512::bitmask_dense_rows(a, r0, r1, buf); }, bias);
        bias_left = c10::nullopt;
      } else {
        out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
          for (int64_t r = r0; r < r1; ++r) bitmask_decompress_row(v, w + r * nw, nw, o[r * nt], K, buf + (r - r0) * K);
        }, bias);
        bias_left = c10::nullopt;
      }
    });
  } else if (B <= expanding_rows_max(algo) && cpu_has_avx512()) {
    // Expanding loads (AVX-512) with row-major x; past the algorithm's rows the AVX2 broadcast
    // kernel below does fewer multiply-adds (one per kept value and 8 or 16 batch lanes).
    out = at::empty({B, O}, x2.options());
    BitmaskRowsArgs a{vals.data_ptr(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), vals.scalar_type(),
                      bm.size(1), off.size(1), K, O, x2.data_ptr<float>(), B, 0, out.data_ptr<float>(),
                      vals.numel()};
    if (cols.defined() && B <= 4) a.columns = cols.data_ptr<int16_t>();  // the 1-to-4-row kernels
    a.b1_indexed = algo == kBitmaskAlgoRowsB1Indexed;
    // abandonable: a worker reads a checked copy of its rows' index tensors (bitmask_block)
    parallel_out_rows(O, B, rows_grain(K, B), a.out, true, {vals, bm, off, x2, cols}, [a](float* dst, int64_t r0, int64_t r1) {
      bitmask_block(a, dst, r0, r1, [](const BitmaskRowsArgs& t, int64_t s0, int64_t s1) { avx512::bitmask_rows(t, s0, s1); });
    });
  } else {
    // Direct sparse kernel, in batch tiles of at most kDirectMaxBatch rows: its cost grows
    // with the kept elements, so at low density it wins at any batch.
    out = at::empty({B, O}, x2.options());
    const bool avx2 = cpu_has_avx2();
    // With the column index, the lanes kernel costs per kept value, not per mask word.
    for (int64_t b0 = 0; b0 < B; b0 += kDirectMaxBatch) {
      const int64_t bt = std::min(kDirectMaxBatch, B - b0);
      auto xt = x2.narrow(0, b0, bt);
      auto ot = bt == B ? out : at::empty({bt, O}, x2.options());
      const int64_t BP = lanes_for_batch(bt);
      auto xin = BP ? x_lanes(xt, BP) : xt.contiguous();
      BitmaskRowsArgs a{vals.data_ptr(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), vals.scalar_type(),
                        bm.size(1), off.size(1), K, O, xin.data_ptr<float>(), bt, BP, ot.data_ptr<float>(),
                        vals.numel()};
      if (cols.defined() && (bt <= 4 || (BP > 0 && cpu_has_avx512()))) a.columns = cols.data_ptr<int16_t>();
      parallel_out_rows(O, bt, rows_grain(K, bt), a.out, true, {vals, bm, off, xin, cols},
                        [a, avx2](float* dst, int64_t r0, int64_t r1) {
        // the kernel chosen from the original arguments: a snapshot keeps columns when a has them
        const bool wide = a.columns && cpu_has_avx512();
        bitmask_block(a, dst, r0, r1, [wide, avx2](const BitmaskRowsArgs& t, int64_t s0, int64_t s1) {
          if (wide) avx512::bitmask_rows(t, s0, s1);
          else if (avx2) avx2::bitmask_rows(t, s0, s1);
          else generic::bitmask_rows(t, s0, s1);
        });
      });
      if (bt != B) out.narrow(0, b0, bt).copy_(ot);
    }
  }
  return finish_linear(out, x, bias_left);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmask_compress_cpu(const at::Tensor& weight,
                                                                    const c10::optional<at::Tensor>& mask) {
  const char* op = "bitmask_compress";
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16 or float16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  const int64_t O = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(K > 0, op, ": weight must have at least one column");
  at::Tensor keep;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == weight.sizes(), op, ": mask shape ", mask->sizes(),
                      " must equal weight shape ", weight.sizes());
    TORCH_CHECK(mask->device() == weight.device(), op, ": mask is on ", mask->device(), " but weight is on ",
                weight.device());
    keep = mask->contiguous();
  } else {
    keep = weight.ne(0).contiguous();
  }
  TORCH_CHECK_VALUE(at::isfinite(weight).all().item<bool>(), op,
                    ": weight has NaN or inf; sparse formats need finite weights");
  auto w = weight.contiguous();
  const int64_t nw = (K + 63) / 64, nt = (K + kBitmaskTileCols - 1) / kBitmaskTileCols;
  auto bitmask = at::zeros({O, nw}, w.options().dtype(at::kLong));
  auto offsets = at::empty({O, nt}, w.options().dtype(at::kInt));
  const bool* kp = keep.data_ptr<bool>();
  int64_t* bp = bitmask.data_ptr<int64_t>();
  // Pass 1: bits and per-tile counts.
  std::vector<int64_t> counts(O * nt, 0);
  parallel_rows(O, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < K; ++c)
        if (kp[r * K + c]) {
          bp[r * nw + c / 64] |= static_cast<int64_t>(uint64_t(1) << (c % 64));
          ++counts[r * nt + c / kBitmaskTileCols];
        }
  });
  // Exclusive prefix sum over (row, tile) in row-major order: the tile's first value.
  int64_t total = 0;
  int32_t* op_ = offsets.data_ptr<int32_t>();
  for (int64_t i = 0; i < O * nt; ++i) {
    TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), op,
                      ": more than 2^31-1 kept elements; split the weight");
    op_[i] = static_cast<int32_t>(total);
    total += counts[i];
  }
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), op,
                    ": more than 2^31-1 kept elements; split the weight");
  auto values = at::empty({total}, w.options());
  SPARSEKERN_DISPATCH_FLOATS(w.scalar_type(), "bitmask_compress", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    parallel_rows(O, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t k = op_[r * nt];
        for (int64_t c = 0; c < K; ++c)
          if (kp[r * K + c]) vp[k++] = wp[r * K + c];
      }
    });
  });
  return {values, bitmask, offsets};
}

at::Tensor bitmask_decompress_cpu(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& offsets,
                                  int64_t in_features) {
  const char* op = "bitmask_decompress";
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be a float tensor");
  TORCH_CHECK_TYPE(bitmask.scalar_type() == at::kLong, op, ": bitmask must be int64");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32");
  const int64_t nw = (in_features + 63) / 64, nt = (in_features + kBitmaskTileCols - 1) / kBitmaskTileCols;
  TORCH_CHECK_VALUE(in_features > 0 && bitmask.dim() == 2 && bitmask.size(1) == nw, op,
                    ": bitmask must have shape [out, ", nw, "] for in_features=", in_features);
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == bitmask.size(0) && offsets.size(1) == nt, op,
                    ": offsets must have shape [", bitmask.size(0), ", ", nt, "]");
  check_bitmask_tail_bits(op, bitmask, in_features);
  const int64_t O = bitmask.size(0);
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto v = values.contiguous();
  // Offsets must be the running popcount, or the loops below would read past values.
  {
    const int64_t* wp = bm.data_ptr<int64_t>();
    const int32_t* o = off.data_ptr<int32_t>();
    int64_t run = 0;
    for (int64_t i = 0; i < O * nt; ++i) {
      TORCH_CHECK_VALUE(o[i] == run, op, ": offsets do not match the bitmask's popcounts (tile ", i, ")");
      const int64_t r = i / nt, t = i % nt;
      for (int64_t wi = t * kBitmaskTileWords; wi < std::min(nw, (t + 1) * kBitmaskTileWords); ++wi)
        run += __builtin_popcountll(static_cast<uint64_t>(wp[r * nw + wi]));
    }
    TORCH_CHECK_VALUE(run == v.numel(), op, ": bitmask keeps ", run, " elements but values has ", v.numel());
  }
  auto out = at::empty({O, in_features}, v.options());
  if (v.scalar_type() == at::kFloat && cpu_has_avx512()) {
    BitmaskRowsArgs a{v.data_ptr(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), v.scalar_type(), nw, nt,
                      in_features, O, nullptr, 0, 0, nullptr, v.numel()};
    float* dst = out.data_ptr<float>();
    parallel_rows(O, 16, [&](int64_t r0, int64_t r1) { avx512::bitmask_dense_rows(a, r0, r1, dst + r0 * in_features); });
    return out;
  }
  SPARSEKERN_DISPATCH_FLOATS(v.scalar_type(), "bitmask_decompress", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t* wp = bm.data_ptr<int64_t>();
    const int32_t* o = off.data_ptr<int32_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_rows(O, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        bitmask_decompress_row(vp, wp + r * nw, nw, o[r * nt], in_features, dst + r * in_features);
    });
  });
  return out;
}

// The shared schema (every backend's): the row kernels at every batch, the mask (the ops layer
// runs bitmask_linear_cpu with the algorithm dispatch_rules chose and the column index).
at::Tensor bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                              const at::Tensor& offsets, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  return bitmask_linear_columns(x, values, bitmask, offsets, in_features, bias, c10::nullopt, kBitmaskAlgoRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bitmask_linear", &bitmask_linear_cpu);
  m.impl("bitmask_linear_cpu", &bitmask_linear_columns);
  m.impl("bitmask_compress", &bitmask_compress_cpu);
  m.impl("bitmask_decompress", &bitmask_decompress_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
