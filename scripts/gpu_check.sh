#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR: the whole GPU check of sbfast in one run, on a machine with a
# CUDA GPU and its own torch (nothing is fetched from a package registry).
#
# Stages (each timed and capped with `timeout`; docs/gpu.md lists them):
#   1 env      GPU, driver, torch, compute capability
#   2 build    sbfast._C in place for this GPU's arch only (pip install -e ., no deps, no index)
#   3 load     the extension imports and serves every op with CUDA C++ on CUDA
#   4 tests    pytest -m "cuda or triton" (CUDA C++ faces, Triton faces on the GPU)
#   5 train    tests/test_train.py -k "graph or compile" (CUDA graphs, torch.compile)
#   6 bench    python -m bench, one module at a time, short timings -> bench/results/<gpu>.json
#   7 summary  OUTDIR/summary.md: pass/fail per test file, the bench table, peak GPU memory,
#              stage times
# Budget: under 8 minutes on an H100/H200 (the stage caps below add up to 7 min 50 s).
# Exit status: 0 when every stage passed, 1 otherwise; 2 for a usage error. Without a GPU: one line, exit 0.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi

mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"

# Caps in seconds (stages sum to 470, under 8 minutes); GPU_CHECK_SCALE=2 doubles them on a slower GPU.
SCALE="${GPU_CHECK_SCALE:-1}"
cap() { echo $(( $1 * SCALE )); }
CAP_ENV=$(cap 15)
CAP_BUILD=$(cap 180)
CAP_LOAD=$(cap 15)
CAP_TESTS=$(cap 110)
CAP_TRAIN=$(cap 40)
CAP_BENCH=$(cap 110)
CAP_BENCH_MODULE=$(cap 20)  # per bench module; the stage runs them one after another ...
CAP_BENCH_TOTAL=$(( CAP_BENCH - 10 ))  # ... and starts none after this many seconds

STAGES_FILE="$OUT/stages.tsv"
: > "$STAGES_FILE"
FAILED=0

# run_stage NAME CAP CMD...: runs CMD under `timeout CAP`, output to OUT/NAME.log; records
# "name<TAB>status<TAB>seconds<TAB>cap" in stages.tsv.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local start end rc status tenths seconds
  start=$(date +%s%N)
  echo "== $name (cap ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
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
  echo "   $status in ${seconds}s (log: $OUT/$name.log)"
  [ $rc -eq 0 ] || tail -n 20 "$OUT/$name.log" | sed 's/^/   | /'
  return $rc
}

# Peak GPU memory over the whole check: nvidia-smi sampled every 200 ms in the background
# (the process is ours; it is stopped by its id when the check ends).
SAMPLER_PID=""
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory_samples.txt" 2>/dev/null &
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
run_stage env "$CAP_ENV" "$PYTHON" - <<'EOF'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"gpu: {torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
EOF
ARCH="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
GPU_NAME="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")"

# ---- 2 build ---------------------------------------------------------------------------------
# One arch (this GPU's) and every core: the build is most of the budget. --no-index: nothing is
# fetched; --no-build-isolation --no-deps: the image's own torch and packages are used.
run_stage build "$CAP_BUILD" env TORCH_CUDA_ARCH_LIST="$ARCH" SBFAST_CUDA=1 MAX_JOBS="$(nproc)" \
  "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .

# ---- 3 load ----------------------------------------------------------------------------------
# Every op that csrc/cuda registers (m.impl in TORCH_LIBRARY_IMPL(sbfast, CUDA)) must be served
# by it; ops with a Triton face only are listed, not failed.
run_stage load "$CAP_LOAD" "$PYTHON" - <<'EOF'
import json, re, sys
from pathlib import Path
import sbfast
from sbfast import registry
table = sbfast.backends()
print(json.dumps(table, indent=1))
if registry.EXTENSION_ERROR is not None:
    sys.exit(f"sbfast._C did not import: {registry.EXTENSION_ERROR}")
expected = {name for cu in Path("csrc/cuda").glob("*.cu") for name in re.findall(r'm\.impl\("(\w+)"', cu.read_text())}
missing = sorted(name for name in expected if table.get(name, {}).get("cuda") != "cuda-c++")
print(f"CUDA C++ kernels expected: {sorted(expected)}")
print(f"Triton or missing on CUDA: {sorted(n for n, f in table.items() if f['cuda'] != 'cuda-c++')}")
if missing:
    sys.exit(f"csrc/cuda kernels that this build does not serve: {missing}")
EOF

# ---- 4 tests, 5 train --------------------------------------------------------------------------
run_stage tests "$CAP_TESTS" "$PYTHON" -m pytest -q -m "cuda or triton" -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" tests
run_stage train "$CAP_TRAIN" "$PYTHON" -m pytest -q -p no:cacheprovider -k "graph or compile" \
  --junitxml="$OUT/train.xml" tests/test_train.py

# ---- 6 bench ---------------------------------------------------------------------------------
# One module at a time so that a slow one is cut off alone; rows of every finished module land
# in the GPU's results file (python -m bench keeps the rows of other modules).
bench_all() {
  local deadline=$(( $(date +%s) + CAP_BENCH_TOTAL )) rc=0 module left
  for module in $("$PYTHON" -c "from bench import harness; print(' '.join(harness.BENCH_MODULES))"); do
    left=$(( deadline - $(date +%s) ))
    if [ $left -le 1 ]; then
      echo "bench: out of time before $module"
      rc=1
      continue
    fi
    [ $left -gt "$CAP_BENCH_MODULE" ] && left=$CAP_BENCH_MODULE
    echo "-- $module (cap ${left}s)"
    timeout --kill-after=5 "$left" "$PYTHON" -m bench --ops "$module" --device cuda --min-run-time 0.05 --save \
      || { echo "bench: $module failed or timed out (rc=$?)"; rc=1; }
  done
  return $rc
}
export -f bench_all
export PYTHON CAP_BENCH_TOTAL CAP_BENCH_MODULE
run_stage bench "$CAP_BENCH" bash -c bench_all
RESULTS="$("$PYTHON" -c "import torch; from bench import harness; print(harness.results_path(torch.device('cuda')).relative_to(harness.RESULTS_DIR.parent.parent))" 2>/dev/null)"
RESULTS="${RESULTS:-bench/results/unknown-gpu.json}"

# ---- 7 summary -------------------------------------------------------------------------------
stop_sampler
"$PYTHON" - "$OUT" "$RESULTS" "$GPU_NAME" "$ARCH" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

out, results, gpu, arch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [f"# sbfast GPU check on {gpu} (sm_{arch.replace('.', '')})", ""]

lines += ["## Stages", "", "| stage | status | seconds | cap |", "|---|---|---|---|"]
for row in (out / "stages.tsv").read_text().splitlines():
    lines.append("| " + " | ".join(row.split("\t")) + " |")

lines += ["", "## Tests (per file)", "", "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
for xml in ("tests.xml", "train.xml"):
    path = out / xml
    if not path.exists():
        lines.append(f"| ({xml} missing: the stage did not finish) | | | | |")
        continue
    counts = defaultdict(lambda: [0, 0, 0, 0])
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = (case.get("classname") or "?").split(".")
        name = case.get("file") or next((p for p in parts if p.startswith("test_")), parts[-1]) + ".py"
        kind = 1 if case.find("failure") is not None else 2 if case.find("error") is not None else \
            3 if case.find("skipped") is not None else 0
        counts[name][kind] += 1
    for name, (p, f, e, s) in sorted(counts.items()):
        lines.append(f"| {name} | {p} | {f} | {e} | {s} |")

samples = out / "gpu_memory_samples.txt"
peak = max((int(x) for x in samples.read_text().split() if x.isdigit()), default=None) if samples.exists() else None
lines += ["", "## Peak GPU memory", "", f"{peak} MiB (nvidia-smi, sampled every 200 ms)" if peak is not None
          else "n/a (no nvidia-smi)"]

lines += ["", f"## Bench ({results})", ""]
if results.exists():
    from bench import harness
    rows = json.loads(results.read_text())["rows"]
    lines += ["```", harness.format_table(rows), "```"]
else:
    lines.append("no results file: the bench stage did not write one")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[ $? -eq 0 ] || FAILED=1

echo
echo "summary: $OUT/summary.md"
echo "to commit (from the repository root):"
echo "  git add $RESULTS && git commit -m \"Bench results on $GPU_NAME\" -- $RESULTS"
echo "  (and paste $OUT/summary.md into the report)"
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: FAILED (see the stage logs in $OUT)"
  exit 1
fi
echo "gpu_check: all stages passed"
exit 0
