// The 2:4 GEMM with bf16 dot products (vdpbf16ps): the scheme is in nm_gemm_bf16.h. Only
// called when cpu_has_avx512_bf16() says the CPU has every extension of the target list
// below (AVX-512 F/VL/BW/DQ and BF16: AMD Zen 4 and later, Intel Cooper Lake, Sapphire
// Rapids and later).
//
// Same include rules as sparse_rows_avx2.cpp (rows_common_impl.h): every header is included
// before the target pragma, nothing from a shared header (c10, std templates) is first
// instantiated under it, and every helper lives in an unnamed namespace.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "nm_gemm_bf16.h"
#include "sparse_rows.h"  // SPARSEKERN_AVX2_KERNELS

#if SPARSEKERN_AVX2_KERNELS
#include <immintrin.h>
#pragma GCC push_options
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip these warnings in its
// own headers (a known false positive; -Wuninitialized from _mm512_permutexvar_epi32 once the
// core is inlined into the range loop's lambda).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace sparsekern {
namespace cpu {
namespace avx512bf16 {
namespace {

constexpr int kRows = 3;                         // output rows per register block
constexpr int64_t kKt = 64;                      // columns per K tile: 16 groups, a 24 KiB slice of a pair tile
constexpr int64_t kGt = kKt / 4;                 // groups per K tile (even: a K tile starts on an index byte)
constexpr int64_t kGroupWords = kPairs * kLanes; // uint32 words of one group of a pair tile
constexpr int64_t kGroupBytes = kGroupWords * 4;
constexpr int kV = kLanes / 16;                  // vectors per row of the register block (4)
static_assert(kV == 4, "core's dispatch lists V = 1..4");
constexpr int64_t kChunk = kChunkTiles * kLanes; // lanes per pass over a panel (512)
static_assert(kGt % 16 == 0, "a row's K-tile slice is whole vectors of 16 value pairs");

// Index nibble (i0 | i1 << 2: a group's two 2-bit slots) -> its pair (a, b) in the order of
// pair_tiles: (0,1) 0, (0,2) 1, (0,3) 2, (1,2) 3, (1,3) 4, (2,3) 5. A nibble whose indices do
// not increase (no validated weight holds one) reads pair 0.
alignas(16) constexpr uint8_t kPairOfNibble[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0};

// One row block's K-tile slice as the core reads it, decoded once per panel, K tile and pass
// and read by every x tile of the pass: each row's value pairs as stored (uint32, group
// order) and the byte offset of each group's x pair inside its group of a pair tile.
struct BlockSlice {
  uint32_t w[kRows][kGt];
  uint16_t off[kRows][kGt];
};

inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// Rows rows[0..2] (repeated rows for a short block), groups [g0, g0 + groups) into dst.
// Masked loads: nothing past the K tile's groups is read; the entries past them are 0.
inline void decode_block(const Nm24Bf16Args& a, const int64_t (&rows)[kRows], int64_t g0, int64_t groups,
                         bool prefetch_next, BlockSlice* dst) {
  const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kPairOfNibble));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int r = 0; r < kRows; ++r) {
    const uint16_t* v = a.values + rows[r] * a.kept + 2 * g0;
    const uint8_t* ix = a.indices + rows[r] * a.idx_row_bytes + g0 / 2;
    if (prefetch_next) {  // this row's next K-tile slice (see the fp32 packers)
      prefetch_lines(v + 2 * kGt, 4 * kGt);
      prefetch_lines(ix + kGt / 2, kGt / 2);
    }
    for (int64_t c = 0; c < kGt; c += 16) {
      const int64_t n = groups - c <= 0 ? 0 : groups - c < 16 ? groups - c : 16;
      const __mmask16 wmask = static_cast<__mmask16>((1u << n) - 1);
      const __mmask16 imask = static_cast<__mmask16>((1u << ((n + 1) / 2)) - 1);
      const __m128i bytes = _mm_maskz_loadu_epi8(imask, ix + c / 2);
      const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      const __m128i pair = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(lo, hi));
      // pair p of a group starts p * kLanes * 4 bytes into it
      const __m256i off = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(pair), _mm256_set1_epi16(kLanes * 4));
      _mm512_storeu_si512(dst->w[r] + c, _mm512_maskz_loadu_epi32(wmask, v + 2 * c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst->off[r] + c), off);
    }
  }
}

// acc[r][16 v ..] (+)= over groups [0, groups) of row r's value pair . the x pair its index
// picked in the K tile xt. kRows x V accumulators (twelve for a whole tile; GCC keeps the
// fully unrolled array in registers: no spill in the object code); the block's data through
// one pointer with constant displacements. A whole K tile (GC = kGt) runs a constant trip
// count: the loop bound then stays out of the load ports, which bound this loop (one 64-byte
// x load per vdpbf16ps; 3 to 6% faster timed on the three largest issue-28 shapes).
template <int V, int64_t GC>
inline void core(const BlockSlice* blk, int64_t groups_rt, const uint32_t* xt, float* acc, bool first) {
  const int64_t groups = GC ? GC : groups_rt;  // a whole K tile: a constant trip count
  __m512 c[kRows][V];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) c[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * kLanes + 16 * v);
  // Each row's 16 value pairs in one register, lane g broadcast by vpermd: a shuffle (the
  // vector pipes have room beside the dot products) instead of a broadcast load per row and
  // group (the load ports do not).
  __m512i wrow[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) wrow[r] = _mm512_loadu_si512(blk->w[r]);
  const char* xg = reinterpret_cast<const char*>(xt);
  for (int64_t g = 0; g < groups; ++g, xg += kGroupBytes) {
    const __m512i lane = _mm512_set1_epi32(static_cast<int>(g));
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const char* xp = xg + blk->off[r][g];
      __asm__("" : "+r"(xp)); /* base+disp loads */
      const __m512bh wb = (__m512bh)_mm512_permutexvar_epi32(lane, wrow[r]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], wb, (__m512bh)_mm512_loadu_si512(xp + 64 * v));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + r * kLanes + 16 * v, c[r][v]);
}

#include "transpose8x8_impl.h"

// fp32 -> bf16 bits as c10::BFloat16 rounds (to nearest even; NaN -> 0x7FC0), 8 lanes: the
// result is bit for bit what torch's conversion of the fp32 output gave.
inline __m128i to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_mask_mov_epi32(r, _mm256_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_set1_epi32(0x7FC0));
  return _mm256_cvtepi32_epi16(r);
}

inline uint16_t to_bf16_bits(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Partial sums acc [rows][L] (lanes fastest) into bf16 out [lanes][ldo] (rows fastest), each
// plus bias[r] when given (the add torch did in fp32 before its conversion): the output is
// written once, in the caller's dtype, instead of an fp32 [B, O] that torch then converts
// (a second pass over it as long as a sixth of the product at ViT-B's fc1).
void lanes_to_rows_bf16(const float* acc, int64_t rows, int64_t L, int64_t lanes, const float* bias, uint16_t* out,
                        int64_t ldo) {
  const int64_t r8 = rows / 8 * 8, j8 = lanes / 8 * 8;
  for (int64_t j = 0; j < j8; j += 8)
    for (int64_t r = 0; r < r8; r += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(acc + (r + i) * L + j);
      transpose8x8(v);
      if (bias) {
        const __m256 bv = _mm256_loadu_ps(bias + r);
        for (int i = 0; i < 8; ++i) v[i] = _mm256_add_ps(v[i], bv);
      }
      for (int i = 0; i < 8; ++i)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (j + i) * ldo + r), to_bf16_bits(v[i]));
    }
  for (int64_t j = 0; j < lanes; ++j) {  // the tails: rows past r8 of every lane, lanes past j8
    uint16_t* o = out + j * ldo;
    for (int64_t r = j < j8 ? r8 : 0; r < rows; ++r) o[r] = to_bf16_bits(bias ? acc[r * L + j] + bias[r] : acc[r * L + j]);
  }
}

// Output rows [r0, r1) of tiles [tile_lo, tile_hi): passes of up to kChunk lanes, K tiles in
// order (each block's slice decoded into blk once), every tile of the pass over every row
// block, then the partial sums into out.
void panel(const Nm24Bf16Args& a, int64_t r0, int64_t r1, int64_t tile_lo, int64_t tile_hi, BlockSlice* blk,
           float* acc) {
  const int64_t rows = r1 - r0, blocks = (rows + kRows - 1) / kRows;
  const int64_t G = a.K / 4, chunk_tiles = kChunkTiles;
  const int64_t tile_words = pair_tile_words(a.K);
  for (int64_t t0 = tile_lo; t0 < tile_hi; t0 += chunk_tiles) {
    const int64_t t1 = t0 + chunk_tiles < tile_hi ? t0 + chunk_tiles : tile_hi;
    for (int64_t g0 = 0; g0 < G; g0 += kGt) {
      const int64_t groups = G - g0 < kGt ? G - g0 : kGt;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t rr = r0 + b * kRows;
        int64_t rs[kRows];
        for (int r = 0; r < kRows; ++r) rs[r] = rr + r < r1 ? rr + r : rr;  // rows past the panel: never read back
        decode_block(a, rs, g0, groups, g0 + kGt < G, blk + b);
      }
      for (int64_t t = t0; t < t1; ++t) {
        const uint32_t* xt = a.tiles + t * tile_words + g0 * kGroupWords;
        const int64_t lanes = a.B - t * kLanes;
        const int V = lanes >= kLanes ? kV : static_cast<int>((lanes + 15) / 16);
        float* at = acc + (t - t0) * blocks * kRows * kLanes;
        // The x slice read next (the next tile's, else the first tile's of the next K tile),
        // fetched a share per row block: its pairs are read in index order, which the
        // hardware prefetcher does not follow, and the first row block would wait for each line.
        const int64_t next_g0 = t + 1 < t1 ? g0 : g0 + kGt;
        const char* next = next_g0 < G ? reinterpret_cast<const char*>(a.tiles + (t + 1 < t1 ? t + 1 : t0) * tile_words +
                                                                         next_g0 * kGroupWords)
                                       : nullptr;
        const int64_t next_bytes = (G - next_g0 < kGt ? G - next_g0 : kGt) * kGroupBytes;
        const int64_t share = (next_bytes / 64 + blocks - 1) / blocks * 64;
        for (int64_t b = 0; b < blocks; ++b) {
          if (next && b * share < next_bytes)
            prefetch_lines(next + b * share, next_bytes - b * share < share ? next_bytes - b * share : share);
          float* ab = at + b * kRows * kLanes;
          if (V == kV && groups == kGt) {
            core<kV, kGt>(blk + b, groups, xt, ab, g0 == 0);
            continue;
          }
          switch (V) {
            case 4: core<4, 0>(blk + b, groups, xt, ab, g0 == 0); break;
            case 3: core<3, 0>(blk + b, groups, xt, ab, g0 == 0); break;
            case 2: core<2, 0>(blk + b, groups, xt, ab, g0 == 0); break;
            default: core<1, 0>(blk + b, groups, xt, ab, g0 == 0); break;
          }
        }
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lanes = a.B - t * kLanes < kLanes ? a.B - t * kLanes : kLanes;
      lanes_to_rows_bf16(acc + (t - t0) * blocks * kRows * kLanes, rows, kLanes, lanes, a.bias ? a.bias + r0 : nullptr,
                         a.out + t * kLanes * a.O + r0, a.O);
    }
  }
}

// The six pairs of one group for 8 lanes from its four columns (each lane's bf16 in the low
// half of a 32-bit word), at dst (the group's first word, this lane block).
inline void store_pairs(const __m256i c0, const __m256i c1, const __m256i c2, const __m256i c3, uint32_t* dst) {
  const __m256i h1 = _mm256_slli_epi32(c1, 16), h2 = _mm256_slli_epi32(c2, 16), h3 = _mm256_slli_epi32(c3, 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 0 * kLanes), _mm256_or_si256(c0, h1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 1 * kLanes), _mm256_or_si256(c0, h2));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * kLanes), _mm256_or_si256(c0, h3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 3 * kLanes), _mm256_or_si256(c1, h2));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4 * kLanes), _mm256_or_si256(c1, h3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 5 * kLanes), _mm256_or_si256(c2, h3));
}

}  // namespace

void pair_tiles(const uint16_t* x, int64_t B, int64_t K, int64_t u0, int64_t u1, uint32_t* tiles) {
  const int64_t tile_words = pair_tile_words(K);
  for (int64_t u = u0; u < u1; ++u) {  // 8 lanes of one tile
    const int64_t lane0 = u * 8, t = lane0 / kLanes, l0 = lane0 % kLanes;
    uint32_t* tile = tiles + t * tile_words + l0;
    const uint16_t* src[8];
    for (int i = 0; i < 8; ++i) src[i] = lane0 + i < B ? x + (lane0 + i) * K : nullptr;
    // 8 columns (two groups) at a time: 8 lanes x 8 bf16, each widened to 32-bit words and
    // transposed, so word l of v[c] is lane l's column c; the last group of an odd K / 4 alone.
    for (int64_t c = 0; c < K; c += 8) {
      const bool two = c + 8 <= K;
      __m256 v[8];
      for (int i = 0; i < 8; ++i) {
        const __m128i h = !src[i] ? _mm_setzero_si128()
                          : two   ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[i] + c))
                                  : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[i] + c));
        v[i] = _mm256_castsi256_ps(_mm256_cvtepu16_epi32(h));
      }
      transpose8x8(v);
      uint32_t* dst = tile + (c / 4) * kGroupWords;
      store_pairs(_mm256_castps_si256(v[0]), _mm256_castps_si256(v[1]), _mm256_castps_si256(v[2]),
                  _mm256_castps_si256(v[3]), dst);
      if (two)
        store_pairs(_mm256_castps_si256(v[4]), _mm256_castps_si256(v[5]), _mm256_castps_si256(v[6]),
                    _mm256_castps_si256(v[7]), dst + kGroupWords);
    }
  }
}

void nm24_gemm(const Nm24Bf16Args& a, int64_t thread) {
  const int64_t blocks = (a.panel_rows + kRows - 1) / kRows;
  const int64_t tiles = (a.B + kLanes - 1) / kLanes;
  const int64_t chunk_tiles = tiles < kChunkTiles ? tiles : kChunkTiles;
  float* acc = static_cast<float*>(std::aligned_alloc(64, chunk_tiles * blocks * kRows * kLanes * sizeof(float)));
  BlockSlice* blk = static_cast<BlockSlice*>(std::aligned_alloc(64, (blocks * sizeof(BlockSlice) + 63) / 64 * 64));
  for_each_range_unit(a.ranges, a.B, a.panels, thread, [&](int64_t p, int64_t lane_lo, int64_t lane_hi) {
    const int64_t r0 = p * a.panel_rows, r1 = r0 + a.panel_rows < a.O ? r0 + a.panel_rows : a.O;
    // a range starts on a tile (range_lanes_for: whole tiles) and ends on one or at B
    panel(a, r0, r1, lane_lo / kLanes, (lane_hi + kLanes - 1) / kLanes, blk, acc);
  });
  std::free(blk);
  std::free(acc);
}

void nm24_gemm_chunks(const Nm24Bf16Args& a, const uint16_t* x, int64_t chunks, int64_t* next, uint32_t* tiles) {
  const int64_t blocks = (a.panel_rows + kRows - 1) / kRows;
  const int64_t units = (a.B + kChunkUnit - 1) / kChunkUnit;  // 16-lane units, split evenly over the chunks
  const int64_t most_tiles = chunk_tiles_for(a.B, chunks);
  float* acc = static_cast<float*>(std::aligned_alloc(64, most_tiles * blocks * kRows * kLanes * sizeof(float)));
  BlockSlice* blk = static_cast<BlockSlice*>(std::aligned_alloc(64, (blocks * sizeof(BlockSlice) + 63) / 64 * 64));
  for (int64_t c = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); c < chunks;
       c = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) {
    const int64_t lane0 = c * units / chunks * kChunkUnit, end = (c + 1) * units / chunks * kChunkUnit;
    const int64_t lanes = (end < a.B ? end : a.B) - lane0;
    if (lanes <= 0) continue;
    const int64_t t = (lanes + kLanes - 1) / kLanes;
    pair_tiles(x + lane0 * a.K, lanes, a.K, 0, t * (kLanes / 8), tiles);
    Nm24Bf16Args ac = a;
    ac.tiles = tiles;
    ac.B = lanes;
    ac.out = a.out + lane0 * a.O;
    for (int64_t p = 0; p < a.panels; ++p) {
      const int64_t r0 = p * a.panel_rows, r1 = r0 + a.panel_rows < a.O ? r0 + a.panel_rows : a.O;
      panel(ac, r0, r1, 0, t, blk, acc);
    }
  }
  std::free(blk);
  std::free(acc);
}

}  // namespace avx512bf16
}  // namespace cpu
}  // namespace sparsekern

#pragma GCC pop_options

#else  // no AVX-512 build: cpu_has_avx512_bf16() is false and these are never called

namespace sparsekern {
namespace cpu {
namespace avx512bf16 {
void pair_tiles(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) { std::abort(); }
void nm24_gemm(const Nm24Bf16Args&, int64_t) { std::abort(); }
void nm24_gemm_chunks(const Nm24Bf16Args&, const uint16_t*, int64_t, int64_t*, uint32_t*) { std::abort(); }
}  // namespace avx512bf16
}  // namespace cpu
}  // namespace sparsekern

#endif
