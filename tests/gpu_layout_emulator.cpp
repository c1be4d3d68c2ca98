// Host emulation of the 2:4 tensor-core decode kernel's data movement (csrc/cuda/nm_linear.cu,
// nm24_mma_kernel), built on the very index functions the kernel calls
// (csrc/cuda/decode_layout.cuh). Compiled and run by tests/test_gpu_layout.py; no GPU needed.
//
// For random 2:4 weights in the NMWeight layout (sparsekern/formats.py) it stages x into a
// simulated shared-memory slice with xs_index, lets each of a warp's 32 lanes load its values
// and index bytes at nm24_value_offset / nm24_meta_offset (checking that a quad's value loads
// are 64 adjacent bytes), transposes the index bytes in each quad round by round as the kernel's
// shuffles do (nm24_quad_src/dst, nm24_meta_piece/place), builds A fragments with
// nm24_dense_pair / nm24_nibble and B fragments from the slice, and multiplies them the way
// mma.sync.m16n8k16 does according to the PTX ISA fragment tables (encoded here independently
// of the kernel). The result must equal x @ W^T computed densely. It also checks that the
// B-fragment reads of every half warp hit 16 distinct 8-byte bank slots (no conflicts).
//
// Exit status 0 and "ok" on success; a message naming the case otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "decode_layout.cuh"

using namespace sparsekern::layout;

namespace {

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint32_t h) {
  const uint32_t u = (h & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Nm24 {
  int O, K;
  std::vector<uint16_t> values;  // [O, K/2]
  std::vector<uint8_t> idx;      // [O, K/8]
  std::vector<float> dense;      // [O, K]
};

// The NMWeight layout: slot s = g*2 + t holds the t-th kept element of group g; its 2-bit
// in-group index sits at bit (2s) % 8 of byte 2s / 8. `pad` leaves some groups with one kept
// element (the other slot a zero with the lowest free index, as nm_compress pads).
Nm24 make_weight(int O, int K, std::mt19937& rng, bool pad) {
  Nm24 w{O, K, std::vector<uint16_t>(size_t(O) * K / 2), std::vector<uint8_t>(size_t(O) * K / 8, 0),
         std::vector<float>(size_t(O) * K, 0.f)};
  std::uniform_real_distribution<float> val(-1.f, 1.f);
  std::uniform_int_distribution<int> pick(0, 5), coin(0, 3);
  const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  for (int r = 0; r < O; ++r)
    for (int g = 0; g < K / 4; ++g) {
      const int* p = pairs[pick(rng)];
      const bool one = pad && coin(rng) == 0;
      for (int t = 0; t < 2; ++t) {
        const int64_t s = int64_t(g) * 2 + t;
        uint16_t h = to_bf16(val(rng));
        if (one && t == 0) h = 0;  // padded slot: value zero
        w.values[size_t(r) * (K / 2) + s] = h;
        w.idx[size_t(r) * (K / 8) + (s * 2) / 8] |= uint8_t(p[t] << ((s * 2) % 8));
        w.dense[size_t(r) * K + g * 4 + p[t]] = from_bf16(h);
      }
    }
  return w;
}

// PTX ISA, mma.m16n8k16 (.bf16/.f16 inputs, .f32 accumulators), groupID = lane >> 2,
// threadID_in_group = lane & 3:
//   A: a[i] (i = 0..3) holds rows g + 8*(i & 1), columns 2q + 8*(i >> 1) + {0, 1} (low half first)
//   B: b[i] (i = 0..1) holds rows (k) 2q + 8*i + {0, 1}, column (n) g
//   C: c[e] (e = 0..3) is row g + 8*(e >> 1), column 2q + (e & 1)
void mma_m16n8k16(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        A[g + 8 * (i & 1)][2 * q + 8 * (i >> 1) + h] = from_bf16(a[lane][i] >> (16 * h));
    for (int i = 0; i < 2; ++i)
      for (int h = 0; h < 2; ++h) B[2 * q + 8 * i + h][g] = from_bf16(b[lane][i] >> (16 * h));
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += double(A[row][k]) * B[k][col];
      c[lane][e] += float(s);
    }
  }
}

// One CTA's work for warp rows [r0, r0+16), K slice [k0, k1), batch tile [b0, b0+BT).
bool run_case(int O, int K, int B, int KS, int split, int r0, int NT, bool pad, unsigned seed) {
  std::mt19937 rng(seed);
  const Nm24 w = make_weight(O, K, rng, pad);
  std::uniform_real_distribution<float> val(-1.f, 1.f);
  std::vector<uint16_t> x(size_t(B) * K);
  for (auto& h : x) h = to_bf16(val(rng));
  const int BT = 8 * NT, RS = KS + kXPad;
  const int64_t k0 = int64_t(split) * KS, k1 = std::min<int64_t>(K, k0 + KS);
  std::vector<uint16_t> xs(size_t(BT) * RS, 0xFFFF);  // poison: NaN bit pattern
  // staging, as the kernel: 8 columns per item, two 8-byte units, zeros past B and k1
  for (int i = 0; i < BT * (KS / 8); ++i) {
    const int bl = i / (KS / 8), c = (i % (KS / 8)) * 8;
    const int64_t col = k0 + c;
    uint16_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (bl < B && col < k1)
      for (int e = 0; e < 8; ++e) v[e] = x[size_t(bl) * K + col + e];
    std::memcpy(&xs[xs_index(bl, c, RS)], v, 8);
    std::memcpy(&xs[xs_index(bl, c + 4, RS)], v + 4, 8);
  }
  float acc[4][32][4] = {};
  const int nss = int((k1 - k0 + kSuperCols - 1) / kSuperCols);
  for (int ss = 0; ss < nss; ++ss) {
    const int64_t c0 = k0 + int64_t(ss) * kSuperCols;
    uint32_t vals[32][2][16] = {}, raw[32][2][2] = {}, meta[32][2][2] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const int q = lane & 3;
      for (int h = 0; h < 2; ++h) {
        const int r = r0 + (lane >> 2) + 8 * h;
        if (r >= O) continue;
        for (int i = 0; i < 4; ++i) {
          if (!nm24_chunk_ok(c0, i, k1)) continue;
          const int64_t off = nm24_value_offset(c0, q, i);
          if (off % 8) return std::printf("value offset %lld not 16-byte aligned\n", (long long)off), false;
          std::memcpy(&vals[lane][h][4 * i], &w.values[size_t(r) * (K / 2) + off], 16);
        }
        if (!nm24_chunk_ok(c0, q, k1)) continue;
        const int64_t moff = nm24_meta_offset(c0, q);
        if (moff % 8) return std::printf("meta offset %lld not 8-byte aligned\n", (long long)moff), false;
        std::memcpy(raw[lane][h], &w.idx[size_t(r) * (K / 8) + moff], 8);
      }
    }
    // a quad's four lanes read 64 adjacent bytes of one row per value load (whole sectors)
    for (int lane = 0; lane < 32; lane += 4)
      for (int i = 0; i < 4; ++i)
        for (int q = 1; q < 4; ++q)
          if (nm24_value_offset(c0, q, i) != nm24_value_offset(c0, q - 1, i) + 8)
            return std::printf("value load %d: lanes of a quad not adjacent\n", i), false;
    // the quad's index transpose, round by round, as the kernel's shuffles do it
    for (int rd = 0; rd < 4; ++rd) {
      uint32_t sent[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int dst = nm24_quad_dst(lane & 3, rd);
        sent[lane] = nm24_meta_piece(raw[lane][0][0], raw[lane][0][1], dst) |
                     (nm24_meta_piece(raw[lane][1][0], raw[lane][1][1], dst) << 16);
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int src = nm24_quad_src(lane & 3, rd), from = (lane & ~3) | src;
        if (nm24_quad_dst(src, rd) != (lane & 3)) return std::printf("shuffle round %d: sender mismatch\n", rd), false;
        nm24_meta_place(meta[lane][0][0], meta[lane][0][1], sent[from] & 0xffffu, src);
        nm24_meta_place(meta[lane][1][0], meta[lane][1][1], sent[from] >> 16, src);
      }
    }
    for (int j = 0; j < 16; ++j) {
      uint32_t a[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        const uint32_t nlo = nm24_nibble(meta[lane][0][0], meta[lane][0][1], j);
        const uint32_t nhi = nm24_nibble(meta[lane][1][0], meta[lane][1][1], j);
        a[lane][0] = nm24_dense_pair(vals[lane][0][j], nlo, 0);
        a[lane][1] = nm24_dense_pair(vals[lane][1][j], nhi, 0);
        a[lane][2] = nm24_dense_pair(vals[lane][0][j], nlo, 1);
        a[lane][3] = nm24_dense_pair(vals[lane][1][j], nhi, 1);
      }
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b[32][2];
        int slot_of[32];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, q = lane & 3;
          const int cl = ss * kSuperCols + int(nm24_group_col(0, q, j));
          if (nm24_group_col(c0, q, j) - k0 != cl) return std::printf("group column mismatch\n"), false;
          const int e = xs_index(nt * 8 + g, cl, RS);
          if (e % 4) return std::printf("B fragment read not 8-byte aligned\n"), false;
          std::memcpy(b[lane], &xs[e], 8);
          slot_of[lane] = (e / 4) % 16;  // 8-byte slot within a 128-byte bank cycle
        }
        for (int half = 0; half < 2; ++half) {  // a 64-bit shared load is served per half warp
          int seen = 0;
          for (int l = 16 * half; l < 16 * half + 16; ++l) seen |= 1 << slot_of[l];
          if (seen != 0xffff)
            return std::printf("bank conflict: half warp %d of super-step %d block %d\n", half, ss, j), false;
        }
        mma_m16n8k16(a, b, acc[nt]);
      }
    }
  }
  // epilogue mapping, then compare with the dense product over the slice
  double err = 0, ref_norm = 0;
  for (int nt = 0; nt < NT; ++nt)
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, q = lane & 3;
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + g + (e >= 2 ? 8 : 0), b = nt * 8 + 2 * q + (e & 1);
        if (r >= O || b >= B) continue;
        double ref = 0;
        for (int64_t c = k0; c < k1; ++c) ref += double(w.dense[size_t(r) * K + c]) * from_bf16(x[size_t(b) * K + c]);
        const double got = acc[nt][lane][e];
        if (!std::isfinite(got)) return std::printf("non-finite output r=%d b=%d\n", r, b), false;
        err += (got - ref) * (got - ref);
        ref_norm += ref * ref;
      }
    }
  const double rel = std::sqrt(err / std::max(ref_norm, 1e-30));
  if (!(rel < 1e-5)) {
    std::printf("O=%d K=%d B=%d KS=%d split=%d r0=%d NT=%d pad=%d: relative error %.3e\n", O, K, B, KS, split, r0, NT,
                int(pad), rel);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  struct Case {
    int O, K, B, KS, split, r0, NT;
    bool pad;
  };
  const Case cases[] = {
      {16, 256, 1, 256, 0, 0, 1, false},     {16, 512, 8, 512, 0, 0, 1, true},
      {37, 320, 5, 512, 0, 16, 1, false},    // rows past O, K tail of 64 columns
      {37, 320, 5, 512, 0, 32, 1, true},     // last row tile, 5 of its 16 rows real
      {64, 1024, 16, 512, 1, 48, 2, false},  // second split of K
      {64, 704, 32, 256, 2, 0, 4, true},     // third split, a 192-column tail
      {48, 64, 3, 256, 0, 32, 1, false},     // K = 64: one partial super-step
  };
  unsigned seed = 1;
  for (const Case& c : cases)
    if (!run_case(c.O, c.K, c.B, c.KS, c.split, c.r0, c.NT, c.pad, seed++)) return 1;
  std::printf("ok\n");
  return 0;
}
