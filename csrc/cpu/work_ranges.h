// Work split into contiguous ranges, one per thread, each with its own counter of work units
// (output panels): thread t runs the units of range t first, then takes what is left of the
// others' (t + 1, t + 2, ...), so a thread the OS parked holds at most the unit it is in. Why
// not one shared counter over the panels of the whole input: each thread then wrote a column
// slice of every output row, and the elementwise op after the layer (torch splits it into
// contiguous parts of the rows, one per thread) found half its input in the other core's
// cache: a residual add and layer norm over a [960, 384] output of the 2:4 int8 GEMM took 156 us
// after the one-counter split and 138 us after this one (torch's int8 linear, whose threads
// split the rows: 157 us; bench/results/cpu-int8-probes-20261207, the Zen 4 machine of issue 28). The 2:4 int8 GEMM splits batch rows in whole core passes (nm_gemm_int8.h),
// the 2:4 bf16 GEMM lanes in whole 64-lane tiles (nm_gemm_bf16.h), each into near-equal ranges:
// a range's thread can steal only whole panels, and at few panels per range a short range's
// thread finds none left. Each range decodes every panel it runs, so each kernel picks how many
// ranges pay for that.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace sparsekern {
namespace cpu {

struct WorkRanges {
  int64_t count;  // ranges
  int64_t size;   // items (batch rows, lanes) per range; the last range takes the rest of the
                  // extent (longer or shorter), ranges past the extent are empty
  int64_t* next;  // [count] unit counters, 0 before the first call
};

// Range r of [0, extent): [r size, (r + 1) size), the last one to the extent, clipped to it.
inline void range_bounds(const WorkRanges& w, int64_t extent, int64_t r, int64_t* lo, int64_t* hi) {
  const int64_t l = r * w.size, h = r + 1 == w.count ? extent : l + w.size;
  *lo = l < extent ? l : extent;
  *hi = h < extent ? h : extent;
}

// Calls unit(u, lo, hi) for the units u < units of the ranges [lo, hi) of [0, extent) that this
// thread takes: its own range's (range thread % count) first, then the others' in turn.
template <typename Unit>
inline void for_each_range_unit(const WorkRanges& w, int64_t extent, int64_t units, int64_t thread, Unit unit) {
  for (int64_t i = 0; i < w.count; ++i) {
    const int64_t range = (thread + i) % w.count;
    int64_t lo, hi;
    range_bounds(w, extent, range, &lo, &hi);
    if (lo >= hi) continue;
    for (int64_t u = __atomic_fetch_add(w.next + range, 1, __ATOMIC_RELAXED); u < units;
         u = __atomic_fetch_add(w.next + range, 1, __ATOMIC_RELAXED))
      unit(u, lo, hi);
  }
}

// `chosen` ranges, unless the benchmarking switch `variable` (read per call) fixes them: "one"
// gives 1, "threads" gives `most`.
inline int64_t ranges_by_switch(const char* variable, int64_t most, int64_t chosen) {
  const char* fixed = std::getenv(variable);
  if (fixed && std::strcmp(fixed, "one") == 0) return 1;
  if (fixed && std::strcmp(fixed, "threads") == 0) return most;
  return chosen;
}

}  // namespace cpu
}  // namespace sparsekern
