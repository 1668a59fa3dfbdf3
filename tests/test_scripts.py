"""scripts/gpu_check.sh: where no CUDA GPU is visible it says so in one line and succeeds, so
the check can sit in any pipeline; its stages are the ones docs/gpu.md lists; its rehearsal runs
every stage on the CPU and leaves the three files a GPU run leaves; its summary names what
failed (scripts/gpu_check_report.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, tmp_path: Path, timeout: float = 120, **env_changes: str | None) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this checks the no-GPU path on every machine;
    # the inner pytest of a rehearsal records its Triton launches in its own session; the
    # script runs this test's Python unless told otherwise
    env = {k: v for k, v in os.environ.items() if k != "SBFAST_TRITON_RECORD"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def _wrapper(folder: Path, name: str, imports_torch: bool) -> Path:
    """folder/name: a Python that leaves folder/name.used behind, and imports torch or cannot."""
    path = folder / name
    target = sys.executable if imports_torch else "false"
    path.write_text(f'#!/usr/bin/env bash\ntouch "{folder}/{name}.used"\nexec {target} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("python3_has_torch", [True, False])
def test_the_python_is_python3_else_python_where_PYTHON_is_unset(tmp_path, python3_has_torch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _wrapper(bin_dir, "python3", imports_torch=python3_has_torch)
    _wrapper(bin_dir, "python", imports_torch=True)
    result = _run(str(tmp_path / "out"), tmp_path=tmp_path, PYTHON=None, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0 and result.stdout.startswith("gpu_check: no CUDA GPU"), result.stderr
    chosen = "python3" if python3_has_torch else "python"
    assert sorted(p.name for p in bin_dir.glob("*.used")) == sorted({"python3.used", f"{chosen}.used"})


def test_without_a_gpu_prints_one_line_and_succeeds(tmp_path):
    out_dir = tmp_path / "out"
    result = _run(str(out_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU"), result.stdout
    assert not out_dir.exists()  # nothing written, nothing built


def test_usage_error_without_outdir(tmp_path):
    result = _run(tmp_path=tmp_path)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh [--rehearse] OUTDIR" in result.stderr


def test_a_rehearsal_runs_every_stage_on_the_cpu_and_leaves_three_files(tmp_path):
    committed = {p: p.read_bytes() for p in (ROOT / "bench" / "results").glob("*.json")}
    out_dir = tmp_path / "out"
    result = _run("--rehearse", str(out_dir), tmp_path=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().endswith("gpu_check: all stages passed")

    results = [p.name for p in out_dir.glob("*.json")]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["summary.md", "logs.tar.gz", *results])
    assert len(results) == 1
    rows = json.loads((out_dir / results[0]).read_text())["rows"]
    assert rows and {r["op"] for r in rows} == {"global_sq_norm"}
    assert {p: p.read_bytes() for p in (ROOT / "bench" / "results").glob("*.json")} == committed

    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    stages = ["env", "build", "load", "tests", "train", "bench"]
    assert {f"logs/{s}.log" for s in stages if s != "build"} | {
        "logs/stages.tsv",
        "logs/tests.xml",
        "logs/train.xml",
    } <= names

    summary = (out_dir / "summary.md").read_text()
    table = re.findall(r"^\| (\w+) \| (pass|skipped|timeout|fail\S*) \|", summary, flags=re.M)
    assert table == [(s, "skipped" if s == "build" else "pass") for s in stages]
    assert re.search(r"^\| test_global_sq_norm\.py \| [1-9]\d* \| 0 \| 0 \|", summary, flags=re.M)
    assert "global_sq_norm" in summary.split("## Bench")[1]


def test_a_rehearsal_refuses_an_outdir_that_holds_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = _run("--rehearse", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpu_check: OUTDIR must be empty or absent, and {tmp_path / 'out'} holds files"
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "scripts" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.test_sam_ops" name="test_perturb[cuda-float16]" file="tests/test_sam_ops.py">
  <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3 / 129">trace</failure>
</testcase>
<testcase classname="tests.test_sam_ops" name="test_perturb[cuda-float32]" file="tests/test_sam_ops.py"/>
<testcase classname="tests.test_select" name="test_ties[cuda]" file="tests/test_select.py">
  <error message="RuntimeError: CUDA error: an illegal memory access was encountered">trace</error>
</testcase>
<testcase classname="tests.test_select" name="test_big[cuda]" file="tests/test_select.py"><skipped message="x"/></testcase>
</testsuite></testsuites>
"""


def test_the_summary_names_failed_tests_failed_stages_and_the_bench_gaps(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "stages.tsv").write_text(
        "env\tpass\t1.0\t15\nbuild\tpass\t60.2\t180\ntests\tfail(rc=1)\t80.0\t120\nbench\ttimeout\t100.0\t100\n"
    )
    (logs / "tests.xml").write_text(JUNIT)
    (logs / "tests.log").write_text("".join(f"line {i}\n" for i in range(100)) + "2 failed, 1 passed\n")
    (logs / "bench.log").write_text(
        "noise\nfailed: compile [digits]: CaseTimeout: ran past its cap of 20 s\n"
        "not run: checkpoint: the bench's budget of 85 s was spent\n"
    )
    (logs / "gpu_memory_samples.txt").write_text("0\n512\n20480\n1024\n")
    results = tmp_path / "nvidia-h200.json"
    results.write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "rows": [
                    {
                        "op": "global_sq_norm",
                        "shape": "flat",
                        "face": "cuda-c++",
                        "reference_ms": 1.0,
                        "sbfast_ms": 0.5,
                        "speedup": 2.0,
                    }
                ],
            }
        )
    )

    text = _report_module().summary(tmp_path, results, "cuda", "NVIDIA H200 (sm_90)")
    assert text == (tmp_path / "summary.md").read_text()
    assert text.startswith("# sbfast GPU check on NVIDIA H200 (sm_90)\n") and "rehearsal" not in text
    assert "| test_sam_ops.py | 1 | 1 | 0 | 0 |" in text and "| test_select.py | 0 | 0 | 1 | 1 |" in text
    assert "(train.xml missing: the train stage did not finish)" in text
    assert "## Failed tests (2)" in text
    assert "- test_sam_ops.py::test_perturb[cuda-float16]: AssertionError: Tensor-likes are not close!\n" in text
    assert (
        "- test_select.py::test_ties[cuda]: RuntimeError: CUDA error: an illegal memory access was encountered" in text
    )
    assert "20480 MiB" in text
    assert "global_sq_norm  flat   cuda-c++" in text
    assert "- failed: compile [digits]: CaseTimeout: ran past its cap of 20 s" in text
    assert "- not run: checkpoint: the bench's budget of 85 s was spent" in text
    # the last lines of each stage that did not pass, and of no other
    assert (
        "## tests: fail(rc=1), last 25 lines of tests.log" in text and "line 76\n" in text and "line 75\n" not in text
    )
    assert "2 failed, 1 passed" in text
    assert "## bench: timeout, last 3 lines of bench.log" in text
    assert "## env:" not in text and "## build:" not in text


def _stage_caps() -> dict[str, int]:
    """Each stage's cap in seconds, as the script computes it (GPU_CHECK_SCALE=1)."""
    text = SCRIPT.read_text()
    caps = {name: int(value) for name, value in re.findall(r"^(CAP_\w+)=\$\(cap (\d+)\)", text, flags=re.M)}
    stages = {}
    for name, expr in re.findall(r"^\s*run_stage (\w+) (\S+)", text, flags=re.M):
        stages[name] = caps[expr.strip('"$')]
    return stages


def test_docs_list_every_stage_with_its_cap():
    caps = _stage_caps()
    assert list(caps) == ["env", "build", "load", "tests", "train", "bench"]
    documented = re.findall(r"^\| \d+ \| (\w+) \| (\d+ s|-) \|", (ROOT / "docs" / "gpu.md").read_text(), flags=re.M)
    assert documented == [(name, f"{cap} s") for name, cap in caps.items()] + [("summary", "-")]


def test_stage_caps_fit_the_eight_minute_budget():
    assert sum(_stage_caps().values()) < 8 * 60
