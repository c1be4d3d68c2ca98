// Quantized decode kernels (rows_q.h) for AVX2 (rows_q_avx2.cpp, under SK_AVX2 and the
// target pragma) and the portable build (rows_q_generic.cpp). Same rules as
// rows_common_impl.h: included after every other header, nothing included here, helpers in
// an unnamed namespace, only the entry points leave the file.
//   AVX2, 2:4, one batch row: four weight rows per step share the x loads; per 16 slots (32
//     columns) the int8 values are sign-extended (int4: nibbles split and re-centred first)
//     and converted to fp32 in registers, and the x values of their columns come from two
//     permutes per 8 slots (nm24_slot_columns, as the fp 2:4 kernel). int8's row scale
//     multiplies the finished sum; int4's group scale each 16 values.
//   Otherwise (other batches and patterns, bitmask): each weight row dequantized once into
//     an fp32 row buffer (nm_q_row_dense / bitmask_q_row_dense), then dense dot products
//     with every batch row (AVX2 FMAs, or portable multiply-adds).
#ifndef SK_ISA_NS
#error "define SK_ISA_NS before including rows_q_impl.h"
#endif

namespace sparsekern {
namespace cpu {
namespace SK_ISA_NS {
namespace {

// out[b * O + r] = row . x[b] for every batch row b.
inline void q_dense_row_times_x(const float* row, const float* x, int64_t B, int64_t K, float* out, int64_t O,
                                int64_t r) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    int64_t c = 0;
    float total = 0.f;
#ifdef SK_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; c + 16 <= K; c += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(xb + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c + 8), _mm256_loadu_ps(xb + c + 8), a1);
    }
    __m256 s = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#else
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (; c + 4 <= K; c += 4)
      for (int j = 0; j < 4; ++j) acc[j] += row[c + j] * xb[c + j];
    total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#endif
    for (; c < K; ++c) total += row[c] * xb[c];
    out[b * O + r] = total;
  }
}

template <typename DenseRow>
void q_expanded_rows(const float* x, int64_t B, int64_t K, float* out, int64_t O, int64_t r0, int64_t r1,
                     const DenseRow& dense_row) {
  float* row = new float[K > 0 ? K : 1];
  for (int64_t r = r0; r < r1; ++r) {
    dense_row(r, row);
    q_dense_row_times_x(row, x, B, K, out, O, r);
  }
  delete[] row;
}

#ifdef SK_AVX2
// 16 quantized values of slots [s0, s0 + 16) of a row as signed int8 (int4 re-centred).
inline __m128i q16_epi8(const uint8_t* vrow, int64_t s0, int64_t bits) {
  if (bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(vrow + s0));
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vrow + s0 / 2));
  const __m128i low = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
  return _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8(8));
}

constexpr int kQPermuteRows = 4;
template <int R>
void nm24_q_b1_step(const NmQRowsArgs& a, int64_t r) {
  const Nm24SlotColumns& lut = nm24_slot_columns();
  auto half = [&](uint8_t lo, uint8_t hi) {
    return _mm256_set_m128i(_mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[hi])),
                            _mm_load_si128(reinterpret_cast<const __m128i*>(lut.col[lo])));
  };
  const int64_t pieces = a.kept / 16;  // full 16-slot pieces; the rest slot by slot
  const uint8_t* v[R];
  const uint8_t* ix[R];
  __m256 acc0[R], acc1[R];
  for (int j = 0; j < R; ++j) {
    v[j] = a.values + (r + j) * a.val_row_bytes;
    ix[j] = a.indices + (r + j) * a.idx_row_bytes;
    acc0[j] = acc1[j] = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < pieces; ++p) {
    const float* xc = a.x + 32 * p;
    const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
    const __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
    for (int j = 0; j < R; ++j) {
      const uint8_t* b = ix[j] + 4 * p;
      const __m256i p0 = half(b[0], b[1]), p1 = half(b[2], b[3]);
      const __m256 s0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, p0), _mm256_permutevar8x32_ps(x1, p0), 0xF0);
      const __m256 s1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(x2, p1), _mm256_permutevar8x32_ps(x3, p1), 0xF0);
      const __m128i q = q16_epi8(v[j], 16 * p, a.bits);
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
      if (a.bits == 4) {
        const __m256 s = _mm256_set1_ps(a.scales[(r + j) * a.groups + 16 * p / a.group_size]);
        w0 = _mm256_mul_ps(w0, s);
        w1 = _mm256_mul_ps(w1, s);
      }
      acc0[j] = _mm256_fmadd_ps(w0, s0, acc0[j]);
      acc1[j] = _mm256_fmadd_ps(w1, s1, acc1[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    const int64_t row = r + j;
    __m256 s = _mm256_add_ps(acc0[j], acc1[j]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float total = _mm_cvtss_f32(h);
    for (int64_t sl = 16 * pieces; sl < a.kept; ++sl) {  // whole groups left, fewer than 16 slots
      const int idx = (ix[j][sl >> 2] >> ((sl & 3) * 2)) & 3;
      const float q = a.bits == 8 ? static_cast<float>(static_cast<int8_t>(v[j][sl]))
                                  : static_cast<float>(((v[j][sl >> 1] >> ((sl & 1) * 4)) & 15) - 8);
      const float sc = a.bits == 8 ? 1.f : a.scales[row * a.groups + sl / a.group_size];
      total += q * sc * a.x[(sl / 2) * 4 + idx];
    }
    a.out[row] = a.bits == 8 ? total * a.scales[row] : total;
  }
}
#endif

}  // namespace

void nm_q_rows(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
#ifdef SK_AVX2
  if (a.B == 1 && a.n == 2 && a.m == 4) {
    int64_t r = r0;
    for (; r + kQPermuteRows <= r1; r += kQPermuteRows) nm24_q_b1_step<kQPermuteRows>(a, r);
    for (; r < r1; ++r) nm24_q_b1_step<1>(a, r);
    return;
  }
#endif
  q_expanded_rows(a.x, a.B, a.K, a.out, a.O, r0, r1, [&](int64_t r, float* row) { nm_q_row_dense(a, r, row); });
}

void bitmask_q_rows(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  q_expanded_rows(a.x, a.B, a.K, a.out, a.O, r0, r1, [&](int64_t r, float* row) { bitmask_q_row_dense(a, r, row); });
}

// kQAlgoInt8Act: the portable integer loops (no AVX2 integer kernel yet).
void nm_q_rows_act(const NmQRowsArgs& a, int64_t r0, int64_t r1) { nm_q_rows_act_portable(a, r0, r1); }
void bitmask_q_rows_act(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  bitmask_q_rows_act_portable(a, r0, r1);
}

}  // namespace SK_ISA_NS
}  // namespace cpu
}  // namespace sparsekern
