"""The output folder of a run: its checks, ``config.json`` and ``log.csv``.

A run folder holds::

    config.json            the complete resolved config, versions, device
    log.csv                one row per member per epoch plus an ensemble row, flushed every epoch
    checkpoints/last.pt    the newest checkpoint (prev.pt: the one before it)
    checkpoints/phase1.pt  the state at the end of epoch T_d (de_sam, sharpbalance), before scoring
    results.json, ...      written at the end by ``EnsembleResult.save``
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sbfast.train.checkpoint import CHECKPOINT_DIR, has_checkpoint, write_atomic
from sbfast.train.config import TrainConfig

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "phase",
    "member",
    "train_loss",
    "test_acc",
    "lr",
    "sam_share",
    "epoch_s",
    "wall_s",
)
# what marks a folder as a run's: another run must not write into it (unless resuming it)
RUN_MARKERS: tuple[str, ...] = (CONFIG_FILE, LOG_FILE, CHECKPOINT_DIR)


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """Create and return a new, empty run folder ``root/<YYYYmmdd-HHMMSS>-<method>-<6 hex>``.

    The random tail makes two runs started in the same second distinct; the folder is created
    here (``exist_ok=False``), so no two callers ever get the same one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create a new run folder under {root}")  # 100 collisions of 24 random bits


def check_output_dir(path: str | Path | None, resume: bool = False) -> Path:
    """Check a run's output folder before any training starts; returns it as a Path.

    New run (``resume=False``): the folder is created if needed and must be writable, and must
    not be another run's folder (one holding config.json, log.csv or checkpoints/). Resume: the
    folder must exist, be writable and hold a checkpoint (checkpoints/last.pt or prev.pt).

    Raises:
        ValueError naming the folder and what is wrong with it.
    """
    if path is None or (isinstance(path, str) and not path):
        raise ValueError("output folder: none given (a run folder path is needed to checkpoint and resume)")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output folder {p}: exists and is not a folder")
    if resume:
        if not p.is_dir():
            raise ValueError(f"cannot resume {p}: no such folder")
        if not has_checkpoint(p):
            raise ValueError(f"cannot resume {p}: it has no {CHECKPOINT_DIR}/last.pt or prev.pt (nothing to resume)")
    else:
        if p.is_dir():
            found = [m for m in RUN_MARKERS if (p / m).exists()]
            if found:
                raise ValueError(
                    f"output folder {p} is another run's folder (it has {', '.join(found)}); resume it with "
                    f"resume={str(p)!r} (sbfast train --resume {p}) or choose a new folder"
                )
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"output folder {p}: cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ValueError(f"output folder {p}: not writable ({e.strerror or e})") from None
    return p


def versions() -> dict[str, str]:
    import sbfast

    # str(): torch.__version__ is a TorchVersion, which a weights_only load refuses
    return {"sbfast": str(sbfast.__version__), "torch": str(torch.__version__), "python": platform.python_version()}


def write_config(run_dir: str | Path, config: TrainConfig, device: torch.device | str) -> Path:
    """Write ``config.json``: every field of the resolved config, the versions and the device."""
    payload = {
        "config": config.to_dict(),
        "device": str(device),
        "versions": versions(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(run_dir) / CONFIG_FILE
    write_atomic(path, (json.dumps(payload, indent=1) + "\n").encode())
    return path


def read_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig in a run folder's ``config.json``."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read a run config ({e})") from None


def _num(v: Any) -> str:
    return "" if v is None else repr(float(v))


def log_rows(record: Mapping[str, Any]) -> list[list[str]]:
    """``log.csv`` rows of one epoch's history record: one per member, then ``ensemble``
    (train_loss and sam_share: the members' means; test_acc: the ensemble's)."""
    losses: Sequence[float] = record["train_loss"]
    shares: Sequence[float] = record.get("sam_share") or [float("nan")] * len(losses)
    accs = record.get("test_acc")
    common = dict(
        epoch=str(record["epoch"]),
        phase=record["phase"],
        lr=_num(record["lr"]),
        epoch_s=_num(record.get("time_s")),
        wall_s=_num(record.get("wall_s")),
    )
    rows = []
    for j, loss in enumerate(losses):
        rows.append(
            {
                **common,
                "member": str(j),
                "train_loss": _num(loss),
                "sam_share": _num(shares[j]),
                "test_acc": _num(accs[j]) if accs is not None else "",
            }
        )
    rows.append(
        {
            **common,
            "member": "ensemble",
            "train_loss": _num(sum(losses) / max(len(losses), 1)),
            "sam_share": _num(sum(shares) / max(len(shares), 1)),
            "test_acc": _num(record.get("ensemble_test_acc")),
        }
    )
    return [[r[c] for c in LOG_COLUMNS] for r in rows]


class RunLog:
    """``log.csv`` of a run: appended and flushed (and fsync'ed) after every epoch, so that it is
    readable up to the last finished epoch after a kill. A resumed run rewrites it from the
    checkpoint's history first, which also drops rows of epochs the checkpoint does not hold."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOG_FILE

    @staticmethod
    def _text(rows: Iterable[list[str]], header: bool) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(LOG_COLUMNS)
        w.writerows(rows)
        return buf.getvalue()

    def rewrite(self, history: Sequence[Mapping[str, Any]]) -> None:
        rows = [row for rec in history for row in log_rows(rec)]
        write_atomic(self.path, self._text(rows, header=True).encode())

    def append(self, record: Mapping[str, Any]) -> None:
        if not self.path.exists():
            self.rewrite([])
        with open(self.path, "a", newline="") as f:
            f.write(self._text(log_rows(record), header=False))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))
