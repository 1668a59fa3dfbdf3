"""The output folder of a run and its rules: the folder's checks, ``config.json``, ``log.csv``, what a resumed or forked run may change, and the fingerprint that ties a checkpoint to its data.

A run folder holds::

    config.json            the complete resolved config, versions, device
    log.csv                one row per member per epoch plus an ensemble row, flushed every epoch
    checkpoints/last.pt    the newest checkpoint (prev.pt: the one before it)
    checkpoints/phase1.pt  the state at the end of epoch T_d (de_sam, sharpbalance), before scoring
    results.json, ...      written at the end by ``EnsembleResult.save``
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sbfast.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    PREVIOUS,
    encode,
    has_checkpoint,
    load_checkpoint,
    load_latest,
    phase1_path,
    remove_stale_temporaries,
    save_checkpoint,
    write_atomic,
)
from sbfast.train.config import TrainConfig, as_config
from sbfast.train.data import TrainData

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


# Fields a resume may change. They leave every parameter, score, mask and metric as the
# uninterrupted run would have them:
#   progress, checkpoint_every, output_dir (the folder being resumed), resume: bookkeeping;
#   eval_every: only which epochs' history rows carry a test accuracy (evaluation reads no RNG);
#   data_root, corruption_root: where the same files now live (the training data is checked
#     against the checkpoint's fingerprint; corruption_root may move but not appear or vanish).
# Two more may change the last bits of float roundings, never the computation:
#   num_threads: the CPU intra-op threads (a parallel reduction may add in another order);
#   backend: the fast and reference components compute the same steps (the optimizer state has
#     one layout, torch.optim.SGD's), the fused optimizer bit for bit on CPU; the scorers agree
#     to rounding. Keep both as they were for a bit-exact resume.
#   placement, dist_timeout: where members run under torchrun and how long an exchange waits;
#     a change of placement that would change a data-parallel member's numbers is refused by
#     sbfast.distributed.ensemble.check_resume_placement, against the placement saved in the checkpoint.
# Every other field (model, seeds, schedule, rho, ratio, batching, dtype, compile, ...) is refused.
RESUME_ROUNDING_FIELDS: tuple[str, ...] = ("num_threads", "backend")
RESUME_SAFE_FIELDS: tuple[str, ...] = (
    "progress",
    "checkpoint_every",
    "output_dir",
    "resume",
    "eval_every",
    "data_root",
    "corruption_root",
    "placement",
    "dist_timeout",
    *RESUME_ROUNDING_FIELDS,
)

# Fields that fix phase 1 (epochs 0..T_d): a run may start at T_d + 1 from another run's
# phase1.pt only when these are equal. Epochs is one of them (the LR schedule spans them),
# test_subset too (phase 1's history holds test accuracies). Free: method (de_sam or
# sharpbalance), batching (phase 1 does not use it), ratio, variant, scoring and evaluation.
PHASE1_FIELDS: tuple[str, ...] = (
    "dataset",
    "train_subset",
    "test_subset",
    "model",
    "model_kwargs",
    "members",
    "dtype",
    "epochs",
    "swap_epoch",
    "rho",
    "adaptive",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "lr_schedule",
    "augment",
    "augment_pad",
    "augment_flip",
    "seed",
    "backend",
    "compile",
    "cuda_graphs",
)


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def same_value(a: Any, b: Any) -> bool:
    """Equality of config values as JSON sees them (tuples and lists alike)."""
    return _plain(a) == _plain(b)


def requested_fields(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The fields a caller asked for when resuming: a dict's keys; for a TrainConfig, the fields
    that differ from a default TrainConfig of the same data set (a field left at its default
    cannot be told from one set to its default, so it is taken from the saved run)."""
    if isinstance(config, Mapping):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict of its fields, got {type(config).__name__}")
    base = TrainConfig(dataset=config.dataset, data_root=config.data_root)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if f.name in ("dataset", "data_root"):
            if not same_value(v, f.default):
                out[f.name] = v
        elif not same_value(v, getattr(base, f.name)):
            out[f.name] = v
    return out


def resumed_config(
    saved: TrainConfig, requested: Mapping[str, Any], run_dir: str | Path, saved_device: str
) -> TrainConfig:
    """The config a resume runs with: the saved one, with the requested changes that
    ``RESUME_SAFE_FIELDS`` allows, ``output_dir`` set to the resumed folder and ``resume`` None.

    Raises:
        ValueError naming every requested field that would change the result (nothing else runs).
    """
    refused, changes = [], {}
    for k, v in requested.items():
        if k == "resume":
            continue
        if k == "output_dir":
            if v is not None and Path(v) != Path(run_dir):
                refused.append(f"output_dir {v!r} (a resumed run writes into its own folder {str(run_dir)!r})")
            continue
        old = getattr(saved, k)
        if k == "device":
            # an explicit device is fine where it is the kind the run trained on (its generators
            # hold that kind's states); None means the saved choice
            if v is not None and torch.device(v).type != torch.device(saved_device).type:
                refused.append(f"device {saved_device!r} -> {v!r}")
            elif v is not None:
                changes[k] = v
            continue
        if same_value(v, old):
            continue
        if k == "corruption_root" and (v is None) != (old is None):
            refused.append(f"corruption_root {old!r} -> {v!r} (it may move, not appear or vanish)")
        elif k in RESUME_SAFE_FIELDS:
            changes[k] = v
        else:
            refused.append(f"{k} {old!r} -> {v!r}")
    if refused:
        raise ValueError(
            f"cannot resume {run_dir} with changed fields that change the result: {'; '.join(refused)} "
            f"(a resume may change only {', '.join(RESUME_SAFE_FIELDS)})"
        )
    changes["output_dir"] = str(run_dir)
    changes["resume"] = None
    return saved.replace(**changes)


def check_phase1_compatible(source: TrainConfig, config: TrainConfig, path: str | Path) -> None:
    """Whether ``config`` may start at T_d + 1 from ``source``'s phase-1 checkpoint.

    Raises:
        ValueError naming ``path`` and every field that differs (nothing else runs).
    """
    if source.method not in ("de_sam", "sharpbalance"):
        raise ValueError(f"from_phase1 {path}: written by a {source.method!r} run, which has no SAM phase 1")
    diffs = [
        f"{k} {getattr(source, k)!r} there, {getattr(config, k)!r} here"
        for k in PHASE1_FIELDS
        if not same_value(getattr(source, k), getattr(config, k))
    ]
    if diffs:
        raise ValueError(
            f"from_phase1 {path}: phase 1 of that run is not this run's phase 1: {'; '.join(diffs)} "
            f"(these must be equal: {', '.join(PHASE1_FIELDS)})"
        )


def data_fingerprint(data: TrainData) -> str:
    """sha256 (hex) of the run's train and test tensors (values, shapes, dtypes, normalisation):
    what ties a checkpoint to its data when the data's folder moves."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        if hasattr(split, "fingerprint"):  # streamed: paths, sizes, labels, normalisation
            h.update(split.fingerprint().encode())
            continue
        for t in (split.x, split.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        h.update(repr((split.mean, split.std)).encode())
    h.update(str(data.num_classes).encode())
    return h.hexdigest()


class RunFolder:
    """What a run writes into its folder, on the one process that writes it: ``config.json``,
    ``log.csv`` and the checkpoints (``checkpoints/<name>``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.log = RunLog(self.path)

    def begin(self, config: TrainConfig, device: torch.device | str, history: Sequence[Mapping[str, Any]]) -> None:
        """As a run (or a resumed one) starts: temporaries a killed write left go, config.json
        holds the config the run goes on with, log.csv the history so far."""
        remove_stale_temporaries(self.path / CHECKPOINT_DIR)
        write_config(self.path, config, device)
        self.log.rewrite(history)

    def append(self, record: Mapping[str, Any]) -> None:
        """An epoch's rows in log.csv (flushed and fsync'ed)."""
        self.log.append(record)

    def save(self, payload: dict[str, Any], names: Sequence[str]) -> None:
        """``payload`` as ``checkpoints/<name>`` for each name, serialised once."""
        data = encode(payload)
        for name in names:
            save_checkpoint(self.path, data, name)

    def has(self, name: str) -> bool:
        """Whether ``checkpoints/<name>`` exists."""
        return (self.path / CHECKPOINT_DIR / name).exists()


@dataclass(frozen=True)
class PreparedRun:
    """What ``train_ensemble`` starts from, settled before anything trains: the config it runs
    with, its folder (None: no folder), the checkpoint payload it continues from (a resume's
    newest good checkpoint, a fork's phase1.pt; None for a fresh run), whether that payload is a
    fork's, and a damaged ``last.pt`` that the resume passed over (to be set aside)."""

    config: TrainConfig
    device: torch.device  # the config's device, checked on this machine
    run_dir: Path | None
    payload: dict[str, Any] | None = None
    fork: bool = False
    bad_last: Path | None = None


def prepare_run(config: TrainConfig | Mapping[str, Any], resume: str | Path | None = None) -> PreparedRun:
    """Settle a run's config, folder and starting checkpoint (docs/runs.md).

    ``resume`` (or ``config.resume``): the folder's newest good checkpoint, with the saved
    config and the requested changes ``RESUME_SAFE_FIELDS`` allows. Otherwise ``config`` as given,
    with ``config.from_phase1``'s checkpoint when it forks (checked by ``check_phase1_compatible``)
    and its device checked before any folder is created. A new run's folder is not created here
    (under torchrun only rank 0 does that).

    Raises:
        ValueError (CheckpointError included) naming what is wrong; nothing is written.
    """
    asked = config.get("resume") if isinstance(config, Mapping) else getattr(config, "resume", None)
    if resume is not None and asked is not None and Path(resume) != Path(asked):
        raise ValueError(f"resume={str(resume)!r} and config.resume={asked!r} name different runs")
    resume = resume if resume is not None else asked
    if resume is not None:
        run_dir = check_output_dir(resume, resume=True)
        path, payload = load_latest(run_dir)
        bad_last = path.parent / LAST if path.name == PREVIOUS and (path.parent / LAST).exists() else None
        saved = TrainConfig.from_dict(payload["config"])
        resumed = resumed_config(saved, requested_fields(config), run_dir, payload["device"])
        return PreparedRun(resumed, resumed.check_device(), run_dir, payload, bad_last=bad_last)
    config = as_config(config)
    payload = None
    if config.from_phase1 is not None:
        source = phase1_path(config.from_phase1)
        payload = load_checkpoint(source)
        check_phase1_compatible(TrainConfig.from_dict(payload["config"]), config, source)
        payload = dict(payload, forked_from=str(source))
    device = config.check_device()  # before the folder is created: a bad device leaves nothing behind
    run_dir = Path(config.output_dir) if config.output_dir else None
    return PreparedRun(config, device, run_dir, payload, fork=payload is not None)


def claim_folder(plan: Any, prepared: PreparedRun) -> PreparedRun:
    """A new run's folder, checked and created by rank 0 of ``plan`` (its outcome handed to every
    process: each process of a command line may name a folder of its own; one that is not rank
    0's and is left empty goes). A resumed run's folder was checked when it was prepared.

    ``plan``: a ``sbfast.distributed`` plan (``on_rank0``); a one-process plan runs the check here.
    """
    if prepared.payload is not None and not prepared.fork:
        return prepared
    own = prepared.run_dir
    run_dir = plan.on_rank0(lambda: check_output_dir(own) if own is not None else None, "the output folder check")
    if own is not None and run_dir is not None and own.resolve() != run_dir.resolve():
        if own.is_dir() and not any(own.iterdir()):
            own.rmdir()
    if run_dir == own:
        return dataclasses.replace(prepared, run_dir=run_dir)
    config = prepared.config.replace(output_dir=str(run_dir) if run_dir is not None else None)
    return dataclasses.replace(prepared, config=config, run_dir=run_dir)
