"""``python -m sbfast``: ``run --quick`` writes its files and prints the comparison table; ``info``;
bad options fail with a clear message and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from sbfast.__main__ import COMPARISON_COLUMNS, main


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sbfast\\.(optim|sharpness|select) is not available")
        yield
    torch.set_num_threads(n)


def test_run_quick_writes_files_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--no-progress", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("method") and "wall_s" in line)
    assert header.split() == COMPARISON_COLUMNS
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["de"], ["de_sam"], ["sharpbalance"])]
    assert [r[0] for r in rows[-3:]] == ["de", "de_sam", "sharpbalance"]  # the comparison's rows
    for m in ("de", "de_sam", "sharpbalance"):
        res = json.loads((out / m / "results.json").read_text())
        assert res["config"]["method"] == m and res["config"]["dataset"] == "digits"
        assert len(res["history"]) == 5 and res["ood"]["per_severity"].keys() == {"1", "5"}
        assert (out / m / "metrics.txt").read_text().startswith("method")
        assert (out / m / "plot.png").read_bytes()[:4] == b"\x89PNG"
    comp = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in comp["rows"]] == ["de", "de_sam", "sharpbalance"]
    assert all(0.3 < r["ensemble_acc"] <= 1 for r in comp["rows"])  # five short epochs still learn
    assert (out / "comparison.txt").read_text().split("\n")[0].split() == COMPARISON_COLUMNS
    assert (out / "comparison.png").stat().st_size > 10_000


def test_run_options_reach_the_config(tmp_path):
    out = tmp_path / "r"
    code = main(["run", "--methods", "sharpbalance", "--dataset", "synthetic", "--epochs", "3", "--swap-epoch", "0",
                 "--members", "2", "--ratio", "0.25", "--variant", "boost", "--batching", "exact", "--backend",
                 "reference", "--width", "4", "--train-subset", "48", "--test-subset", "24", "--corruptions",
                 "--seed", "3", "--no-progress", "--output", str(out)])  # fmt: skip
    assert code == 0
    cfg = json.loads((out / "sharpbalance" / "results.json").read_text())["config"]
    assert (cfg["epochs"], cfg["swap_epoch"], cfg["members"], cfg["ratio"], cfg["variant"]) == (3, 0, 2, 0.25, "boost")
    assert (cfg["batching"], cfg["backend"], cfg["model_kwargs"], cfg["seed"]) == ("exact", "reference", {"width": 4}, 3)
    assert cfg["eval_corruptions"] == [] and not (out / "de").exists()


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(["run", "--ratio", "1.5", "--output", str(tmp_path / "x")]) == 2
    assert "ratio must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--methods", "sgd"])
    assert e.value.code == 2


def test_info_and_module_entry_point():
    # a real `python -m sbfast` process: the entry point and the import path work as users call them
    proc = subprocess.run([sys.executable, "-m", "sbfast", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout
    assert "global_sq_norm" in proc.stdout and "trainer components" in proc.stdout
