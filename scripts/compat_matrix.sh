#!/usr/bin/env bash
# Builds sbfast against several torch + Triton pairs and runs the tests against each, then writes
# a markdown table of the results (docs/compat_matrix.md by default).
#
#   bash scripts/compat_matrix.sh                       # every combo, the whole test suite
#   bash scripts/compat_matrix.sh tests/test_select.py  # every combo, these tests only
#
# Combos: COMPAT_COMBOS, space-separated "torch:triton[:venv[:checkout]]" (default
# "2.11.0:3.6.0 2.14.1:3.8.0": the GPU image's pair and the newest torch that installs here).
# A combo's venv defaults to $COMPAT_DIR/venv-torch<torch> (COMPAT_DIR default
# ~/.cache/sbfast-compat); it is created with `python3 -m venv` and pip (torch, triton, then
# requirements.txt's other pins) when missing, and reused as it is otherwise.
# Each combo builds sbfast into its venv from its own copy of this working tree (tracked and
# untracked, not ignored files) under $COMPAT_DIR, so this checkout's sbfast/_C*.so is never
# touched; or, given a checkout (e.g. a git worktree of this repository that the venv already
# has installed), from that checkout as it is. SBFAST_CUDA defaults to 0 here (CPU kernels only;
# CI's build compiles the CUDA sources); MAX_JOBS to 2.
# COMPAT_OUT: the table (default docs/compat_matrix.md). Logs: $COMPAT_DIR/torch<version>/.
# COMPAT_REPORT_ONLY=1 writes the table again from the logs of the last run, building nothing.
#
# Not part of CI: two venvs, two builds and two full test runs take far longer than CI's budget.
set -euo pipefail
cd "$(dirname "$0")/.."

combos="${COMPAT_COMBOS:-2.11.0:3.6.0 2.14.1:3.8.0}"
compat_dir="${COMPAT_DIR:-${HOME}/.cache/sbfast-compat}"
out="${COMPAT_OUT:-docs/compat_matrix.md}"
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(tests)
export SBFAST_CUDA="${SBFAST_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}"
mkdir -p "$compat_dir"

# the requirements other than torch and triton, at their pinned versions
others=$(grep -v -E '^\s*(#|$)|^(torch|triton)==' requirements.txt | tr '\n' ' ')

logs=()
for combo in $combos; do
  IFS=: read -r torch_v triton_v venv checkout <<< "$combo"
  venv="${venv:-$compat_dir/venv-torch$torch_v}"
  py="$venv/bin/python"
  log="$compat_dir/torch$torch_v"
  logs+=("$log")
  [ "${COMPAT_REPORT_ONLY:-0}" = 1 ] && continue
  rm -rf "$log" && mkdir -p "$log"
  echo "== torch $torch_v + Triton $triton_v ($venv)"
  if [ ! -x "$py" ]; then
    python3 -m venv "$venv"
    "$py" -m pip install --quiet "torch==$torch_v" "triton==$triton_v"
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet $others
    # Triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses ("only
    # 0-dimensional arrays can be converted to Python scalars" in any loop over a scalar argument)
    case "$triton_v" in 3.[0-6].*) "$py" -m pip install --quiet "numpy<2.4" ;; esac
  fi
  "$py" -c 'import torch, triton, platform; print(torch.__version__, triton.__version__, platform.python_version())' \
    > "$log/versions"

  if [ -n "${checkout:-}" ]; then
    src="$checkout"
    echo "   from $src at $(git -C "$src" log --oneline -1)"
    git -C "$src" rev-parse --short HEAD > "$log/source"
  else  # a copy of the working tree for this torch's build
    src="$compat_dir/src-torch$torch_v"
    rm -rf "$src" && mkdir -p "$src"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
      if [ -e "$f" ]; then printf '%s\0' "$f"; fi
    done | tar --null -T - -cf - | tar -xf - -C "$src"
    echo "$(git rev-parse --short HEAD) + working tree" > "$log/source"
  fi

  start=$(date +%s)
  if (cd "$src" && "$py" -m pip install --no-build-isolation --no-deps -e . > "$log/build.log" 2>&1); then
    echo "ok $(( $(date +%s) - start ))" > "$log/build"
    start=$(date +%s)
    (cd "$src" && "$py" -m pytest -q -p no:cacheprovider -rfE -m "not triton" "${tests[@]}" \
      > "$log/pytest.log" 2>&1) || true
    echo "$(( $(date +%s) - start ))" > "$log/pytest.seconds"
    start=$(date +%s)
    (cd "$src" && TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -rfE -m triton "${tests[@]}" \
      > "$log/pytest-triton.log" 2>&1) || true
    echo "$(( $(date +%s) - start ))" > "$log/pytest-triton.seconds"
  else
    echo "failed $(( $(date +%s) - start ))" > "$log/build"
    tail -20 "$log/build.log"
  fi
  echo "   build: $(cat "$log/build") s; logs in $log"
done

python3 - "$out" "${tests[*]}" "${logs[@]}" <<'PY'
import datetime, os, platform, re, sys

out, tests, logs = sys.argv[1], sys.argv[2], sys.argv[3:]


def read(path, default=""):
    return open(path, errors="replace").read().strip() if os.path.exists(path) else default


def summary(log):
    text = read(log)
    if not text:
        return "not run", []
    ends = [re.sub(r" in [0-9.]+s.*", "", line.strip("= ")) for line in text.splitlines()
            if re.search(r"\b(passed|failed|errors?|no tests ran)\b", line) and " in " in line]
    fails = [re.sub(r" - .*", "", line) for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return (ends[-1] if ends else "no summary (crashed?)"), fails


lines = [
    "# Compatibility matrix",
    "",
    "What `bash scripts/compat_matrix.sh` found: sbfast built with `pip install --no-build-isolation --no-deps -e .`",
    "(CPU kernels only, `SBFAST_CUDA=0`) against each torch + Triton pair, each in its own venv, and",
    "tested there. The Triton tests run under the interpreter (`TRITON_INTERPRET=1`);",
    "`scripts/triton_aot_check.py` compiles their kernels for sm_80 and sm_90 with each Triton (see",
    "[triton_aot.md](triton_aot.md)). The GPU image has torch 2.11 and Triton 3.6 on Python 3.12; this",
    "machine has Python 3.11 only. Triton 3.6's interpreter needs numpy < 2.4 (it converts 1-element",
    "arrays to ints, which numpy 2.4 refuses), so the script installs that in Triton 3.6 venvs.",
    "",
    f"Tests: `{tests}`. Machine: {platform.machine()} {platform.system()}, no GPU. "
    f"Run on {datetime.date.today().isoformat()}.",
    "",
    "| torch | Triton | Python | source | build | tests (not triton) | Triton tests (interpreter) |",
    "|---|---|---|---|---|---|---|",
]
failures = []
for log in logs:
    torch_v, triton_v, python_v = (read(f"{log}/versions", "? ? ?").split() + ["?"] * 3)[:3]
    status, build_s = (read(f"{log}/build", "not run 0").rsplit(" ", 1) + ["0"])[:2]
    main, main_fails = summary(f"{log}/pytest.log")
    trit, trit_fails = summary(f"{log}/pytest-triton.log")
    lines.append(f"| {torch_v} | {triton_v} | {python_v} | {read(f'{log}/source', '?')} | {status} ({build_s} s) "
                 f"| {main} ({read(f'{log}/pytest.seconds', '0')} s) "
                 f"| {trit} ({read(f'{log}/pytest-triton.seconds', '0')} s) |")
    failures += [(torch_v, f) for f in main_fails + trit_fails]
if failures:
    lines += ["", "Failures (one that every row shows comes from the code, not from the torch version):", ""]
    lines += [f"- torch {t}: `{f}`" for t, f in failures]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
