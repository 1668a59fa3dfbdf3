"""A run folder written by an earlier sbfast (tests/fixtures/run_v1, made by the code before the
trainer was re-layered) still resumes, evaluates and loads with today's code, bit for bit.

The folder is a digits sharpbalance run (2 members, width-4 CNN, 4 epochs, T_d = 1, 96 training
samples, CPU, one thread) stopped by SIGINT inside member 1's first mixed epoch (epoch 2, after
step 2): its last.pt holds a position inside an epoch, scores and masks, and phase1.pt the state
at the end of epoch 1. ``expected.json`` holds what the old code gave when it resumed that folder
to the end: sha256 of every member's parameters and buffers, the epochs' losses, sha256 of the
scores and masks, and the final metrics exactly as its results.json holds them.

Float results differ between kinds of CPU (oneDNN and MKL choose kernels by vendor and vector
ISA), so the old code's numbers are recorded per kind of machine (``records``, keyed by
``record_run_v1.machine_key``; ``tests/fixtures/record_run_v1.py`` makes a record). Where this
machine has a record, today's code must give it bit for bit. Where it has none, nothing can say
what the old code gives here: the losses and metrics must then agree with every recorded
machine's to float32 round-off (one run's numbers on other hardware).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from sbfast import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from record_run_v1 import digests as member_digests  # noqa: E402
from record_run_v1 import machine_key  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
RECORDS = EXPECTED["records"]
# this machine's record: its vendor and ISA, else its vendor alone (the first record's key)
RECORD = RECORDS.get(machine_key()) or RECORDS.get(machine_key().split("/")[0])
METRIC_KEYS = ("metrics", "ood", "sharpness")
# where today's files hold what the old code called each key: the mean Fisher score was "sharpness"
TODAY_KEY = {"metrics": "metrics", "ood": "ood", "sharpness": "fisher_mean"}
ROUND_OFF = 1e-6  # relative: one run's float32 numbers on two kinds of CPU


def _close(a, b) -> bool:
    """Nested numbers equal to ROUND_OFF (everything else exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=ROUND_OFF, abs_tol=ROUND_OFF)
    return a == b


def _matches(what: str, today, key: str, record: dict | None) -> None:
    """``today`` equals ``record[key]`` (this machine's), or with no record every recorded
    machine's to round-off."""
    if record is not None:
        assert today == record[key], f"{what} differs from the old code's on this machine ({machine_key()})"
        return
    for name, other in RECORDS.items():
        assert _close(today, other[key]), f"{what} differs from the old code's on {name} beyond round-off"


@pytest.fixture
def run_copy(tmp_path) -> Path:
    folder = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, folder)
    (folder / "expected.json").unlink()
    return folder


def test_the_fixture_is_stopped_inside_an_epoch():
    pos = T.load_checkpoint(FIXTURE / "checkpoints" / "last.pt")["position"]
    assert [pos["epoch"], pos["member"], pos["step"]] == EXPECTED["position"] == [2, 1, 2]


def _resume_and_evaluate(run_copy: Path, record: dict | None) -> None:
    result = T.train_ensemble(dict(resume=str(run_copy)))
    digests = member_digests(result.models)
    if record is not None:
        assert digests == record["members_sha256"]
        assert hashlib.sha256(result.scores.numpy().tobytes()).hexdigest() == record["scores_sha256"]
        assert hashlib.sha256(result.masks.numpy().tobytes()).hexdigest() == record["masks_sha256"]
    _matches("train losses", [r["train_loss"] for r in result.history], "history_train_loss", record)
    saved = json.loads((run_copy / "results.json").read_text())
    for k in METRIC_KEYS:
        _matches(f"results.json {TODAY_KEY[k]}", saved[TODAY_KEY[k]], k, record)
    evaluated = T.evaluate_run(run_copy)
    for k in METRIC_KEYS:
        _matches(f"evaluate_run {TODAY_KEY[k]}", evaluated[TODAY_KEY[k]], k, record)
    assert member_digests(T.load_ensemble(run_copy)) == digests


def test_an_old_run_folder_resumes_and_evaluates_bit_for_bit(run_copy):
    _resume_and_evaluate(run_copy, RECORD)


def test_the_round_off_check_holds_against_the_other_machines(run_copy):
    """The path a machine without a record takes, run everywhere: today's losses and metrics
    against every recorded machine's, to round-off."""
    _resume_and_evaluate(run_copy, None)


def test_an_old_phase1_checkpoint_forks_to_the_uninterrupted_run(run_copy, tmp_path):
    from sbfast.train.run_folder import read_config

    config = read_config(run_copy).replace(output_dir=None, from_phase1=str(run_copy))
    result = T.train_ensemble(config)
    if RECORD is not None:
        assert member_digests(result.models) == RECORD["uninterrupted_members_sha256"]
    # the uninterrupted run's losses are the resumed run's, on every machine to round-off
    _matches("forked train losses", [r["train_loss"] for r in result.history], "history_train_loss", None)
