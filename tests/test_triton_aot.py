"""Every Triton specialisation that sbfast launches compiles for the GPU (sm_80, sm_90), with the
installed Triton, on a machine without a GPU (scripts/triton_aot_check.py).

The specialisations are the committed record (scripts/triton_specializations.jsonl, made by
``python scripts/triton_aot_check.py --record``) plus whatever this session's Triton tests
launched (tests/conftest.py records them), so a launcher or test that starts a new one is
compiled here too. The file sorts after the other Triton tests, so in the Triton leg it sees
all of their launches.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_aot_check.py"
COMMITTED = ROOT / "scripts" / "triton_specializations.jsonl"


def _launched_kernels() -> set[str]:
    """module:name of every kernel a launcher in kernels/ passes to ``launch``."""
    found = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "launch"
                and node.args
                and isinstance(node.args[0], ast.Name)
            ):
                found.add(f"sbfast.kernels.{path.stem}:{node.args[0].id}")
    return found


def test_the_committed_record_covers_every_kernel():
    kernels = _launched_kernels()
    assert len(kernels) >= 8  # global norm, 3 SAM, 2 per-sample, 3 selection kernels
    recorded = {json.loads(line)["kernel"] for line in COMMITTED.read_text().splitlines() if line.strip()}
    assert kernels <= recorded, f"never recorded: {sorted(kernels - recorded)}; run {SCRIPT.name} --record"


def test_every_launched_specialisation_compiles_for_the_gpu(triton_launch_record):
    specs = [COMMITTED]
    session = Path(triton_launch_record)
    if session.exists() and session.stat().st_size:
        specs.append(session)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SBFAST_TRITON_RECORD")}
    cmd = [sys.executable, str(SCRIPT), "--archs", "80,90"]
    for path in specs:
        cmd += ["--specs", str(path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "compiled in" in report
