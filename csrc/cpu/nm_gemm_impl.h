// 2:4 large-batch kernel of nm_linear (AVX2 only; compiled inside sparse_rows_avx2.cpp,
// the rules in rows_common_impl.h). Weight-stationary, over a transposed activation tile:
//
//   xT  : the op file passes x as tiles of 32 batch lanes, tile t = [K + 1][32] fp32 (lanes
//         of the last tile past B are zero, and so is column K: padding slots point there,
//         so an inf or NaN in x never reaches a row through a padding slot); one input
//         column of a tile is 4 vectors.
//   pack: for a panel of output rows and a K tile of kKt columns, each row's kept slots are
//         decoded (LUT on the index byte, no scalar decode) into byte offsets col * 128 of
//         the column inside an xT tile and fp32 values, in blocks of 3 rows x 4 slots:
//         {int32 off[3][4]; float val[3][4]} (96 bytes), per call, per panel and K tile;
//         each row's next slice is prefetched while this one is packed. Or, given
//         a.prepacked (Nm24Panels, nm24_panels.h: the same blocks with uint16 offsets for
//         64-lane tiles, built once per weight), read where they lie, offsets halved.
//   core: 3 output rows x V vectors of 8 batch lanes in 3V accumulators (12 for V = 4);
//         per kept (row, slot): load its offset, broadcast its value, V FMAs whose second
//         operand is loaded from the xT tile at that offset (an L1 hit: the tile is
//         kKt x 128 B = 16 KiB and is reused by every row block of the panel).
//         Loads per FMA: (2 + V) / V = 1.5 at V = 4; the FMA count is half the dense one.
//   acc : partial sums [tile][row][32] per panel in a per-call buffer (L2), summed over the
//         K tiles, then transposed once into out [B, O].
//   threads: each calling thread takes panels of panel_rows rows from a shared counter, or
//            (the chunk order, ws_chunks_impl.h) chunks of lanes whose tiles it builds.
// Numerics: fp32 products and fp32 accumulation, one chain per (row, 8 lanes) in column
// order within a K tile, K tiles added in order.
#include "rows_common_impl.h"

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

constexpr int kG24Rows = 3;     // rows per register block
constexpr int kG24Kt = 128;     // columns per K tile (64 kept slots per row)
constexpr int kG24Chunk = 256;  // batch lanes per pass over a panel (8 tiles of 32)
static_assert(kG24Kt == Nm24Panels::kKt && kG24Rows == Nm24Panels::kBlockRows && kG24Kt / 8 == Nm24Panels::kQuads,
              "the pre-packed layout follows this kernel's K tiles, row blocks and quads");


inline __m128 g24_load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 g24_load4(const c10::BFloat16* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m128 g24_load4(const c10::Half* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }

// Packs rows [r0, r0 + rows) (rows <= 3; missing rows and slots get value 0 and the offset
// of the zero column K) for slots
// [s0, s1) (s0 a multiple of 4) into quads of 96 bytes at dst.
template <typename VT>
void g24_pack(const Nm24GemmArgs& a, int64_t r0, int rows, int64_t s0, int64_t s1, int32_t* dst) {
  const Nm24SlotColumns& lut = nm24_slot_columns();
  static_assert(kG24Lanes * 4 == 128, "offsets are col << 7");
  const int32_t zero_col = static_cast<int32_t>(a.K * 128);
  int64_t q = 0;
  for (int64_t s = s0; s < s1; s += 4, ++q) {
    int32_t* o = dst + q * 24;
    float* w = reinterpret_cast<float*>(o + 12);
    const bool full = s + 4 <= s1;
    for (int r = 0; r < kG24Rows; ++r) {
      if (r >= rows) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * r), _mm_set1_epi32(zero_col));
        _mm_storeu_ps(w + 4 * r, _mm_setzero_ps());
        continue;
      }
      const VT* v = static_cast<const VT*>(a.values) + (r0 + r) * a.kept;
      if (s == s0 && s1 < a.kept) {
        // This row's next K-tile slice: panels read each row in slices of a few hundred
        // bytes, too many streams for the hardware prefetcher (see the AVX-512 packers).
        const char* next = reinterpret_cast<const char*>(v + s1);
        for (int64_t off = 0; off < (s1 - s0) * static_cast<int64_t>(sizeof(VT)); off += 64)
          _mm_prefetch(next + off, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a.indices + (r0 + r) * a.idx_row_bytes + (s1 >> 2)), _MM_HINT_T0);
      }
      const uint8_t byte = a.indices[(r0 + r) * a.idx_row_bytes + (s >> 2)];
      if (full) {
        const __m128i cols = _mm_add_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[byte])),
                                           _mm_set1_epi32(static_cast<int32_t>(2 * s)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4 * r), _mm_slli_epi32(cols, 7));  // * 32 lanes * 4 B
        _mm_storeu_ps(w + 4 * r, g24_load4(v + s));
      } else {
        for (int t = 0; t < 4; ++t) {
          const bool in = s + t < s1;
          o[4 * r + t] = in ? static_cast<int32_t>((2 * s + lut.col[byte][t]) * kG24Lanes * 4) : zero_col;
          w[4 * r + t] = in ? to_f32(v[s + t]) : 0.f;
        }
      }
    }
  }
}

// The quads g24_core reads. G24Packed: written by g24_pack at every call, int32 offsets from
// the x tile's start. G24Prepacked: the weight pre-packed once (Nm24Panels, nm24_panels.h),
// uint16 offsets from the K tile's start in a 64-lane tile, masked into the K tile (so any
// bytes read inside it) and halved for these 32-lane tiles.
struct G24Packed {
  static constexpr int64_t kBytes = 96;
  static int32_t off(const uint8_t* q, int i) { return reinterpret_cast<const int32_t*>(q)[i]; }
  static const float* vals(const uint8_t* q) { return reinterpret_cast<const float*>(q + 48); }
};
struct G24Prepacked {
  static_assert(kG24Lanes * 4 * 2 == 256, "Nm24Panels offsets are col << 8 (64 lanes); these tiles have 32");
  static constexpr int64_t kBytes = Nm24Panels::kQuadBytes;
  static int32_t off(const uint8_t* q, int i) {
    return (reinterpret_cast<const uint16_t*>(q)[i] & Nm24Panels::kOffMask) >> 1;
  }
  static const float* vals(const uint8_t* q) { return reinterpret_cast<const float*>(q + 24); }
};

// acc[r][v] (+)= sum over quads of val * xT[off + 32 v bytes]; acc is [3][32] floats.
// Twelve named accumulators (not an array: GCC then keeps them in registers instead of
// storing the array back to the stack every iteration); V < 4 leaves the rest unused.
template <int V, typename Q>
inline void g24_core(const uint8_t* pk, int64_t quads, const float* xt, float* acc, bool first) {
  __m256 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
#define SK_G24_LD(R, VV) c##R##VV = first || V <= VV ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + R * kG24Lanes + 8 * VV)
  SK_G24_LD(0, 0); SK_G24_LD(0, 1); SK_G24_LD(0, 2); SK_G24_LD(0, 3);
  SK_G24_LD(1, 0); SK_G24_LD(1, 1); SK_G24_LD(1, 2); SK_G24_LD(1, 3);
  SK_G24_LD(2, 0); SK_G24_LD(2, 1); SK_G24_LD(2, 2); SK_G24_LD(2, 3);
#undef SK_G24_LD
  const char* xb = reinterpret_cast<const char*>(xt);
#define SK_G24_ROW(R, T)                                                                   \
  {                                                                                        \
    const float* xp = reinterpret_cast<const float*>(xb + Q::off(pk, 4 * R + T));         \
    __asm__("" : "+r"(xp)); /* base+disp loads, no base+index: those un-laminate */        \
    const __m256 wb = _mm256_broadcast_ss(w + 4 * R + T);                                 \
    c##R##0 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xp), c##R##0);                           \
    if (V > 1) c##R##1 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xp + 8), c##R##1);            \
    if (V > 2) c##R##2 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xp + 16), c##R##2);           \
    if (V > 3) c##R##3 = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xp + 24), c##R##3);           \
  }
  for (int64_t q = 0; q < quads; ++q, pk += Q::kBytes) {
    const float* w = Q::vals(pk);
    SK_G24_ROW(0, 0) SK_G24_ROW(1, 0) SK_G24_ROW(2, 0)
    SK_G24_ROW(0, 1) SK_G24_ROW(1, 1) SK_G24_ROW(2, 1)
    SK_G24_ROW(0, 2) SK_G24_ROW(1, 2) SK_G24_ROW(2, 2)
    SK_G24_ROW(0, 3) SK_G24_ROW(1, 3) SK_G24_ROW(2, 3)
  }
#undef SK_G24_ROW
#define SK_G24_ST(R, VV) if (V > VV) _mm256_storeu_ps(acc + R * kG24Lanes + 8 * VV, c##R##VV)
  SK_G24_ST(0, 0); SK_G24_ST(0, 1); SK_G24_ST(0, 2); SK_G24_ST(0, 3);
  SK_G24_ST(1, 0); SK_G24_ST(1, 1); SK_G24_ST(1, 2); SK_G24_ST(1, 3);
  SK_G24_ST(2, 0); SK_G24_ST(2, 1); SK_G24_ST(2, 2); SK_G24_ST(2, 3);
#undef SK_G24_ST
}

// The panel's work over quads of kind Q (see g24_panel).
template <typename Q, typename VT = float>
void g24_panel_quads(const Nm24GemmArgs& a, int64_t B, const float* xT, float* out, int64_t r0, int64_t r1,
                     int32_t* pack, float* acc) {
  constexpr bool prepacked = std::is_same<Q, G24Prepacked>::value;
  const int64_t rows = r1 - r0, blocks = (rows + kG24Rows - 1) / kG24Rows;
  const int64_t kt_quads = kG24Kt / 8;  // 4 slots per quad, 2 slots per 4 columns
  const int64_t tiles = (B + kG24Lanes - 1) / kG24Lanes;
  const int64_t chunk_tiles = kG24Chunk / kG24Lanes;
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk_tiles) {
    const int64_t t1 = t0 + chunk_tiles < tiles ? t0 + chunk_tiles : tiles;
    for (int64_t k0 = 0; k0 < a.K; k0 += kG24Kt) {
      const int64_t k1 = k0 + kG24Kt < a.K ? k0 + kG24Kt : a.K;
      const int64_t s0 = k0 / 2, s1 = k1 / 2;
      const int64_t quads = (s1 - s0 + 3) / 4;
      const uint8_t* first_block;  // the panel's quads of this K tile: blocks kBlockBytes (Q::kBytes * kt_quads) apart
      if constexpr (prepacked) {
        const int64_t kt = k0 / kG24Kt;
        first_block = a.prepacked + Nm24Panels::block_offset(a.O, a.K, r0, kt);
        if (k1 < a.K)
          for (int64_t off = 0; off < blocks * Nm24Panels::kBlockBytes; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(a.prepacked + Nm24Panels::block_offset(a.O, a.K, r0, kt + 1) + off),
                         _MM_HINT_T0);
      } else {
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t rr = r0 + b * kG24Rows;
          const int nr = static_cast<int>(r1 - rr < kG24Rows ? r1 - rr : kG24Rows);
          g24_pack<VT>(a, rr, nr, s0, s1, pack + b * kt_quads * 24);
        }
        first_block = reinterpret_cast<const uint8_t*>(pack);
      }
      const bool first = k0 == 0;
      for (int64_t t = t0; t < t1; ++t) {
        // Prepacked offsets start at the K tile, packed ones at the x tile.
        const float* xt = xT + t * (a.K + 1) * kG24Lanes + (prepacked ? k0 * kG24Lanes : 0);
        const int64_t lanes = B - t * kG24Lanes;
        const int V = lanes >= 32 ? 4 : static_cast<int>((lanes + 7) / 8);
        float* at = acc + (t - t0) * blocks * kG24Rows * kG24Lanes;
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* pk = first_block + b * kt_quads * Q::kBytes;
          float* ab = at + b * kG24Rows * kG24Lanes;
          switch (V) {
            case 4: g24_core<4, Q>(pk, quads, xt, ab, first); break;
            case 3: g24_core<3, Q>(pk, quads, xt, ab, first); break;
            case 2: g24_core<2, Q>(pk, quads, xt, ab, first); break;
            default: g24_core<1, Q>(pk, quads, xt, ab, first); break;
          }
        }
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lanes = B - t * kG24Lanes < kG24Lanes ? B - t * kG24Lanes : kG24Lanes;
      lanes_to_rows(acc + (t - t0) * blocks * kG24Rows * kG24Lanes, rows, kG24Lanes, lanes,
                    out + t * kG24Lanes * a.O + r0, a.O);
    }
  }
}

// Output rows [r0, r1) for B lanes of x tiles at xT, into out (rows of a.O). With
// a.prepacked the quads are read where they lie (the panel inside one of the layout's, so a
// K tile's blocks are contiguous: the next K tile's are fetched at the first block), and xT
// has Nm24Panels::x_extra_cols(K) more zero columns; else g24_pack writes them into pack.
template <typename VT>
void g24_panel(const Nm24GemmArgs& a, int64_t B, const float* xT, float* out, int64_t r0, int64_t r1, int32_t* pack,
               float* acc) {
  if (a.prepacked) return g24_panel_quads<G24Prepacked>(a, B, xT, out, r0, r1, nullptr, acc);
  g24_panel_quads<G24Packed, VT>(a, B, xT, out, r0, r1, pack, acc);
}

// Takes panels from the shared counter until none is left (threads that share their core
// with other work take fewer), with one set of buffers per call: allocating them per
// panel made glibc mmap/munmap them, and each munmap stalls the other thread.
template <typename VT>
void g24_panels(const Nm24GemmArgs& a) {
  const int64_t blocks = (a.panel_rows + kG24Rows - 1) / kG24Rows;
  const int64_t tiles = (a.B + kG24Lanes - 1) / kG24Lanes;
  const int64_t chunk_tiles = tiles < kG24Chunk / kG24Lanes ? tiles : kG24Chunk / kG24Lanes;
  // The packer's buffer (a pre-packed weight needs none).
  int32_t* pack = a.prepacked ? nullptr : static_cast<int32_t*>(std::aligned_alloc(64, blocks * (kG24Kt / 8) * 96));
  float* acc = static_cast<float*>(std::aligned_alloc(64, chunk_tiles * blocks * kG24Rows * kG24Lanes * sizeof(float)));
  if (a.chunked.lanes) {  // ws_chunks_impl.h (a pre-packed weight's offsets read the extra columns)
    ws_chunks(a.K, a.O, kG24Lanes, a.panel_rows, a.chunked, a.out,
              [&](int64_t lanes, const float* xt, float* out, int64_t r0, int64_t r1) {
                g24_panel<VT>(a, lanes, xt, out, r0, r1, pack, acc);
              },
              a.prepacked ? Nm24Panels::x_extra_cols(a.K) : 0);
  } else {
    for (;;) {
      const int64_t p = __atomic_fetch_add(a.next_panel, 1, __ATOMIC_RELAXED);
      if (p >= a.panels) break;
      const int64_t r0 = p * a.panel_rows, r1 = r0 + a.panel_rows < a.O ? r0 + a.panel_rows : a.O;
      g24_panel<VT>(a, a.B, a.xT, a.out, r0, r1, pack, acc);
    }
  }
  std::free(acc);
  std::free(pack);
}

template <typename VT>
struct G24F {
  static void run(const Nm24GemmArgs& a, int64_t, int64_t) { g24_panels<VT>(a); }
};

}  // namespace

void nm24_gemm(const Nm24GemmArgs& a) { by_dtype<G24F>(a.dtype, a, 0, 0); }

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
