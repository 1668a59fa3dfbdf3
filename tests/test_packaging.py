"""A regular (non-editable) install ships every subpackage: a wheel built without the extension
(SBFAST_NO_EXT=1, seconds) holds each package directory that the source tree has."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_subpackage(tmp_path):
    env = {**os.environ, "SBFAST_NO_EXT": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("sbfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{p.parent.relative_to(ROOT).as_posix()}/__init__.py"
        for p in (ROOT / "sbfast").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    expected.add("sbfast/kernels/__init__.py")
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
