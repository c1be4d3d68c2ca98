#!/usr/bin/env bash
# One script for a lent GPU machine: build for the local GPU, run the CUDA tests, run
# compute-sanitizer on a small case, run the GPU benchmarks. Everything goes to OUT_DIR
# (logs, JSON, the compiler's resource report); the last lines printed are a summary.
#
#   bench/gpu_check.sh OUT_DIR            (e.g. bench/gpu_check.sh "$OUT" on the device)
#
# Everything is written to a work folder and packed into OUT_DIR/gpu_check.tgz (the device
# tool returns at most 8 files), with the summary log beside it. Unpack it under
# bench/results/<card>-<date>/ and commit (the files name card, torch, commit, date).
set -uo pipefail
FINAL=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$FINAL"
OUT=$(mktemp -d)
trap 'tar -czf "$FINAL/gpu_check.tgz" -C "$OUT" . ; cp "$OUT/summary.log" "$FINAL/" 2>/dev/null' EXIT
exec > >(tee "$OUT/summary.log") 2>&1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} SPARSEKERN_CUDA_ARCHS=${SPARSEKERN_CUDA_ARCHS:-90a} SPARSEKERN_REQUIRE_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() { echo "::: $1"; }

step "environment"
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/env.log" 2>&1

step "build (archs $SPARSEKERN_CUDA_ARCHS, $MAX_JOBS jobs)"
start=$(date +%s)
# -Xptxas=-v: the compiler's resource report (registers, spills, shared memory) lands in the log.
if ! SPARSEKERN_NVCC_EXTRA="-Xptxas=-v" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/resource_usage.txt" || true
$PY -m sparsekern info | tee "$OUT/info.log"

step "tests (CUDA parameters enabled)"
$PY -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"

step "compute-sanitizer on a small case"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  "$SAN" --tool memcheck --error-exitcode 9 $PY bench/sanitize_case.py > "$OUT/sanitizer.log" 2>&1 || status=1
  tail -3 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"; status=1
fi

step "benchmarks"
# decode sweep (CUDA C++, Triton, cuBLAS, torch 2:4), then fused mask generation and a short
# kernel sweep through the suite (CSV/JSON/plots in $OUT/suite)
$PY bench/bench_gpu_linear.py --out "$OUT/gpu_linear.json" > "$OUT/bench_gpu_linear.log" 2>&1 || status=1
$PY -m sparsekern bench --device cuda --suite masks --no-progress --out "$OUT/suite_masks" > "$OUT/bench_masks.log" 2>&1 || status=1
$PY -m sparsekern bench --device cuda --suite kernels --quick --no-progress --out "$OUT/suite_kernels" > "$OUT/bench_kernels.log" 2>&1 || status=1
tail -60 "$OUT/bench_gpu_linear.log"
grep -A8 "Mask generation" "$OUT/bench_masks.log" || true
echo "gpu_check: exit $status"
exit $status
