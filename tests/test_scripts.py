"""scripts/gpu_check.sh: where no CUDA GPU is visible it says so in one line and succeeds, so
the check can sit in any pipeline; its stages are the ones docs/gpu.md lists."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this checks the no-GPU path on every machine
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_prints_one_line_and_succeeds(tmp_path):
    out_dir = tmp_path / "out"
    result = _run(str(out_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU"), result.stdout
    assert not out_dir.exists()  # nothing written, nothing built


def test_usage_error_without_outdir(tmp_path):
    result = _run(tmp_path=tmp_path)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh OUTDIR" in result.stderr


def _stage_caps() -> dict[str, int]:
    """Each stage's cap in seconds, as the script computes it (GPU_CHECK_SCALE=1)."""
    text = SCRIPT.read_text()
    caps = {name: int(value) for name, value in re.findall(r"^(CAP_\w+)=\$\(cap (\d+)\)", text, flags=re.M)}
    stages = {}
    for name, expr in re.findall(r"^run_stage (\w+) (\S+)", text, flags=re.M):
        stages[name] = caps[expr.strip('"$')]
    return stages


def test_docs_list_every_stage_with_its_cap():
    caps = _stage_caps()
    assert list(caps) == ["env", "build", "load", "tests", "train", "bench"]
    documented = re.findall(r"^\| \d+ \| (\w+) \| (\d+ s|-) \|", (ROOT / "docs" / "gpu.md").read_text(), flags=re.M)
    assert documented == [(name, f"{cap} s") for name, cap in caps.items()] + [("summary", "-")]


def test_stage_caps_fit_the_eight_minute_budget():
    assert sum(_stage_caps().values()) < 8 * 60
