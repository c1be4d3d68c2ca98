// CPU kernels of the quantized linear ops nm_linear_q and bitmask_linear_q: x @ W^T + b with
// W's kept values stored int8 (or int4 for N:M) and dequantized in registers (rows_q.h).
// Layouts: sparsekern/precisions.py, sparsekern/formats.py.
//
// The algorithm is chosen in Python (sparsekern/dispatch_rules.py q_cpu_algo / nm_q_cpu_algo,
// rows_q.h kQAlgo*: which rows, bits and CPUs take which) and the kernels run what they are
// told, at any batch; none chooses again by the rows:
//   exact (kQAlgoExact) and int8 activations (kQAlgoInt8Act): the decode row kernels
//     (AVX-512 for 2:4 and bitmask where the CPU has it, else AVX2, else portable), which
//     stream the packed bytes, in batch tiles of at most kDirectMaxBatch rows;
//   the exact tiles (kQAlgoExactTiles): tiles of output rows dequantized into fp32 and
//     multiplied by the BLAS GEMM (cpu_common.h tiled_gemm), as the fp kernels' large-batch
//     path ("load as sparse, compute as dense");
//   the 2:4 int8 dot-product GEMM (kQAlgoInt8Dot, nm_gemm_int8.h, x quantized per row) for 2:4
//     int8 and int4 weights, or the values expanded to a dense int8 weight for torch's int8
//     GEMM (kQAlgoInt8Expand) for other int8 ones.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "nm_gemm_int8.h"
#include "rows_q.h"

namespace sparsekern {
namespace cpu {
namespace {

// kQAlgoInt8Act (rows_q.h): x's rows quantized to int8 once, before the threads split the
// output rows. Returns the tensors that own the bytes and scales.
std::pair<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x2, QuantizedActivations& q) {
  const int64_t B = x2.size(0), K = x2.size(1);
  q.ld = q_act_row_bytes(K);
  auto u8 = at::empty({B, q.ld}, x2.options().dtype(at::kByte));
  auto scale = at::empty({B}, x2.options());
  (cpu_has_avx512() ? avx512::quantize_activation_rows : quantize_activation_rows)(
      x2.data_ptr<float>(), B, K, u8.data_ptr<uint8_t>(), q.ld, scale.data_ptr<float>());
  q.u8 = u8.data_ptr<uint8_t>();
  q.scale = scale.data_ptr<float>();
  return {u8, scale};
}

void check_q_algo(const char* op, int64_t algo) {
  TORCH_CHECK_VALUE(algo == kQAlgoExact || algo == kQAlgoInt8Act || algo == kQAlgoInt8Dot || algo == kQAlgoInt8Expand ||
                        algo == kQAlgoExactTiles,
                    op, ": algo must be ", kQAlgoExact, " (exact, the decode rows), ", kQAlgoInt8Act,
                    " (int8 activations), ", kQAlgoInt8Dot, " (the 2:4 int8 dot-product GEMM), ", kQAlgoInt8Expand,
                    " (int8 values expanded for torch's int8 GEMM) or ", kQAlgoExactTiles,
                    " (exact, dequantized tiles into the BLAS GEMM), got ", algo);
}

// The decode row kernels (kQAlgoExact, kQAlgoInt8Act) over all B rows of x, in batch tiles of
// at most kDirectMaxBatch rows (the widest they take): tile b0 reads rows b0.. of x (and of
// its quantized bytes and scales) and writes rows b0.. of out. `rows(tile, r0, r1, worker)` runs
// output rows [r0, r1) of one tile into tile.out; `worker`: a pool worker runs them into its own
// buffer (a chunk the calling thread may abandon). It is copied into each chunk's job, with the
// tile, and `keep` holds every tensor the tile points into (parallel_out_rows: with
// `abandonable`, a chunk a parked worker abandoned may still run after the call returned).
template <typename Args, typename Rows>
void decode_in_batch_tiles(const Args& a, float* out, bool abandonable, const std::vector<at::Tensor>& keep, Rows rows) {
  for (int64_t b0 = 0; b0 < a.B; b0 += kDirectMaxBatch) {
    Args t = a;
    t.B = std::min(kDirectMaxBatch, a.B - b0);
    t.x = a.x + b0 * a.K;
    if (a.xq.u8 != nullptr) {
      t.xq.u8 = a.xq.u8 + b0 * a.xq.ld;
      t.xq.scale = a.xq.scale + b0;
    }
    float* tile_out = out + b0 * a.O;
    parallel_out_rows(a.O, t.B, rows_grain(a.K, t.B), tile_out, abandonable, keep,
                      [t, rows, tile_out](float* dst, int64_t r0, int64_t r1) {
      Args u = t;
      u.out = dst;
      rows(u, r0, r1, dst != tile_out);
    });
  }
}

// Output rows [r0, r1) of a bitmask decode tile: a pool worker's (whose chunk the calling thread
// may abandon, the caller then editing the weight in place) on a checked copy of the rows' mask
// and offsets (snapshot_bitmask_rows), the calling thread's on the weight itself. A copy that
// fails its check (the weight was edited while the call ran) gives NaN rows.
template <typename Kernel>
void bitmask_q_block(const BitmaskQRowsArgs& t, int64_t r0, int64_t r1, bool worker, Kernel kernel) {
  if (!worker) {
    kernel(t, r0, r1);
    return;
  }
  const BitmaskRowsSnapshot snap =
      snapshot_bitmask_rows(t.bitmask, t.offsets, nullptr, t.words, t.tiles, t.K, t.nnz, r0, r1);
  if (!snap.valid) {
    for (int64_t b = 0; b < t.B; ++b)
      for (int64_t r = r0; r < r1; ++r) t.out[b * t.O + r] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  BitmaskQRowsArgs u = t;
  u.values = t.values + snap.first;
  u.bitmask = snap.bitmask;
  u.offsets = snap.offsets;
  u.nnz = snap.nnz;
  u.scales = t.scales + r0;
  u.out = t.out + r0;
  kernel(u, 0, r1 - r0);
}

// x (any float dtype) -> fp32 [B, O] through the 2:4 int8 dot-product GEMM, bias (fp32 [O],
// or undefined) added in the kernel's last FMA: a separate add over the output took about 2% of
// MiniLM's forward at 16 sentences. int8 values (bits 8) or int4 values expanded to int8 in the
// kernel (bits 4, scales per group).
at::Tensor nm24_int8_dot(const at::Tensor& x2, const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& sc,
                         int64_t K, int64_t O, int64_t bits, int64_t group_size, const at::Tensor& bias) {
  namespace v = avx512vnni;
  const int64_t B = x2.size(0);
  auto out = at::empty({B, O}, x2.options());
  if (B == 0 || O == 0) return out.zero_();
  const int64_t stride = v::xq_stride(K);
  auto xq = at::empty({B, stride}, x2.options().dtype(at::kByte));
  auto xs = at::empty({B}, x2.options());
  // x is quantized by the GEMM's threads themselves (QuantizeJob in nm_gemm_int8.h)
  const int64_t chunk_rows = v::quantize_chunk_rows(K);
  int64_t quantize_next = 0, quantize_done = 0;
  const QuantizeJob quantize{x2.data_ptr<float>(), xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), chunk_rows,
                             (B + chunk_rows - 1) / chunk_rows, &quantize_next, &quantize_done};
  const int64_t panels = (O + v::kPanelRows - 1) / v::kPanelRows;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> next(size_t(nth), 0);
  // Ranges of batch rows (nm_gemm_int8.h ranges_for; SPARSEKERN_INT8_RANGES=one|threads, a
  // benchmarking switch, fixes them)
  const int64_t nr = ranges_by_switch("SPARSEKERN_INT8_RANGES", nth, v::ranges_for(B, nth));
  const WorkRanges ranges{nr, v::range_rows_for(B, nr), next.data()};
  if (bits == 4) {
    const Nm24Int4Args g{vals.data_ptr<uint8_t>(), idx.data_ptr<uint8_t>(), sc.data_ptr<float>(), K / 2,
                         vals.size(1), idx.size(1), K, O, group_size, sc.size(1), xq.data_ptr<uint8_t>(),
                         xs.data_ptr<float>(), stride, B, out.data_ptr<float>(), panels, ranges, quantize,
                         bias.defined() ? bias.data_ptr<float>() : nullptr};
    at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) v::nm24_int4_gemm(g, t);
    });
    return out;
  }
  const Nm24Int8Args g{vals.data_ptr<int8_t>(), idx.data_ptr<uint8_t>(), sc.data_ptr<float>(), vals.size(1),
                       idx.size(1), K, O, xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), stride, B,
                       out.data_ptr<float>(), panels, ranges, quantize, bias.defined() ? bias.data_ptr<float>() : nullptr};
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) v::nm24_gemm(g, t);
  });
  return out;
}

at::Tensor nm_linear_q_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                           int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t algo = kQAlgoExact) {
  check_q_algo("nm_linear_q", algo);
  check_nm_linear_q_args(x, values, indices, scales, n, m, in_features, bits, group_size, bias);
  if (algo == kQAlgoInt8Dot) {
    TORCH_CHECK_VALUE(n == 2 && m == 4, "nm_linear_q: algo ", kQAlgoInt8Dot, " (the 2:4 int8 dot-product GEMM) "
                      "runs 2:4 weights with int8 or int4 values, got ", n, ":", m);
    TORCH_CHECK(cpu_has_avx512_vnni(), "nm_linear_q: algo ", kQAlgoInt8Dot, " (the 2:4 int8 dot-product GEMM) "
                "needs a CPU with AVX512_VNNI (SPARSEKERN_CPU_ISA may cap it); pass algo ", kQAlgoExact);
    auto x2 = x_float_2d(x);
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    auto out = nm24_int8_dot(x2, values.contiguous(), indices.contiguous(), scales.contiguous(), in_features,
                             indices.size(0), bits, group_size, b);
    return finish_linear(out, x, c10::nullopt);
  }
  const int64_t K = in_features, O = indices.size(0), kept = K / m * n;
  auto vals = values.contiguous();
  auto idx = indices.contiguous();
  auto sc = scales.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  NmQRowsArgs a{reinterpret_cast<const uint8_t*>(vals.data_ptr()), idx.data_ptr<uint8_t>(), sc.data_ptr<float>(),
                bits, bits == 4 ? group_size : 0, bits == 4 ? (kept + group_size - 1) / group_size : 1,
                n, m, kept, vals.size(1), idx.size(1), K, O, x2.data_ptr<float>(), B, nullptr};
  if (algo == kQAlgoInt8Expand) {
    TORCH_CHECK_VALUE(bits == 8, "nm_linear_q: algo ", kQAlgoInt8Expand, " (int8 values expanded for torch's int8 "
                      "GEMM) runs int8 values (bits 8), got bits ", bits);
    auto out = int8_expand_gemm(x2, sc, O, [&](int64_t r0, int64_t r1, int8_t* dst) { nm_q_rows_int8(a, r0, r1, dst); });
    return finish_linear(out, x, bias);
  }
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;
  if (B == 0 || O == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (algo == kQAlgoExactTiles) {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
      for (int64_t r = r0; r < r1; ++r) nm_q_row_dense(a, r, buf + (r - r0) * K);
    }, bias);
    bias_left = c10::nullopt;
  } else {
    out = at::empty({B, O}, x2.options());
    const bool wide = avx512_nm_q_pattern(n, m) && cpu_has_avx512();
    const bool avx2 = cpu_has_avx2();
    if (algo == kQAlgoInt8Act) {
      const auto held = quantize_activations(x2, a.xq);
      const bool vnni = cpu_has_avx512() && avx512_q_act_vector();
      decode_in_batch_tiles(a, out.data_ptr<float>(), m == 4, {vals, idx, sc, x2, held.first, held.second},
                            [vnni, avx2](const NmQRowsArgs& t, int64_t r0, int64_t r1, bool) {
        if (vnni) avx512::nm_q_rows_act(t, r0, r1);
        else if (avx2) avx2::nm_q_rows_act(t, r0, r1);
        else generic::nm_q_rows_act(t, r0, r1);
      });
      return finish_linear(out, x, bias_left);
    }
    decode_in_batch_tiles(a, out.data_ptr<float>(), m == 4, {vals, idx, sc, x2},
                          [wide, avx2](const NmQRowsArgs& t, int64_t r0, int64_t r1, bool) {
      if (wide) avx512::nm_q_rows(t, r0, r1);
      else if (avx2) avx2::nm_q_rows(t, r0, r1);
      else generic::nm_q_rows(t, r0, r1);
    });
  }
  return finish_linear(out, x, bias_left);
}

at::Tensor bitmask_linear_q_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                const c10::optional<at::Tensor>& bias, int64_t algo = kQAlgoExact) {
  check_q_algo("bitmask_linear_q", algo);
  TORCH_CHECK_VALUE(algo != kQAlgoInt8Dot, "bitmask_linear_q: algo ", kQAlgoInt8Dot, " (the 2:4 int8 dot-product "
                    "GEMM) runs 2:4 weights only");
  check_bitmask_linear_q_args(x, values, bitmask, offsets, scales, in_features, bias);
  check_bitmask_tail_bits("bitmask_linear_q", bitmask, in_features);
  const int64_t K = in_features, O = bitmask.size(0);
  auto vals = values.contiguous();
  auto bm = bitmask.contiguous();
  auto off = offsets.contiguous();
  auto sc = scales.contiguous();
  auto x2 = x_float_2d(x);
  const int64_t B = x2.size(0);
  BitmaskQRowsArgs a{vals.data_ptr<int8_t>(), bm.data_ptr<int64_t>(), off.data_ptr<int32_t>(), sc.data_ptr<float>(),
                     bm.size(1), off.size(1), K, O, vals.numel(), x2.data_ptr<float>(), B, nullptr};
  if (algo == kQAlgoInt8Expand) {
    const bool wide = cpu_has_avx512();
    auto out = int8_expand_gemm(x2, sc, O, [&](int64_t r0, int64_t r1, int8_t* dst) {
      if (wide) avx512::bitmask_q_rows_int8(a, r0, r1, dst);
      else bitmask_q_rows_int8(a, r0, r1, dst);
    });
    return finish_linear(out, x, bias);
  }
  at::Tensor out;
  c10::optional<at::Tensor> bias_left = bias;
  if (B == 0 || O == 0 || vals.numel() == 0) {
    out = at::zeros({B, O}, x2.options());
  } else if (algo == kQAlgoExactTiles) {
    out = tiled_gemm(x2, O, [&](int64_t r0, int64_t r1, float* buf) {
      for (int64_t r = r0; r < r1; ++r) bitmask_q_row_dense(a, r, buf + (r - r0) * K);
    }, bias);
    bias_left = c10::nullopt;
  } else {
    out = at::empty({B, O}, x2.options());
    const bool wide = cpu_has_avx512(), avx2 = cpu_has_avx2();
    if (algo == kQAlgoInt8Act) {
      const auto held = quantize_activations(x2, a.xq);
      const bool vnni = wide && avx512_q_act_vector();
      // abandonable: a worker reads a checked copy of its rows' index tensors (bitmask_q_block)
      decode_in_batch_tiles(a, out.data_ptr<float>(), true, {vals, bm, off, sc, x2, held.first, held.second},
                            [vnni, avx2](const BitmaskQRowsArgs& t, int64_t r0, int64_t r1, bool worker) {
        bitmask_q_block(t, r0, r1, worker, [vnni, avx2](const BitmaskQRowsArgs& u, int64_t s0, int64_t s1) {
          if (vnni) avx512::bitmask_q_rows_act(u, s0, s1);
          else if (avx2) avx2::bitmask_q_rows_act(u, s0, s1);
          else generic::bitmask_q_rows_act(u, s0, s1);
        });
      });
      return finish_linear(out, x, bias_left);
    }
    decode_in_batch_tiles(a, out.data_ptr<float>(), true, {vals, bm, off, sc, x2},
                          [wide, avx2](const BitmaskQRowsArgs& t, int64_t r0, int64_t r1, bool worker) {
      bitmask_q_block(t, r0, r1, worker, [wide, avx2](const BitmaskQRowsArgs& u, int64_t s0, int64_t s1) {
        if (wide) avx512::bitmask_q_rows(u, s0, s1);
        else if (avx2) avx2::bitmask_q_rows(u, s0, s1);
        else generic::bitmask_q_rows(u, s0, s1);
      });
    });
  }
  return finish_linear(out, x, bias_left);
}

}  // namespace

// kQAlgoInt8Expand (rows_q.h; declared in cpu_common.h, also run by block_linear_q_cpu).
at::Tensor int8_expand_gemm(const at::Tensor& x2, const at::Tensor& wscales, int64_t O,
                            const std::function<void(int64_t, int64_t, int8_t*)>& expand) {
  const int64_t B = x2.size(0), K = x2.size(1);
  auto out = at::empty({B, O}, x2.options());
  if (B == 0 || O == 0 || K == 0) return out.zero_();
  // The activation bytes of kQAlgoInt8Act (q + 128, one scale per row) with no column padding,
  // then q itself: x ^ 0x80 read as int8 is x - 128.
  auto xq = at::empty({B, K}, x2.options().dtype(at::kByte));
  auto xs = at::empty({B}, x2.options());
  const float* xp = x2.data_ptr<float>();
  uint8_t* qp = xq.data_ptr<uint8_t>();
  float* sp = xs.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t(1) << 20) / K), [&](int64_t b0, int64_t b1) {
    (cpu_has_avx512() ? avx512::quantize_activation_rows : quantize_activation_rows)(
        xp + b0 * K, b1 - b0, K, qp + b0 * K, K, sp + b0);
    for (int64_t i = b0 * K; i < b1 * K; ++i) qp[i] ^= 0x80;
  });
  auto w8 = at::empty({O, K}, x2.options().dtype(at::kChar));
  int8_t* wp = w8.data_ptr<int8_t>();
  parallel_rows(O, rows_grain(K, 1), [&](int64_t r0, int64_t r1) { expand(r0, r1, wp); });
  // torch 2.14's CPU _int_mm leaves its output unwritten for K = 1 and N > 1 (what the
  // allocation held comes back): that one-column product is formed here instead.
  const auto sums = K == 1 ? xq.view(at::kChar).to(at::kInt) * w8.view({1, O}).to(at::kInt)
                           : at::_int_mm(xq.view(at::kChar), w8.t());
  const int32_t* acc = sums.data_ptr<int32_t>();
  const float* ws = wscales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t(1) << 16) / O), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = sp[b];
      for (int64_t o = 0; o < O; ++o) op[b * O + o] = static_cast<float>(acc[b * O + o]) * s * ws[o];
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("nm_linear_q", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                           int64_t group_size, const c10::optional<at::Tensor>& bias) {
    return nm_linear_q_cpu(x, values, indices, scales, n, m, in_features, bits, group_size, bias);
  });
  m.impl("bitmask_linear_q", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                const c10::optional<at::Tensor>& bias) {
    return bitmask_linear_q_cpu(x, values, bitmask, offsets, scales, in_features, bias);
  });
  // The CPU-only ops with the algorithm chosen in Python (rows_q.h kQAlgo*), each at any rows:
  // the decode rows (fp32 or int8 activations, in batch tiles), the exact tiles, the int8
  // dot-product GEMM of 2:4 int8 and int4 weights, the expanded int8 weight of int8 ones.
  m.impl("nm_linear_q_cpu", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& scales, int64_t n, int64_t m, int64_t in_features, int64_t bits,
                               int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t algo) {
    return nm_linear_q_cpu(x, values, indices, scales, n, m, in_features, bits, group_size, bias, algo);
  });
  m.impl("bitmask_linear_q_cpu", [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                    const at::Tensor& offsets, const at::Tensor& scales, int64_t in_features,
                                    const c10::optional<at::Tensor>& bias, int64_t algo) {
    return bitmask_linear_q_cpu(x, values, bitmask, offsets, scales, in_features, bias, algo);
  });
}

}  // namespace cpu
}  // namespace sparsekern
