"""Every rule, threshold and noise margin that decides what runs, on the CPU and the GPU.

One module, so a threshold lives once, next to the run it came from (`EVIDENCE`: the stored
run under bench/results/ and the figures that set it, as data). Who reads what:

  sparsekern.ops        the backend order per device (`BACKEND_ORDER`), batch buckets
                        (`batch_bucket`), the CPU kernels' algorithm (`*_cpu_algo`, passed to
                        the C++ kernels as their `algo` argument: they do not choose again),
                        the pre-packed and derived CPU layouts (`uses_gemm_panels`,
                        `uses_column_index`), measured GPU timings (`measured_verdict`) and the
                        2:4 sparse tensor-core GEMMs' batch rule (`semi_structured_verdict`)
  sparsekern.tuning     `TUNING_NOISE` (the margin of `fastest_within` over measured medians)
  sparsekern.nn         `PATH_NOISE` (choose_path: the sparse path keeps ties within it),
                        `DENSE_COPY_MAX_BYTES` (the layers that may keep a dense copy)

The CPU kernels' algorithms (`nm_cpu_algo`, `bitmask_cpu_algo`, `block_cpu_algo`, `q_cpu_algo`,
`nm_q_cpu_algo`, `block_q_cpu_algo`) reach the C++ kernels as the `algo` argument of the
CPU-only ops (nm_linear_cpu, nm_conv2d_cpu, bitmask_linear_cpu, block_linear_cpu,
nm_linear_q_cpu, bitmask_linear_q_cpu, block_linear_q_cpu); each algorithm runs at any rows, and
the shared schemas' CPU kernels run the row kernels.

Switches for benchmarking, read per call: SPARSEKERN_NM_GEMM=tile|direct (`nm_cpu_algo`),
SPARSEKERN_BITMASK_GEMM=tile (`bitmask_cpu_algo`), SPARSEKERN_BLOCK_GEMM=tile (`block_cpu_algo`),
SPARSEKERN_NM_Q_GEMM=tile (`nm_q_cpu_algo`, `q_cpu_algo`: quantized weights above the decode rows
keep the dequantized tiles instead of the int8 GEMMs),
SPARSEKERN_Q_ACT=int8|exact (`q_activations_int8`, read by `q_cpu_algo` and `nm_q_cpu_algo`);
SPARSEKERN_NM_BF16=fma (`nm_cpu_algo`: bf16 weights on the 2:4 GEMM's fp32-FMA kernel,
NM_ALGO_GEMM_FP32, instead of the vdpbf16ps one, csrc/cpu/nm_gemm_bf16.cpp). Threading switches,
read in C++: SPARSEKERN_NM_BF16_THREADS=omp (that kernel's
threads on torch's OpenMP team instead of the chunk pool, csrc/cpu/nm_linear.cpp),
SPARSEKERN_NM_BF16_CHUNKS=shared|private (its shared passes or thread-private chunks,
csrc/cpu/nm_gemm_bf16.h private_chunks_for), SPARSEKERN_NM_BF16_RANGES=one|threads and
SPARSEKERN_INT8_RANGES=one|threads (the bf16 and int8 2:4 GEMMs' lane / batch ranges, work_ranges.h);
read once per process: SPARSEKERN_POOL=pool|omp|inline (where the kernels' parallel jobs run,
csrc/cpu/chunk_pool.cpp) and SPARSEKERN_CONTENTION=busy|quiet (fixes the verdict of whether other
processes use the cores torch's threads need, which sends the jobs to the pool and keeps libgomp's
idle workers from spinning, csrc/cpu/contention.cpp).
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple

import torch

from . import _extension, tuning


class Measured(NamedTuple):
    """Where a threshold came from: the stored run (bench/results/<run>/README.md says how
    it was measured) and the figures that set it."""

    run: str
    figures: dict


# ------------------------------------------------------------------ backend order
BACKEND_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cusparselt", "cutlass", "cuda", "triton", "reference")}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Upper edges of the batch buckets (rows of x); rows above the last share one bucket (-1).
BATCH_BUCKETS = (1, 4, 16, 64, 256)


def batch_bucket(rows: int) -> int:
    """The upper edge of the bucket `rows` falls in (BATCH_BUCKETS), or -1 above the last."""
    for edge in BATCH_BUCKETS:
        if rows <= edge:
            return edge
    return -1


def bucket_min_rows(bucket: int) -> int:
    """The fewest rows of a batch bucket (0 for the first)."""
    if bucket == -1:
        return BATCH_BUCKETS[-1] + 1
    i = BATCH_BUCKETS.index(bucket)
    return BATCH_BUCKETS[i - 1] + 1 if i else 0


# ------------------------------------------------------------------ noise margins
# Relative margins within which the earlier (preferred) candidate keeps its place.
PATH_NOISE = 0.02    # sparsekern.nn.choose_path: "sparse" wins ties with the dense paths
# How sparsekern.nn.measure_paths starts each timed call cold (part of the tuning cache's
# environment, through this file's hash: choices measured another way are not reused).
PATH_COLD_START = "CPU: the layer's weight tensors evicted from the caches; GPU: a flush buffer twice L2"
# measure_paths runs Policy.reps rounds at least, and more (up to PATH_MAX_REPS) while the
# rounds took less than PATH_MIN_MEASURE_MS per path.
PATH_MIN_MEASURE_MS = 10.0
# Policy(cold="auto"): a model whose weights (sparsekern.nn.model_footprint: each sparse layer
# at the larger of its compressed and dense sizes) fit in this fraction of the last-level
# cache is measured with each layer's weights starting there, not in memory: between two of
# its forwards they stay cached (the rest of the cache is left to activations).
WARM_MODEL_LLC_FRACTION = 0.5
PATH_MAX_REPS = 40
# Relative time added to a path's measurement before choose_path compares it. "decompress"
# makes a dense weight per call: measured alone it reuses the block the allocator just freed,
# warm in cache, while in a model it is not (EVIDENCE: alone it is the fastest path of the
# 1536x384 layer, in the model the slowest).
PATH_HANDICAP = {"decompress": 0.25}
TUNING_NOISE = 0.03  # measured GPU medians: two runs of one kernel on a lent H100 differ by about this


def fastest_within(times: dict[str, float], order: Iterable[str] = (), noise: float = TUNING_NOISE) -> str:
    """The candidate to run: the fastest time, except that the earliest of `order` within
    `noise` (relative) of the fastest keeps its place (noise is not a reason to switch)."""
    if not times:
        raise ValueError("fastest_within: no timings")
    best = min(times, key=times.get)
    for b in order:
        if b in times and times[b] <= times[best] * (1 + noise):
            return b
    return best


# ------------------------------------------------------------------ sparse modules' paths
# A sparse layer whose dense weight is at most this many bytes measures a dense copy of its
# weight per batch bucket instead of decompressing per call (sparsekern.nn.Policy
# .dense_copy_max_bytes) and keeps it where it wins: in small layers a kernel call's fixed
# cost (EVIDENCE) is a large part of the time. A memory cap, not a speed threshold (the
# measurement decides the speed): at most a 512x512 fp32 weight's bytes per layer.
DENSE_COPY_MAX_BYTES = 1 << 20

# ------------------------------------------------------------------ CPU: N:M kernels
# The algorithm argument of the CPU-only ops nm_linear_cpu / nm_conv2d_cpu (csrc/cpu/nm_linear.cpp
# kNmAlgoRows / kNmAlgoGemm / kNmAlgoTiles).
NM_ALGO_DECODE = 0  # the row kernels (in batch tiles of 16 rows above 16)
NM_ALGO_GEMM = 1    # the 2:4 weight-stationary GEMM kernel (AVX2 and AVX-512 CPUs)
NM_ALGO_TILES = 2   # the weight decompressed a tile at a time into the BLAS GEMM
NM_ALGO_GEMM_FP32 = 3  # the 2:4 GEMM's fp32 multiply-add kernel, bf16 values converted (NM_ALGO_GEMM runs
#                        bf16 weights on the vdpbf16ps kernel where the CPU has AVX512_BF16)
NM_ALGO_NAMES = {NM_ALGO_DECODE: "decode", NM_ALGO_GEMM: "2:4 GEMM", NM_ALGO_TILES: "decompressed tiles + BLAS",
                 NM_ALGO_GEMM_FP32: "2:4 GEMM, fp32 multiply-adds"}
# The row kernels of every sparse CPU op (N:M, bitmask, block) take up to this many rows; above
# it the tiles or a GEMM kernel run (the row kernels' cost grows with the rows, a GEMM's does not).
# It ends a batch bucket: the decision is made per bucket.
CPU_ROWS_MAX_ROWS = 16
assert CPU_ROWS_MAX_ROWS in BATCH_BUCKETS, "CPU_ROWS_MAX_ROWS must end a batch bucket"
# From this many rows (output pixels for nm_conv2d) 2:4 runs the GEMM kernel on AVX2/AVX-512.
# nm_linear decides by batch bucket: it must start one.
NM24_GEMM_MIN_ROWS = 17
assert NM24_GEMM_MIN_ROWS - 1 in BATCH_BUCKETS, "NM24_GEMM_MIN_ROWS must start a batch bucket"
# Whether the GEMM kernel reads the weight pre-packed (NMWeight.gemm_panels, built on first use
# and kept with the weight, 6 bytes per kept value, fp32 weights only) instead of packing it at
# every call. False keeps the memory.
CPU_GEMM_PANELS = True


def _cpu_isa(name: str) -> bool:
    return bool(_extension.BUILD_INFO.get(f"cpu_{name}_runtime"))


def nm_cpu_algo(n: int, m: int, rows: int | None, dtype: torch.dtype | None = None) -> int:
    """The CPU algorithm for an N:M product over `rows` rows (None: not known, the row
    kernels) in `dtype`. SPARSEKERN_NM_GEMM (read per call): "tile" never takes the 2:4 GEMM
    (the tiles run instead), "direct" takes it from NM24_GEMM_MIN_ROWS rows as the default does.
    SPARSEKERN_NM_BF16=fma (read per call): bf16 on the 2:4 GEMM's fp32 kernel (NM_ALGO_GEMM_FP32)."""
    if rows is None or rows <= CPU_ROWS_MAX_ROWS:
        return NM_ALGO_DECODE
    if (n, m) == (2, 4) and rows >= NM24_GEMM_MIN_ROWS and _cpu_isa("avx2") \
            and os.environ.get("SPARSEKERN_NM_GEMM") != "tile":  # portable builds keep the tiles
        if dtype == torch.bfloat16 and os.environ.get("SPARSEKERN_NM_BF16") == "fma":
            return NM_ALGO_GEMM_FP32
        return NM_ALGO_GEMM
    return NM_ALGO_TILES


def uses_gemm_panels(algo: int, dtype: torch.dtype) -> bool:
    """Whether the CPU GEMM kernel gets NMWeight.gemm_panels. Not under torch.compile: a
    traced graph holds no cache, so it would pack the weight at every call."""
    # fp32 only: the layout holds fp32 values, 1.5x a dense bf16/fp16 weight's bytes.
    return algo == NM_ALGO_GEMM and CPU_GEMM_PANELS and dtype == torch.float32 and \
        not torch.compiler.is_compiling()


# ------------------------------------------------------------------ CPU: quantized kernels
# nm_linear_q_cpu / bitmask_linear_q_cpu / block_linear_q_cpu's `algo` (csrc/cpu/rows_q.h kQAlgo*):
# Each runs at any rows (the kernels do not choose by the rows); q_cpu_algo / nm_q_cpu_algo /
# block_q_cpu_algo choose by them.
Q_ALGO_EXACT = 0     # x in fp32, the int8/int4 weights dequantized in registers by the decode row
#                      kernels (in batch tiles of 16 rows): exact products. Chosen up to 16 rows
Q_ALGO_INT8_ACT = 1  # each row of x quantized to int8 first (symmetric, one scale per row, as
#                      torch's dynamic quantization does), then integer dot products (VNNI) in the
#                      decode row kernels (batch tiles of 16 rows). Chosen up to 16 rows
Q_ALGO_INT8_DOT = 2  # 2:4 int8 or int4 weights: x quantized per row, the int8 dot-product GEMM
#                      (csrc/cpu/nm_gemm_int8.h; int4 nibbles expanded to int8 in registers,
#                      int32 sums per scale group). rows_q.h kQAlgoInt8Dot mirrors it.
Q_ALGO_INT8_EXPAND = 3  # int8 values of any other N:M and of the bitmask: x quantized per row, the
#                         values expanded into a dense int8 weight for the call, torch's int8 GEMM
#                         (torch._int_mm: oneDNN's VNNI kernels), then the scales. Dense work, but
#                         integer: bench/results/cpu-models-20261206d ran 70% int8 prefill on the
#                         fp32 tiles at 0.2x torch's dynamic int8 (and 0.87x dense fp32).
Q_ALGO_EXACT_TILES = 4  # x in fp32, the weight dequantized a tile of output rows at a time into the
#                         BLAS GEMM: exact products. Chosen above 16 rows where no int8 GEMM applies
Q_ALGO_NAMES = {Q_ALGO_EXACT: "fp32 activations", Q_ALGO_INT8_ACT: "int8 activations (integer dot products)",
                Q_ALGO_INT8_DOT: "2:4 int8 dot-product GEMM",
                Q_ALGO_INT8_EXPAND: "int8 values expanded + torch's int8 GEMM",
                Q_ALGO_EXACT_TILES: "fp32 activations, dequantized tiles + BLAS"}
# The algorithms that multiply x in floats (where q_activations_int8 holds, the ops round x
# per row first, so every path carries that rounding).
Q_ALGOS_FLOAT_X = (Q_ALGO_EXACT, Q_ALGO_EXACT_TILES)
# The value precisions (bits) the 2:4 int8 dot-product GEMM runs.
NM24_INT8_DOT_BITS = (8, 4)
# Up to this many rows the quantized ops run the decode row kernels (Q_ALGO_EXACT /
# Q_ALGO_INT8_ACT), above it a GEMM (the int8 ones or Q_ALGO_EXACT_TILES): the rows every sparse
# CPU op's row kernels take before the tiles (was linear_q.cpp's own `B > kDirectMaxBatch`).
Q_DECODE_MAX_ROWS = CPU_ROWS_MAX_ROWS

# Whether int8 activations are the default for quantized weights' decode where the CPU has
# AVX512_VNNI (its vpdpbusd kernels; the AVX2 and portable integer loops are not measured to
# win, so those CPUs keep the exact path). They round each x row to 255 levels, as torch's
# quantize_dynamic does (per tensor there), and read a quarter of the bytes of x per kept
# value, so the decode kernels stream the weight bytes at about torch's int8 rate instead of
# a fraction of it; bench/bench_decode_q.py measures both. SPARSEKERN_Q_ACT=exact keeps the
# exact products.
Q_INT8_ACT_DEFAULT = True

# From this many rows 2:4 int8 and int4 weights run the int8 dot-product GEMM where the CPU has
# AVX512_VNNI (a batch bucket's first row count: the decision is made per bucket).
NM24_INT8_DOT_MIN_ROWS = 17
assert NM24_INT8_DOT_MIN_ROWS - 1 in BATCH_BUCKETS, "NM24_INT8_DOT_MIN_ROWS must start a batch bucket"


def q_activations_int8(device: torch.device) -> bool:
    """Whether nm_linear_q / bitmask_linear_q multiply activations rounded per row to int8 on
    `device`, on every path, so a layer's numbers do not depend on the path or batch size its
    dispatch picks: the integer kernels quantize x themselves; the others (the tiles, a
    module's dense copy, the reference backend, the training forward) multiply
    precisions.round_activation_rows(x). SPARSEKERN_Q_ACT (read per call): "int8" yes, "exact"
    no (activations in their float dtype, exact products; the int8 GEMMs are then not used
    either); unset: on a CPU Q_INT8_ACT_DEFAULT where it has AVX512_VNNI, on a GPU no (other
    devices: no, the setting not read). A GPU
    multiplies int8 activations only when asked: then 2:4 int8 weights run on the int8 sparse
    tensor cores above the decode rows (cuSPARSELt, sparsekern/semi_structured.py), the other
    paths on x rounded as that GEMM rounds it."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        return False
    choice = os.environ.get("SPARSEKERN_Q_ACT")
    if choice is not None and choice not in ("int8", "exact"):
        raise ValueError(f"SPARSEKERN_Q_ACT must be 'int8' or 'exact', got {choice!r}")
    if kind == "cuda" or choice is not None:
        return choice == "int8"
    return bool(Q_INT8_ACT_DEFAULT and _extension.BUILD_INFO.get("cpu_avx512_vnni_runtime"))


def q_cpu_algo(rows: int | None, bits: int = 8) -> int:
    """The CPU algorithm of nm_linear_q / bitmask_linear_q over `rows` rows of x (None: not
    known, the decode rows) with `bits`-bit values. Up to Q_DECODE_MAX_ROWS rows the decode row
    kernels: int8 activations where q_activations_int8 holds, else x in fp32. Above them, int8
    values expanded for torch's int8 GEMM (Q_ALGO_INT8_EXPAND) where q_activations_int8 holds
    and the CPU has AVX512_VNNI; elsewhere (exact products, int4 values, whose scales change
    along a row, SPARSEKERN_NM_Q_GEMM=tile) the dequantized tiles into BLAS (Q_ALGO_EXACT_TILES,
    which then multiply the rounded x where q_activations_int8 holds).
    nm_q_cpu_algo puts 2:4 weights on their own int8 GEMM first."""
    decode = rows is None or rows <= Q_DECODE_MAX_ROWS
    if not q_activations_int8(torch.device("cpu")):
        return Q_ALGO_EXACT if decode else Q_ALGO_EXACT_TILES
    if decode:
        return Q_ALGO_INT8_ACT
    if (bits == 8 and _extension.BUILD_INFO.get("cpu_avx512_vnni_runtime")
            and os.environ.get("SPARSEKERN_NM_Q_GEMM") != "tile"):
        return Q_ALGO_INT8_EXPAND
    return Q_ALGO_EXACT_TILES


def block_q_cpu_algo(rows: int | None) -> int:
    """The CPU algorithm of block_linear_q (int8 values) over `rows` rows of x: q_cpu_algo's
    where the block kernels have it (the int8 GEMM over the expanded values, the dequantized
    tiles), else x in fp32 through the block row kernel (it has no int8-activation kernel: the
    op rounds x first where q_activations_int8 holds)."""
    algo = q_cpu_algo(rows)
    return Q_ALGO_EXACT if algo == Q_ALGO_INT8_ACT else algo


def nm_q_cpu_algo(n: int, m: int, bits: int, rows: int | None) -> int:
    """The CPU algorithm of nm_linear_q over `rows` rows (None: not known, the decode rule).
    2:4 int8 and int4 weights (NM24_INT8_DOT_BITS) from NM24_INT8_DOT_MIN_ROWS rows take the
    int8 dot-product GEMM where the CPU has AVX512_VNNI; SPARSEKERN_NM_Q_GEMM=tile (read per
    call) keeps the dequantized tiles into BLAS (for benchmarking). The int8 GEMM quantizes x
    per row (nm_gemm_int8.h), as torch's dynamic quantization does per tensor: its result
    differs from the dequantized weight's by that rounding. Otherwise q_cpu_algo (other int8
    N:M weights above the decode rows: the expanded int8 weight)."""
    if ((n, m) == (2, 4) and bits in NM24_INT8_DOT_BITS and rows is not None and rows >= NM24_INT8_DOT_MIN_ROWS
            and _extension.BUILD_INFO.get("cpu_avx512_vnni_runtime")  # AVX2 and portable builds: tiles
            and q_activations_int8(torch.device("cpu"))
            and os.environ.get("SPARSEKERN_NM_Q_GEMM") != "tile"):
        return Q_ALGO_INT8_DOT
    return q_cpu_algo(rows, bits)


# ------------------------------------------------------------------ CPU: bitmask kernels
# The CPU bitmask kernels read the column of each kept value (BitmaskWeight.column_index,
# 2 bytes per kept value) instead of the mask up to these densities, per batch bucket.
COLUMN_INDEX_MAX_DENSITY = {1: 0.2, 4: 0.1, 16: 0.2, 64: 0.2}  # AVX-512: batch bucket -> density
COLUMN_INDEX_MAX_DENSITY_AVX2 = {1: 0.5, 4: 0.5}              # AVX2 only (gathers of x)


def uses_column_index(device: torch.device, dtype: torch.dtype, bucket: int, density: float, in_features: int,
                      max_in: int) -> bool:
    """Whether bitmask_linear on the C++ backend passes BitmaskWeight.column_index (max_in:
    the largest in_features its 16-bit columns address)."""
    if not (device.type == "cpu" and dtype in KERNEL_DTYPES and in_features <= max_in):
        return False
    if _extension.BUILD_INFO.get("cpu_avx512_runtime"):
        limits = COLUMN_INDEX_MAX_DENSITY
    elif _extension.BUILD_INFO.get("cpu_avx2_runtime"):
        limits = COLUMN_INDEX_MAX_DENSITY_AVX2
    else:
        return False
    return bucket in limits and density <= limits[bucket]


# The algorithm argument of the CPU-only op bitmask_linear_cpu (csrc/cpu/bitmask_linear.cpp
# kBitmaskAlgo*).
BITMASK_ALGO_DECODE = 0  # the row kernels: on AVX-512 the expanding loads (row-major x) for a batch of
#                          up to 4 rows, else the broadcast lanes kernels (in batch tiles of 16 rows)
BITMASK_ALGO_TILES = 1   # the weight decompressed a tile at a time into the BLAS GEMM
BITMASK_ALGO_GEMM = 2    # the AVX-512 weight-stationary kernel (one multiply-add per kept value, 16 lanes)
BITMASK_ALGO_DECODE_EXPAND8 = 3  # the row kernels with the AVX-512 expanding loads for a batch of up to
#                                  8 rows (AVX-512 CPUs only), else as BITMASK_ALGO_DECODE
BITMASK_ALGO_DECODE_B1_INDEXED = 4  # as BITMASK_ALGO_DECODE, and one row runs the AVX-512 indexed kernel
#                                     (per 64-column word, shuffles instead of expanding loads)
BITMASK_ALGO_NAMES = {BITMASK_ALGO_DECODE: "decode", BITMASK_ALGO_TILES: "decompressed tiles + BLAS",
                      BITMASK_ALGO_GEMM: "weight-stationary GEMM",
                      BITMASK_ALGO_DECODE_EXPAND8: "decode, AVX-512 expanding loads up to 8 rows",
                      BITMASK_ALGO_DECODE_B1_INDEXED: "decode, the one-row indexed kernel"}
# Up to CPU_ROWS_MAX_ROWS rows on AVX-512, weights keeping at least this fraction run the
# expanding loads up to 8 rows (BITMASK_ALGO_DECODE_EXPAND8) rather than up to 4: at 5-8 rows
# they beat the broadcast lanes kernel above it (EVIDENCE). The rows decide within the bucket
# (5-8 of the 5-16 rows of batch bucket 16), so the kernel gets the rule as its algorithm.
BITMASK_EXPAND_8_MIN_DENSITY = 0.2
# One row on AVX-512, weights keeping at most this fraction run the indexed kernel
# (BITMASK_ALGO_DECODE_B1_INDEXED) rather than the expanding loads (EVIDENCE).
BITMASK_B1_INDEXED_MAX_DENSITY = 0.25
# Above CPU_ROWS_MAX_ROWS rows, weights denser than this run the tiles (a dense GEMM over
# decompressed tiles beats rows/16 sparse passes), sparser ones the row kernels.
BITMASK_TILES_MIN_DENSITY = 0.25
# The weight-stationary kernel from this many rows (a bucket start) up to this density: at
# 20-64 rows it led every other algorithm at 20-50% kept on MiniLM's, BERT-base's and a
# 4096x4096 layer (0.82-2.9x dense; under 1x only at 20 rows, 50% kept, 384x1536 and
# 384x384), where the tiles ran 0.49-1.2x; at 17 rows the row kernels led it by 5-20%
# (EVIDENCE). In a bucket where the row kernels read the column index
# (COLUMN_INDEX_MAX_DENSITY), weights that sparse keep them. SPARSEKERN_BITMASK_GEMM=tile
# (read per call, a benchmarking switch) turns it off.
BITMASK_GEMM_MIN_ROWS = 17
BITMASK_GEMM_MAX_DENSITY = 0.5
assert BITMASK_GEMM_MIN_ROWS - 1 in BATCH_BUCKETS, "BITMASK_GEMM_MIN_ROWS must start a batch bucket"


def bitmask_cpu_algo(rows: int | None, density: float) -> int:
    """The CPU algorithm for a bitmask product over `rows` rows (None: not known, the row
    kernels) of a weight keeping `density` of its entries. Up to CPU_ROWS_MAX_ROWS rows the row
    kernels, with the AVX-512 expanding loads up to 8 rows from BITMASK_EXPAND_8_MIN_DENSITY
    (up to 4 below it) and one row indexed up to BITMASK_B1_INDEXED_MAX_DENSITY; above, the
    weight-stationary GEMM, the tiles or the row kernels."""
    if rows is None:
        return BITMASK_ALGO_DECODE
    if rows <= 1 and density <= BITMASK_B1_INDEXED_MAX_DENSITY and _cpu_isa("avx512"):  # bucket 1 (0 or 1 rows)
        return BITMASK_ALGO_DECODE_B1_INDEXED
    if rows <= CPU_ROWS_MAX_ROWS:
        if density >= BITMASK_EXPAND_8_MIN_DENSITY and _cpu_isa("avx512"):
            return BITMASK_ALGO_DECODE_EXPAND8
        return BITMASK_ALGO_DECODE
    if rows >= BITMASK_GEMM_MIN_ROWS and density <= BITMASK_GEMM_MAX_DENSITY and _cpu_isa("avx512") \
            and density > COLUMN_INDEX_MAX_DENSITY.get(batch_bucket(rows), 0.0) \
            and os.environ.get("SPARSEKERN_BITMASK_GEMM") != "tile":
        return BITMASK_ALGO_GEMM
    return BITMASK_ALGO_TILES if density > BITMASK_TILES_MIN_DENSITY else BITMASK_ALGO_DECODE


# ------------------------------------------------------------------ CPU: block kernels
# The algorithm argument of the CPU-only op block_linear_cpu (csrc/cpu/block_linear.cpp
# kBlockAlgo*).
BLOCK_ALGO_DECODE = 0    # the row kernels, one block row at a time (in batch tiles of 16 rows above 16)
BLOCK_ALGO_ROW_GEMM = 1  # per block row, one BLAS GEMM over its kept blocks only
BLOCK_ALGO_TILES = 2     # the weight decompressed a tile at a time into the BLAS GEMM
BLOCK_ALGO_NAMES = {BLOCK_ALGO_DECODE: "decode", BLOCK_ALGO_ROW_GEMM: "per-block-row GEMMs",
                    BLOCK_ALGO_TILES: "decompressed tiles + BLAS"}
# Above CPU_ROWS_MAX_ROWS rows: the per-block-row GEMMs up to this fraction of blocks kept, the
# tiles above it. SPARSEKERN_BLOCK_GEMM=tile (read per call, a benchmarking switch) forces the tiles.
BLOCK_ROW_GEMM_MAX_DENSITY = 0.3


def block_cpu_algo(rows: int | None, density: float) -> int:
    """The CPU algorithm for a block (BSR) product over `rows` rows (None: not known, the row
    kernels) of a weight keeping `density` of its blocks."""
    if rows is None or rows <= CPU_ROWS_MAX_ROWS:
        return BLOCK_ALGO_DECODE
    if density <= BLOCK_ROW_GEMM_MAX_DENSITY and os.environ.get("SPARSEKERN_BLOCK_GEMM") != "tile":
        return BLOCK_ALGO_ROW_GEMM
    return BLOCK_ALGO_TILES


# ------------------------------------------------------------------ GPU
# The CUDA decode kernels (csrc/cuda/nm_linear.cu, bitmask_linear.cu) run any batch in tiles
# of 8 to 32 rows, reading the weight once per tile. Above these many rows, unless the GPU
# timing table (sparsekern.tuning) measured otherwise, the dispatch passes over them for the
# next backend (BACKEND_ORDER: Triton, then the reference's GEMM on the decompressed weight,
# cuBLAS). Batch bucket edges: a decision per bucket. A guess until measured (the kernels
# decided 64 and 32 rows inside C++ before, never run on a GPU).
CUDA_DECODE_MAX_ROWS = {"nm_linear": 64, "bitmask_linear": 16}
assert all(v in BATCH_BUCKETS for v in CUDA_DECODE_MAX_ROWS.values()), "CUDA_DECODE_MAX_ROWS must end a batch bucket"


def cuda_decode_verdict(op: str, bucket: int | None) -> str | None:
    """Why the CUDA decode kernel of `op` should not run a batch of this bucket (None: it
    should, or the op has no such limit)."""
    limit = CUDA_DECODE_MAX_ROWS.get(op)
    if limit is None or bucket is None or (bucket != -1 and bucket <= limit):
        return None
    return (f"{_bucket_text(bucket)}: above {limit} rows the decode kernel reads the weight once per batch tile; "
            "a GEMM on the decompressed weight runs it (dispatch_rules.CUDA_DECODE_MAX_ROWS)")


# Batch buckets that go to the 2:4 sparse tensor-core GEMMs (cuSPARSELt, CUTLASS) when nothing
# was measured: rows > 64. Below, the decode kernel reads the weight once for all rows; the
# GEMMs tile for large M and leave most of a tensor-core tile empty (a guess until measured).
SEMI_STRUCTURED_BUCKETS = (256, -1)


def measured_verdict(op: str, backend: str, device_name: str, dtype, bucket: int | None, shape,
                     order: Iterable[str] = ()) -> str | None:
    """Why the measured timings (sparsekern.tuning) pass over `backend` for this key, or None
    (not measured, no batch bucket, or it measured fastest within TUNING_NOISE)."""
    if bucket is None:
        return None
    med = tuning.lookup(op, device_name, dtype, bucket, shape)
    if not med or backend not in med or fastest_within(med, order) == backend:
        return None
    times = ", ".join(f"{b} {t:.4f} ms" for b, t in sorted(med.items(), key=lambda kv: kv[1]))
    return f"measured slower on {device_name} for this batch bucket ({times})"


def cuda_kernel_verdict(op: str, device_name: str, dtype, bucket: int | None, shape,
                        order: Iterable[str] = ()) -> str | None:
    """Why the compiled CUDA kernel should not run this key: where the timing table measured
    the key, its verdict (measured_verdict); elsewhere the decode kernels' batch limit
    (cuda_decode_verdict). None: it should run."""
    if bucket is not None and tuning.lookup(op, device_name, dtype, bucket, shape):
        return measured_verdict(op, "cuda", device_name, dtype, bucket, shape, order)
    return cuda_decode_verdict(op, bucket)


def _bucket_text(bucket: int) -> str:
    return "rows above 256" if bucket == -1 else f"rows <= {bucket}"


def semi_structured_verdict(op: str, backend: str, device_name: str, dtype, bucket: int, shape,
                            order: Iterable[str] = ()) -> str | None:
    """None when a 2:4 sparse tensor-core GEMM (that can run) should run: measured fastest for
    the key, or, unmeasured, a bucket of SEMI_STRUCTURED_BUCKETS; else why not."""
    med = tuning.lookup(op, device_name, dtype, bucket, shape)
    if med and backend in med and fastest_within(med, order) == backend:
        return None
    measured = measured_verdict(op, backend, device_name, dtype, bucket, shape, order)
    if measured is not None:
        return measured
    if bucket not in SEMI_STRUCTURED_BUCKETS:
        return (f"batch bucket {_bucket_text(bucket)}: the decode kernel reads the weight once for all rows "
                f"(2:4 GEMMs from 65 rows until measured otherwise)")
    return None


# ------------------------------------------------------------------ where each came from
EVIDENCE: dict[str, Measured] = {
    # The AVX2 16-row-tile GEMM lost to MKL's AVX-512 GEMM; the 16-lane AVX-512 kernel beats
    # the AVX-512 tiles at every shape and batch measured from 32 rows (bench/bench_cpu_gemm.py).
    "NM24_GEMM_MIN_ROWS": Measured("bench/results/cpu-gemm-20261128d", {
        "avx2 kernel vs MKL AVX-512 (earlier run cpu-gemm-20261128)": 0.73,
        "shape": "4096x4096 fp32, 2 threads, 128 rows"}),
    # In-process interleaved, weights streaming from memory: pre-packed vs packing per call.
    "CPU_GEMM_PANELS": Measured("bench/results/cpu-gemm-20261128e", {
        "128 rows, Llama-style 2048x2048/5632x2048/2048x5632 and 4096x4096, x dense": {
            "packing per call": (0.95, 1.30), "pre-packed": (1.16, 1.48)},
        "788 rows (ViT-B's layers), x dense": {"packing per call": (0.90, 1.02), "pre-packed": (0.97, 1.06)},
        "extra bytes": "6 per kept value (0.75x a dense fp32 weight)"}),
    # 4096x4096 fp32 rotated over 24-40 weights, 2 threads, interleaved with the mask kernels:
    # column index / mask kernel speed at 10% / 20% kept (30% kept in the last entry).
    "COLUMN_INDEX_MAX_DENSITY": Measured("bench/results/cpu-linear-20261128g", {
        "rows 1": (1.30, 1.19), "rows 2": (2.0, 1.00), "rows 4": (1.22, 0.70), "rows 8": (2.06, 1.44),
        "rows 16": (2.18, 2.04), "rows 32": (2.33, 1.65), "30% kept, rows 1/2/4": (1.03, 1.66, 0.99)}),
    # SPARSEKERN_CPU_ISA=avx2, same setup: column index / mask kernel at 10%, 20%, 30%, 50% kept.
    "COLUMN_INDEX_MAX_DENSITY_AVX2": Measured("bench/results/cpu-avx2-linear-20261128b", {
        "rows 1": (3.59, 2.20, 1.91, 1.47), "rows 4": (1.90, 1.60, 1.39, 1.44)}),
    # 2:4 int8 weights above 16 rows: the int8 dot-product GEMM against the dequantized tiles
    # into MKL (the path before), interleaved, Llama prefill and ViT-B batch 4 shapes
    # (bench/bench_cpu_gemm_int8.py; the lowest ratio over the six shapes, one thread and two).
    "NM24_INT8_DOT_MIN_ROWS": Measured("bench/results/cpu-gemm-int8-20261206", {
        "int8 GEMM / dequantized tiles, 128x2048x2048 ... 788x3072x768, 1 thread": (5.8, 7.9, 7.2, 8.5, 7.8, 5.2),
        "same, 2 threads (a loaded machine)": (2.7, 6.2, 5.1, 2.5, 3.3, 3.3),
        "17x2048x2048, 64x2048x2048, 17x768x3072, 1 thread": (29, 24, 19)}),
    # 2:4 int4 weights above 16 rows take the same GEMM (nibbles expanded in registers, scales
    # per group): it against the dequantized tiles into MKL and against dense fp32, interleaved
    # (bench/bench_cpu_gemm_int8.py --tiles), Llama prefill shapes.
    "NM24_INT8_DOT_BITS": Measured("bench/results/cpu-gemm-int4-20261206", {
        "int4 GEMM / int4 tiles, 128x2048x2048, 128x2048x5632, 128x5632x2048, 1 thread":
            {"g32": (8.1, 8.6, 8.4), "g128": (9.1, 9.2, 9.2)},
        "int4 tiles / dense fp32, same": {"g32": (0.58, 0.65, 0.63), "g128": (0.59, 0.66, 0.63)},
        "int4 g128 GEMM / torch int8 dynamic, same": (1.22, 1.27, 1.28)}),
    # The row kernels against the tiles and GEMMs (the old kDirectMaxBatch in csrc/cpu/sparse_rows.h).
    "CPU_ROWS_MAX_ROWS": Measured("not stored as a run (figures moved from csrc/cpu/sparse_rows.h)", {}),
    "BITMASK_TILES_MIN_DENSITY": Measured("not stored as a run (moved from csrc/cpu/sparse_rows.h kGemmMinDensity)",
                                          {}),
    # fp32, 2 threads, weights rotated from memory, x dense (same loop): the weight-stationary
    # GEMM against the tiles the bucket ran before and the best row kernel. (The figures it
    # replaced, from csrc/cpu/bitmask_linear.cpp, gave it 0.7x dense at 17-32 rows on a
    # 4096x4096 30% weight; it runs 1.57-2.11x there now.) At 20% kept or less, the row
    # kernels reading the column index led it at 17 rows and tied at 32 (low-density/).
    "BITMASK_GEMM_MIN_ROWS": Measured("bench/results/cpu-bitmask-algos-20261207", {
        "384x1536, 50% kept": {"rows 20": {"weight-stationary": 0.82, "tiles": 0.80, "rows": 0.53},
                               "rows 46": {"weight-stationary": 1.07, "tiles": 0.90, "rows": 0.67}},
        "1536x384, 30% kept": {"rows 17": {"weight-stationary": 1.63, "tiles": 1.06, "rows": 1.87},
                               "rows 32": {"weight-stationary": 2.23, "tiles": 1.21, "rows": 2.01}},
        "4096x4096, 30% kept (large/)": {"rows 17": {"weight-stationary": 1.57, "tiles": 0.85, "rows": 1.70},
                                          "rows 32": {"weight-stationary": 2.11, "tiles": 0.89, "rows": 1.62}},
        "384x1536, 10% kept (low-density/)": {"rows 17": {"weight-stationary": 1.34, "rows, column index": 2.28},
                                              "rows 32": {"weight-stationary": 1.70, "rows, column index": 1.72},
                                              "rows 64": {"weight-stationary": 2.09, "rows, column index": 1.34}}}),
    # One row, the indexed kernel against the expanding loads (figures moved from the comment beside it).
    "BITMASK_B1_INDEXED_MAX_DENSITY": Measured(
        "not stored as a run (moved from csrc/cpu/sparse_rows_avx512.cpp kB1IndexedMaxDensity)", {
            "4096x4096 fp32 streamed from memory, 2 threads, ms: indexed / expanding loads":
                {"10% kept": (0.89, 1.75), "20% kept": (1.33, 1.69), "30% kept": "even"}}),
    # 4096x4096 fp32, 2 threads, 5-8 rows: ms per call of the AVX-512 expanding-load kernel and
    # the AVX2 broadcast lanes kernel (figures moved from the comment beside it).
    "BITMASK_EXPAND_8_MIN_DENSITY": Measured(
        "not stored as a run (moved from csrc/cpu/bitmask_linear.cpp kAvx512MinDensity)", {
            "30% kept": {"expanding loads": 4.6, "broadcast lanes": 7.3},
            "10% kept": {"expanding loads": 4.3, "broadcast lanes": 3.9}}),
    "BITMASK_GEMM_MAX_DENSITY": Measured("not stored as a run (figures moved from csrc/cpu/bitmask_linear.cpp)", {
        "70% kept, 128 rows, vs dense": {"weight-stationary": 0.66, "tiles": 0.79}}),
    # 4096x4096 fp32 32x32 blocks, 2 threads, 128 rows: ms per call (moved from csrc/cpu/block_linear.cpp).
    "BLOCK_ROW_GEMM_MAX_DENSITY": Measured("not stored as a run (figures moved from csrc/cpu/block_linear.cpp)", {
        "10% kept": {"per-block-row GEMMs": 15, "tiles": 26}}),
    "SEMI_STRUCTURED_BUCKETS": Measured("not measured yet (bench/gpu_check.sh measures it)", {}),
    "CUDA_DECODE_MAX_ROWS": Measured("not measured yet (moved from csrc/cuda kDecodeMaxRows; bench/gpu_check.sh "
                                     "times the CUDA kernels per batch bucket)", {}),
    "TUNING_NOISE": Measured("not stored yet (two runs of one kernel on a lent H100)", {"spread": 0.03}),
    "PATH_NOISE": Measured("bench/results/cpu-models-20261128q", {"margin": 0.02}),
    # all-MiniLM-L6-v2 2:4, 20 rows, 2 threads (bench/bench_path_measurement.py): ms per call of
    # each path in the model (layers forced onto it, the model run whole) and alone (the
    # fastest of 5 rounds, min-max over 5 trials) with each cold start.
    "PATH_COLD_START": Measured("bench/results/cpu-paths-20261206", {
        "384x384 sparse / dense copy": {"in the model": (0.127, 0.110), "alone, weights evicted":
                                        ((0.118, 0.175), (0.097, 0.111)),
                                        "alone, flush buffer": ((0.306, 0.337), (0.193, 0.225))}}),
    "PATH_MIN_MEASURE_MS": Measured("bench/results/cpu-paths-20261206", {
        "384x384 sparse, alone, weights evicted": {"5 rounds": (0.118, 0.175), "adaptive": (0.116, 0.118)}}),
    "WARM_MODEL_LLC_FRACTION": Measured("bench/results/demo-digits-20261207b", {
        "digits MLP, 64 images, rows l1 70% / 2:4 x dense": {"measured from memory (CI demos)": ((0.56, 0.90), (0.50, 0.99)),
                                                             "from the last-level cache": (0.94, 0.98)},
        "digits CNN 2:4 x dense": {"from memory": (1.0, 1.1), "from the last-level cache": 1.2}}),
    "PATH_MAX_REPS": Measured("bench/results/cpu-paths-20261206", {
        "rounds of a 0.1 ms layer within PATH_MIN_MEASURE_MS x 3 paths": "about 40"}),
    "PATH_HANDICAP": Measured("bench/results/cpu-paths-20261206", {
        "1536x384 sparse / decompress": {"in the model": (0.375, 0.407),
                                         "alone, weights evicted": ((0.346, 0.359), (0.331, 0.335))}}),
    # A memory cap (which layers may keep a dense copy), not a speed threshold: the per-bucket
    # measurement decides whether the copy runs. Per-call CPU time in us, 64x256 fp32, 1 row,
    # 1 thread (thread clock, busy machine), after the cached call per input shape:
    "DENSE_COPY_MAX_BYTES": Measured("bench/results/cpu-overhead-20261206-percall", {
        "F.linear": 3.6, "nn.Linear": 6.4, "2:4 kernel / module": (5.9, 9.5),
        "bitmask 30% kernel / module": (6.4, 9.9), "block kernel / module": (12.5, 16.4),
        "module with its dense copy": 7.2}),
    # Not a measured edge: the rows every CPU row kernel takes before the tiles (CPU_ROWS_MAX_ROWS).
    "Q_DECODE_MAX_ROWS": Measured("not stored as a run (moved from csrc/cpu/linear_q.cpp and block_linear.cpp "
                                  "`B > kDirectMaxBatch`; the row kernels' CPU_ROWS_MAX_ROWS)", {}),
    # The int8 algorithm's speed at batch 1 against the exact one (figures: x torch int8
    # dynamic, one thread, CPU time, a shared machine).
    "Q_INT8_ACT_DEFAULT": Measured("bench/results/cpu-decode-q-20261206", {
        "decode step, x torch int8 dynamic (exact, int8 activations)": {
            "2:4 int8": (0.97, 1.40), "70% int8": (0.32, 1.47), "2:4 int4 g128": (0.87, 2.06)}}),
}
