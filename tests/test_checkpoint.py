"""sbfast.train.checkpoint and sbfast.train.run_folder: the checkpoint file (atomic, checksummed,
weights_only), its damage detection and fallback, the output folder's checks, config.json and
log.csv. Everything here is file-level and takes well under a second per test."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from sbfast import train as T
from sbfast.train import checkpoint as C
from sbfast.train import run_folder as RF


def payload(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "format": C.PAYLOAD_FORMAT,
        "members": [{"w": torch.randn(7, 3, generator=g), "b": torch.arange(5, dtype=torch.int64)}],
        "f64": torch.randn(129, dtype=torch.float64, generator=g),
        "mask": torch.rand(13, generator=g) > 0.5,
        "empty": torch.zeros(0),
        "gen": torch.Generator().manual_seed(3).get_state(),
        "history": [{"epoch": 0, "phase": "sam", "train_loss": [2.5, 2.25], "test_acc": None}],
        "nested": {"t": (1, 2.5, "x", None, True)},
        "seed": seed,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------ the file


def test_round_trip_keeps_every_value_and_dtype(tmp_path):
    p = C.save_checkpoint(tmp_path, payload())
    assert p == tmp_path / "checkpoints" / "last.pt"
    assert_same(C.load_checkpoint(p), payload())
    raw = p.read_bytes()
    magic, version, length, digest = C.HEADER.unpack_from(raw)
    assert (magic, version, length) == (C.MAGIC, C.FORMAT_VERSION, len(raw) - C.HEADER.size)


def test_encode_rejects_a_non_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        C.encode([1, 2])


@pytest.mark.parametrize("keep", [0, 5, C.HEADER.size, C.HEADER.size + 1, -1])
def test_truncated_file_is_detected(tmp_path, keep):
    p = C.save_checkpoint(tmp_path, payload())
    raw = p.read_bytes()
    n = len(raw) + keep if keep < 0 else keep
    p.write_bytes(raw[:n])
    expected = "empty" if n == 0 else "truncated"
    with pytest.raises(C.CheckpointError, match=rf"checkpoint {re.escape(str(p))}: {expected}"):
        C.load_checkpoint(p)


def test_every_flipped_byte_is_detected(tmp_path):
    # a flip anywhere: the magic, version, length, checksum or payload; never a silent load
    p = C.save_checkpoint(tmp_path, payload())
    raw = bytearray(p.read_bytes())
    kinds = set()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(C.CheckpointError) as e:
            C.decode(bytes(bad), "x.pt")
        msg = str(e.value)
        assert msg.startswith("checkpoint x.pt: ")
        kinds.add(msg.split(": ", 1)[1].split(" ")[0])
    assert {"not", "format", "truncated", "corrupted"} <= kinds, kinds


def test_appended_bytes_are_detected(tmp_path):
    p = C.save_checkpoint(tmp_path, payload())
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(C.CheckpointError, match="corrupted \\(1 bytes after"):
        C.load_checkpoint(p)


class NotAllowed:
    def __init__(self) -> None:
        self.v = 1


def _framed(body: bytes, version: int = C.FORMAT_VERSION) -> bytes:
    import hashlib

    return C.HEADER.pack(C.MAGIC, version, len(body), hashlib.sha256(body).digest()) + body


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, plain)  # an ordinary torch checkpoint
    with pytest.raises(C.CheckpointError, match=rf"{re.escape(str(plain))}: not an sbfast checkpoint"):
        C.load_checkpoint(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint at all\n" * 3)
    with pytest.raises(C.CheckpointError, match="not an sbfast checkpoint"):
        C.load_checkpoint(text)
    with pytest.raises(C.CheckpointError, match="missing"):
        C.load_checkpoint(tmp_path / "nope.pt")


def test_payload_is_read_with_weights_only(tmp_path):
    # checksum and header right, but the payload pickles an arbitrary class: refused, not run
    buf = io.BytesIO()
    torch.save({"format": C.PAYLOAD_FORMAT, "x": NotAllowed()}, buf)
    p = tmp_path / "evil.pt"
    p.write_bytes(_framed(buf.getvalue()))
    with pytest.raises(C.CheckpointError, match="holds objects other than tensors.*NotAllowed"):
        C.load_checkpoint(p)
    # a well-formed payload of another program
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2)}, buf)
    p.write_bytes(_framed(buf.getvalue()))
    with pytest.raises(C.CheckpointError, match="not an sbfast training checkpoint"):
        C.load_checkpoint(p)


def test_unknown_format_version_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save(payload(), buf)
    p = tmp_path / "future.pt"
    p.write_bytes(_framed(buf.getvalue(), version=C.FORMAT_VERSION + 1))
    with pytest.raises(C.CheckpointError, match=f"format version {C.FORMAT_VERSION + 1}; this sbfast reads version"):
        C.load_checkpoint(p)


# ------------------------------------------------------------------------------ writing and rotation


def test_last_keeps_its_predecessor(tmp_path):
    for seed in range(3):
        C.save_checkpoint(tmp_path, payload(seed))
    assert C.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["seed"] == 2
    assert C.load_checkpoint(tmp_path / "checkpoints" / "prev.pt")["seed"] == 1
    C.save_checkpoint(tmp_path, payload(7), "phase1.pt")  # no rotation for phase1
    assert C.load_checkpoint(tmp_path / "checkpoints" / "prev.pt")["seed"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "phase1.pt", "prev.pt"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    C.save_checkpoint(tmp_path, payload(1))

    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise KeyboardInterrupt  # a signal arriving mid-write

    monkeypatch.setattr(C, "_write_bytes", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, payload(2))
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    assert C.load_checkpoint(folder / "last.pt")["seed"] == 1


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    C.save_checkpoint(tmp_path, payload(1))
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-last.pt-999").write_bytes(b"torn")
    C.remove_stale_temporaries(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


def test_load_latest_falls_back_to_prev_and_names_the_problem(tmp_path):
    C.save_checkpoint(tmp_path, payload(1))
    C.save_checkpoint(tmp_path, payload(2))
    last = tmp_path / "checkpoints" / "last.pt"
    path, got = C.load_latest(tmp_path)
    assert path == last and got["seed"] == 2
    raw = last.read_bytes()
    last.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(RuntimeWarning, match=r"last.pt: truncated .*using the previous checkpoint .*prev.pt"):
        path, got = C.load_latest(tmp_path)
    assert path.name == "prev.pt" and got["seed"] == 1
    prev = tmp_path / "checkpoints" / "prev.pt"
    bad = bytearray(prev.read_bytes())
    bad[-3] ^= 1
    prev.write_bytes(bytes(bad))
    with pytest.raises(C.CheckpointError, match=r"no usable checkpoint .*last.pt: truncated.*prev.pt: corrupted"):
        C.load_latest(tmp_path)
    last.unlink()  # the window between the two renames of a write: only prev.pt exists
    prev.write_bytes(C.encode(payload(5)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert C.load_latest(tmp_path)[1]["seed"] == 5


def test_phase1_path(tmp_path):
    assert C.phase1_path(tmp_path) == tmp_path / "checkpoints" / "phase1.pt"
    f = tmp_path / "x.pt"
    f.write_bytes(b"")
    assert C.phase1_path(f) == f


# ------------------------------------------------------------------------------ the run folder


def test_check_output_dir_new_folder(tmp_path):
    p = RF.check_output_dir(tmp_path / "a" / "b")
    assert p.is_dir() and list(p.iterdir()) == []
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")  # a folder with unrelated files is fine
    assert RF.check_output_dir(str(tmp_path / "plain")) == tmp_path / "plain"


@pytest.mark.parametrize("marker", ["config.json", "log.csv", "checkpoints"])
def test_check_output_dir_refuses_another_runs_folder(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).mkdir() if marker == "checkpoints" else (run / marker).write_text("{}")
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(run))} is another run's folder \(it has {marker}\).*--resume"
    ):
        RF.check_output_dir(run)


def test_check_output_dir_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        RF.check_output_dir(f)
    with pytest.raises(ValueError, match="cannot be created"):
        RF.check_output_dir(f / "sub")
    with pytest.raises(ValueError, match="none given"):
        RF.check_output_dir(None)
    if Path("/proc").is_dir():  # Linux: a folder no one may create files in, not even root
        with pytest.raises(ValueError, match="not writable|cannot be created"):
            RF.check_output_dir("/proc")
    with pytest.raises(ValueError, match="cannot resume .*no such folder"):
        RF.check_output_dir(tmp_path / "gone", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to resume"):
        RF.check_output_dir(tmp_path / "empty", resume=True)
    C.save_checkpoint(tmp_path / "empty", payload())
    assert RF.check_output_dir(tmp_path / "empty", resume=True) == tmp_path / "empty"


def test_default_run_dir_is_new_and_unique(tmp_path):
    a = RF.default_run_dir("sharpbalance", tmp_path / "runs")
    b = RF.default_run_dir("sharpbalance", tmp_path / "runs")
    assert a != b and a.is_dir() and b.is_dir()
    assert re.fullmatch(r"\d{8}-\d{6}-sharpbalance-[0-9a-f]{6}", a.name)
    RF.check_output_dir(a)  # a new run folder passes the check


def test_config_json_holds_every_field_versions_and_device(tmp_path):
    cfg = T.TrainConfig(dataset="synthetic", epochs=3, checkpoint_every=2)
    RF.write_config(tmp_path, cfg, torch.device("cpu"))
    d = json.loads((tmp_path / "config.json").read_text())
    import dataclasses

    assert set(d["config"]) == {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert d["device"] == "cpu" and d["versions"]["torch"] == str(torch.__version__)
    assert set(d["versions"]) == {"sbfast", "torch", "python"}
    assert RF.read_config(tmp_path) == cfg


def _record(epoch: int, m: int = 2) -> dict:
    return {
        "epoch": epoch,
        "phase": "mixed",
        "lr": 0.1,
        "train_loss": [1.0 + epoch, 2.0 + epoch][:m],
        "test_acc": [0.5, 0.75][:m],
        "ensemble_test_acc": 0.8,
        "time_s": 1.5,
        "wall_s": 3.0 + epoch,
        "sam_share": [0.25, 0.75][:m],
    }


def test_log_csv_rows_and_rewrite(tmp_path):
    log = RF.RunLog(tmp_path)
    log.rewrite([])
    for e in range(3):
        log.append(_record(e))
    rows = log.read()
    assert len(rows) == 3 * 3 and list(rows[0]) == list(RF.LOG_COLUMNS)
    ens = [r for r in rows if r["member"] == "ensemble"]
    assert [r["epoch"] for r in ens] == ["0", "1", "2"]
    assert float(ens[0]["train_loss"]) == 1.5 and float(ens[0]["sam_share"]) == 0.5 and float(ens[0]["test_acc"]) == 0.8
    assert rows[1]["member"] == "1" and float(rows[1]["test_acc"]) == 0.75 and float(rows[1]["sam_share"]) == 0.75
    # a resume rewrites the file from the checkpoint's history, dropping later epochs
    log.rewrite([_record(0)])
    with open(tmp_path / "log.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 3
    # an epoch without a test evaluation leaves test_acc empty
    rec = dict(_record(1), test_acc=None, ensemble_test_acc=None)
    log.append(rec)
    assert all(r["test_acc"] == "" for r in log.read()[3:])
