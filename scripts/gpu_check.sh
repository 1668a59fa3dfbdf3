#!/usr/bin/env bash
# scripts/gpu_check.sh [--rehearse] OUTDIR: the whole GPU check of sbfast in one run, on a
# machine with a CUDA GPU and its own torch (nothing is fetched from a package registry).
#
# Stages (each timed and capped with `timeout`; docs/gpu.md lists them):
#   1 env      GPU, driver, torch, Triton
#   2 build    sbfast._C in place for this GPU's arch only (pip install -e ., no deps, no index)
#   3 load     the extension imports and serves every op with CUDA C++ on CUDA
#   4 tests    pytest -m "cuda or triton" (CUDA C++ faces, Triton faces on the GPU), in
#              parallel (pytest-xdist) where the plugin is installed
#   5 train    the trainer's CUDA-graph and torch.compile tests
#   6 bench    python -m bench --save, most telling module first, each case capped, the whole
#              bench on a budget -> bench/results/<gpu>.json, copied into OUTDIR
#   7 summary  OUTDIR/summary.md: pass/fail per test file, the failed tests, the bench table,
#              peak GPU memory, stage times, the last lines of a failed stage's log
# OUTDIR ends with three files: summary.md, logs.tar.gz (every stage's log, the JUnit files,
# the stage table) and <gpu>.json.
# Budget: under 8 minutes on an H100/H200 (the stage caps add up to 7 min 50 s).
# Exit status: 0 when every stage passed, 1 otherwise; 2 for a usage error. Without a GPU: one line, exit 0.
#
# --rehearse runs every stage on the CPU instead (no build: the installed sbfast._C is used; a
# small test selection; one bench module into OUTDIR, never the committed results): it checks
# this script, not the GPU code, and tests/test_scripts.py runs it in CI.
set -uo pipefail

usage() {
  echo "usage: scripts/gpu_check.sh [--rehearse] OUTDIR" >&2
  exit 2
}
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then
  REHEARSE=1
  shift
fi
[ $# -eq 1 ] || usage
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REPORT="$ROOT/scripts/gpu_check_report.py"

# The Python that holds torch: $PYTHON if set, else the first of python3 and python that imports it
# (GPU images often have python3 only).
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 && "$candidate" -c "import torch" > /dev/null 2>&1; then
      PYTHON="$candidate"
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "gpu_check: no python with torch on PATH (tried python3, python); set PYTHON=/path/to/python" >&2
  exit 2
fi

if [ $REHEARSE -eq 1 ]; then
  DEVICE=cpu
elif "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  DEVICE=cuda
else
  echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi

mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
if [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu_check: OUTDIR must be empty or absent, and $OUT holds files" >&2
  exit 2
fi
LOGS="$OUT/logs"
mkdir -p "$LOGS"
cd "$ROOT"

# Caps in seconds (stages sum to 470, under 8 minutes); GPU_CHECK_SCALE=2 doubles them on a slower GPU.
SCALE="${GPU_CHECK_SCALE:-1}"
cap() { echo $(( $1 * SCALE )); }
CAP_ENV=$(cap 15)
CAP_BUILD=$(cap 180)
CAP_LOAD=$(cap 15)
CAP_TESTS=$(cap 120)
CAP_TRAIN=$(cap 40)
CAP_BENCH=$(cap 100)
BENCH_CASE_CAP=$(cap 20)              # one bench case
BENCH_BUDGET=$(( CAP_BENCH - 15 ))    # no case starts after this (the process start and writes fit in the rest)

STAGES_FILE="$LOGS/stages.tsv"
: > "$STAGES_FILE"
FAILED=0

# run_stage NAME CAP CMD...: runs CMD under `timeout CAP`, output to LOGS/NAME.log; records
# "name<TAB>status<TAB>seconds<TAB>cap" in stages.tsv.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local start end rc status tenths seconds
  start=$(date +%s%N)
  echo "== $name (cap ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  end=$(date +%s%N)
  tenths=$(( (end - start) / 100000000 ))
  seconds="$(( tenths / 10 )).$(( tenths % 10 ))"
  if [ $rc -eq 0 ]; then
    status=pass
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="timeout"
  else
    status="fail(rc=$rc)"
  fi
  [ $rc -eq 0 ] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" >> "$STAGES_FILE"
  echo "   $status in ${seconds}s"
  [ $rc -eq 0 ] || tail -n 20 "$LOGS/$name.log" | sed 's/^/   | /'
  return $rc
}

skip_stage() {
  printf '%s\tskipped\t0.0\t-\n' "$1" >> "$STAGES_FILE"
  echo "== $1: skipped ($2)"
}

# Peak GPU memory over the whole check: nvidia-smi sampled every 200 ms in the background
# (the process is ours; it is stopped by its id when the check ends).
SAMPLER_PID=""
if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$LOGS/gpu_memory_samples.txt" 2>/dev/null &
  SAMPLER_PID=$!
fi
stop_sampler() {
  if [ -n "$SAMPLER_PID" ]; then
    kill "$SAMPLER_PID" 2>/dev/null
    wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=""
  fi
}
trap stop_sampler EXIT

# ---- 1 env -----------------------------------------------------------------------------------
# It also writes what later stages need (ARCH, TITLE, RESULTS, BENCH_ORDER) to env.vars.
ARCH="" TITLE="an unknown device (the env stage failed)" RESULTS="" BENCH_ORDER=""
run_stage env "$CAP_ENV" "$PYTHON" "$REPORT" env --device "$DEVICE" --vars "$LOGS/env.vars" \
  && . "$LOGS/env.vars"

# ---- 2 build ---------------------------------------------------------------------------------
# One arch (this GPU's) and every core: the build is most of the budget. --no-index: nothing is
# fetched; --no-build-isolation --no-deps: the image's own torch and packages are used.
if [ "$DEVICE" = cuda ]; then
  run_stage build "$CAP_BUILD" env TORCH_CUDA_ARCH_LIST="$ARCH" SBFAST_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
else
  skip_stage build "a rehearsal uses the installed sbfast._C"
fi

# ---- 3 load ----------------------------------------------------------------------------------
run_stage load "$CAP_LOAD" "$PYTHON" "$REPORT" load --device "$DEVICE"

# ---- 4 tests, 5 train --------------------------------------------------------------------------
# On the GPU the ahead-of-time Triton compile test is left out: the GPU compiles every kernel
# for real, and CI runs that test anyway.
PARALLEL=()
if "$PYTHON" -c "import xdist" > /dev/null 2>&1; then
  WORKERS=$(nproc)
  [ "$WORKERS" -gt 8 ] && WORKERS=8
  PARALLEL=(-n "$WORKERS")
fi
if [ "$DEVICE" = cuda ]; then
  TEST_PATHS=(tests)
else
  TEST_PATHS=(tests/test_global_sq_norm.py)
fi
run_stage tests "$CAP_TESTS" "$PYTHON" -m pytest -q -m "cuda or triton" -p no:cacheprovider "${PARALLEL[@]}" \
  --deselect tests/test_triton_aot.py::test_every_launched_specialisation_compiles_for_the_gpu \
  --junitxml="$LOGS/tests.xml" "${TEST_PATHS[@]}"
run_stage train "$CAP_TRAIN" "$PYTHON" -m pytest -q -p no:cacheprovider -k "graph or compile" \
  --junitxml="$LOGS/train.xml" tests/test_train.py tests/test_compile_graphs.py

# ---- 6 bench ---------------------------------------------------------------------------------
# One process (the CUDA context and imports once), most telling module first; each case is cut
# at BENCH_CASE_CAP and none starts after BENCH_BUDGET, and the results file is rewritten after
# every case, so a cut-off bench keeps what it measured.
if [ "$DEVICE" = cuda ]; then
  # shellcheck disable=SC2086
  run_stage bench "$CAP_BENCH" "$PYTHON" -m bench --device cuda --ops $BENCH_ORDER \
    --min-run-time 0.05 --case-cap "$BENCH_CASE_CAP" --budget "$BENCH_BUDGET" --save
  [ -n "$RESULTS" ] && [ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/"
else
  RESULTS="$OUT/$(basename "${RESULTS:-unknown-device.json}")"
  run_stage bench "$CAP_BENCH" "$PYTHON" -m bench --device cpu --ops global_sq_norm \
    --min-run-time 0.01 --case-cap "$BENCH_CASE_CAP" --budget "$BENCH_BUDGET" --output "$RESULTS"
fi

# ---- 7 summary -------------------------------------------------------------------------------
stop_sampler
timeout 30 "$PYTHON" "$REPORT" summary "$OUT" --results "$RESULTS" --device "$DEVICE" --title "$TITLE" \
  || { echo "gpu_check: the summary failed"; FAILED=1; }
# Everything but the summary and the results in one archive: a machine that hands back only a
# few files still hands back all of it.
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"

echo
echo "summary: $OUT/summary.md; logs: $OUT/logs.tar.gz"
if [ "$DEVICE" = cuda ]; then
  echo "to commit (from the repository root, with $(basename "$RESULTS") copied back to bench/results/):"
  echo "  git add bench/results/$(basename "$RESULTS") && git commit -m \"Bench results on ${TITLE}\" -- bench/results/$(basename "$RESULTS")"
  echo "  (and paste $OUT/summary.md into the report)"
fi
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: FAILED (see $OUT/summary.md)"
  exit 1
fi
echo "gpu_check: all stages passed"
exit 0
