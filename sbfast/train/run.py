"""A run from its config: ``train_ensemble`` prepares the run, joins the world it runs in (a
torchrun job, or a world of size one), locks the folder (rank 0 holds the lock), builds the
trainer there and runs it (docs/runs.md).

What a run starts from is settled before anything trains: its config, device, folder, the
checkpoint it continues from and the lock on its folder.

``prepare_run`` reads (every process of a torchrun job does); ``claim_folder`` creates a new
run's folder and takes the folder's lock, on rank 0 only. A resume reads the folder's
``config.json`` and its newest good checkpoint and refuses them when they are not the same
run's (another run's ``last.pt`` copied in, an edited ``config.json``); a folder whose run
stopped before its first checkpoint (``config.json``, perhaps ``log.csv``, no checkpoint)
starts again from epoch 0 in place, with its ``config.json``.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sbfast.distributed.ensemble import start_plan
from sbfast.distributed.local_plan import LocalPlan, Plan
from sbfast.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    PREVIOUS,
    RunLock,
    checkpoint_paths,
    has_checkpoint,
    load_checkpoint,
    load_latest,
    phase1_path,
)
from sbfast.train.config import TrainConfig, as_config, check_num_threads, thread_limit
from sbfast.train.data import TrainData
from sbfast.train.results import EnsembleResult
from sbfast.train.run_folder import (
    CONFIG_FILE,
    RESUME_SAFE_FIELDS,
    check_output_dir,
    check_phase1_compatible,
    disk_words,
    read_config_file,
    requested_fields,
    resumed_config,
    same_folder,
    same_value,
)
from sbfast.train.run_state import Callback, RunInterrupted
from sbfast.train.trainer import EnsembleTrainer

# Fields config.json and a checkpoint of one run may hold differently: those a resume may
# change (a run killed after writing config.json and before its next checkpoint has the new
# value in the one, the old in the other), and the device (named as the kind it trained on).
NOT_COMPARED: tuple[str, ...] = (*RESUME_SAFE_FIELDS, "device")


def new_run_id() -> str:
    """A new run's identity (16 hex digits), written into its config.json and every checkpoint."""
    return secrets.token_hex(8)


def folder_stamp(run_dir: Path) -> tuple[Any, ...]:
    """The state of the files a resume reads (checkpoints, config.json): size, time and inode of
    each, so that a write by another process between the read and the lock is seen."""
    out = []
    for path in (*checkpoint_paths(run_dir), run_dir / CONFIG_FILE):
        try:
            st = path.stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


@dataclass(frozen=True)
class PreparedRun:
    """A run as ``train_ensemble`` starts it: the config it runs with, its device (checked on
    this machine), its folder (None: no folder), the checkpoint payload it continues from (a
    resume's newest good checkpoint, a fork's phase1.pt; None for a fresh run), whether that
    payload is a fork's, a damaged ``last.pt`` that the resume passed over (to be set aside),
    whether the folder is this run's already (``in_place``: a resume, or a start again), the
    run's identity, the folder's state when it was read and a line to print as the run starts."""

    config: TrainConfig
    device: torch.device
    run_dir: Path | None
    payload: dict[str, Any] | None = None
    fork: bool = False
    bad_last: Path | None = None
    in_place: bool = False
    run_id: str = field(default_factory=new_run_id)
    stamp: tuple[Any, ...] = ()
    note: str | None = None


def check_same_run(folder: Mapping[str, Any], payload: Mapping[str, Any], run_dir: Path, checkpoint: Path) -> None:
    """Refuse a checkpoint and a ``config.json`` (``folder``: the file's contents) that are not
    one run's: other run identities, or fields (other than ``NOT_COMPARED``) that differ.

    Raises:
        ValueError: one line naming both files and every difference.
    """
    problems = []
    a, b = payload.get("run_id"), folder.get("run_id")
    if a is not None and b is not None and a != b:
        problems.append(f"run id {a} in the checkpoint, {b} in {CONFIG_FILE}")
    ours, theirs = payload["config"], folder["config"]
    for name in ours:
        if name not in NOT_COMPARED and not same_value(ours[name], theirs.get(name)):
            problems.append(f"{name} {ours[name]!r} in the checkpoint, {theirs.get(name)!r} in {CONFIG_FILE}")
    if problems:
        raise ValueError(
            f"cannot resume {run_dir}: {CHECKPOINT_DIR}/{checkpoint.name} and {CONFIG_FILE} are not the same run's: "
            f"{'; '.join(problems)} (a checkpoint copied from another run, or an edited {CONFIG_FILE}: a resume "
            f"changes only {', '.join(RESUME_SAFE_FIELDS)}, by its own options; put the run's own file back, or "
            "start a new run in another folder)"
        )


def _fork_payload(config: TrainConfig) -> dict[str, Any] | None:
    """``config.from_phase1``'s checkpoint, checked against ``config`` (None: no fork)."""
    if config.from_phase1 is None:
        return None
    source = phase1_path(config.from_phase1)
    payload = load_checkpoint(source)
    check_phase1_compatible(TrainConfig.from_dict(payload["config"]), config, source)
    return dict(payload, forked_from=str(source))


def _prepare_resume(config: TrainConfig | Mapping[str, Any], resume: str | Path) -> PreparedRun:
    run_dir = check_output_dir(resume, resume=True)
    stamp = folder_stamp(run_dir)
    folder = read_config_file(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    requested = requested_fields(config)
    if has_checkpoint(run_dir):
        path, payload = load_latest(run_dir)
        bad_last = path.parent / LAST if path.name == PREVIOUS and (path.parent / LAST).exists() else None
        saved = TrainConfig.from_dict(payload["config"])
        if folder is not None:
            check_same_run(folder, payload, run_dir, path)
            # config.json holds the newest session's bookkeeping (it is written as a session starts)
            kept = {k: folder["config"][k] for k in RESUME_SAFE_FIELDS if k in folder["config"]}
            saved = saved.replace(**{k: v for k, v in kept.items() if k not in ("output_dir", "resume")})
        resumed = resumed_config(saved, requested, run_dir, payload["device"])
        check_num_threads(resumed.num_threads)
        run_id = payload.get("run_id") or (folder or {}).get("run_id") or new_run_id()
        return PreparedRun(
            resumed,
            resumed.check_device(),
            run_dir,
            payload,
            bad_last=bad_last,
            in_place=True,
            run_id=run_id,
            stamp=stamp,
        )
    # no checkpoint: the run stopped in its first epoch(s); its config.json says what it was
    assert folder is not None  # check_output_dir(resume=True) needs one of the two
    saved = TrainConfig.from_dict(folder["config"])
    resumed = resumed_config(saved, requested, run_dir, str(folder.get("device") or saved.resolved_device()))
    check_num_threads(resumed.num_threads)
    payload = _fork_payload(resumed)
    device = resumed.check_device()
    note = (
        f"sbfast: {run_dir} has no checkpoint (its run stopped before writing one): it starts again from epoch 0 "
        f"with its {CONFIG_FILE}"
    )
    return PreparedRun(
        resumed,
        device,
        run_dir,
        payload,
        fork=payload is not None,
        in_place=True,
        run_id=folder.get("run_id") or new_run_id(),
        stamp=stamp,
        note=note,
    )


def prepare_run(config: TrainConfig | Mapping[str, Any], resume: str | Path | None = None) -> PreparedRun:
    """Settle a run's config, folder and starting checkpoint (docs/runs.md).

    ``resume`` (or ``config.resume``): the folder's newest good checkpoint (checked against its
    ``config.json`` by ``check_same_run``), with the saved config and the requested changes
    ``RESUME_SAFE_FIELDS`` allows; a folder with ``config.json`` and no checkpoint starts again
    from epoch 0 with that config. Otherwise ``config`` as given, with ``config.from_phase1``'s
    checkpoint when it forks (checked by ``check_phase1_compatible``), its device and thread
    count checked before any folder is created. A new run's folder is not created here (under
    torchrun only rank 0 does that, in ``claim_folder``).

    Raises:
        ValueError (CheckpointError included) naming what is wrong; nothing is written.
    """
    asked = config.get("resume") if isinstance(config, Mapping) else getattr(config, "resume", None)
    if resume is not None and asked is not None and not same_folder(resume, asked):
        raise ValueError(f"resume={str(resume)!r} and config.resume={asked!r} name different runs")
    resume = resume if resume is not None else asked
    if resume is not None:
        return _prepare_resume(config, resume)
    config = as_config(config)
    payload = _fork_payload(config)
    check_num_threads(config.num_threads)
    device = config.check_device()  # before the folder is created: a bad device leaves nothing behind
    run_dir = Path(config.output_dir) if config.output_dir else None
    return PreparedRun(config, device, run_dir, payload, fork=payload is not None)


def lock_folder(run_dir: Path, prepared: PreparedRun) -> RunLock:
    """Take ``run_dir``'s lock for this run, then check again, under the lock, what was checked
    without it: a new run's folder is still no other run's; a resumed folder is as it was read.

    Raises:
        RunFolderLocked (a ValueError) naming the holder; ValueError when the folder changed.
    """
    lock = RunLock(run_dir).acquire()
    try:
        if not prepared.in_place:
            check_output_dir(run_dir)
        elif folder_stamp(run_dir) != prepared.stamp:
            raise ValueError(
                f"cannot resume {run_dir}: another process wrote its checkpoint or {CONFIG_FILE} while this resume "
                "was starting; start the resume again"
            )
    except BaseException:
        lock.release()
        raise
    return lock


def claim_folder(plan: Any, prepared: PreparedRun) -> tuple[PreparedRun, RunLock | None]:
    """The run's folder, checked (a new run's created) and locked by rank 0 of ``plan``, the
    outcome handed to every process: each process of a command line may name a folder of its
    own; one that is not rank 0's and is left empty goes. Returns the run as it goes on and, on
    rank 0, the folder's lock (to release when the run ends; None elsewhere or without a folder).

    ``plan``: a ``sbfast.distributed`` plan (``on_rank0``); a one-process plan runs here.
    """
    own = prepared.run_dir
    held: list[RunLock] = []

    def claim() -> Path | None:
        run_dir = own if prepared.in_place or own is None else check_output_dir(own)
        if run_dir is not None:
            held.append(lock_folder(run_dir, prepared))
        return run_dir

    run_dir = plan.on_rank0(claim, "the output folder check")
    lock = held[0] if held else None
    if prepared.in_place:
        return prepared, lock
    if own is not None and run_dir is not None and own.resolve() != run_dir.resolve():
        if own.is_dir() and not any(own.iterdir()):
            own.rmdir()
    if run_dir == own:
        return dataclasses.replace(prepared, run_dir=run_dir), lock
    config = prepared.config.replace(output_dir=str(run_dir) if run_dir is not None else None)
    return dataclasses.replace(prepared, config=config, run_dir=run_dir), lock


def _run_prepared(
    plan: Plan,
    prepared: PreparedRun,
    data: TrainData | None,
    callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None,
) -> EnsembleResult:
    """Claim and lock the run's folder, then run it there (released however the run ends)."""
    prepared, lock = claim_folder(plan, prepared)  # rank 0 holds the folder's lock until the run ends
    try:
        return _run_locked(plan, prepared, data, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    plan: Plan,
    prepared: PreparedRun,
    data: TrainData | None,
    callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None,
) -> EnsembleResult:
    """Build the trainer on ``plan``, load the starting checkpoint, run (the run writes its folder)."""
    config, run_dir = prepared.config, prepared.run_dir
    plan.announce()
    if prepared.note is not None and plan.is_main:
        print(prepared.note, flush=True)
    with thread_limit(config.num_threads, prepared.device):
        trainer = EnsembleTrainer(config, data, callbacks, run_dir=run_dir, plan=plan, run_id=prepared.run_id)
        if prepared.payload is not None:
            trainer.load_state_dict(prepared.payload, fork=prepared.fork)
            if trainer.placement_note is not None and trainer.writes:
                print(trainer.placement_note, flush=True)
            plan.barrier("reading the checkpoint")  # every process has read it before rank 0 writes
        if prepared.bad_last is not None and trainer.writes:  # kept for inspection, out of the rotation
            prepared.bad_last.replace(prepared.bad_last.with_name(LAST + ".bad"))
        try:
            result = trainer.run()
        except RunInterrupted as e:
            if trainer.writes:
                print(str(e), file=sys.stderr, flush=True)
            raise
    if run_dir is not None and trainer.writes:
        with disk_words(run_dir, run_dir, "the results"):
            result.save(run_dir)
    return result


def train_ensemble(
    config: TrainConfig | Mapping[str, Any],
    callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None = None,
    *,
    data: TrainData | None = None,
    resume: str | Path | None = None,
) -> EnsembleResult:
    """Train an ensemble with ``config.method`` and evaluate it (see the package docstring).

    With ``config.output_dir`` the run writes its folder there (docs/runs.md): config.json,
    log.csv, checkpoints/last.pt (every ``checkpoint_every`` epochs) and phase1.pt (de_sam,
    sharpbalance: the end of epoch T_d), then ``EnsembleResult.save``'s files. SIGINT/SIGTERM
    finish the current step, write a checkpoint, print one line saying how to resume and raise
    :class:`RunInterrupted`.

    Args:
        config: a TrainConfig (or a dict of its fields).
        callbacks: Callback instances and/or callables ``fn(epoch, record)`` (epoch end).
        data: a TrainData from :func:`load_data` to reuse across runs (default: loaded here).
        resume: a run folder to continue from its last good checkpoint (also
            ``config.resume``). The saved config is used; fields the caller set (a dict's keys,
            or a TrainConfig's fields that differ from their defaults) may differ from it only
            where ``RESUME_SAFE_FIELDS`` allows. The result equals the uninterrupted run's.
    ``config.from_phase1``: start at T_d + 1 from a compatible run's ``phase1.pt`` (the same
    phase 1 as this config's, ``PHASE1_FIELDS``), bit-identical to training phase 1 again.

    Returns:
        EnsembleResult; also saved under the run folder when there is one.
    Raises:
        ValueError for a bad config, an unavailable device, an unusable output folder, a refused
        resume or fork (CheckpointError, a ValueError, for a bad checkpoint file), all before
        anything is trained. RunInterrupted on SIGINT/SIGTERM.
    """
    prepared = prepare_run(config, resume)
    c = prepared.config
    # under torchrun: join the job and place the members (docs/distributed.md); else one process
    plan = start_plan(
        c.members,
        prepared.device,
        placement=c.placement,
        sam_grad_sync=c.sam_grad_sync,
        sync_batchnorm=c.sync_batchnorm,
        timeout_s=c.dist_timeout,
    ) or LocalPlan(c.members, prepared.device)
    try:
        return _run_prepared(plan, prepared, data, callbacks)
    finally:
        plan.shutdown()
