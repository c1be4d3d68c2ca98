#!/usr/bin/env bash
# The GPU check for a short lease (one H100/H200, 16 cores): build, test, smoke, sanitize and
# measure in at most 8 minutes, every step under its own `timeout`, every result written into
# OUT_DIR as the step runs (a kill loses nothing), at most 8 files, no sub-folders.
#
#   bench/gpu_check.sh OUT_DIR             on the lent machine (e.g. bench/gpu_check.sh "$OUT")
#   bench/gpu_check.sh --dry-run OUT_DIR   here, no GPU: every step with a CPU stand-in (< 2 min; CI)
#
# Steps (timeout in seconds; each is cut to what is left of the whole-run budget). The timeouts
# add up to 420 s of the 470 s budget: 50 s spare, which covers the 5 s grace (`--kill-after`)
# of every step that overruns; a slow step costs only its own results, never a later step's.
#   env        20  nvidia-smi (read only), versions, tools (cold torch + Triton import)  -> summary.log
#   build     120  sm_90a only, 16 jobs, -Xptxas=-v resource report,       -> build.log
#                  parsed into a table (bench/ptxas_report.py; spills fail)
#                  A failed build skips the CUDA C++ parts; Triton still runs.
#   tests      90  first the GPU kernel files (test_gpu_kernels, test_cusparselt, test_triton,
#                  test_gpu_dispatch, test_gpu_triton), then every other test with "cuda", "gpu"
#                  or "cusparselt" in its id; never the "cuda-reference" cases (plain torch on
#                  CUDA); no -x, 8 workers when xdist is there, -v (a result per line as it ends)
#                                                                           -> tests.log
#   smoke      45  edge shapes against fp64 (bench/gpu_smoke.py --budget-s) -> smoke.log
#   sanitizer  45  compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, every CUDA
#                  and Triton kernel, a line per case (bench/sanitize_case.py --budget-s)
#                                                                           -> sanitizer.log
#   bench     100  decode + large batch with peers + masked + Llama e2e (bench/bench_gpu_linear.py)
#                                                  -> bench.log, bench.json, tuning.json
#   ncu       (optional, only with >= 45 s left) Nsight Compute on the two decode kernels at
#                  batch 1                                                  -> bench.log
# The last lines printed are the summary (also summary.log). Exit status: 0 when every step
# that ran passed. Unpack OUT_DIR under bench/results/<card>-<date>/ and commit it.
#
# GPU_CHECK_SLOW_STEP=name:seconds[,name:seconds] makes those steps sleep that long before their
# command (inside the step's timeout): a simulated slow step, to see that the later steps still
# run and report (e.g. GPU_CHECK_SLOW_STEP=tests:999 bench/gpu_check.sh --dry-run /tmp/gc).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
BUDGET=${GPU_CHECK_BUDGET_S:-470}     # the whole run; 8 minutes is 480
DRY_LIMIT=120                         # the dry run must finish within this (CI)
KILL_GRACE=5                          # timeout --kill-after: a step can overrun its timeout by this
SLOW=${GPU_CHECK_SLOW_STEP:-}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY DRY OUT
SUMMARY="$OUT/summary.log"
: > "$SUMMARY"

# name:timeout, in order. The sum must fit the budget (checked below, and by the dry run).
PLAN="env:20 build:120 tests:90 smoke:45 sanitizer:45 bench:100"
NCU_MIN=45
planned=0
nsteps=0
for s in $PLAN; do planned=$(( planned + ${s#*:} )); nsteps=$(( nsteps + 1 )); done

log() { echo "$*" | tee -a "$SUMMARY"; }
budget_of() { for s in $PLAN; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }
slow_of() { local s; for s in ${SLOW//,/ }; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }
elapsed() { echo $(( $(date +%s) - START )); }

declare -A RESULT
FAILED=0
# step NAME LOGFILE CMD... : runs CMD under `timeout`, appending to LOGFILE; records the result.
step() {
  local name=$1 logf=$2; shift 2
  local budget left t0 rc res
  budget=${STEP_BUDGET:-$(budget_of "$name")}
  left=$(( BUDGET - $(elapsed) ))
  if (( left < 5 )); then
    log "::: $name: SKIPPED, the ${BUDGET} s budget is used"; RESULT[$name]="skipped (no time)"; return 0
  fi
  (( budget > left )) && budget=$left
  log "::: $name (timeout ${budget} s, at $(elapsed) s)"
  echo "\$ $*" >> "$logf"
  # a shell function runs in a child bash (timeout runs programs only)
  # a step function may read STEP_S, its timeout
  if declare -F "$1" > /dev/null; then set -- bash -c "STEP_S=$budget; $(declare -f "$1"); $1"; fi
  local slow
  slow=$(slow_of "$name")
  if [ -n "$slow" ]; then
    log "::: $name: GPU_CHECK_SLOW_STEP, sleeping ${slow} s first"
    set -- bash -c 'sleep "$0" && exec "$@"' "$slow" "$@"
  fi
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=$KILL_GRACE "$budget" "$@" >> "$logf" 2>&1
  rc=$?
  if (( rc == 124 || rc == 137 )); then res="TIMEOUT after ${budget} s"; FAILED=1
  elif (( rc == 0 )); then res="ok"
  else res="FAILED (exit $rc)"; FAILED=1; fi
  RESULT[$name]="$res in $(( $(date +%s) - t0 )) s"
  log "::: $name: ${RESULT[$name]}"
  return $rc
}

log "gpu_check $( ((DRY)) && echo '--dry-run ')-> $OUT; budget ${BUDGET} s, steps planned ${planned} s: $PLAN"
if (( planned + nsteps * KILL_GRACE > BUDGET )); then
  log "PLAN TOO LONG: the steps' timeouts add up to ${planned} s (+ ${KILL_GRACE} s kill grace each) > budget ${BUDGET} s"
  exit 2
fi
log "spare: $(( BUDGET - planned )) s ($(( BUDGET - planned - nsteps * KILL_GRACE )) s after every step's kill grace)"

# ------------------------------------------------------------------------------ env
env_info() {
  date -u
  git rev-parse HEAD 2>/dev/null || true
  if ((DRY)); then echo "dry run: no nvidia-smi"; else nvidia-smi || true; fi
  # One interpreter for both (each start imports torch: seconds on a busy machine).
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')"
  local san
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  echo "nvcc: $(command -v nvcc || echo none); compute-sanitizer: ${san:-none}; ncu: $(command -v ncu || echo none)"
  nproc
}
step env "$SUMMARY" env_info

# ---------------------------------------------------------------------------- build
BUILT=0
if ((DRY)); then
  # stand-in: setup.py's arch handling for 90a, and the resource-report parser on a sample
  dry_build() {
    SPARSEKERN_CUDA_ARCHS=90a $PY - <<'EOF'
import re, sys
src = open("setup.py").read()
ns = {"__file__": "setup.py"}
exec(src.split("FORCE_CPU =")[0], ns)
print("setup.py arch flags for 90a:", ns["cuda_arch_flags"]("90a"))
assert ns["cuda_arch_flags"]("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
EOF
    cat > "$OUT/.ptxas_sample" <<'EOF'
ptxas info    : Compiling entry function '_ZN10sparsekern4cuda12_GLOBAL__N_115nm24_mma_kernelIN3c108BFloat16ELi1EEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN10sparsekern4cuda12_GLOBAL__N_115nm24_mma_kernelIN3c108BFloat16ELi1EEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
EOF
    $PY bench/ptxas_report.py "$OUT/.ptxas_sample" --fail-on-spill
    rc=$?
    rm -f "$OUT/.ptxas_sample"
    echo "would run: SPARSEKERN_CUDA_ARCHS=90a MAX_JOBS=16 SPARSEKERN_REQUIRE_CUDA=1 SPARSEKERN_NVCC_EXTRA='-Xptxas=-v -lineinfo' $PY setup.py build_ext --inplace"
    return $rc
  }
  step build "$OUT/build.log" dry_build
else
  build() {
    SPARSEKERN_CUDA_ARCHS=90a MAX_JOBS=${MAX_JOBS:-16} SPARSEKERN_REQUIRE_CUDA=1 \
      SPARSEKERN_NVCC_EXTRA="-Xptxas=-v -lineinfo" $PY setup.py build_ext --inplace
  }
  if step build "$OUT/build.log" build; then
    BUILT=1
    { echo "--- resource report (ptxas -v, sm_90a)"; $PY bench/ptxas_report.py "$OUT/build.log" --fail-on-spill; } \
      > "$OUT/.resources" 2>&1 || { RESULT[build]="${RESULT[build]}, SPILLS"; FAILED=1; }
    cat "$OUT/.resources" >> "$OUT/build.log"
    grep -E "nm24_mma|nm_fma|bitmask_warp|SPILL" "$OUT/.resources" | tee -a "$SUMMARY"
    rm -f "$OUT/.resources"
    $PY -m sparsekern info >> "$SUMMARY" 2>&1 || true
  else
    log "BUILD FAILED: the CUDA C++ kernels are not tested; Triton and the 2:4 library paths still are"
    tail -30 "$OUT/build.log" | tee -a "$SUMMARY"
  fi
fi

# ---------------------------------------------------------------------------- tests
# First the files that test our GPU kernels (a timeout later keeps them), then the rest of
# the GPU selection. "cuda-reference" ids test plain torch on CUDA: left out.
FIRST="tests/test_gpu_kernels.py tests/test_cusparselt.py tests/test_triton.py tests/test_gpu_dispatch.py tests/test_gpu_triton.py"
REST_K="(cuda or gpu or cusparselt) and not cuda-reference"
IGNORE="--ignore=tests/test_gpu_check.py --ignore=tests/test_gpu_layout.py"
for f in $FIRST; do IGNORE="$IGNORE --ignore=$f"; done
XDIST=""
$PY -c "import xdist" 2> /dev/null && XDIST="-n 8"
export FIRST REST_K IGNORE XDIST
if ((DRY)); then
  # one collection (one interpreter) of both selections: module names match -k too
  sel="(($REST_K)"
  for f in $FIRST; do sel="$sel or ${f#tests/}"; done
  sel="$sel) and not cuda-reference and not test_gpu_check.py and not test_gpu_layout.py"
  step tests "$OUT/tests.log" $PY -m pytest tests -q -p no:cacheprovider --collect-only -k "$sel"
elif ((BUILT)); then
  gpu_tests() {
    # -v: one line per test as it ends, so a cut keeps every result so far. Each part runs
    # under its own timeout inside the step's, so the step ends with its summary lines: a
    # part cut short says so and does not fail the step (its results above still count).
    local t0 rc rc2 left
    t0=$(date +%s)
    echo "--- first: $FIRST"
    timeout --kill-after=3 $(( STEP_S - 12 )) $PY -m pytest $FIRST -v --tb=short -p no:cacheprovider -rfE $XDIST \
      -k "not cuda-reference"
    rc=$?
    (( rc == 124 || rc == 137 )) && { echo "--- first: cut after $(( $(date +%s) - t0 )) s"; rc=0; }
    left=$(( STEP_S - ($(date +%s) - t0) - 6 ))
    if (( left < 10 )); then echo "--- rest: not run, ${left} s left"; return $rc; fi
    echo "--- rest: -k \"$REST_K\" (${left} s)"
    timeout --kill-after=3 $left $PY -m pytest tests $IGNORE -v --tb=short -p no:cacheprovider -rfE $XDIST -k "$REST_K"
    rc2=$?
    (( rc2 == 124 || rc2 == 137 )) && { echo "--- rest: cut after ${left} s"; rc2=0; }
    (( rc2 == 5 )) && rc2=0  # nothing selected
    return $(( rc ? rc : rc2 ))
  }
  step tests "$OUT/tests.log" gpu_tests
else
  step tests "$OUT/tests.log" $PY -m pytest tests/test_triton.py tests/test_cusparselt.py tests/test_gpu_dispatch.py \
    tests/test_gpu_triton.py -v --tb=short -p no:cacheprovider -rfE $XDIST -k "not cuda-reference"
fi
# xdist prints "[gw3] [ 40%] FAILED tests/...": match FAILED/ERROR anywhere in the line
{ grep -E "^--- |tests collected|[0-9]+ passed|[0-9]+ failed|=+ .*(passed|failed|error)" "$OUT/tests.log" | tail -8
  # "FAILED tests/x.py::t - msg" (-rfE), "[gw3] [ 40%] FAILED tests/x.py::t" (xdist) and
  # "tests/x.py::t FAILED [ 40%]" (-v, all a cut run leaves): one line per test id
  grep -oE "(FAILED|ERROR) tests/[^ ]+|tests/[^ ]+ (FAILED|ERROR)" "$OUT/tests.log" \
    | sed -E 's/^(tests\/[^ ]+) (FAILED|ERROR)$/\2 \1/' | sort -u | head -15
} | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------- smoke
NOCUDA=""
(( BUILT || DRY )) || NOCUDA="--no-cuda"
if ((DRY)); then
  step smoke "$OUT/smoke.log" $PY bench/gpu_smoke.py --dry-run
else
  step smoke "$OUT/smoke.log" $PY bench/gpu_smoke.py $NOCUDA --budget-s $(( $(budget_of smoke) - 10 ))
fi
grep -E "^FAIL|^SKIP|^gpu_smoke:" "$OUT/smoke.log" | tail -12 | tee -a "$SUMMARY"

# ------------------------------------------------------------------------ sanitizer
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if ((DRY)); then
  echo "would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${SAN:-compute-sanitizer} --tool memcheck --error-exitcode 9 $PY bench/sanitize_case.py" \
    >> "$OUT/sanitizer.log"
  step sanitizer "$OUT/sanitizer.log" $PY bench/sanitize_case.py --dry-run
elif [ -n "$SAN" ]; then
  step sanitizer "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
    --error-exitcode 9 --print-limit 30 $PY bench/sanitize_case.py $NOCUDA --budget-s $(( $(budget_of sanitizer) - 12 ))
else
  log "compute-sanitizer not found"; RESULT[sanitizer]="not found"; FAILED=1
fi
{ grep -E "sanitize_case: .*(FAIL|SKIPPED)|Invalid|out of bounds" "$OUT/sanitizer.log" | head -6
  grep -E "ERROR SUMMARY|sanitize_case: (ok|FAILED)|sanitize_case: \[" "$OUT/sanitizer.log" | tail -2
} | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------- bench
bench_budget=$(budget_of bench)
if ((DRY)); then
  step bench "$OUT/bench.log" $PY bench/bench_gpu_linear.py --dry-run --out "$OUT/bench.json" \
    --tuning-out "$OUT/tuning.json"
  bench_planned=$(grep -o '"planned_s": [0-9]*' "$OUT/bench.log" | tail -1 | grep -o '[0-9]*$')
  if [ -z "$bench_planned" ] || (( bench_planned > bench_budget )); then
    log "BENCH PLAN: ${bench_planned:-?} s planned, over its ${bench_budget} s step"; FAILED=1
  else
    log "bench plan: ${bench_planned} s of its ${bench_budget} s step"
  fi
else
  # stop starting new shapes 40 s before the step's end (masked + e2e still run)
  step bench "$OUT/bench.log" $PY bench/bench_gpu_linear.py --out "$OUT/bench.json" --tuning-out "$OUT/tuning.json" \
    --budget-s $(( bench_budget - 40 ))
fi
rm -f "$OUT"/*.tmp  # a write the timeout cut short
{ grep -E "^linear " "$OUT/bench.log" | grep -E " 4096x4096 | error" | head -36
  grep -E "^(masked|e2e) |^linear .*: [0-9.]+ s$" "$OUT/bench.log" | head -16
} | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------ ncu
NCU=$(command -v ncu || true)
NCU_ARGS="--target-processes all --kernel-name regex:nm24_mma|bitmask_warp --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats"
if ((DRY)); then
  echo "would run (with >= ${NCU_MIN} s left): ncu $NCU_ARGS $PY bench/bench_gpu_linear.py --suite ncu" >> "$OUT/bench.log"
  STEP_BUDGET=20 step ncu "$OUT/bench.log" $PY bench/bench_gpu_linear.py --dry-run --suite ncu
elif (( BUILT )) && [ -n "$NCU" ] && (( BUDGET - $(elapsed) >= NCU_MIN )); then
  STEP_BUDGET=$NCU_MIN step ncu "$OUT/bench.log" "$NCU" $NCU_ARGS $PY bench/bench_gpu_linear.py --suite ncu
else
  log "::: ncu: skipped (built=$BUILT, ncu=${NCU:-none}, $(( BUDGET - $(elapsed) )) s left)"
fi

# --------------------------------------------------------------------------- summary
total=$(elapsed)
log ""
log "=== gpu_check summary ($total s of ${BUDGET} s budget)"
for s in env build tests smoke sanitizer bench ncu; do log "  $s: ${RESULT[$s]:-not run}"; done
rm -f "$OUT"/*.tmp
files=$(find "$OUT" -type f | wc -l)
log "  files in $OUT: $files (limit 8): $(cd "$OUT" && ls | tr '\n' ' ')"
(( files <= 8 )) || { log "TOO MANY FILES for the device tool (8)"; FAILED=1; }
slow_total=0
for s in ${SLOW//,/ }; do slow_total=$(( slow_total + ${s#*:} )); done
if ((DRY)) && (( total > DRY_LIMIT + slow_total )); then
  log "DRY RUN TOO SLOW: ${total} s > ${DRY_LIMIT} s"; FAILED=1
fi
log "gpu_check: exit $FAILED"
exit $FAILED
