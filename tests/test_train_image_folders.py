"""The trainer and command line on image-folder data sets: fabricated Tiny-ImageNet folders in
both val layouts (official annotations file, class folders), trained and written by ``compare``."""

import json
import subprocess
import sys

import pytest
from test_data_folders import make_tiny


@pytest.mark.parametrize("val", ["annotations", "folders"])
def test_compare_tiny_imagenet_writes_its_run_folders(tmp_path, val):
    root, out = tmp_path / "tiny", tmp_path / "out"
    make_tiny(root, val=val)
    # --quick's subsets (384 train) exceed the 6 fabricated images: ask for the sizes there are
    cmd = [sys.executable, "-m", "sbfast", "compare", "--dataset", "tiny_imagenet", "--data-root", str(root)]
    cmd += ["--quick", "--width", "4", "--train-subset", "6", "--test-subset", "4", "--output-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "comparison.json").read_text())
    assert summary
    results = sorted(out.glob("*/seed*/results.json"))
    assert len(results) >= 3, results  # one run folder per method at least
    for path in results:
        config = json.loads((path.parent / "config.json").read_text())["config"]
        assert config["dataset"] == "tiny_imagenet"
