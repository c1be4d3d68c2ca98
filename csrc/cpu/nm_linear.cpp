// CPU kernels of the N:M family: nm_linear, nm_compress, nm_decompress.
// Layout: sparsekern/formats.py (NMWeight). Inner loops: nm_rows_impl.h.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "nm_gemm_bf16.h"

namespace sparsekern {
namespace cpu {
namespace {

template <typename VT>
void nm_decompress_row(const VT* v, const uint8_t* ix, int64_t kept, int64_t n, int64_t m, int64_t K, float* dst) {
  const int bits = nm_index_bits(m);
  std::fill(dst, dst + K, 0.f);
  for (int64_t s = 0; s < kept; ++s) {
    // & (m - 1): an index past the group stays in it (a tile row is never written past).
    const int idx = (bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15) & (m - 1);
    dst[(s / n) * m + idx] = static_cast<float>(v[s]);
  }
}

// The algorithm of nm_linear_cpu / nm_conv2d_cpu, chosen in Python (sparsekern/dispatch_rules.py
// NM_ALGO_*, nm_cpu_algo: which rows, patterns, CPUs and switches take which); the kernels
// run what they are told and do not choose again.
constexpr int64_t kNmAlgoRows = 0;   // the row kernels (nm_rows_impl.h), in batch tiles of kDirectMaxBatch rows
constexpr int64_t kNmAlgoGemm = 1;   // the 2:4 weight-stationary GEMM kernel (nm_gemm_impl.h)
constexpr int64_t kNmAlgoTiles = 2;  // decompressed weight tiles into the BLAS GEMM (tiled_gemm)
constexpr int64_t kNmAlgoGemmFp32 = 3;  // the 2:4 GEMM's fp32 multiply-add kernel even on bf16 weights
//                                         (their values converted; algo 1 runs vdpbf16ps on them)

// Algorithms 1 and 3 both run the 2:4 weight-stationary GEMM.
bool nm_gemm_algo(int64_t algo) { return algo == kNmAlgoGemm || algo == kNmAlgoGemmFp32; }

void check_nm_algo(const char* op, int64_t algo, int64_t n, int64_t m, const c10::optional<at::Tensor>& panels) {
  TORCH_CHECK_VALUE(algo == kNmAlgoRows || algo == kNmAlgoGemm || algo == kNmAlgoTiles || algo == kNmAlgoGemmFp32, op,
                    ": algo must be 0 (row kernels), 1 (the 2:4 GEMM), 2 (decompressed tiles) or 3 (the 2:4 "
                    "GEMM's fp32 kernel), got ", algo);
  if (nm_gemm_algo(algo)) {
    TORCH_CHECK_VALUE(n == 2 && m == 4, op, ": algo ", algo, " (the 2:4 GEMM kernel) runs 2:4 weights, got ", n, ":", m);
    TORCH_CHECK(cpu_has_avx2(), op, ": algo ", algo, " (the 2:4 GEMM kernel) needs an AVX2 CPU (this build runs the ",
                "portable kernels here, SPARSEKERN_CPU_ISA may cap them); pass algo 0 or 2");
  } else {
    TORCH_CHECK_VALUE(!panels.has_value(), op, ": panels are read by algo 1 (the 2:4 GEMM kernel) only, got algo ",
                      algo);
  }
}

}  // namespace

void nm24_gemm_cpu(const LaneRows& src, const at::TensorOptions& options, const at::Tensor& vals,
                   const at::Tensor& idx, int64_t K, int64_t O, float* out, const uint8_t* prepacked) {
  // 16-lane vectors over tiles of 64 batch lanes, else 8-lane ones over tiles of 32; both
  // read a pre-packed weight (its offsets are for 64-lane tiles, the AVX2 kernel halves them).
  const bool wide = cpu_has_avx512();
  const int64_t B = src.B;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  WsPlan plan = ws_plan(B, K, O, vals.nbytes() + idx.nbytes(), nth);
  if (prepacked && !plan.chunked) {
    // Panels that lie inside the layout's (rows dividing Nm24Panels::kRows), no larger than
    // ws_plan's choice (96 from O = 768 at 2 threads; below, up to half as many rows).
    int64_t rows = Nm24Panels::kRows;
    while (rows > Nm24Panels::kBlockRows && rows > plan.panel_rows) rows /= 2;
    plan.panel_rows = rows;
    plan.panels = (O + rows - 1) / rows;
  }
  at::Tensor xT;
  if (!plan.chunked)
    xT = lane_tiles(src, wide ? avx512::kG24Lanes512 : kG24Lanes, options,
                    prepacked ? Nm24Panels::x_extra_cols(K) : 0);
  // Panels (or chunks) taken by the threads from a shared counter.
  int64_t next = 0, next_chunk = 0;
  Nm24GemmArgs g{vals.data_ptr(), idx.data_ptr<uint8_t>(), vals.scalar_type(), vals.size(1), idx.size(1), K, O,
                 xT.defined() ? xT.data_ptr<float>() : nullptr, B, out, plan.panel_rows,
                 plan.panels, &next};
  g.prepacked = prepacked;
  if (plan.chunked) g.chunked = WsChunks{&src, plan.chunk_lanes, plan.chunks, &next_chunk};
  parallel_chunks(nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (wide) avx512::nm24_gemm(g);
      else avx2::nm24_gemm(g);
    }
  });
}

void nm24_gemm_bf16_cpu(const at::Tensor& x2, const at::Tensor& vals, const at::Tensor& idx, int64_t K, int64_t O,
                        const float* bias, at::BFloat16* out) {
  namespace b16 = avx512bf16;
  const int64_t B = x2.size(0);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tile_words = b16::pair_tile_words(K);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const int64_t panel_rows = b16::panel_rows_for(O, nth);  // see nm_gemm_bf16.h
  // Threads: parallel_chunks, chunks from a shared counter (chunk_pool.cpp: torch's OpenMP
  // team while its workers join promptly, else the chunk pool); the kernel writes the bf16
  // output itself. SPARSEKERN_NM_BF16_THREADS=omp (read per call, a benchmarking switch) runs
  // it through at::parallel_for's fixed ranges instead: on the shared machine
  // (cpu-gemm-bf16-20261206b) about half the speed, a parked thread holding its range.
  const char* threads_mode = std::getenv("SPARSEKERN_NM_BF16_THREADS");
  const bool on_omp = threads_mode && std::strcmp(threads_mode, "omp") == 0;
  auto run_parallel = [&](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (on_omp) at::parallel_for(0, n, grain, fn);
    else parallel_chunks(n, grain, fn);
  };
  // Thread-private chunks or shared passes (nm_gemm_bf16.h private_chunks_for);
  // SPARSEKERN_NM_BF16_CHUNKS=private|shared (read per call, a benchmarking switch) fixes the choice.
  const char* chunks_mode = std::getenv("SPARSEKERN_NM_BF16_CHUNKS");
  int64_t chunks = b16::private_chunks_for(B, O, nth);
  if (chunks_mode && std::strcmp(chunks_mode, "shared") == 0) chunks = 0;
  if (chunks_mode && std::strcmp(chunks_mode, "private") == 0 && chunks == 0)
    chunks = std::max<int64_t>(1, (B + b16::kChunkTargetLanes - 1) / b16::kChunkTargetLanes);
  if (chunks > 0) {
    const int64_t chunk_words = b16::chunk_tiles_for(B, chunks) * tile_words;
    auto buffers = at::empty({nth * chunk_words}, x2.options().dtype(at::kInt));
    uint32_t* bp = reinterpret_cast<uint32_t*>(buffers.data_ptr<int32_t>());
    int64_t next_chunk = 0;
    const Nm24Bf16Args g{reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>()), idx.data_ptr<uint8_t>(),
                         vals.size(1), idx.size(1), K, O, nullptr, B, reinterpret_cast<uint16_t*>(out), bias,
                         panel_rows, (O + panel_rows - 1) / panel_rows, WorkRanges{1, B, nullptr}};
    // Parallel chunk t (at most one per thread) owns buffer t.
    run_parallel(nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) b16::nm24_gemm_chunks(g, xp, chunks, &next_chunk, bp + t * chunk_words);
    });
    return;
  }
  // Passes of up to 1024 lanes bound the transient pair tiles (6 bytes per element of x: 12
  // MiB at K = 2048); each pass reads the weight once more.
  constexpr int64_t kPassLanes = 1024;
  const int64_t max_tiles = (std::min(B, kPassLanes) + b16::kLanes - 1) / b16::kLanes;
  auto tiles = at::empty({max_tiles * tile_words}, x2.options().dtype(at::kInt));
  uint32_t* tp = reinterpret_cast<uint32_t*>(tiles.data_ptr<int32_t>());
  for (int64_t b0 = 0; b0 < B; b0 += kPassLanes) {
    const int64_t lanes = std::min(kPassLanes, B - b0);
    const int64_t units = (lanes + b16::kLanes - 1) / b16::kLanes * (b16::kLanes / 8);  // 8 lanes each, whole tiles
    run_parallel(units, std::max<int64_t>(1, (int64_t(1) << 15) / (8 * K)), [&](int64_t u0, int64_t u1) {
      b16::pair_tiles(xp + b0 * K, lanes, K, u0, u1, tp);
    });
    // Ranges of lanes in whole tiles (nm_gemm_bf16.h ranges_for, range_lanes_for;
    // SPARSEKERN_NM_BF16_RANGES=one|threads, a benchmarking switch, fixes their count)
    const int64_t pass_tiles = (lanes + b16::kLanes - 1) / b16::kLanes;
    const int64_t nr = ranges_by_switch("SPARSEKERN_NM_BF16_RANGES", std::min(nth, pass_tiles),
                                        b16::ranges_for(lanes, nth));
    std::vector<int64_t> next(size_t(nr), 0);
    const Nm24Bf16Args g{reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>()), idx.data_ptr<uint8_t>(),
                         vals.size(1), idx.size(1), K, O, tp, lanes, reinterpret_cast<uint16_t*>(out + b0 * O), bias,
                         panel_rows, (O + panel_rows - 1) / panel_rows,
                         WorkRanges{nr, b16::range_lanes_for(lanes, nr), next.data()}};
    // Chunk t usually runs on thread t (the calling thread, first to start, takes chunk 0);
    // another order only loses the locality, every unit still runs once.
    run_parallel(nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) b16::nm24_gemm(g, t);
    });
  }
}

namespace {

// Whether nm_linear's 2:4 GEMM (algo 1) runs the bf16 dot-product kernel: bf16 tensors, no
// pre-packed fp32 panels, a CPU with AVX512_BF16. Algorithm 3 (dispatch_rules.nm_cpu_algo,
// under SPARSEKERN_NM_BF16=fma) runs the fp32 multiply-add kernel on the values converted instead.
bool nm24_bf16_dot(int64_t algo, const at::Tensor& values, const c10::optional<at::Tensor>& panels) {
  return algo == kNmAlgoGemm && !panels.has_value() && values.scalar_type() == at::kBFloat16 &&
         cpu_has_avx512_bf16();
}

// `panels` as the kernel reads it (uint16 and fp32 fields): contiguous, and copied when a
// view starts at an odd byte offset. Undefined without panels.
at::Tensor aligned_panels(const c10::optional<at::Tensor>& panels) {
  if (!panels.has_value()) return at::Tensor();
  at::Tensor packed = panels->contiguous();
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % alignof(float)) packed = packed.clone();
  return packed;
}

at::Tensor nm_linear_algo(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                          int64_t m, int64_t in_features, const c10::optional<at::Tensor>& bias, int64_t algo,
                          const c10::optional<at::Tensor>& panels) {
  check_nm_linear_args(x, values, indices, n, m, in_features, bias, panels);
  check_nm_algo("nm_linear", algo, n, m, panels);
  const int64_t K = in_features, O = values.size(0), kept = values.size(1);
  auto vals = values.contiguous();
  auto idx = indices.contiguous();
  // The bf16 dot-product kernel reads x in bf16; every other kernel in fp32.
  const bool bf16_dot = nm24_bf16_dot(algo, vals, panels);
  auto x2 = bf16_dot ? x.reshape({-1, K}).contiguous() : x_float_2d(x);
  const int64_t B = x2.size(0);
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;  // what finish_linear still adds
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options().dtype(at::kFloat));
  } else if (bf16_dot) {
    // bf16 out with the bias added in fp32 before the rounding, as finish_linear would
    out = at::empty({B, O}, x2.options());
    const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    nm24_gemm_bf16_cpu(x2, vals, idx, K, O, bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                       out.data_ptr<at::BFloat16>());
    bias_left = c10::nullopt;
  } else if (nm_gemm_algo(algo)) {
    out = at::empty({B, O}, x2.options());
    // `panels` (NMWeight.gemm_panels): the weight packed ahead for the kernel (AVX2 and AVX-512).
    const at::Tensor packed = aligned_panels(panels);
    nm24_gemm_cpu(LaneRows{x2.data_ptr<float>(), B, 1, K}, x2.options(), vals, idx, K, O, out.data_ptr<float>(),
                  packed.defined() ? packed.data_ptr<uint8_t>() : nullptr);
  } else if (algo == kNmAlgoTiles && avx512_nm_pattern(n, m) && cpu_has_avx512()) {
    // Tiles expanded by the AVX-512 kernel, then the BLAS GEMM.
    NmRowsArgs a{vals.data_ptr(), idx.data_ptr<uint8_t>(), nullptr, vals.scalar_type(), kept, idx.size(1), n, m, K, O,
                 nullptr, 0, 0, nullptr};
    out = tiled_gemm(
        x2, O, [&](int64_t r0, int64_t r1, float* buf) { avx512::nm_dense_rows(a, r0, r1, buf); }, bias);
    bias_left = c10::nullopt;
  } else if (algo == kNmAlgoTiles) {
    SPARSEKERN_DISPATCH_FLOATS(vals.scalar_type(), "nm_linear", [&] {
      const scalar_t* v = vals.data_ptr<scalar_t>();
      const uint8_t* ix = idx.data_ptr<uint8_t>();
      const int64_t rb = idx.size(1);
      out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
        for (int64_t r = r0; r < r1; ++r) nm_decompress_row(v + r * kept, ix + r * rb, kept, n, m, K, buf + (r - r0) * K);
      }, bias);
      bias_left = c10::nullopt;
    });
  } else {
    // The row kernels, in batch tiles of at most kDirectMaxBatch rows (the widest they take):
    // tile b0's rows of the output are rows b0.. of out, written in place.
    out = at::empty({B, O}, x2.options());
    const bool wide = avx512_nm_pattern(n, m) && cpu_has_avx512();
    const bool avx2 = cpu_has_avx2();
    // Slot s of every row belongs to the group starting at column (s / n) * m (read by
    // the AVX2 kernel for N:M other than 2:4).
    at::Tensor slot_base;
    if (!wide) slot_base = at::div(at::arange(kept, idx.options().dtype(at::kInt)), n, "floor").mul_(m);
    for (int64_t b0 = 0; b0 < B; b0 += kDirectMaxBatch) {
      const int64_t bt = std::min(kDirectMaxBatch, B - b0);
      auto xt = x2.narrow(0, b0, bt);
      // The AVX-512 and AVX2 N:M kernels read row-major x at every batch (in tiles of 8 rows).
      const int64_t BP = wide || avx2 ? 0 : lanes_for_batch(bt);
      auto xin = BP ? x_lanes(xt, BP) : xt;
      NmRowsArgs a{vals.data_ptr(), idx.data_ptr<uint8_t>(), wide ? nullptr : slot_base.data_ptr<int32_t>(),
                   vals.scalar_type(), kept, idx.size(1), n, m, K, O, xin.data_ptr<float>(), bt, BP,
                   out.data_ptr<float>() + b0 * O};
      // parallel_out_rows: for 2:4 (2-bit in-group indices: any bytes stay inside the row), a
      // chunk a parked worker abandoned may run after this returns; keep holds what `a` points
      // into (out excepted: the worker writes its own buffer then).
      parallel_out_rows(O, bt, rows_grain(K, bt), a.out, m == 4, {vals, idx, slot_base, xin},
                        [a, wide, avx2](float* dst, int64_t r0, int64_t r1) {
        NmRowsArgs t = a;
        t.out = dst;
        if (wide) avx512::nm_rows(t, r0, r1);
        else if (avx2) avx2::nm_rows(t, r0, r1);
        else generic::nm_rows(t, r0, r1);
      });
    }
  }
  return finish_linear(out, x, bias_left);
}

// The im2col matrix [rows, K] of x as [N, H, W, C] (xl), columns in (kh, kw, C) order, in x's
// dtype: a view where x is channels-last and the convolution 1x1 of stride 1 without padding.
at::Tensor conv_columns(const at::Tensor& xl, const ConvGeometry& g, int64_t rows, int64_t K) {
  auto xp = ((g.ph || g.pw) ? at::constant_pad_nd(xl, {0, 0, g.pw, g.pw, g.ph, g.ph}) : xl).contiguous();
  const auto st = xp.strides();
  return xp.as_strided({g.N, g.OH, g.OW, g.kh, g.kw, g.C},
                       {st[0], st[1] * g.sh, st[2] * g.sw, st[1] * g.dh, st[2] * g.dw, st[3]})
      .reshape({rows, K});
}

// nm_conv2d: the convolution of x [N, C, H, W] with the N:M weight [O, kh * kw * C] (input
// channels fastest within each tap: patterns.as_2d), as one product over channels-last
// patches: rows are output pixels (n, oh, ow), columns the taps' channels. 2:4 from 17
// rows runs the weight-stationary kernel (algo 1, chosen by sparsekern/dispatch_rules.py) with the x tiles gathered straight from the
// channels-last input, tap by tap (LaneRows): no padded copy, no im2col matrix; bf16 x and
// weights there run the bf16 2:4 GEMM on the patch matrix instead (nm24_bf16_dot). Anything
// else builds the patch matrix with one strided copy and runs nm_linear's kernels on it.
// The result is [N, O, OH, OW] in channels-last memory (the next convolution reads it
// without a copy).
at::Tensor nm_conv2d_algo(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                          int64_t m, at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, const c10::optional<at::Tensor>& bias, int64_t algo,
                          const c10::optional<at::Tensor>& panels) {
  const char* op = "nm_conv2d";
  check_nm_params(op, n, m);
  const ConvGeometry g = check_conv_geometry(op, x, weight_shape, stride, padding, dilation);
  TORCH_CHECK_VALUE(g.C % m == 0, op, ": input channels (", g.C, ") must be a multiple of m (", m,
                    "): N:M groups run along input channels");
  const int64_t K = g.kh * g.kw * g.C, O = g.O, kept = K / m * n;
  check_same(op, x, values, "values");
  check_index_tensor(op, x, indices, "indices", c10::kByte);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == O && values.size(1) == kept, op,
                    ": values must have shape [", O, ", ", kept, "] for weight_shape ", weight_shape, " and ", n, ":",
                    m, ", got ", values.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == O && indices.size(1) == nm_index_row_bytes(kept, m),
                    op, ": indices must have shape [", O, ", ", nm_index_row_bytes(kept, m), "], got ",
                    indices.sizes());
  check_bias(op, x, bias, O);
  check_nm24_panels(op, x, n, m, O, K, panels);
  check_nm_algo(op, algo, n, m, panels);
  auto vals = values.contiguous();
  auto idx = indices.contiguous();
  auto xl = x.permute({0, 2, 3, 1});  // [N, H, W, C]: contiguous when x is channels-last
  const int64_t rows = g.N * g.OH * g.OW;
  if (rows > 0 && O > 0 && nm24_bf16_dot(algo, vals, panels)) {
    // bf16 x and weight on a CPU with vdpbf16ps: the columns of x in bf16 (a view for a 1x1
    // convolution of stride 1 on channels-last x, a copy otherwise) into the bf16 2:4 GEMM,
    // whose bf16 [rows, O] result, bias in, is the memory of the channels-last output: no fp32
    // x, no fp32 output and no conversions (ResNet-50's bf16 convolutions ran the fp32 kernel).
    auto cols = conv_columns(xl, g, rows, K);
    return nm_linear_algo(cols, vals, idx, n, m, K, bias, algo, c10::nullopt)
        .view({g.N, g.OH, g.OW, O})
        .permute({0, 3, 1, 2});
  }
  auto out = at::empty({g.N, O, g.OH, g.OW}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  if (rows == 0 || O == 0) {
    out.zero_();
  } else if (nm_gemm_algo(algo)) {
    xl = xl.to(at::kFloat).contiguous();
    const LaneRows src{xl.data_ptr<float>(), rows, g.kh * g.kw, g.C, g.H, g.W, g.OH, g.OW, g.kw,
                       g.sh, g.sw, g.ph, g.pw, g.dh, g.dw};
    const at::Tensor packed = aligned_panels(panels);
    nm24_gemm_cpu(src, xl.options(), vals, idx, K, O, out.data_ptr<float>(),
                  packed.defined() ? packed.data_ptr<uint8_t>() : nullptr);
  } else {
    // In x's dtype: nm_linear's kernels take x in the values' dtype.
    auto cols = conv_columns(xl, g, rows, K);
    // [N, OH, OW, O] is the memory of the channels-last result. The bias goes in there, so
    // a bf16/fp16 result is rounded once.
    out.permute({0, 2, 3, 1}).reshape({rows, O}).copy_(nm_linear_algo(cols, vals, idx, n, m, K, bias, algo, c10::nullopt));
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat).view({1, O, 1, 1}));
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// The shared schemas (every backend's), no CPU-only arguments: the row kernels at every batch
// (the ops layer runs nm_linear_cpu / nm_conv2d_cpu with the algorithm dispatch_rules chose).
at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                         int64_t m, int64_t in_features, const c10::optional<at::Tensor>& bias) {
  return nm_linear_algo(x, values, indices, n, m, in_features, bias, kNmAlgoRows, c10::nullopt);
}

at::Tensor nm_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n,
                         int64_t m, at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, const c10::optional<at::Tensor>& bias) {
  return nm_conv2d_algo(x, values, indices, n, m, weight_shape, stride, padding, dilation, bias, kNmAlgoRows,
                        c10::nullopt);
}

// Shared by nm_compress (mask or |w|) and nm_score_compress (score |w| * |grad| *
// act_norm[col], chosen, masked and compressed in one pass: no topk + scatter chain).
std::tuple<at::Tensor, at::Tensor> nm_compress_impl(const char* op, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& mask,
                                                    const c10::optional<at::Tensor>& grad,
                                                    const c10::optional<at::Tensor>& act_norm, int64_t n, int64_t m) {
  check_nm_params(op, n, m);
  TORCH_CHECK_TYPE(is_float_dtype(weight.scalar_type()), op, ": weight must be float32, bfloat16 or float16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  const int64_t O = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(K % m == 0, op, ": in_features (weight.shape[1] = ", K, ") must be divisible by m = ", m);
  at::Tensor mk;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == weight.sizes(), op, ": mask shape ", mask->sizes(),
                      " must equal weight shape ", weight.sizes());
    TORCH_CHECK(mask->device() == weight.device(), op, ": mask is on ", mask->device(), " but weight is on ",
                weight.device());
    mk = mask->contiguous();
  }
  at::Tensor g, an;
  if (grad.has_value()) {
    TORCH_CHECK_VALUE(grad->sizes() == weight.sizes(), op, ": grad shape ", grad->sizes(), " must equal weight shape ",
                      weight.sizes());
    TORCH_CHECK(grad->device() == weight.device(), op, ": grad must be on the weight's device");
    g = grad->to(at::kFloat).contiguous();
  }
  if (act_norm.has_value()) {
    TORCH_CHECK_VALUE(act_norm->dim() == 1 && act_norm->size(0) == K, op, ": act_norm must have shape [", K,
                      "] (one norm per input feature), got ", act_norm->sizes());
    TORCH_CHECK(act_norm->device() == weight.device(), op, ": act_norm must be on the weight's device");
    an = act_norm->to(at::kFloat).contiguous();
  }
  auto w = weight.contiguous();
  const int64_t kept = K / m * n, rb = nm_index_row_bytes(kept, m);
  auto values = at::empty({O, kept}, w.options());
  auto indices = at::zeros({O, rb}, w.options().dtype(at::kByte));
  std::atomic<int64_t> bad_mask_row{-1}, nonfinite_row{-1};
  const int bits = nm_index_bits(m);
  SPARSEKERN_DISPATCH_FLOATS(w.scalar_type(), "nm_compress", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const bool* mp = mk.defined() ? mk.data_ptr<bool>() : nullptr;
    const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
    const float* ap = an.defined() ? an.data_ptr<float>() : nullptr;
    scalar_t* vp = values.data_ptr<scalar_t>();
    uint8_t* ip = indices.data_ptr<uint8_t>();
    parallel_rows(O, 8, [&](int64_t r0, int64_t r1) {
      int sel[16];
      bool taken[16];
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* wr = wp + r * K;
        for (int64_t g = 0; g < K / m; ++g) {
          const int64_t c0 = g * m;
          int cnt = 0;
          for (int j = 0; j < m; ++j) {
            taken[j] = false;
            if (!std::isfinite(static_cast<float>(wr[c0 + j]))) nonfinite_row.store(r);
          }
          if (mp) {
            for (int j = 0; j < m; ++j) {
              if (!mp[r * K + c0 + j]) continue;
              if (cnt == n) { bad_mask_row.store(r); break; }
              sel[cnt++] = j;
              taken[j] = true;
            }
            // Fewer than n kept: pad with the first unused positions, stored as zeros.
            for (int j = 0; j < m && cnt < n; ++j)
              if (!taken[j]) { sel[cnt++] = j; taken[j] = true; }
            std::sort(sel, sel + n);  // slots hold a group's elements in column order
          } else {
            // n largest scores (|w|, times |grad| and act_norm[col] when given); ties go to
            // the lower column, so the choice is deterministic.
            for (; cnt < n; ++cnt) {
              int best = -1;
              float bv = -1.f;
              for (int j = 0; j < m; ++j) {
                float a = std::fabs(static_cast<float>(wr[c0 + j]));
                if (gp) a *= std::fabs(gp[r * K + c0 + j]);
                if (ap) a *= ap[c0 + j];
                if (!taken[j] && a > bv) { bv = a; best = j; }
              }
              if (best < 0) best = 0;  // only reached when every score left is NaN
              taken[best] = true;
              sel[cnt] = best;
            }
            std::sort(sel, sel + n);
          }
          for (int t = 0; t < n; ++t) {
            const int64_t s = g * n + t;
            const int j = sel[t];
            const bool keep = mp ? static_cast<bool>(mp[r * K + c0 + j]) : true;
            vp[r * kept + s] = keep ? wr[c0 + j] : scalar_t(0);
            ip[r * rb + (s * bits >> 3)] |= static_cast<uint8_t>(j << ((s * bits) & 7));
          }
        }
      }
    });
  });
  TORCH_CHECK_VALUE(nonfinite_row.load() < 0, op, ": weight has NaN or inf (row ", nonfinite_row.load(),
                    "); sparse formats need finite weights");
  TORCH_CHECK_VALUE(bad_mask_row.load() < 0, op, ": mask is not ", n, ":", m, " (row ", bad_mask_row.load(),
                    " keeps more than ", n, " of ", m, " in a group)");
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> nm_compress_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                                   int64_t n, int64_t m) {
  return nm_compress_impl("nm_compress", weight, mask, c10::nullopt, c10::nullopt, n, m);
}

std::tuple<at::Tensor, at::Tensor> nm_score_compress_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& grad,
                                                         const c10::optional<at::Tensor>& act_norm, int64_t n,
                                                         int64_t m) {
  return nm_compress_impl("nm_score_compress", weight, c10::nullopt, grad, act_norm, n, m);
}

at::Tensor nm_decompress_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m,
                             int64_t in_features) {
  const char* op = "nm_decompress";
  check_nm_params(op, n, m);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % m == 0, op, ": in_features (", in_features,
                    ") must be a positive multiple of m (", m, ")");
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be a float tensor");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op, ": indices must be uint8");
  const int64_t kept = in_features / m * n, O = values.size(0);
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == kept, op, ": values must have shape [out, ", kept, "]");
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == O && indices.size(1) == nm_index_row_bytes(kept, m), op,
                    ": indices must have shape [", O, ", ", nm_index_row_bytes(kept, m), "]");
  auto v = values.contiguous();
  auto ix = indices.contiguous();
  auto out = at::empty({O, in_features}, v.options());
  if (avx512_nm_pattern(n, m) && m != 8 && v.scalar_type() == at::kFloat && cpu_has_avx512()) {
    // fp32: the AVX-512 row expansion of the large-batch tiles (it needs the in-group
    // indices distinct and increasing, which every format from the formats layer has).
    // Not for m = 8, whose 4-bit fields can hold an index >= m: the loop below refuses it.
    NmRowsArgs a{v.data_ptr(), ix.data_ptr<uint8_t>(), nullptr, v.scalar_type(), kept, ix.size(1), n, m,
                 in_features, O, nullptr, 0, 0, nullptr};
    float* dst = out.data_ptr<float>();
    parallel_rows(O, 16, [&](int64_t r0, int64_t r1) { avx512::nm_dense_rows(a, r0, r1, dst + r0 * in_features); });
    return out;
  }
  SPARSEKERN_DISPATCH_FLOATS(v.scalar_type(), "nm_decompress", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const uint8_t* ip = ix.data_ptr<uint8_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int bits = nm_index_bits(m);
    const int64_t rb = ix.size(1);
    parallel_rows(O, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = op_ + r * in_features;
        std::fill(dst, dst + in_features, scalar_t(0));
        for (int64_t s = 0; s < kept; ++s) {
          const uint8_t byte = ip[r * rb + (s * bits >> 3)];
          const int j = (byte >> ((s * bits) & 7)) & ((1 << bits) - 1);
          TORCH_CHECK_VALUE(j < m, op, ": indices hold an in-group index >= m (corrupt indices)");
          dst[(s / n) * m + j] = vp[r * kept + s];
        }
      }
    });
  });
  return out;
}

}  // namespace

// nm24_pack_panels: a 2:4 weight in the layout of nm24_panels.h (read by the AVX2 and AVX-512
// GEMM kernels of nm_linear from 17 rows and of nm_conv2d from 17 output pixels). Once per
// weight; portable scalar code.
template <typename VT>
void pack_panel_blocks(const VT* v, const uint8_t* ix, int64_t kept, int64_t rb, int64_t K, int64_t O, int64_t b0,
                       int64_t b1, uint8_t* dst) {
  using P = Nm24Panels;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t kt = 0; kt < P::k_tiles(K); ++kt) {
      const int64_t k0 = kt * P::kKt, s0 = k0 / 2, s1 = std::min(kept, (k0 + P::kKt) / 2);
      uint8_t* blk = dst + P::block_offset(O, K, b * P::kBlockRows, kt);
      for (int64_t q = 0; q * 4 < s1 - s0; ++q) {
        uint8_t* quad = blk + q * P::kQuadBytes;
        uint16_t off[12];
        float val[12];
        for (int r = 0; r < P::kBlockRows; ++r) {
          const int64_t row = b * P::kBlockRows + r;
          for (int t = 0; t < 4; ++t) {
            const int64_t s = s0 + 4 * q + t;
            int64_t col = k0;  // rows past O: column k0 (inside the K tile), value 0
            float w = 0.f;
            if (row < O && s < s1) {
              col = (s / 2) * 4 + ((ix[row * rb + (s >> 2)] >> ((s & 3) * 2)) & 3);
              w = static_cast<float>(v[row * kept + s]);
            } else if (row < O) {
              col = K;  // past the row's end: the zero column, inside this last K tile
            }
            off[4 * r + t] = static_cast<uint16_t>((col - k0) << 8);
            val[4 * r + t] = w;
          }
        }
        std::memcpy(quad, off, sizeof(off));
        std::memcpy(quad + sizeof(off), val, sizeof(val));
      }
    }
  }
}

at::Tensor nm24_pack_panels_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t in_features) {
  const char* op = "nm24_pack_panels";
  TORCH_CHECK_VALUE(in_features > 0 && in_features % 4 == 0, op, ": in_features (", in_features,
                    ") must be a positive multiple of 4");
  TORCH_CHECK_TYPE(is_float_dtype(values.scalar_type()), op, ": values must be float32, bfloat16 or float16, got ",
                   values.scalar_type());
  check_index_tensor(op, values, indices, "indices", c10::kByte);
  const int64_t kept = in_features / 2, O = values.dim() == 2 ? values.size(0) : -1;
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == kept, op, ": values must have shape [out, ", kept,
                    "], got ", values.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == O && indices.size(1) == nm_index_row_bytes(kept, 4),
                    op, ": indices must have shape [", O, ", ", nm_index_row_bytes(kept, 4), "], got ",
                    indices.sizes());
  auto vals = values.contiguous();
  auto idx = indices.contiguous();
  auto out = at::zeros({Nm24Panels::bytes(O, in_features)}, values.options().dtype(at::kByte));
  SPARSEKERN_DISPATCH_FLOATS(vals.scalar_type(), "nm24_pack_panels", [&] {
    at::parallel_for(0, Nm24Panels::blocks(O), 32, [&](int64_t b0, int64_t b1) {
      pack_panel_blocks(vals.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), kept, idx.size(1), in_features, O, b0, b1,
                        out.data_ptr<uint8_t>());
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("nm_linear", &nm_linear_cpu);
  m.impl("nm24_pack_panels", &nm24_pack_panels_cpu);
  m.impl("nm_conv2d", &nm_conv2d_cpu);
  m.impl("nm_linear_cpu", &nm_linear_algo);
  m.impl("nm_conv2d_cpu", &nm_conv2d_algo);
  m.impl("nm_compress", &nm_compress_cpu);
  m.impl("nm_score_compress", &nm_score_compress_cpu);
  m.impl("nm_decompress", &nm_decompress_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
