"""The output folder of a run and its rules: the folder's checks, ``config.json``, ``log.csv``, what a resumed or forked run may change, and the fingerprint that ties a checkpoint to its data.

A run folder holds::

    config.json            the complete resolved config, versions, device
    log.csv                one row per member per epoch plus an ensemble row, flushed every epoch
    checkpoints/last.pt    the newest checkpoint (prev.pt: the one before it)
    checkpoints/phase1.pt  the state at the end of epoch T_d (de_sam, sharpbalance), before scoring
    results.json, ...      written at the end by ``EnsembleResult.save``
    run.lock               while a process writes the folder (``sbfast.train.lock``)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import platform
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbfast.models import create_model
from sbfast.train.checkpoint import (
    CHECKPOINT_DIR,
    check_unlocked,
    encode,
    has_checkpoint,
    load_latest,
    remove_stale_temporaries,
    save_checkpoint,
    write_atomic,
)
from sbfast.train.config import TrainConfig, thread_limit
from sbfast.train.data import TrainData, load_data
from sbfast.train.evaluate import evaluate_ensemble
from sbfast.train.results import EnsembleResult
from sbfast.train.steps import get_components

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


def resumable(path: str | Path) -> bool:
    """Whether a folder holds a run to continue: a checkpoint, or the ``config.json`` of a run
    that stopped before its first checkpoint (it starts again from epoch 0 in place)."""
    p = Path(path)
    return has_checkpoint(p) or (p / CONFIG_FILE).is_file()


def check_output_dir(path: str | Path | None, resume: bool = False) -> Path:
    """Check a run's output folder before any training starts; returns it as a Path.

    New run (``resume=False``): the folder is created if needed and must be writable, and must
    not be another run's folder (one holding config.json, log.csv or checkpoints/). Resume: the
    folder must exist, be writable and hold a checkpoint (checkpoints/last.pt or prev.pt) or the
    config.json of a run that stopped before its first checkpoint.

    Raises:
        ValueError naming the folder and what is wrong with it.
    """
    if path is None or (isinstance(path, str) and not path):
        raise ValueError("output folder: none given (a run folder path is needed to checkpoint and resume)")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output folder {p}: exists and is not a folder")
    if p.is_dir():
        check_unlocked(p)  # another process writes it now: say who, before anything else
    if resume:
        if not p.is_dir():
            raise ValueError(f"cannot resume {p}: no such folder")
        if not resumable(p):
            raise ValueError(
                f"cannot resume {p}: it has no {CHECKPOINT_DIR}/last.pt or prev.pt and no {CONFIG_FILE} (nothing to resume)"
            )
    else:
        if p.is_dir():
            found = [m for m in RUN_MARKERS if (p / m).exists()]
            if found and resumable(p):
                raise ValueError(
                    f"output folder {p} is another run's folder (it has {', '.join(found)}); resume it with "
                    f"resume={str(p)!r} (sbfast train --resume {p}) or choose a new folder"
                )
            if found:
                raise ValueError(
                    f"output folder {p} is another run's folder (it has {', '.join(found)}) but holds neither a "
                    f"checkpoint nor {CONFIG_FILE}, so it cannot be resumed (--resume): remove it or choose a new folder"
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


def write_config(
    run_dir: str | Path, config: TrainConfig, device: torch.device | str, run_id: str | None = None
) -> Path:
    """Write ``config.json``: every field of the resolved config, the versions, the device and
    the run's identity (``run_id``, which its checkpoints carry too)."""
    payload = {
        "config": config.to_dict(),
        "device": str(device),
        "versions": versions(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if run_id is not None:
        payload["run_id"] = run_id
    path = Path(run_dir) / CONFIG_FILE
    write_atomic(path, (json.dumps(payload, indent=1) + "\n").encode())
    return path


def read_config_file(run_dir: str | Path) -> dict[str, Any]:
    """The whole ``config.json`` of a run folder (``config``, ``device``, ``versions``, ``run_id``)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        TrainConfig.from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read a run config ({e})") from None
    return data


def read_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig in a run folder's ``config.json``."""
    return TrainConfig.from_dict(read_config_file(run_dir)["config"])


def saved_config(run_dir: str | Path) -> TrainConfig:
    """A run folder's config: its ``config.json``, or, where that file is gone, the config its
    newest good checkpoint holds (a checkpoint holds the whole config)."""
    p = Path(run_dir)
    if (p / CONFIG_FILE).is_file() or not has_checkpoint(p):
        return read_config(p)
    _, payload = load_latest(p)
    return TrainConfig.from_dict(payload["config"])


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


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one folder (``unf`` and ``/abs/path/unf`` alike)."""
    return Path(a).resolve() == Path(b).resolve()


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
            if v is not None and not same_folder(v, run_dir):
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


# what a full disk (or quota) raises: the run stops, naming the file; what is on disk resumes exactly
DISK_FULL_ERRNOS: frozenset[int] = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)


class RunFolderFull(OSError):
    """A write into the run folder failed for lack of space: ``str(e)`` is one line naming the
    file and saying how the run resumes (every file a resume reads was written atomically, so
    the folder holds the last checkpoint whole). ``errno`` and ``filename`` are the write's."""

    one_line = True  # a command line prints str(e) alone: it says what to do

    def __str__(self) -> str:
        return str(self.strerror)  # the line itself (OSError's own form adds "[Errno 28]" and the name)


@contextlib.contextmanager
def disk_words(run_dir: Path, path: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one :class:`RunFolderFull` line."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS or isinstance(e, RunFolderFull):
            raise
        if path == run_dir and e.filename:  # a write of several files (the results): the one that failed
            path = Path(e.filename)
        raise RunFolderFull(
            e.errno,
            f"the disk is full: writing {path} ({what}) failed ({e.strerror or e}); the run stopped and its folder holds "
            f"its last checkpoint whole: free some space, then sbfast train --resume {run_dir} continues it exactly",
            str(path),
        ) from None


class RunFolder:
    """What a run writes into its folder, on the one process that writes it: ``config.json``,
    ``log.csv`` and the checkpoints (``checkpoints/<name>``). A full disk stops the run with
    :class:`RunFolderFull` naming the file."""

    def __init__(self, path: str | Path, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.log = RunLog(self.path)
        self.run_id = run_id

    def begin(self, config: TrainConfig, device: torch.device | str, history: Sequence[Mapping[str, Any]]) -> None:
        """As a run (or a resumed one) starts: temporaries a killed write left go, config.json
        holds the config the run goes on with, log.csv the history so far."""
        remove_stale_temporaries(self.path / CHECKPOINT_DIR)
        with disk_words(self.path, self.path / CONFIG_FILE, "the run's config"):
            write_config(self.path, config, device, self.run_id)
        with disk_words(self.path, self.log.path, "the run's log"):
            self.log.rewrite(history)

    def append(self, record: Mapping[str, Any]) -> None:
        """An epoch's rows in log.csv (flushed and fsync'ed)."""
        with disk_words(self.path, self.log.path, f"epoch {record['epoch']}'s rows of the log"):
            self.log.append(record)

    def save(self, payload: dict[str, Any], names: Sequence[str]) -> None:
        """``payload`` as ``checkpoints/<name>`` for each name, serialised once."""
        data = encode(payload)
        for name in names:
            path = self.path / CHECKPOINT_DIR / name
            with disk_words(self.path, path, "a checkpoint"):
                save_checkpoint(self.path, data, name)

    def has(self, name: str) -> bool:
        """Whether ``checkpoints/<name>`` exists."""
        return (self.path / CHECKPOINT_DIR / name).exists()


METRIC_KEYS: tuple[str, ...] = ("metrics", "diversity", "ood", "fisher_mean", "worst_case_sharpness")


def _members(payload: dict[str, Any], device: torch.device, run_dir: str | Path) -> list[nn.Module]:
    config = TrainConfig.from_dict(payload["config"])
    pos = payload["position"]
    if pos["epoch"] < config.epochs:
        warnings.warn(
            f"run {run_dir} has not finished training (its checkpoint is in epoch {pos['epoch']} of {config.epochs}): "
            "these are the members as of that checkpoint",
            RuntimeWarning,
            stacklevel=3,
        )
    spec = payload["model"]
    models = []
    for saved in payload["members"]:
        # create_model draws its initial weights from the global RNG: leave the caller's alone
        with torch.random.fork_rng(devices=[]):
            model = create_model(spec["name"], spec["num_classes"], **spec["kwargs"])
        model = model.to(dtype=config.torch_dtype)
        model.load_state_dict(saved["model"])
        models.append(model.to(device).eval())
    return models


def load_ensemble(run_dir: str | Path, device: str | torch.device = "cpu") -> list[nn.Module]:
    """The members of a run, in eval mode on ``device``, from its newest good checkpoint
    (``checkpoints/last.pt``, else ``prev.pt``); the trained ensemble once the run has finished
    (a RuntimeWarning says so when it has not).

    Returns:
        M modules of the run's architecture and dtype (``config.json``), parameters and buffers
        as the run left them; no optimizer is attached.
    Raises:
        CheckpointError (a ValueError) when no checkpoint of the folder is usable.
    """
    _, payload = load_latest(run_dir)
    return _members(payload, torch.device(device), run_dir)


def evaluate_run(
    run_dir: str | Path,
    *,
    data_root: str | None = None,
    corruption_root: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Recompute a run's final metrics from its saved members: test metrics, accuracy on the
    corrupted test sets, the members' diversity and each member's mean Fisher score, with the run's own config (data, subsets,
    corruptions, severities, batch sizes, backend, threads).

    Args:
        run_dir: the run folder. data_root / corruption_root: where the data lives now, if it
            moved (the data is checked against the checkpoint's fingerprint). device: where to
            evaluate; on the device the run used (and CPU with its thread count) the numbers
            are the run's own bit for bit.
    Returns:
        {"metrics", "diversity", "ood", "fisher_mean", "worst_case_sharpness"} exactly as the run's results
        file (``EnsembleResult.save``)
        holds them: the same JSON values.
    Raises:
        ValueError (CheckpointError included) for an unusable folder or data that is not the run's.
    """
    _, payload = load_latest(run_dir)
    config = TrainConfig.from_dict(payload["config"])
    changes = {k: v for k, v in (("data_root", data_root), ("corruption_root", corruption_root)) if v is not None}
    if changes:
        config = config.replace(**changes)
    data = load_data(config)
    if data_fingerprint(data) != payload["data"]["fingerprint"]:
        raise ValueError(
            f"the data loaded for run {run_dir} is not the data it trained on: point data_root at the run's data"
        )
    dev = torch.device(device)
    models = _members(payload, dev, run_dir)
    with thread_limit(config.num_threads, dev):
        ev = evaluate_ensemble(models, data, config, dev, get_components(config.backend).fisher)
    result = EnsembleResult(
        config=config,
        metrics=ev["metrics"],
        ood=ev["ood"],
        history=[],
        fisher_mean=ev["fisher_mean"],
        worst_case_sharpness=ev.get("worst_case_sharpness", []),
        diversity=ev["diversity"],
    )
    as_saved = json.loads(result.to_json())  # the results file's own conversion, so the values compare equal
    return {k: as_saved[k] for k in METRIC_KEYS}
