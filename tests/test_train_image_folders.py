"""The trainer and command line on image-folder data sets: fabricated Tiny-ImageNet folders in
both val layouts (official annotations file, class folders) and a plain train/ + val/ folder,
through compare, train, eval, score, measure and tradeoff; streamed against in-memory data;
refusals before any folder is written."""

import json
import subprocess
import sys

import pytest
import torch
from test_data_folders import CLASSES, TRAIN_COUNTS, VAL_COUNTS, make_folder, make_tiny

from sbfast.cli import main
from sbfast.train import load_ensemble

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_VAL = sum(TRAIN_COUNTS.values()), sum(VAL_COUNTS.values())
SMALL = ["--width", "4", "--no-progress"]


def _sbfast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbfast", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("val", ["annotations", "folders"])
def test_compare_quick_on_tiny_imagenet_in_both_val_layouts(tmp_path, val):
    """`sbfast compare --dataset tiny_imagenet --data-root DIR --quick` as a user types it: --quick's
    subsets (384 / 180) shrink to the folder's 6 / 5 images; the release's Tiny-ImageNet model
    and preset; every method's run folder written and evaluated on the 5 val images."""
    root, out = tmp_path / "tiny", tmp_path / "out"
    make_tiny(root, val=val)
    done = _sbfast(
        "compare",
        "--dataset",
        "tiny_imagenet",
        "--data-root",
        str(root),
        "--quick",
        "--seeds",
        "0",
        "--output",
        str(out),
        *SMALL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    comp = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in comp["runs"]] == ["de", "de_sam", "sharpbalance"]
    for method in ("de", "de_sam", "sharpbalance"):
        res = json.loads((out / method / "seed0" / "results.json").read_text())
        cfg = res["config"]
        assert cfg["dataset"] == "tiny_imagenet" and cfg["model"] == "resnet18_tiny"
        assert (cfg["train_subset"], cfg["test_subset"]) == (N_TRAIN, N_VAL)
        assert cfg["augment_pad"] == 4 and cfg["augment_flip"] is True  # the release's 64x64 transforms
        assert res["metrics"]["num_samples"] == N_VAL
        assert len(res["worst_case_sharpness"]) == 3 and all(v >= 0 for v in res["worst_case_sharpness"])
        assert res["ood"] is not None and res["ood"]["per_set"]  # generated 64x64 corruptions


def test_both_val_layouts_train_the_same_run(tmp_path):
    """The two layouts are the same data set: a run on each gives the same numbers."""
    results = []
    for val in ("annotations", "folders"):
        root, out = tmp_path / val, tmp_path / f"run-{val}"
        make_tiny(root, val=val)
        args = ["train", "--dataset", "tiny_imagenet", "--data-root", str(root), "--method", "de_sam"]
        args += ["--quick", "--epochs", "2", "--eval-corruptions", "--output", str(out), *SMALL]
        assert main(args) == 0
        results.append(json.loads((out / "results.json").read_text())["metrics"])
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """`sbfast compare --dataset folder --quick` on a 2-class train/ + val/ folder of 16x12 PNGs
    (big enough for BatchNorm on a 1-sample SAM part after three stride-2 stages); its
    sharpbalance run, whose stats were computed from the train pixels and kept in its config."""
    base = tmp_path_factory.mktemp("folder")
    root, out = base / "data", base / "compare"
    make_folder(root, h=16, w=12)
    args = ["compare", "--dataset", "folder", "--data-root", str(root), "--quick", "--seeds", "0"]
    args += ["--epochs", "2", "--swap-epoch", "0", "--output", str(out), *SMALL]
    assert main(args) == 0
    assert [r["method"] for r in json.loads((out / "comparison.json").read_text())["runs"]] == [
        "de",
        "de_sam",
        "sharpbalance",
    ]
    return root, out / "sharpbalance" / "seed0"


def test_folder_runs_with_its_computed_stats_saved(folder_run):
    from sbfast.data import load_image_splits

    root, out = folder_run
    cfg = json.loads((out / "config.json").read_text())["config"]
    splits = load_image_splits("folder", root)
    assert cfg["data_mean"] == pytest.approx(list(splits.train.mean), abs=1e-12)
    assert cfg["data_std"] == pytest.approx(list(splits.train.std), abs=1e-12)
    assert cfg["model"] == "resnet18_tiny" and cfg["train_subset"] == len(splits.train)


def test_eval_score_measure_and_tradeoff_read_image_folders(folder_run, tmp_path, capsys):
    root, out = folder_run
    saved = json.loads((out / "results.json").read_text())
    assert main(["eval", str(out), "--json", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["metrics"]["ensemble_acc"] == saved["metrics"]["ensemble_acc"]
    assert ev["worst_case_sharpness"] == saved["worst_case_sharpness"]
    assert main(["score", str(out), "--output", str(tmp_path / "scores.npy")]) == 0
    import numpy as np

    assert np.load(tmp_path / "scores.npy").shape == (3, saved["config"]["train_subset"])
    assert main(["measure", str(out), "--quick", "--measures", "fisher", "worst_case"]) == 0
    measured = json.loads((out / "measures.json").read_text())
    assert {"fisher", "worst_case"} <= set(measured["measures"])
    t_out = tmp_path / "tradeoff"
    args = ["tradeoff", "--dataset", "folder", "--data-root", str(root), "--quick", "--rhos", "0.1"]
    args += ["--sharpbalance-rhos", "0.1", "--seeds", "0", "--epochs", "2", "--swap-epoch", "0"]
    args += ["--eval-corruptions", "--output", str(t_out), *SMALL]
    assert main(args) == 0
    points = json.loads((t_out / "tradeoff.json").read_text())["points"]
    assert [p["method"] for p in points] == ["de", "de_sam", "sharpbalance"]
    capsys.readouterr()


def test_streamed_data_trains_the_in_memory_run(tmp_path):
    """--data-storage stream decodes per batch what memory holds decoded: the same run."""
    root = tmp_path / "tiny"
    make_tiny(root, val="annotations")
    metrics, models = [], []
    for storage in ("memory", "stream"):
        out = tmp_path / storage
        args = ["train", "--dataset", "tiny_imagenet", "--data-root", str(root), "--method", "de_sam", "--quick"]
        args += ["--epochs", "2", "--data-storage", storage, "--eval-corruptions", "--output", str(out), *SMALL]
        assert main(args) == 0
        metrics.append(json.loads((out / "results.json").read_text())["metrics"])
        models.append(load_ensemble(out))
    assert metrics[0] == metrics[1]
    for a, b in zip(models[0], models[1], strict=True):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), k


@pytest.mark.parametrize(
    "setup, flags, match",
    [
        ("no_train", [], "no train/ folder"),
        ("tiny", ["--train-subset", "999"], "train_subset 999 is larger than tiny_imagenet's 6"),
        ("tiny", ["--image-size", "0"], "--image-size"),
        ("bad_image", [], "not an image"),
    ],
)
def test_bad_image_folders_are_one_line_before_any_run_folder(tmp_path, capsys, setup, flags, match):
    root, out = tmp_path / "data", tmp_path / "out"
    if setup == "no_train":
        (root / "val").mkdir(parents=True)
    else:
        make_tiny(root, val="annotations")
        if setup == "bad_image":
            (root / "train" / CLASSES[0] / "images" / "notes.JPEG").write_text("not a picture")
    args = ["compare", "--dataset", "tiny_imagenet", "--data-root", str(root), "--quick", "--output", str(out)]
    assert main([*args, *flags, *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_one_image_size_value_is_a_square(tmp_path):
    """`--image-size 8` (one value, as the flag's help says) resizes every image to 8 x 8."""
    from sbfast.data.images import as_size

    assert as_size((8,)) == as_size([8]) == as_size(8) == (8, 8)
    root, out = tmp_path / "data", tmp_path / "run"
    make_folder(root, h=16, w=12)
    args = ["train", "--dataset", "folder", "--data-root", str(root), "--image-size", "8", "--method", "de"]
    args += ["--quick", "--epochs", "1", "--eval-corruptions", "--output", str(out), *SMALL]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["config"]["image_size"] == [8, 8]
