// Helpers shared by the CPU op files: activation layout, the large-batch path and the
// epilogue (bias, dtype, leading shape).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <functional>
#include <vector>

#include "../common.h"
#include "sparse_rows.h"

namespace sparsekern {

namespace cpu {

// A bitmask weight's bits past in_features would unmask x past its end (and index outside
// the row): refused, for every CPU op that reads a bitmask (free when in % 64 == 0).
inline void check_bitmask_tail_bits(const char* op, const at::Tensor& bitmask, int64_t in_features) {
  // Bits past in_features would index outside the row: refuse them rather than read there.
  const int64_t tail = in_features % 64;
  if (tail == 0 || bitmask.numel() == 0) return;
  auto last = bitmask.select(1, bitmask.size(1) - 1);
  const int64_t high = static_cast<int64_t>(~((uint64_t(1) << tail) - 1));
  TORCH_CHECK_VALUE(at::bitwise_and(last, high).ne(0).sum().item<int64_t>() == 0, op,
                    ": bitmask has bits set beyond in_features (", in_features, ")");
}

// Rows [r0, r1) of a bitmask weight's index tensors copied into buffers of the calling thread
// and checked there, for a parallel_out_rows worker whose chunk the calling thread may abandon:
// the worker may still run after the call returned, while the caller's next steps edit those
// tensors in place, so it reads the copy, which holds what it checked. Checked: the rows'
// offsets start at first (0 <= first <= nnz) and each tile's offset is the count of kept bits
// before it (the rows' values follow one another from first), they end within nnz, no bit is
// set past K, and each copied column index (the rows' and up to K + 64 past them, what the
// kernels' wide loads may read) is below K. A kernel run on the copy (rows 0 to r1 - r0), its
// values from values + first, `nnz` of them, and its output and per-row arrays from row r0,
// reads inside the buffers whatever bytes the originals hold. `valid` false: the copy failed a check
// (the weight was edited while the call ran); run nothing.
struct BitmaskRowsSnapshot {
  bool valid = false;
  int64_t first = 0;               // index in values of row r0's first kept value
  int64_t nnz = 0;                 // values (and copied columns) a kernel may read from first: at
                                   // most nnz - first, and the rows' own plus K + 64
  const int64_t* bitmask = nullptr;  // [r1 - r0, words]
  const int32_t* offsets = nullptr;  // [r1 - r0 + 1, tiles], counted from first; the last row: the rows' end
  const int16_t* columns = nullptr;  // from first, or null when columns is
};
BitmaskRowsSnapshot snapshot_bitmask_rows(const int64_t* bitmask, const int32_t* offsets, const int16_t* columns,
                                          int64_t words, int64_t tiles, int64_t K, int64_t nnz, int64_t r0,
                                          int64_t r1);

// x [..., K] as contiguous fp32 [B, K].
at::Tensor x_float_2d(const at::Tensor& x);

// fp32 [B, K] -> [K, BP] with BP = 8 or 16 lanes (zero padded), the layout of the
// broadcast kernels.
at::Tensor x_lanes(const at::Tensor& x2, int64_t BP);

// The x layout of the weight-stationary kernels from any lane source (sparse_rows.h: the
// rows of x, or a convolution's taps): ceil(B / L) tiles of [K + 1][L] fp32, lanes past B
// and column K zero (padding slots point at column K). Needs AVX2 (avx2::lane_tile).
// extra_cols more zero columns after the last tile (Nm24Panels::x_extra_cols).
at::Tensor lane_tiles(const LaneRows& src, int64_t L, const at::TensorOptions& options, int64_t extra_cols = 0);

// How the weight-stationary kernels walk B rows of K columns into O outputs, given the
// compressed weight's bytes (WsChunks in sparse_rows.h): the panel order, unless the weight
// stays in the L2 and x is several times its size (a convolution: thousands of pixels, a
// weight of a few hundred KB), where the chunk order reads x once. cpu_common.cpp has the
// measurements behind the thresholds.
struct WsPlan {
  int64_t panel_rows, panels;
  bool chunked;
  int64_t chunk_lanes, chunks;
};
WsPlan ws_plan(int64_t B, int64_t K, int64_t O, int64_t weight_bytes, int64_t threads);

// 2:4 through the weight-stationary kernel (AVX2, or AVX-512 where the CPU has it), x
// read from src: vals [O, K / 2] and idx as NMWeight's; writes fp32 [src.B, O] (no bias)
// to out. With `prepacked` (the weight as Nm24Panels, nm24_panels.h) either kernel reads
// it instead of packing vals and idx. nm_linear.cpp, for nm_linear and nm_conv2d.
void nm24_gemm_cpu(const LaneRows& src, const at::TensorOptions& options, const at::Tensor& vals,
                   const at::Tensor& idx, int64_t K, int64_t O, float* out, const uint8_t* prepacked = nullptr);

// 2:4 bf16 weight times bf16 x [B, K] (row-major, contiguous) with bf16 dot products
// (nm_gemm_bf16.h; needs cpu_has_avx512_bf16()): vals [O, K / 2] and idx as NMWeight's,
// read as they are stored (no packed copy); writes bf16 [B, O] to out, bias (fp32 [O], or
// nullptr) added before the rounding. nm_linear.cpp, for nm_linear's 2:4 GEMM (algo 1) on
// bf16 tensors.
void nm24_gemm_bf16_cpu(const at::Tensor& x2, const at::Tensor& vals, const at::Tensor& idx, int64_t K, int64_t O,
                        const float* bias, at::BFloat16* out);

// Rows per panel of the weight-stationary kernels: a multiple of 3 (their row block), at
// most 96, and at least 4 panels per thread so threads that share a core even out.
inline int64_t ws_panel_rows(int64_t O, int64_t threads) {
  return std::max<int64_t>(3, std::min<int64_t>(96, ((O + 4 * threads - 1) / (4 * threads) + 2) / 3 * 3));
}

// Lanes for the broadcast kernels, or 0 when the row-major kernels take this batch.
inline int64_t lanes_for_batch(int64_t B) { return B <= kRowMajorMaxBatch ? 0 : (B <= 8 ? 8 : 16); }

// Large batches: decompress a tile of output rows at a time into an fp32 buffer and
// multiply it with the BLAS GEMM: "load as sparse, compute as dense". Never holds more
// than one tile. fill(r0, r1, buf) writes rows [r0, r1) as dense [r1-r0, K]; tiled_gemm
// calls it on disjoint row ranges from the intra-op thread pool. With a bias ([O], any
// float dtype) the result already holds it: pass finish_linear no bias then.
using FillRows = std::function<void(int64_t r0, int64_t r1, float* buf)>;
at::Tensor tiled_gemm(const at::Tensor& x2, int64_t O, const FillRows& fill,
                      const c10::optional<at::Tensor>& bias = c10::nullopt);

// out fp32 [B, O] -> + bias, x's dtype, shape [..., O].
at::Tensor finish_linear(const at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& bias);

// The int8 GEMM of the quantized ops' kQAlgoInt8Expand (rows_q.h; linear_q.cpp): x (fp32 [B, K])
// quantized per row to int8 (symmetric, one scale per row, the bytes of kQAlgoInt8Act less
// 128), the weight's int8 values expanded by expand(r0, r1, dst) into output rows [r0, r1) of
// a dense int8 [O, K] made for the call and freed after it (O * K bytes; 0 where pruned),
// at::_int_mm (torch's int8 GEMM: exact int32 sums), then each sum times its x row's and its
// weight row's scale (wscales float32 [O]) -> fp32 [B, O], no bias.
at::Tensor int8_expand_gemm(const at::Tensor& x2, const at::Tensor& wscales, int64_t O,
                            const std::function<void(int64_t, int64_t, int8_t*)>& expand);

// Output rows per task of a direct kernel: at least 16, and enough that a task does about
// 2^17 multiply-adds (weight columns x batch rows). A tiny layer then runs on one thread:
// waking a second one costs more than its share of the work.
inline int64_t rows_grain(int64_t K, int64_t B) {
  const int64_t per_row = std::max<int64_t>(1, K * std::max<int64_t>(1, B));
  return std::max<int64_t>(16, (int64_t(1) << 17) / per_row);
}

// Whether other processes now use the cores that `threads` of torch's need (the machine's CPU
// time against this process's, sampled every 200 ms at most; `now`: the caller's steady-clock
// ns); while they do, libgomp's idle workers are kept from spinning. contention.cpp.
bool machine_contended(int64_t threads, int64_t now);

// Runs fn over [0, n) in chunks of at least `grain` (about 8 per thread), taken from one shared
// counter by the calling thread and at::get_num_threads() - 1 pool workers; returns when every
// chunk is done, without waiting for a worker that never ran (a thread the OS parked behind
// another process leaves its share to the others, where at::parallel_for's fixed ranges and
// end barrier wait for it). fn must be plain computation over its range: ATen ops inside run
// single-threaded, and fn must not depend on which thread runs it. An exception from fn is
// rethrown here. Runs inline with one thread, a single chunk, or inside a parallel region.
// chunk_pool.cpp.
void parallel_chunks(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Output rows [0, O) of an fp32 result `out` [B, O] (row stride O) over the threads, as
// parallel_chunks, except that with `abandonable` a thread the OS parked cannot hold the call:
// rows(dst, r0, r1) must write dst[b * O + r] for b < B and r1 > r >= r0, and nothing else,
// reading only what its own by-value captures point into and `keep` holds. A pool worker runs
// its chunk into a buffer of its own, a block of rows at a time, and copies it into out unless
// the calling thread took the chunk over meanwhile: out of chunks, the calling thread takes
// over one a worker has held for a few times as long as its own chunks took, and returns. The
// worker stops the abandoned chunk at its next block, the job (rows, the storages of keep's
// tensors) kept alive by it; the block it was in when the OS parked it runs to its end after
// the call returned, reading those bytes as they are then. So `abandonable` only where no bytes of them can steer a
// read outside them (a 2:4 weight's 2-bit in-group indices), or where the worker's rows read a
// checked copy of what could (a bitmask weight's mask, offsets and columns:
// snapshot_bitmask_rows, taken when dst is not `out`): elsewhere the calling thread waits for
// the worker, as in parallel_chunks. On the team the region's barrier waits as before.
// chunk_pool.cpp; for the decode row kernels, where each of tens of calls a token could wait a
// time slice for a parked worker's chunk (bench/results/cpu-busy-takeover-20261207).
using OutRows = std::function<void(float* dst, int64_t r0, int64_t r1)>;
void parallel_out_rows(int64_t O, int64_t B, int64_t grain, float* out, bool abandonable,
                       const std::vector<at::Tensor>& keep, OutRows rows);

// The row loops of the CPU kernels: parallel_chunks.
inline void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_chunks(n, grain, fn);
}

#define SPARSEKERN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace cpu
}  // namespace sparsekern
