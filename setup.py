"""Build of sbfast: one extension, ``sbfast._C``, from ``csrc/``.

Environment:
- ``SBFAST_NO_EXT=1``: pure-Python install (reference on CPU, Triton on CUDA).
- ``SBFAST_CUDA=auto|0|1`` (default auto): compile ``csrc/cuda/*.cu`` whenever nvcc is found,
  also on a machine without a GPU; 1 makes a missing nvcc an error.
- ``TORCH_CUDA_ARCH_LIST``: defaults to "8.0;9.0" when no GPU is visible.
- ``MAX_JOBS``: parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME, else the toolkit that holds nvcc *and* the runtime
    library (an nvcc on PATH may be a wrapper script outside the toolkit)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        root = Path(candidate)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _nvidia_wheel_includes() -> list[str]:
    """Include folders of the ``nvidia-*`` pip wheels that a CUDA build of torch installs:
    they carry headers (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers include and
    that a bare nvcc install lacks."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(str(p) for p in Path(base).glob("*/include") if p.is_dir())
    return found


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("SBFAST_NO_EXT", "0") == "1":
        return [], {}
    cuda_setting = os.environ.get("SBFAST_CUDA", "auto").lower()
    if cuda_setting not in ("auto", "0", "1"):
        sys.exit(f"SBFAST_CUDA={cuda_setting!r}: expected auto, 0 or 1")
    cuda_home = _find_cuda_home() if cuda_setting != "0" else None
    if cuda_setting == "1" and cuda_home is None:
        sys.exit("SBFAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch.utils.cpp_extension picks the standard its headers need.
    # -ffp-contract=off: csrc/sbfast_math.h writes out every fma it wants (fma_rn) and rounds
    # every other product, on the device through _rn intrinsics; the host must not contract
    # a * b + c either (gcc would wherever the target has FMA, e.g. with -march=native).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [str(ROOT / "csrc")]
    if cuda_home:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "sbfast._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs + _nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + ["-DSBFAST_WITH_CUDA"], "nvcc": ["-O3", "-DSBFAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "sbfast._C", sources, include_dirs=include_dirs, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    # every subpackage (cli, train, data, ...) plus the Triton kernels, which live in kernels/
    packages=[*find_packages(include=["sbfast", "sbfast.*"]), "sbfast.kernels"],
    package_dir={"sbfast": "sbfast", "sbfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
