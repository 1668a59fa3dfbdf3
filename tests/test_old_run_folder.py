"""A run folder written by an earlier sbfast (tests/fixtures/run_v1, made by the code before the
trainer was re-layered) still resumes, evaluates and loads with today's code, bit for bit.

The folder is a digits sharpbalance run (2 members, width-4 CNN, 4 epochs, T_d = 1, 96 training
samples, CPU, one thread) stopped by SIGINT inside member 1's first mixed epoch (epoch 2, after
step 2): its last.pt holds a position inside an epoch, scores and masks, and phase1.pt the state
at the end of epoch 1. ``expected.json`` holds what the old code gave when it resumed that folder
to the end: sha256 of every member's parameters and buffers, the epochs' losses, sha256 of the
scores and masks, and the final metrics exactly as its results.json holds them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sbfast import train as T

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
METRIC_KEYS = ("metrics", "ood", "sharpness")
# where today's files hold what the old code called each key: the mean Fisher score was "sharpness"
TODAY_KEY = {"metrics": "metrics", "ood": "ood", "sharpness": "fisher_mean"}


def member_digests(models) -> list[str]:
    """sha256 of each member's state_dict tensors' bytes, in state_dict order."""
    out = []
    for m in models:
        h = hashlib.sha256()
        for t in m.state_dict().values():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


@pytest.fixture
def run_copy(tmp_path) -> Path:
    folder = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, folder)
    (folder / "expected.json").unlink()
    return folder


def test_the_fixture_is_stopped_inside_an_epoch():
    pos = T.load_checkpoint(FIXTURE / "checkpoints" / "last.pt")["position"]
    assert [pos["epoch"], pos["member"], pos["step"]] == EXPECTED["position"] == [2, 1, 2]


def test_an_old_run_folder_resumes_and_evaluates_bit_for_bit(run_copy):
    result = T.train_ensemble(dict(resume=str(run_copy)))
    assert member_digests(result.models) == EXPECTED["members_sha256"]
    assert [r["train_loss"] for r in result.history] == EXPECTED["history_train_loss"]
    assert hashlib.sha256(result.scores.numpy().tobytes()).hexdigest() == EXPECTED["scores_sha256"]
    assert hashlib.sha256(result.masks.numpy().tobytes()).hexdigest() == EXPECTED["masks_sha256"]
    saved = json.loads((run_copy / "results.json").read_text())
    for k in METRIC_KEYS:
        assert saved[TODAY_KEY[k]] == EXPECTED[k], f"results.json {TODAY_KEY[k]} differs from the old code's {k}"
    evaluated = T.evaluate_run(run_copy)
    for k in METRIC_KEYS:
        assert evaluated[TODAY_KEY[k]] == EXPECTED[k], f"evaluate_run {TODAY_KEY[k]} differs from the old code's {k}"
    assert member_digests(T.load_ensemble(run_copy)) == EXPECTED["members_sha256"]


def test_an_old_phase1_checkpoint_forks_to_the_uninterrupted_run(run_copy, tmp_path):
    from sbfast.train.run_folder import read_config

    config = read_config(run_copy).replace(output_dir=None, from_phase1=str(run_copy))
    result = T.train_ensemble(config)
    assert member_digests(result.models) == EXPECTED["uninterrupted_members_sha256"]
