// The 2:4 weight-stationary GEMM for bf16 weights and bf16 activations with bf16 dot
// products (AVX-512 BF16 `vdpbf16ps`), nm_gemm_bf16.cpp. nm_linear (algo 1, the 2:4 GEMM)
// takes it where cpu_has_avx512_bf16() (cpu_common.h) says the CPU runs it; the op file owns
// the threading and calls the two entry points below from every intra-op thread.
//
// The scheme (read nm_gemm_impl.h first: the fp32 kernel it follows):
//   vdpbf16ps adds a[2i] * b[2i] + a[2i+1] * b[2i+1] into fp32 lane i. A 2:4 group keeps
//   exactly two values, stored side by side in NMWeight.values: one group of one row is one
//   bf16 pair, a 32-bit word read straight from the stored values (no packing, no copy of the
//   weight: nothing is kept beside it). Its partner is the pair (x[4g + i0], x[4g + i1]) of
//   every batch lane, which changes with the row's indices (i0 < i1, one of 6 pairs). So the
//   activations are laid out once per call with all six:
//   pair tiles: 64 batch lanes per tile, tile = [K / 4 groups][6 pairs][64 lanes] uint32,
//               pair p of group g = (x[4g + a] | x[4g + b] << 16) for (a, b) = (0,1), (0,2),
//               (0,3), (1,2), (1,3), (2,3); lanes past B are zero. 6 bytes per x element
//               (the fp32 kernel's tiles take 4), transient, built from bf16 x [B, K].
//   decode: per panel, K tile (64 columns) and pass, each 3-row block's slice once: the value
//         pairs copied as stored and each index nibble turned into its pair's byte offset (a
//         byte shuffle over 16 nibbles), read by every x tile of the pass.
//   core: 3 output rows x 4 vectors of 16 lanes in 12 fp32 accumulators; each row's 16 value
//         pairs of the K tile in one register; per (row, group) one offset load, one vpermd
//         that broadcasts the group's pair (a broadcast load here cost 1.1x: the load ports,
//         not the vector pipes, bound this loop), four vdpbf16ps whose x operand is loaded
//         from the tile (an L1 hit: a K tile's slice is 24 KiB, and the
//         slice read next is prefetched a share per row block: the pairs are read in index
//         order, which the hardware prefetcher does not follow; 1.3x faster with it). Two kept
//         products per instruction lane: half the instructions of the fp32 kernel per kept value.
//   acc / order: as the fp32 kernel: panels of about 256 output rows from a counter (one per
//         range of lanes, whole tiles: Nm24Bf16Args.ranges), passes of up to 512 lanes, K tiles in order, partial sums [tile][row][64] in a per-thread
//         buffer, transposed once into out [B, O] in bf16 (the bias added in fp32 first, then
//         rounded to nearest even as torch rounds: no fp32 output for torch to convert).
//   threads: nm_linear.cpp runs nm24_gemm through parallel_chunks (torch's OpenMP team, or the
//         chunk pool while a core is held elsewhere: chunk_pool.cpp), panels from a shared
//         counter (SPARSEKERN_NM_BF16_THREADS=omp: at::parallel_for's fixed ranges; see there).
// Numerics: bf16 x bf16 products (exact in fp32), each pair summed into an fp32 lane with
// round-to-nearest-even; denormal inputs count as zero and denormal results are flushed
// (the instruction's rule, also oneDNN's dense bf16 GEMM's). The indices of a group must
// increase (every validated NMWeight); other indices read a wrong pair but never outside the
// tile.
#pragma once

#include <cstdint>

#include "work_ranges.h"

namespace sparsekern {
namespace cpu {

struct Nm24Bf16Args {
  const uint16_t* values;   // [O, kept] bf16 bits, kept = K / 2: group g's pair at 2g
  const uint8_t* indices;   // [O, idx_row_bytes], 2 bits per slot (one nibble per group)
  int64_t kept, idx_row_bytes, K, O;
  const uint32_t* tiles;    // ceil(B / 64) pair tiles (pair_tile_words(K) each)
  int64_t B;                // lanes (rows of x) of this pass
  uint16_t* out;            // [B, O] bf16 bits (this pass's first row)
  const float* bias;        // [O] fp32 added before the rounding to bf16, or nullptr
  int64_t panel_rows;       // output rows per panel (a multiple of 3: panel_rows_for)
  int64_t panels;           // ceil(O / panel_rows)
  WorkRanges ranges;        // the work units (work_ranges.h): (range of the pass's lanes, panel)
};

namespace avx512bf16 {
constexpr int64_t kLanes = 64;  // batch lanes per pair tile
constexpr int64_t kPairs = 6;   // pairs per 2:4 group of x
// uint32 words of one pair tile.
inline int64_t pair_tile_words(int64_t K) { return K / 4 * kPairs * kLanes; }
// Pair tiles of lanes [8 u0, 8 u1) of bf16 x [B, K] (row-major, K a multiple of 4) into
// tiles (tile t = tiles + t * pair_tile_words(K)); lanes past B are written zero.
void pair_tiles(const uint16_t* x, int64_t B, int64_t K, int64_t u0, int64_t u1, uint32_t* tiles);
constexpr int64_t kChunkTiles = 8;  // tiles per pass over a panel (512 lanes: its slices decoded once)
// Lanes per range for a pass of `lanes` lanes over `ranges` ranges: the whole tiles nearest an
// equal share (the last range takes the rest; its last tile may be partial). ceil(tiles /
// ranges) tiles per range split ViT-B's 788 lanes 448 + 340, and with only 4 panels per range
// (768 outputs) the thread done first found nothing left to steal: 384 + 404 is 5-8% faster
// there and at ResNet-50's 784-lane layers of 256 outputs, about 2% slower at 2304 and 3072
// outputs (bench/results/cpu-gemm-bf16-balance-20261207).
inline int64_t range_lanes_for(int64_t lanes, int64_t ranges) {
  const int64_t share = (lanes + ranges / 2) / ranges, t = (share + kLanes / 2) / kLanes;
  return (t < 1 ? 1 : t) * kLanes;
}
// Ranges for a pass of `lanes` lanes over `threads` threads: one per thread when that decodes
// each panel's slices no more often than one range does (each range passes over a panel in
// chunks of kChunkTiles tiles; one range over 8 tiles decodes them once, two ranges of 4
// twice), else one.
inline int64_t ranges_for(int64_t lanes, int64_t threads) {
  const int64_t tiles = (lanes + kLanes - 1) / kLanes;
  if (threads <= 1 || tiles < threads) return 1;
  const WorkRanges w{threads, range_lanes_for(lanes, threads), nullptr};
  int64_t chunks = 0;
  for (int64_t r = 0; r < threads; ++r) {
    int64_t lo, hi;
    range_bounds(w, lanes, r, &lo, &hi);
    if (lo < hi) chunks += ((hi - lo + kLanes - 1) / kLanes + kChunkTiles - 1) / kChunkTiles;
  }
  return chunks == (tiles + kChunkTiles - 1) / kChunkTiles ? threads : 1;
}
// Work units (range, panel) until all are done; call it from every thread, `thread` its index
// among them.
void nm24_gemm(const Nm24Bf16Args& a, int64_t thread);
// Thread-private chunks, the other way to run a call: the lanes split into `chunks` near-equal
// chunks (whole 16-lane units) taken from one counter; a thread builds a chunk's pair tiles in a
// buffer of its own, runs every panel over them and writes the chunk's output rows. Against the
// shared passes (pair tiles of up to 1024 lanes built by all threads, then panels over ranges)
// it reads the weight once per chunk instead of once per range, and keeps each thread's tiles
// to its own core: no tile a thread reads was written by the other core, and a chunk's 128
// lanes of tiles (768 bytes per input column) stay in L2 where the passes' spilled to the shared
// L3. It pays where the weight is small beside the tiles: few outputs, many lanes.
constexpr int64_t kChunkUnit = 16;          // lanes: chunks are whole vectors of the core
constexpr int64_t kChunkTargetLanes = 128;  // lanes per chunk aimed at
constexpr int64_t kChunkMaxOut = 1024;      // outputs up to which a call runs in chunks
// Chunks for B lanes, O outputs on `threads` threads: 0 (the shared passes) unless O <=
// kChunkMaxOut and each thread gets at least two chunks of about kChunkTargetLanes (then a
// multiple of the threads, so the counter deals them out evenly). Timed interleaved on the Zen 4
// machine, 2 threads, with the layer norm after each call (bench/results/cpu-gemm-bf16-chunks-20261207):
// 1.24-1.57x the passes' speed at ResNet-50's 3136- and 12544-lane layers (64-512 outputs),
// level with them at 784 lanes (256 and 1024 outputs) and at ViT-B's 768-output layers, 6-10%
// slower at ViT-B's 2304 and 3072 outputs (the weight read again for each chunk), which the
// 1024-output bound leaves on the passes, as it does ResNet-50's 196-lane layers (one chunk per thread).
inline int64_t private_chunks_for(int64_t B, int64_t O, int64_t threads) {
  const int64_t per_thread = (2 * B + threads * kChunkTargetLanes) / (2 * threads * kChunkTargetLanes);  // rounded
  return O <= kChunkMaxOut && per_thread >= 2 ? per_thread * threads : 0;
}
// The chunks, until the counter `next` (0 before the call) passes them: call it from every
// thread, `tiles` its own buffer of pair_tile_words(K) words for each tile of the longest chunk
// (a.tiles and a.ranges unused).
void nm24_gemm_chunks(const Nm24Bf16Args& a, const uint16_t* x, int64_t chunks, int64_t* next, uint32_t* tiles);
// Tiles of the longest of `chunks` chunks of B lanes.
inline int64_t chunk_tiles_for(int64_t B, int64_t chunks) {
  const int64_t units = (B + kChunkUnit - 1) / kChunkUnit;
  return ((units + chunks - 1) / chunks * kChunkUnit + kLanes - 1) / kLanes;
}
// Rows per output panel for O outputs over `threads` threads: the fewest panels of about 256
// rows (rounded up to a multiple of 3) whose count is a multiple of the threads, so each
// thread gets the same share. A panel decodes its weight slices once per pass, and each x
// slice brought into L1 is read by every row block of the panel, so small panels cost (timed
// one-threaded on this kernel alone: 96-row panels slower than 192 at ViT-B's fc2, 768 x
// 3072, and 18-row panels, what at least 4 panels per thread gave for 64 outputs, slower
// than one panel).
inline int64_t panel_rows_for(int64_t O, int64_t threads) {
  constexpr int64_t kMaxRows = 256;
  const int64_t per_thread = (O + threads * kMaxRows - 1) / (threads * kMaxRows);  // >= 1
  const int64_t rows = (O + threads * per_thread - 1) / (threads * per_thread);
  return rows < 3 ? 3 : (rows + 2) / 3 * 3;
}
}  // namespace avx512bf16

}  // namespace cpu
}  // namespace sparsekern
