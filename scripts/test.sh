#!/usr/bin/env bash
# The test command (README and CI): lint, C++ tests, Python tests, Triton-interpreter leg.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff"
ruff check .
ruff format --check .

echo "== C++ tests (CMake + ctest, same csrc/ sources)"
cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > cmake-build.log 2>&1 \
  || { cat cmake-build.log; exit 1; }
cmake --build cmake-build -j"${MAX_JOBS:-2}" >> cmake-build.log 2>&1 || { cat cmake-build.log; exit 1; }
ctest --test-dir cmake-build --output-on-failure

echo "== pytest (C++ CPU kernels, reference, trainer; CUDA twins where a GPU exists)"
python -m pytest -q -m "not triton" "$@"

echo "== pytest, Triton kernels (TRITON_INTERPRET=1 on CPU tensors where no GPU exists)"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  python -m pytest -q -m triton "$@"
else
  TRITON_INTERPRET=1 python -m pytest -q -m triton "$@"
fi
