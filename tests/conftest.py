"""Shared grids and fixtures.

Triton kernels run on CPU tensors under the Triton interpreter: where no GPU exists this
file sets TRITON_INTERPRET=1 before anything imports triton, so a plain `pytest` runs every
Triton test too (CI also runs them as their own leg with `-m triton`).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Sizes every op is tried on: one element, odd sizes that straddle vector and block widths.
ODD_SIZES = [1, 7, 129, 4097]

# Devices for the C++/CUDA faces: the CUDA twin skips only where no GPU exists.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
    ),
]

# Device for Triton faces: the GPU where there is one, else CPU under the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session", autouse=True)
def triton_launch_record(tmp_path_factory) -> str:
    """The file where this session records every Triton specialisation it launches
    (sbfast.kernels.launch, SBFAST_TRITON_RECORD), so that tests/test_triton_aot.py compiles
    them for the GPU as well; a record file set by the caller is kept."""
    given = os.environ.get("SBFAST_TRITON_RECORD")
    if given:
        yield given
        return
    path = str(tmp_path_factory.mktemp("triton") / "launches.jsonl")
    os.environ["SBFAST_TRITON_RECORD"] = path
    yield path
    os.environ.pop("SBFAST_TRITON_RECORD", None)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small problems: on the shared 2-core machine extra
    threads only add contention, and float64 sums keep one order. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
