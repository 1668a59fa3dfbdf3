"""A run from its config: ``train_ensemble`` prepares the run (``prepare.prepare_run``: the
config, its device, the folder, the checkpoint it starts from), joins the world it runs in (a
torchrun job, or a world of size one), locks the folder (rank 0 holds the lock), builds the
trainer there and runs it (docs/runs.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sbfast.distributed.ensemble import start_plan
from sbfast.distributed.local_plan import LocalPlan, Plan
from sbfast.train.checkpoint import LAST
from sbfast.train.config import TrainConfig, thread_limit
from sbfast.train.data import TrainData
from sbfast.train.events import Callback, RunInterrupted
from sbfast.train.prepare import PreparedRun, claim_folder, prepare_run
from sbfast.train.results import EnsembleResult
from sbfast.train.run_folder import disk_words
from sbfast.train.trainer import EnsembleTrainer


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
