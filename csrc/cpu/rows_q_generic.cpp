// Portable build of the quantized decode kernels (rows_q_impl.h), and the row
// dequantization every ISA shares (rows_q.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"  // nm_index_bits
#include "rows_q.h"

namespace sparsekern {
namespace cpu {

void nm_q_row_dense(const NmQRowsArgs& a, int64_t r, float* dst) {
  std::fill(dst, dst + a.K, 0.f);
  const uint8_t* v = a.values + r * a.val_row_bytes;
  const uint8_t* ix = a.indices + r * a.idx_row_bytes;
  const int bits = nm_index_bits(a.m);
  for (int64_t s = 0; s < a.kept; ++s) {
    // & (m - 1): an index past the group stays in it (the row is never written past).
    const int idx = (bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15) & (a.m - 1);
    const float q = a.bits == 8 ? static_cast<float>(static_cast<int8_t>(v[s]))
                                : static_cast<float>(((v[s >> 1] >> ((s & 1) * 4)) & 15) - 8);
    const float sc = a.bits == 8 ? a.scales[r] : a.scales[r * a.groups + s / a.group_size];
    dst[(s / a.n) * a.m + idx] = q * sc;
  }
}

namespace {
// put(column, index into values) for each kept value of bitmask row r: a tampered mask or
// offsets never read outside the values nor write past the row (those are skipped).
template <typename Put>
void bitmask_row_kept(const BitmaskQRowsArgs& a, int64_t r, const Put& put) {
  int64_t p = a.tiles ? a.offsets[r * a.tiles] : 0;
  const int64_t* words = a.bitmask + r * a.words;
  for (int64_t w = 0; w < a.words; ++w) {
    uint64_t bits = static_cast<uint64_t>(words[w]);
    while (bits) {
      const int64_t c = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      if (c < a.K && p >= 0 && p < a.nnz) put(c, p);
      ++p;
    }
  }
}
}  // namespace

void bitmask_q_row_dense(const BitmaskQRowsArgs& a, int64_t r, float* dst) {
  std::fill(dst, dst + a.K, 0.f);
  const float sc = a.scales[r];
  bitmask_row_kept(a, r, [&](int64_t c, int64_t p) { dst[c] = static_cast<float>(a.values[p]) * sc; });
}

void nm_q_rows_int8(const NmQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst) {
  const int bits = nm_index_bits(a.m);
  const int64_t groups = a.n ? a.kept / a.n : 0;
  for (int64_t r = r0; r < r1; ++r) {
    int8_t* row = dst + r * a.K;
    std::memset(row, 0, static_cast<size_t>(a.K));
    const int8_t* v = reinterpret_cast<const int8_t*>(a.values + r * a.val_row_bytes);
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    // group by group (no division per value); & (m - 1): an index past the group stays in it
    for (int64_t g = 0, s = 0; g < groups; ++g) {
      int8_t* grp = row + g * a.m;
      for (int64_t j = 0; j < a.n; ++j, ++s) {
        const int idx = bits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15;
        grp[idx & (a.m - 1)] = v[s];
      }
    }
  }
}

void bitmask_q_rows_int8(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1, int8_t* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    int8_t* row = dst + r * a.K;
    std::memset(row, 0, static_cast<size_t>(a.K));
    bitmask_row_kept(a, r, [&](int64_t c, int64_t p) { row[c] = a.values[p]; });
  }
}

void quantize_activation_rows(const float* x, int64_t B, int64_t K, uint8_t* u8, int64_t ld, float* scale) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    uint8_t* qb = u8 + b * ld;
    float amax = 0.f;
    bool finite = true;
    for (int64_t c = 0; c < K; ++c) {
      finite = finite && std::isfinite(xb[c]);
      amax = std::max(amax, std::fabs(xb[c]));
    }
    // One fp32 multiply and a round-half-to-even conversion per value (what vcvtps2dq does
    // under the default rounding mode), so a torch emulation reproduces the bytes exactly.
    // The rounding adds and subtracts 1.5 * 2^23: |x * inv| <= 127, so the sum lies where fp32's
    // step is 1 and the add rounds to an integer as nearbyint would, without a libm call per
    // value (NaN stays NaN, as before).
    const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
    scale[b] = finite ? (amax > 0.f ? amax / 127.f : 0.f) : std::nanf("");
    // (This file is built for baseline x86-64, without FMA, so the multiply is never fused
    // into the add.)
    constexpr float kRound = 12582912.f;  // 1.5 * 2^23
    for (int64_t c = 0; c < K; ++c) {
      const float product = xb[c] * inv;
      const float q = (product + kRound) - kRound;
      qb[c] = static_cast<uint8_t>(static_cast<int>(std::min(127.f, std::max(-127.f, q))) + 128);
    }
    std::fill(qb + K, qb + ld, uint8_t{128});
  }
}

void nm_q_rows_act_portable(const NmQRowsArgs& a, int64_t r0, int64_t r1) {
  const int ibits = nm_index_bits(a.m);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* v = a.values + r * a.val_row_bytes;
    const uint8_t* ix = a.indices + r * a.idx_row_bytes;
    for (int64_t b = 0; b < a.B; ++b) {
      const uint8_t* xb = a.xq.u8 + b * a.xq.ld;
      double total = 0.0;
      int64_t group_sum = 0;  // exact: |q| <= 127, |u - 128| <= 127
      for (int64_t s = 0; s < a.kept; ++s) {
        const int idx = (ibits == 2 ? (ix[s >> 2] >> ((s & 3) * 2)) & 3 : (ix[s >> 1] >> ((s & 1) * 4)) & 15) &
                        (a.m - 1);
        const int q = a.bits == 8 ? static_cast<int8_t>(v[s]) : ((v[s >> 1] >> ((s & 1) * 4)) & 15) - 8;
        group_sum += static_cast<int64_t>(q) * (static_cast<int>(xb[(s / a.n) * a.m + idx]) - 128);
        if (a.bits == 4 && ((s + 1) % a.group_size == 0 || s + 1 == a.kept)) {
          total += static_cast<double>(group_sum) * a.scales[r * a.groups + s / a.group_size];
          group_sum = 0;
        }
      }
      if (a.bits == 8) total = static_cast<double>(group_sum) * a.scales[r];
      a.out[b * a.O + r] = static_cast<float>(total * a.xq.scale[b]);
    }
  }
}

void bitmask_q_rows_act_portable(const BitmaskQRowsArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t* words = a.bitmask + r * a.words;
    for (int64_t b = 0; b < a.B; ++b) {
      const uint8_t* xb = a.xq.u8 + b * a.xq.ld;
      int64_t p = a.tiles ? a.offsets[r * a.tiles] : 0, sum = 0;
      for (int64_t w = 0; w < a.words; ++w) {
        uint64_t bits = static_cast<uint64_t>(words[w]);
        while (bits) {
          const int64_t c = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          // A tampered mask or offsets never read outside values nor x.
          if (c < a.K && p >= 0 && p < a.nnz) sum += static_cast<int64_t>(a.values[p]) * (static_cast<int>(xb[c]) - 128);
          ++p;
        }
      }
      a.out[b * a.O + r] = static_cast<float>(static_cast<double>(sum) * a.scales[r] * a.xq.scale[b]);
    }
  }
}

}  // namespace cpu
}  // namespace sparsekern

#define SK_ISA_NS generic
#include "rows_q_impl.h"
