// N:M rows: the direct kernels of nm_linear (B <= kDirectMaxBatch), one output row at a
// time. Compiled twice, see rows_common_impl.h for the rules.
//   AVX2:     row-major x, batch tiles of at most 8 rows. 2:4 takes the permute kernel
//             (B = 1) or the expand kernel (B = 2..8); any other N:M the densify kernel.
//   portable: decode chunks of slots into columns and fp32 weights, then broadcast
//             multiply-adds (xT, B = 5..16) or row-major ones (B <= kRowMajorMaxBatch).
#include "rows_common_impl.h"

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

// In-group index of kept slot s: 2 bits per slot for m = 4, 4 bits for m = 8 and 16.
inline int nm_index_at(const uint8_t* ix, int64_t s, int bits) {
  return bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15;
}

// Decodes kept slots [s0, s0+cnt) of one N:M row into columns and fp32 weights.
template <typename VT>
inline void nm_decode(const VT* v, const uint8_t* ix, int64_t s0, int cnt, int64_t n, int64_t m, int bits,
                      int32_t* cols, float* w) {
  int64_t g = s0 / n, t = s0 % n;
  for (int j = 0; j < cnt; ++j) {
    const int64_t s = s0 + j;
    // & (m - 1): an index past the group (only from indices no format would hold: m = 8
    // has 4-bit fields) stays inside its group instead of reading past the row.
    cols[j] = static_cast<int32_t>(g * m + (nm_index_at(ix, s, bits) & (m - 1)));
    w[j] = to_f32(v[s]);
    if (++t == n) { t = 0; ++g; }
  }
}

#ifdef SK_AVX2
// ---- 2:4 and 4:8, one batch row: permute kernels ----------------------------------------
// n = m / 2 (2:4, 4:8): eight kept slots cover 16 columns, and lanes 0-3 take their x from
// the first 8 of them, lanes 4-7 from the next 8, each by one permute, then a blend: no
// gathers, no scalar decode. lanes(ix, c) gives the permute lanes (0..7) of 8-slot chunks
// c and c + 1 of a row's index bytes ix; n, m and bits are the tail's (nm_decode).
// Four weight rows per step share the x loads and keep eight streams in flight. For 2:4 one
// row per step ran at dense speed on the AVX2 build (4096x4096 fp32, 2 threads, weights
// rotated, SPARSEKERN_CPU_ISA=avx2 on an AVX-512 Xeon, MKL pinned to AVX2; in-process
// interleaved: 0.89-1.01x dense); four rows 1.50-1.62x, two 1.26x, six and eight within 5%
// of four (eight rows' 16 accumulators exceed the 16 ymm registers).
constexpr int kHalfPermuteRows = 4;
template <typename VT, int R, typename Lanes>
void half_rows_permute_step_avx2(const NmRowsArgs& a, int64_t r, int bits, const Lanes& lanes) {
  const int64_t chunks = a.kept / 8;  // full 8-slot chunks, taken in pairs; the rest goes the scalar way
  const VT* v[R];
  const uint8_t* ix[R];
  // One accumulator chain per chunk of the pair and row, so consecutive FMAs do not wait
  // on each other's latency.
  __m256 acc0[R], acc1[R];
  for (int j = 0; j < R; ++j) {
    v[j] = static_cast<const VT*>(a.values) + (r + j) * a.kept;
    ix[j] = a.indices + (r + j) * a.idx_row_bytes;
    acc0[j] = acc1[j] = _mm256_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    const float* xc = a.x + 16 * c;
    const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
    const __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
    for (int j = 0; j < R; ++j) {
      const auto [p0, p1] = lanes(ix[j], c);
      const __m256 s0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, p0), _mm256_permutevar8x32_ps(x1, p0), 0xF0);
      const __m256 s1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(x2, p1), _mm256_permutevar8x32_ps(x3, p1), 0xF0);
      acc0[j] = _mm256_fmadd_ps(load8(v[j] + 8 * c), s0, acc0[j]);
      acc1[j] = _mm256_fmadd_ps(load8(v[j] + 8 * c + 8), s1, acc1[j]);
    }
  }
  alignas(64) int32_t cols[8];
  alignas(64) float w[8];
  for (int j = 0; j < R; ++j) {
    float tail = 0.f;
    for (int64_t s0 = 8 * c; s0 < a.kept; s0 += 8) {
      const int cnt = static_cast<int>(a.kept - s0 < 8 ? a.kept - s0 : 8);
      nm_decode(v[j], ix[j], s0, cnt, a.n, a.m, bits, cols, w);
      for (int t = 0; t < cnt; ++t) tail += w[t] * a.x[cols[t]];
    }
    a.out[r + j] = hsum8(_mm256_add_ps(acc0[j], acc1[j])) + tail;
  }
}

template <typename VT, typename Lanes>
void half_rows_permute_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1, int bits, const Lanes& lanes) {
  int64_t r = r0;
  for (; r + kHalfPermuteRows <= r1; r += kHalfPermuteRows)
    half_rows_permute_step_avx2<VT, kHalfPermuteRows>(a, r, bits, lanes);
  for (; r < r1; ++r) half_rows_permute_step_avx2<VT, 1>(a, r, bits, lanes);
}

// 2:4: one index byte holds 4 slots = 2 groups; nm24_slot_columns().col[byte] gives the 4
// source lanes (0..7) of those slots within the 8 columns the byte covers.
template <typename VT>
void nm24_rows_permute_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const Nm24SlotColumns& lut = nm24_slot_columns();
  auto half = [&](uint8_t lo, uint8_t hi) {
    return _mm256_set_m128i(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[hi])),
                            _mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[lo])));
  };
  half_rows_permute_avx2<VT>(a, r0, r1, 2, [&](const uint8_t* ix, int64_t c) {
    const uint8_t* b = ix + 2 * c;
    return std::make_pair(half(b[0], b[1]), half(b[2], b[3]));
  });
}

// 4:8: an 8-slot chunk's eight 4-bit in-group indices are 4 index bytes; lane j takes its
// index by a variable shift of the broadcast word (& 7: a raw call with indices no format
// holds still reads inside its group). The densify kernel below (a scalar scatter of every
// value into a zeroed row, then dense FMAs) ran at 0.37x dense at one row (4096x4096 fp32,
// 2 threads, rotated, SPARSEKERN_CPU_ISA=avx2 with MKL pinned to AVX2;
// bench/results/cpu-avx2-linear-20261128), this kernel at 1.41-1.47x.
template <typename VT>
void nm48_rows_permute_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i seven = _mm256_set1_epi32(7);
  auto chunk = [&](const uint8_t* p) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), seven);
  };
  half_rows_permute_avx2<VT>(a, r0, r1, 4, [&](const uint8_t* ix, int64_t c) {
    return std::make_pair(chunk(ix + 4 * c), chunk(ix + 4 * c + 4));
  });
}

// ---- 2:4, B = 2..8: expand kernel ------------------------------------------------------
// Expand each 8-slot chunk once into the dense weights of its 16 columns (two registers,
// zeros in the pruned lanes), then every batch row costs two loads and two FMAs with no
// shuffles; the shuffle port is what limits the permute kernel above once B > 1. Twice
// the multiply-adds, but FMAs have two ports to spare.
struct Expand24 {
  alignas(32) int32_t lo[256][8];    // lane of the compressed 8 (0..3) feeding column j of the first 8
  alignas(32) int32_t hi[256][8];    // same for the second 8 columns (lanes 4..7)
  alignas(32) int32_t keep[256][8];  // -1 where column j holds a kept value, else 0
  Expand24() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int j = 0; j < 8; ++j) { lo[byte][j] = 0; hi[byte][j] = 4; keep[byte][j] = 0; }
      for (int t = 0; t < 4; ++t) {
        const int col = (t / 2) * 4 + ((byte >> (2 * t)) & 3);
        lo[byte][col] = t;
        hi[byte][col] = t + 4;
        keep[byte][col] = -1;
      }
    }
  }
};
const Expand24& expand24() {
  static const Expand24 lut;
  return lut;
}

template <typename VT, int B>
void nm24_rows_expand_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const Expand24& e = expand24();
  const int64_t chunks = a.kept / 8;
  alignas(64) int32_t cols[8];
  alignas(64) float w[8];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t b0 = ix[2 * c], b1 = ix[2 * c + 1];
      const __m256 w8 = load8(v + 8 * c);
      const __m256 wlo = _mm256_and_ps(
          _mm256_permutevar8x32_ps(w8, _mm256_load_si256(reinterpret_cast<const __m256i*>(e.lo[b0]))),
          _mm256_load_ps(reinterpret_cast<const float*>(e.keep[b0])));
      const __m256 whi = _mm256_and_ps(
          _mm256_permutevar8x32_ps(w8, _mm256_load_si256(reinterpret_cast<const __m256i*>(e.hi[b1]))),
          _mm256_load_ps(reinterpret_cast<const float*>(e.keep[b1])));
      for (int b = 0; b < B; ++b) {
        const float* xb = a.x + b * a.K + 16 * c;
        acc[b] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xb), acc[b]);
        acc[b] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xb + 8), acc[b]);
      }
    }
    float tail[B] = {};
    for (int64_t s0 = 8 * chunks; s0 < a.kept; s0 += 8) {
      const int cnt = static_cast<int>(a.kept - s0 < 8 ? a.kept - s0 : 8);
      nm_decode(v, ix, s0, cnt, 2, 4, 2, cols, w);
      for (int j = 0; j < cnt; ++j)
        for (int b = 0; b < B; ++b) tail[b] += w[j] * a.x[b * a.K + cols[j]];
    }
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(acc[b]) + tail[b];
  }
}

// ---- Any other N:M, B = 1..8: densify kernel -------------------------------------------
// Scatter the row's kept values into a dense fp32 row held in L1 (indices decoded eight
// at a time), then a dense dot product per batch row with contiguous loads. Gathers are
// slow on many x86 cores; scalar stores are not.
template <typename VT, int B>
void nm_rows_densify_avx2(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const int bits = a.m == 4 ? 2 : 4;
  const int64_t K8 = (a.K + 7) / 8 * 8;
  float* row = static_cast<float*>(std::aligned_alloc(32, K8 * sizeof(float)));
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    for (int64_t c = 0; c < K8; c += 8) _mm256_store_ps(row + c, _mm256_setzero_ps());
    int64_t s = 0;
    for (; s + 8 <= a.kept; s += 8) {
      uint32_t packed = 0;
      if (bits == 2) {  // constant sizes: a run-time memcpy length would become a library call
        uint16_t p16;
        std::memcpy(&p16, ix + s / 4, 2);
        packed = p16;
      } else {
        std::memcpy(&packed, ix + s / 2, 4);
      }
      // Scalar decode from one packed word: a vector decode stored and reloaded lane by
      // lane stalls on store-to-load forwarding.
      const int32_t* base = a.slot_base + s;
      // & (m - 1) (m is 4, 8 or 16): an out-of-range index stays in its group, never past the row.
      for (int j = 0; j < 8; ++j) row[base[j] + ((packed >> (j * bits)) & (a.m - 1))] = to_f32(v[s + j]);
    }
    for (; s < a.kept; ++s) row[a.slot_base[s] + (nm_index_at(ix, s, bits) & (a.m - 1))] = to_f32(v[s]);
    __m256 acc[B];
    float tail[B] = {};
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= a.K; c += 8) {
      const __m256 wv = _mm256_load_ps(row + c);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + b * a.K + c), acc[b]);
    }
    for (; c < a.K; ++c)
      for (int b = 0; b < B; ++b) tail[b] += row[c] * a.x[b * a.K + c];
    for (int b = 0; b < B; ++b) a.out[b * a.O + r] = hsum8(acc[b]) + tail[b];
  }
  std::free(row);
}

template <typename VT>
void nm_rows_dispatch(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.B > 8) {
    // Batch tiles of at most 8 rows (the accumulators must stay in registers).
    for (int64_t b0 = 0; b0 < a.B; b0 += 8) {
      NmRowsArgs t = a;
      t.x = a.x + b0 * a.K;
      t.out = a.out + b0 * a.O;
      t.B = a.B - b0 < 8 ? a.B - b0 : 8;
      nm_rows_dispatch<VT>(t, r0, r1);
    }
    return;
  }
  if (a.n == 2 && a.m == 4) {
    switch (a.B) {
      case 1: return nm24_rows_permute_avx2<VT>(a, r0, r1);
      case 2: return nm24_rows_expand_avx2<VT, 2>(a, r0, r1);
      case 3: return nm24_rows_expand_avx2<VT, 3>(a, r0, r1);
      case 4: return nm24_rows_expand_avx2<VT, 4>(a, r0, r1);
      case 5: return nm24_rows_expand_avx2<VT, 5>(a, r0, r1);
      case 6: return nm24_rows_expand_avx2<VT, 6>(a, r0, r1);
      case 7: return nm24_rows_expand_avx2<VT, 7>(a, r0, r1);
      default: return nm24_rows_expand_avx2<VT, 8>(a, r0, r1);
    }
  }
  if (a.n == 4 && a.m == 8 && a.B == 1) return nm48_rows_permute_avx2<VT>(a, r0, r1);
  switch (a.B) {
    case 1: return nm_rows_densify_avx2<VT, 1>(a, r0, r1);
    case 2: return nm_rows_densify_avx2<VT, 2>(a, r0, r1);
    case 3: return nm_rows_densify_avx2<VT, 3>(a, r0, r1);
    case 4: return nm_rows_densify_avx2<VT, 4>(a, r0, r1);
    case 5: return nm_rows_densify_avx2<VT, 5>(a, r0, r1);
    case 6: return nm_rows_densify_avx2<VT, 6>(a, r0, r1);
    case 7: return nm_rows_densify_avx2<VT, 7>(a, r0, r1);
    default: return nm_rows_densify_avx2<VT, 8>(a, r0, r1);
  }
}
#else
// ---- Portable ----------------------------------------------------------------------------
template <typename VT, int BP, int BR>
void nm_rows_t(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  const int bits = a.m == 4 ? 2 : 4;
  alignas(64) int32_t cols[kChunk];
  alignas(64) float w[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const VT* v = static_cast<const VT*>(a.values) + r * a.kept;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    if constexpr (BP > 0) {
      float acc[4][BP] = {};
      for (int64_t s0 = 0; s0 < a.kept; s0 += kChunk) {
        const int cnt = static_cast<int>((a.kept - s0 < kChunk ? a.kept - s0 : kChunk));
        nm_decode(v, ix, s0, cnt, a.n, a.m, bits, cols, w);
        bcast_chunk<BP>(cols, w, cnt, a.x, acc);
      }
      for (int64_t b = 0; b < a.B; ++b) a.out[b * a.O + r] = (acc[0][b] + acc[1][b]) + (acc[2][b] + acc[3][b]);
    } else {
      float acc[2][kRowMajorMaxBatch] = {};
      for (int64_t s0 = 0; s0 < a.kept; s0 += kChunk) {
        const int cnt = static_cast<int>((a.kept - s0 < kChunk ? a.kept - s0 : kChunk));
        nm_decode(v, ix, s0, cnt, a.n, a.m, bits, cols, w);
        rowmajor_chunk<BR>(cols, w, cnt, a.x, a.K, acc);
      }
      for (int64_t b = 0; b < BR; ++b) a.out[b * a.O + r] = acc[0][b] + acc[1][b];
    }
  }
}

template <typename VT>
void nm_rows_dispatch(const NmRowsArgs& a, int64_t r0, int64_t r1) {
  if (a.BP == 8) return nm_rows_t<VT, 8, 0>(a, r0, r1);
  if (a.BP == 16) return nm_rows_t<VT, 16, 0>(a, r0, r1);
  switch (a.B) {
    case 1: return nm_rows_t<VT, 0, 1>(a, r0, r1);
    case 2: return nm_rows_t<VT, 0, 2>(a, r0, r1);
    case 3: return nm_rows_t<VT, 0, 3>(a, r0, r1);
    default: return nm_rows_t<VT, 0, 4>(a, r0, r1);
  }
}
#endif

template <typename VT>
struct NmF {
  static void run(const NmRowsArgs& a, int64_t r0, int64_t r1) { nm_rows_dispatch<VT>(a, r0, r1); }
};

}  // namespace

void nm_rows(const NmRowsArgs& a, int64_t r0, int64_t r1) { by_dtype<NmF>(a.dtype, a, r0, r1); }

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
