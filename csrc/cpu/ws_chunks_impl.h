// The chunk order of the weight-stationary kernels (WsChunks in sparse_rows.h), shared by the
// AVX2 2:4 kernel (nm_gemm_impl.h) and the AVX-512 2:4 and bitmask kernels: every calling
// thread takes chunks of lanes from the shared counter, builds the chunk's x tiles in its own
// buffer (sized by ws_plan to stay in the L2; lane_rows, then avx2::lane_tile), and runs
// every output row over them, panel_rows at a time, with the kernel's own panel code:
// panel(lanes, xt, out_rows, r0, r1) for output rows [r0, r1) of the chunk's `lanes` lanes,
// whose tiles are [K + 1][L] each at xt, into out_rows = the chunk's first output row.
// Included by sparse_rows_avx2.cpp and sparse_rows_avx512.cpp under their target pragmas
// (the rules in rows_common_impl.h), with SK_ISA_NS naming the namespace.
#pragma once

#ifndef SK_ISA_NS
#error "define SK_ISA_NS before including ws_chunks_impl.h"
#endif

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

// extra_cols: zero columns after the last tile (Nm24Panels::x_extra_cols for a pre-packed weight).
template <typename Panel>
void ws_chunks(int64_t K, int64_t O, int64_t L, int64_t panel_rows, const WsChunks& ch, float* out,
               const Panel& panel, int64_t extra_cols = 0) {
  const LaneRows& src = *ch.lanes;
  const int64_t tiles = ch.chunk_lanes / L;
  float* xt = static_cast<float*>(std::aligned_alloc(64, (tiles * (K + 1) + extra_cols) * L * sizeof(float)));
  std::fill(xt + tiles * (K + 1) * L, xt + (tiles * (K + 1) + extra_cols) * L, 0.f);
  const float** rows = static_cast<const float**>(std::malloc(src.positions * L * sizeof(const float*)));
  for (;;) {
    const int64_t c = __atomic_fetch_add(ch.next_chunk, 1, __ATOMIC_RELAXED);
    if (c >= ch.chunks) break;
    const int64_t b0 = c * ch.chunk_lanes;
    const int64_t lanes = src.B - b0 < ch.chunk_lanes ? src.B - b0 : ch.chunk_lanes;
    for (int64_t t = 0; t * L < lanes; ++t) {
      lane_rows(src, b0 + t * L, L, rows);
      avx2::lane_tile(LaneTileArgs{rows, src.positions, src.C, L, xt + t * (K + 1) * L});
    }
    for (int64_t r0 = 0; r0 < O; r0 += panel_rows)
      panel(lanes, xt, out + b0 * O, r0, r0 + panel_rows < O ? r0 + panel_rows : O);
  }
  std::free(rows);
  std::free(xt);
}

}  // namespace
}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
