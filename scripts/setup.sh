#!/usr/bin/env bash
# Installs everything sbfast needs and builds sbfast._C in place (editable install).
# Works on a fresh machine that has only Python, pip, gcc (and nvcc, for the CUDA kernels).
set -euo pipefail
cd "$(dirname "$0")/.."

# SBFAST_SKIP_REQUIREMENTS=1 keeps the packages already installed (e.g. a GPU image whose torch
# differs from requirements.txt and that has no package registry); the build still uses them.
if [ "${SBFAST_SKIP_REQUIREMENTS:-0}" != "1" ]; then
  python -m pip install --quiet -r requirements.txt
fi
# --no-build-isolation: compile against the torch installed above (an isolated build env
# would fetch another torch and the extension would then fail to import).
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --quiet --no-build-isolation --no-deps -e .
python -c "import sbfast, json; print('sbfast backends:', json.dumps(sbfast.backends()))"
