#include "cpu_common.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sparsekern {

// True when sparse_rows_avx2.cpp holds AVX2 kernels and this CPU has every extension it
// was compiled for (its `#pragma GCC target` list).
// SPARSEKERN_CPU_ISA (read once): "generic" (or "portable") forces the portable kernels;
// "avx2": the AVX2 kernels only (no AVX-512 ones); unset: the best the CPU runs.
bool cpu_has_avx2() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = [] {
    const char* isa = std::getenv("SPARSEKERN_CPU_ISA");
    if (isa && (std::strcmp(isa, "generic") == 0 || std::strcmp(isa, "portable") == 0)) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = [] {
    const char* isa = std::getenv("SPARSEKERN_CPU_ISA");
    if (isa && std::strcmp(isa, "avx512") != 0) return false;  // "avx2", "generic", "portable"
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("popcnt");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if SPARSEKERN_AVX2_KERNELS
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

void cpu_evict_from_cache(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "sparsekern.cpu_evict_from_cache: tensors[", i, "] is undefined");
    TORCH_CHECK_VALUE(t.device().is_cpu(), "sparsekern.cpu_evict_from_cache: tensors[", i,
                      "] must be a CPU tensor, got one on ", t.device());
  }
#if defined(__x86_64__) || defined(__i386__)
  for (const at::Tensor& t : tensors) {
    if (!t.has_storage()) continue;
    const char* base = static_cast<const char*>(t.storage().data());
    const size_t nbytes = t.storage().nbytes();
    if (base == nullptr || nbytes == 0) continue;
    const uintptr_t first = reinterpret_cast<uintptr_t>(base) & ~uintptr_t(63);
    const uintptr_t end = reinterpret_cast<uintptr_t>(base) + nbytes;
    for (uintptr_t line = first; line < end; line += 64) _mm_clflush(reinterpret_cast<const void*>(line));
  }
  _mm_mfence();  // the evictions are done before the timed call starts
#else
  TORCH_CHECK(false, "sparsekern.cpu_evict_from_cache: evicting cache lines is implemented for x86 CPUs only");
#endif
}

std::tuple<double, double, int64_t> cpu_fma_probe(int64_t iterations) {
  TORCH_CHECK(iterations > 0 && iterations <= (int64_t(1) << 32),
              "sparsekern.cpu_fma_probe: iterations must be in [1, 2^32], got ", iterations);
  const int64_t lanes = cpu_has_avx512() ? 16 : cpu_has_avx2() ? 8 : 1;
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> started{0};
  float sink = 0.f;
  std::mutex sink_lock;
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0_, int64_t t1_) {
    for (int64_t t = t0_; t < t1_; ++t) {
      started.fetch_add(1);
      const float v = lanes == 16 ? cpu::avx512::fma_probe(iterations)
                      : lanes == 8 ? cpu::avx2::fma_probe(iterations)
                                   : cpu::generic::fma_probe(iterations);
      std::lock_guard<std::mutex> g(sink_lock);
      sink += v;
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // A NaN sink would mean the chains overflowed (they cannot: |acc| stays below 1e-3 / (1 - 0.9999));
  // reading it keeps the work observable.
  TORCH_CHECK(sink == sink, "sparsekern.cpu_fma_probe: the probe's sum is NaN");
  const double flops = 2.0 * double(lanes) * double(cpu::kFmaProbeChains) * double(iterations) * double(started.load());
  return {seconds, flops, lanes};
}

namespace cpu {

BitmaskRowsSnapshot snapshot_bitmask_rows(const int64_t* bitmask, const int32_t* offsets, const int16_t* columns,
                                          int64_t words, int64_t tiles, int64_t K, int64_t nnz, int64_t r0,
                                          int64_t r1) {
  thread_local std::vector<int64_t> word_copy;
  thread_local std::vector<int32_t> offset_copy;
  thread_local std::vector<int16_t> column_copy;
  BitmaskRowsSnapshot snap;
  const int64_t rows = r1 - r0;
  if (rows <= 0 || words <= 0 || tiles <= 0) return snap;
  word_copy.resize(size_t(rows * words));
  offset_copy.resize(size_t((rows + 1) * tiles));  // + the end of the last row (bitmask_kept_span reads it)
  std::memcpy(word_copy.data(), bitmask + r0 * words, size_t(rows * words) * sizeof(int64_t));
  // each offset read once, into the copy: what is checked below is what the kernel reads
  std::memcpy(offset_copy.data(), offsets + r0 * tiles, size_t(rows * tiles) * sizeof(int32_t));
  const int64_t first = offset_copy[0];
  if (first < 0 || first > nnz) return snap;
  const int64_t tail = K % 64;
  const uint64_t past_k = tail ? ~((uint64_t(1) << tail) - 1) : 0;
  constexpr int64_t kTileWords = kBitmaskTileCols / 64;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* w = reinterpret_cast<const uint64_t*>(word_copy.data() + r * words);
    if (w[words - 1] & past_k) return snap;
    for (int64_t t = 0; t < tiles; ++t) {
      int32_t& off = offset_copy[size_t(r * tiles + t)];
      if (int64_t(off) - first != count) return snap;
      off = static_cast<int32_t>(count);
      for (int64_t j = t * kTileWords; j < std::min(words, (t + 1) * kTileWords); ++j) count += __builtin_popcountll(w[j]);
    }
  }
  if (count > nnz - first) return snap;
  for (int64_t t = 0; t < tiles; ++t) offset_copy[size_t(rows * tiles + t)] = static_cast<int32_t>(count);
  const int64_t n = std::min(nnz - first, count + K + 64);
  if (columns != nullptr) {
    column_copy.resize(size_t(n > 0 ? n : 1));
    std::memcpy(column_copy.data(), columns + first, size_t(n) * sizeof(int16_t));
    for (int64_t i = 0; i < n; ++i)
      if (static_cast<uint16_t>(column_copy[size_t(i)]) >= K) return snap;
    snap.columns = column_copy.data();
  }
  snap.valid = true;
  snap.first = first;
  snap.nnz = n;
  snap.bitmask = word_copy.data();
  snap.offsets = offset_copy.data();
  return snap;
}

const Nm24SlotColumns& nm24_slot_columns() {
  static const Nm24SlotColumns table = [] {
    Nm24SlotColumns t;
    for (int byte = 0; byte < 256; ++byte)
      for (int s = 0; s < 4; ++s) t.col[byte][s] = (s / 2) * 4 + ((byte >> (2 * s)) & 3);
    return t;
  }();
  return table;
}

at::Tensor x_float_2d(const at::Tensor& x) {
  const int64_t K = x.size(-1);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

at::Tensor x_lanes(const at::Tensor& x2, int64_t BP) {
  auto xT = at::zeros({x2.size(1), BP}, x2.options());
  xT.narrow(1, 0, x2.size(0)).copy_(x2.t());
  return xT;
}

void lane_rows(const LaneRows& s, int64_t b0, int64_t L, const float** rows) {
  if (s.positions == 1 && s.H * s.W == 1 && s.OH * s.OW == 1 && s.ph == 0 && s.pw == 0) {  // linear: the rows of x
    for (int64_t l = 0; l < L; ++l) rows[l] = b0 + l < s.B ? s.x + (b0 + l) * s.C : nullptr;
    return;
  }
  const int64_t kh = s.positions / s.kw;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = b0 + l;
    if (b >= s.B) {
      for (int64_t p = 0; p < s.positions; ++p) rows[p * L + l] = nullptr;
      continue;
    }
    const int64_t n = b / (s.OH * s.OW), oh = b / s.OW % s.OH, ow = b % s.OW;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t ih = oh * s.sh - s.ph + i * s.dh;
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t iw = ow * s.sw - s.pw + j * s.dw;
        const bool in = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        rows[(i * s.kw + j) * L + l] = in ? s.x + ((n * s.H + ih) * s.W + iw) * s.C : nullptr;
      }
    }
  }
}

at::Tensor lane_tiles(const LaneRows& src, int64_t L, const at::TensorOptions& options, int64_t extra_cols) {
  const int64_t K = src.positions * src.C, tiles = (src.B + L - 1) / L;
  auto xT = at::empty({tiles * (K + 1) + extra_cols, L}, options);
  float* dst = xT.data_ptr<float>();
  std::fill(dst + tiles * (K + 1) * L, dst + (tiles * (K + 1) + extra_cols) * L, 0.f);
  parallel_chunks(tiles, std::max<int64_t>(1, (int64_t(1) << 16) / ((K + 1) * L)), [&](int64_t t0, int64_t t1) {
    std::vector<const float*> rows(src.positions * L);
    for (int64_t t = t0; t < t1; ++t) {
      lane_rows(src, t * L, L, rows.data());
      avx2::lane_tile(LaneTileArgs{rows.data(), src.positions, src.C, L, dst + t * (K + 1) * L});
    }
  });
  return xT;
}

WsPlan ws_plan(int64_t B, int64_t K, int64_t O, int64_t weight_bytes, int64_t threads) {
  // A chunk's tiles take about half of a 2 MiB L2 (the packed weight, the partial sums and
  // the output rows share it; at K > 4095 one 64-lane tile is already more): 3136 x 1152 -> 128 (192 lanes a chunk) ran 1.24x dense
  // with 1 MiB chunks against 0.77x with 512 KiB (64 lanes: the weight re-packed for every
  // tile) and 0.85x with 2 MiB, interleaved in one process each.
  constexpr int64_t kChunkBytes = int64_t(1024) << 10;
  // A chunk re-packs and re-reads the whole weight: worth it for a weight that stays in the
  // L2, and for an x several times the weight's size. Measured interleaved against the
  // panel order (2:4 fp32, 2 threads, AVX-512): 12544 rows x 576 -> 64, 256 -> 64,
  // 3136 x 1152 -> 128 and 3136 x 128 -> 512 (weights of 74-313 KB, x 12-29x that) ran
  // 1.3-2.9x faster in chunks; 784 x 1024 -> 256 (x 5.8x a 557 KB weight) the same;
  // 784 x 256 -> 1024 (x 1.5x) 0.81x, 1024 x 2048 -> 2048 (8.9 MB) 0.66x, 4096^3 (36 MB) 0.75x.
  constexpr int64_t kChunkWeightBytes = int64_t(1) << 20;
  constexpr int64_t L = avx512::kG24Lanes512, kMaxChunkLanes = 512;
  WsPlan p{};
  p.panel_rows = ws_panel_rows(O, threads);
  p.panels = (O + p.panel_rows - 1) / p.panel_rows;
  const int64_t col_bytes = (K + 1) * int64_t(sizeof(float));
  p.chunk_lanes = std::min(kMaxChunkLanes, std::max(L, kChunkBytes / col_bytes / L * L));
  p.chunks = (B + p.chunk_lanes - 1) / p.chunk_lanes;
  const int64_t x_bytes = B * col_bytes;
  p.chunked = x_bytes > 4 * weight_bytes && weight_bytes <= kChunkWeightBytes && p.chunks >= threads;
  // SPARSEKERN_WS_ORDER (read per call, a benchmarking switch): "panels" or "chunks" forces
  // an order.
  if (const char* order = std::getenv("SPARSEKERN_WS_ORDER")) {
    if (std::strcmp(order, "panels") == 0) p.chunked = false;
    if (std::strcmp(order, "chunks") == 0) p.chunked = true;
  }
  if (p.chunked) {  // one thread runs all rows of its chunk: the largest panel the kernel takes
    p.panel_rows = std::min<int64_t>(96, (O + 2) / 3 * 3);
    p.panels = (O + p.panel_rows - 1) / p.panel_rows;
  }
  return p;
}

at::Tensor tiled_gemm(const at::Tensor& x2, int64_t O, const FillRows& fill, const c10::optional<at::Tensor>& bias) {
  const int64_t B = x2.size(0), K = x2.size(1);
  auto out = at::empty({B, O}, x2.options());
  // Tiles of about 16 MiB (at least 128 rows): the whole weight of a ViT-B or BERT-base
  // layer, so one GEMM call there (the BLAS packs x again for every call: with 4 MiB tiles,
  // a 768x3072 weight in three, the path ran at 0.79-0.81x dense at 788 rows, one 16 MiB
  // tile 0.93-1.01x), while a 4096x4096 weight's tiles still come back from the cache
  // between their decompression and their GEMM (one 64 MiB tile: 0.43-0.49x dense at 128
  // rows, against 0.72-0.78x for 16 MiB and 0.72-0.74x for 4 MiB; 4:8, 2 threads,
  // interleaved with F.linear). The buffer is transient.
  const int64_t tile = std::max<int64_t>(128, (int64_t(16) << 20) / (K * int64_t(sizeof(float))));
  auto buf = at::empty({std::min(tile, O), K}, x2.options());
  // The bias goes in as F.linear's addmm puts it (copied into the output, then the GEMM with
  // beta = 1) instead of an add over the finished output.
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t r0 = 0; r0 < O; r0 += tile) {
    const int64_t r1 = std::min(O, r0 + tile);
    auto part = buf.narrow(0, 0, r1 - r0);
    float* p = part.data_ptr<float>();
    parallel_chunks(r1 - r0, 1, [&](int64_t a, int64_t b) { fill(r0 + a, r0 + b, p + a * K); });
    // Straight into the output's columns (BLAS writes with leading dimension O): no
    // temporary, no copy.
    auto cols = out.narrow(1, r0, r1 - r0);
    if (b32.defined()) at::addmm_out(cols, b32.narrow(0, r0, r1 - r0), x2, part.t());
    else at::mm_out(cols, x2, part.t());
  }
  return out;
}

at::Tensor finish_linear(const at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = out;
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  // resize_, not reshape: the result must not be a view of a temporary (autograd and FSDP2
  // warn about custom ops returning views, and in-place ops on a view skip their hooks).
  at::Tensor r = y.to(x.scalar_type());
  r.resize_(sizes);
  return r;
}

}  // namespace cpu
}  // namespace sparsekern
