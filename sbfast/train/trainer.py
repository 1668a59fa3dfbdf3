"""The fast ensemble trainer: the schedule of de, de_sam and SharpBalance end to end, with
checkpoints, exact resume and the phase-1 fork (docs/runs.md).

One loop serves a single process and torchrun alike: the trainer runs on a plan
(:class:`~sbfast.distributed.ensemble.RankPlan` under torchrun, else a world of size one,
:class:`~sbfast.distributed.local_plan.LocalPlan`) that says which members this process trains
and does every exchange. Read top to bottom: the members, a batch, a step, an epoch of one
member, scoring and selection, evaluation, the checkpoint, then the schedule (start, one epoch,
its record, the finish). ``sbfast.train.run.train_ensemble`` prepares a run and runs it here.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbfast.distributed.ensemble import check_resume_placement
from sbfast.distributed.local_plan import LocalPlan, Plan
from sbfast.select import sam_index_split
from sbfast.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    PAYLOAD_FORMAT,
    PHASE1,
)
from sbfast.train.config import TrainConfig, as_config
from sbfast.train.data import (
    StaticBatcher,
    TrainData,
    augment_fill,
    device_data,
    load_data,
    member_seeds,
)
from sbfast.train.evaluate import accuracies, ensemble_probs, evaluate_ensemble
from sbfast.train.results import EnsembleResult
from sbfast.train.run_folder import (
    RunFolder,
    data_fingerprint,
    versions,
)
from sbfast.train.run_state import (
    RUN_STATE_KEYS,
    Callback,
    CallbackList,
    Member,
    RunDiverged,
    RunInterrupted,
    RunState,
    SignalCatcher,
    find_divergence,
    fmt_acc,
    model_spec,
    progress_bar,
    warn_once,
)
from sbfast.train.steps import StepRunner, get_components


class _StopAt(Exception):  # noqa: N818 - control flow inside the trainer, never escapes it
    def __init__(self, step: int, total: torch.Tensor) -> None:
        self.step, self.total = step, total


class EnsembleTrainer:
    """The fast trainer behind :func:`train_ensemble`, exposed so that single epochs can be run
    and timed (``bench/bench_train.py``). ``run()`` does the whole schedule.

    With ``run_dir`` (a folder checked by ``check_output_dir``) the run writes ``log.csv`` and
    its checkpoints there and stops cleanly on SIGINT / SIGTERM (see docs/runs.md);
    ``state_dict()`` / ``load_state_dict()`` are the checkpoint's contents. ``plan``: this
    process's share of a torchrun job (``sbfast.distributed.ensemble.start_plan``); by default
    the process is a world of size one that trains every member.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: TrainData | None = None,
        callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None = None,
        *,
        run_dir: str | Path | None = None,
        plan: Plan | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config = as_config(config)
        self.plan: Plan = plan if plan is not None else LocalPlan(config.members, config.check_device())
        self.device = self.plan.device
        if config.cuda_graphs and any(self.plan.data_parallel(j) for j in self.plan.local):
            raise ValueError(
                "cuda_graphs with a data-parallel member: its gradient all-reduce is not captured; "
                "place whole members on ranks (placement='members') or turn cuda_graphs off"
            )
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, the run uses {self.device}")
        self.callbacks = CallbackList(callbacks)
        self.components = get_components(config.backend)
        if config.cuda_graphs and "SharpBalanceSAM" not in self.components.names["optimizer"]:
            raise ValueError(
                "cuda_graphs needs the fused sbfast.optim.SharpBalanceSAM (the reference SAM synchronises "
                f"with the host in first_step); this run would use {self.components.names['optimizer']}"
            )
        self.data = data if data is not None else load_data(config)
        if self.data.info.get("stats") == "computed":  # a folder's own statistics: saved with the run
            info = self.data.info
            self.config = config = config.replace(
                image_size=tuple(info["image_size"]), data_mean=tuple(info["mean"]), data_std=tuple(info["std"])
            )
        self.train_dev = device_data(self.data.train, self.device)
        self.test_dev = device_data(self.data.test, self.device)
        self.steps = StepRunner(config, self.train_dev, augment_fill(self.data.train), self.plan)
        self.members = [
            Member.build(config, self.data, j, self.device, self.plan, self.components.make_optimizer)
            for j in self.plan.local
        ]
        self._member_at = {m.index: m for m in self.members}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # only one rank writes the run folder: rank 0 (every rank checkpoints through it)
        self.writes = self.plan.is_main
        self.run_id = run_id  # the run's identity in config.json and every checkpoint (train_ensemble's)
        self.folder = RunFolder(self.run_dir, run_id) if self.run_dir is not None and self.writes else None
        self.state = RunState()
        self._fingerprint: str | None = None
        self._catcher: SignalCatcher | None = None
        self._stage = "training"
        self.placement_note: str | None = None  # set by a resume whose placement changed
        self._epoch_steps: dict[int, int] = {}  # each local member's steps in its latest epoch

    # -- members -----------------------------------------------------------------------------

    def member(self, j: int) -> Member:
        """Member j (under torchrun: one of this rank's members)."""
        if j not in self._member_at:
            raise ValueError(f"member {j} is not trained here (this rank trains members {sorted(self._member_at)})")
        return self._member_at[j]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.data)
        return self._fingerprint

    def train_epoch(
        self, j: int, phase: str, *, start_step: int = 0, loss_sum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One epoch of member j in ``phase`` ("sgd" | "sam" | "mixed"); returns the mean batch
        loss as a 0-d device tensor (no host sync here) and steps the LR scheduler.

        ``start_step`` > 0 continues an epoch that stopped after that many steps (the member's
        order generator set back to its state at the epoch's start, the augmentation generator
        to its state after those steps, ``loss_sum`` the float64 running sum of their losses).
        """
        m = self.member(j)
        m.model.train()
        m.order_start = m.order_gen.get_state()
        batches = self.steps.epoch_batches(m, phase)
        total = torch.zeros((), device=self.device, dtype=torch.float64) if loss_sum is None else loss_sum
        stop = self._catcher if self.plan.stops_inside_epoch else None
        self._epoch_steps[j] = len(batches)
        for k in range(start_step, len(batches)):
            total += self.steps(m, phase, batches[k])
            if stop is not None and stop.requested is not None:
                raise _StopAt(k + 1, total)  # the step is done: a resume continues with step k + 1
        m.sched.step()
        self.plan.sync_buffers(j, m.model)  # a data-parallel member's BatchNorm statistics: the leader's
        return total / max(len(batches), 1)

    def _train_members(self, phase: str) -> tuple[list[float], bool]:
        """One epoch of this process's members from the current position; every member's mean
        loss and whether any process was signalled. Members before the position's member are
        done (their losses are in the position); the position's member continues from its step.
        Where a signal may stop the run inside an epoch, the position follows each member."""
        p = self.state.position
        local: dict[int, torch.Tensor] = {}
        for m in self.members:
            j = m.index
            if j < p.member:  # done before the checkpoint: its loss is in the position, counted once
                if self.plan.leads(j):
                    local[j] = p.losses[j]
                continue
            resume_here = j == p.member and p.step > 0
            start_sum = None
            if resume_here:
                # a data-parallel member's running sum is the whole member's: its leader carries it
                lead_sum = p.loss_sum if self.plan.leads(j) else None
                start_sum = (
                    lead_sum if lead_sum is not None else torch.zeros((), device=self.device, dtype=torch.float64)
                )
            local[j] = self.train_epoch(j, phase, start_step=p.step if resume_here else 0, loss_sum=start_sum)
            if self.plan.stops_inside_epoch:
                p.losses.append(local[j])
                p.member, p.step, p.loss_sum = j + 1, 0, None
        assert self._catcher is not None
        return self.plan.epoch_end(local, self._catcher.requested is not None)

    # -- scoring and selection ---------------------------------------------------------------

    def score_and_select(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member scores the training set (eval mode, no augmentation), the scores [M, N]
        are shared, the masks selected; per member, the static batcher or the exact mask is set.
        Returns (scores float32 [M, N], masks bool [M, N]), both on the CPU."""
        c = self.config
        # a bar per member only where scoring takes a while (it would interleave with the epoch bar)
        progress = c.progress and len(self.data.train) >= 5000 and self.plan.is_main
        seeds = [member_seeds(c, j)["init"] for j in range(c.members)]
        n = len(self.data.train)
        # this process's rows (a data-parallel member's slice of the samples), then every process's
        rows = [
            self.components.fisher(
                self.member(j).model,
                self.data.train if (s, e) == (0, n) else self.data.train.subset(torch.arange(s, e)),
                config=c,
                device=self.device,
                progress=progress,
            )
            for j, s, e in self.plan.score_pieces(n)
        ]
        scores = self.plan.exchange_scores([r.float() for r in rows], n)
        masks = self.plan.select(scores, self.components.select, c.ratio, c.variant, seeds).bool()
        self.set_masks(masks)
        self.state.scores = scores.cpu()
        return self.state.scores, self.state.masks

    def set_masks(self, masks: torch.Tensor) -> None:
        """Install SAM masks bool [M, N] (also used by the benchmark to skip scoring)."""
        c = self.config
        if masks.shape != (c.members, self.train_dev.n) or masks.dtype != torch.bool:
            raise ValueError(
                f"masks must be bool [{c.members}, {self.train_dev.n}], got {masks.dtype} {tuple(masks.shape)}"
            )
        masks_dev = masks.to(self.device)
        for m in self.members:
            row = masks_dev[m.index]
            m.mask = row
            if c.batching == "static":
                sam_idx, nor_idx = sam_index_split(row)
                # the batcher shuffles with the member's own order generator, continuing its stream
                m.batcher = StaticBatcher(sam_idx, nor_idx, c.batch_size, m.order_gen, self.device)
        self.state.masks = masks.cpu()

    def sam_shares(self, phase: str) -> list[float]:
        """Each member's share of SAM samples in an epoch of ``phase``."""
        if phase == "mixed" and self.state.masks is not None:
            return self.state.masks.double().mean(1).tolist()
        return [1.0 if phase == "sam" else 0.0] * self.config.members

    # -- evaluation --------------------------------------------------------------------------

    def evaluated_members(self) -> list[Member]:
        """The members this process evaluates: those it leads (under torchrun; else all)."""
        return [m for m in self.members if self.plan.leads(m.index)]

    def _test_batches(self) -> Any:
        return (x for x, _ in self.test_dev.slices(self.config.eval_batch_size))

    def test_accuracy(self) -> tuple[list[float], float]:
        """Member and ensemble accuracies on the test split (the same on every process)."""
        evaluated = self.evaluated_members()
        gather = self.plan.evaluation([m.index for m in evaluated], self.data.num_classes)
        probs = ensemble_probs(
            [m.model for m in evaluated],
            self._test_batches,
            self.config.torch_dtype,
            len(self.data.test),
            self.data.num_classes,
            gather,
        )
        acc = accuracies(probs, self.data.test.y) if probs is not None else None
        return self.plan.broadcast(acc, "the test accuracies")

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """Everything the rest of the run depends on (the checkpoint's payload): members'
        parameters and buffers, optimizer states (torch.optim.SGD's layout), LR schedulers, every
        generator (torch CPU/CUDA, per-member order and augmentation), the run state (position,
        scores, masks, history, clocks), the config, the data's fingerprint and the versions.
        Tensors and plain containers only.

        Under torchrun every rank must call it: rank 0 gathers every member's state and returns
        the whole payload (with the placement it ran under); the other ranks return None."""
        p = self.state.position
        members = self.plan.gather_states(
            {m.index: m.state_dict(mid_epoch=p.step > 0 and m.index == p.member) for m in self.members}
        )
        if members is None:
            return None
        # the training device's CUDA generator only: a resume may see another number of GPUs
        cuda_rng = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        run = self.state.state_dict()
        return {
            "format": PAYLOAD_FORMAT,
            "config": self.config.to_dict(),
            "versions": versions(),
            "device": str(self.device),
            "data": {"fingerprint": self.fingerprint, "train": len(self.data.train), "test": len(self.data.test)},
            "model": model_spec(self.config, self.data),
            "components": dict(self.components.names),
            "position": run["position"],
            "members": members,
            "rng": {"torch": torch.get_rng_state(), "cuda": list(cuda_rng)},
            **{k: run[k] for k in RUN_STATE_KEYS if k != "position"},
            "placement": self.plan.saved_placement(),
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, fork: bool = False) -> None:
        """Continue from a checkpoint's payload (``state_dict()``'s). Everything is checked
        before anything is loaded: the data's fingerprint, the device kind, the members and their
        parameter shapes. ``fork``: a phase-1 checkpoint of another run, whose clocks are not
        carried (the run's timing counts its own work).

        Raises:
            ValueError naming what does not match.
        """
        c = self.config
        if state.get("format") != PAYLOAD_FORMAT:
            raise ValueError(f"not an sbfast training checkpoint payload (format {state.get('format')!r})")
        if state["data"]["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the checkpoint was written for other data than this run's (train {state['data']['train']} / test "
                f"{state['data']['test']} samples there, {len(self.data.train)} / {len(self.data.test)} here, and the "
                "values differ): point data_root at the run's data"
            )
        saved_dev = torch.device(state["device"])
        if saved_dev.type != self.device.type:
            raise ValueError(
                f"the checkpoint was written on {saved_dev.type}, this run uses {self.device}: pass device={saved_dev.type!r}"
            )
        saved_members = state["members"]
        if len(saved_members) != c.members:
            raise ValueError(f"the checkpoint has {len(saved_members)} members, the config {c.members}")
        note = None
        if not fork:
            note = check_resume_placement(
                state.get("placement"),
                self.plan.placement,
                c.members,
                c.sam_grad_sync,
                c.sync_batchnorm,
                any(isinstance(x, nn.modules.batchnorm._BatchNorm) for m in self.members for x in m.model.modules()),
            )
        for m in self.members:
            m.check_state(saved_members[m.index], c.augment)

        for m in self.members:
            m.load_state_dict(saved_members[m.index])
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"]["cuda"]
        if cuda_rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng[0], self.device)
        self.state.load_state_dict(state, self.device, c, fork)
        if self.state.masks is not None:
            self.set_masks(self.state.masks)
        self.placement_note = note

    def save(self, *names: str) -> None:
        """Write the current state as ``checkpoints/<name>`` for each name (serialised once)."""
        if self.run_dir is None:
            raise ValueError("this trainer has no run folder to checkpoint into (run_dir=None)")
        payload = self.state_dict()  # under torchrun: gathered on rank 0, which alone writes
        if payload is not None and self.folder is not None:
            self.folder.save(payload, names)
        if LAST in names:
            self.state.mark_saved(self.config)

    def _epoch_checkpoints(self, epoch: int) -> None:
        c = self.config
        if c.method in ("de_sam", "sharpbalance") and epoch == c.swap_epoch:
            # phase 1 ends here: the state a sharpbalance run (this one, or a fork) scores from;
            # last.pt first, so that a stop between the two writes leaves a resumable run
            self.save(LAST, PHASE1)
        elif epoch == c.epochs - 1 or (c.checkpoint_every and (epoch + 1) % c.checkpoint_every == 0):
            self.save(LAST)

    # -- the schedule ------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall seconds of the run, over every session (a resumed run carries the earlier ones)."""
        return self.state.elapsed()

    def _describe_stop(self) -> str:
        return f"during {self._stage}; the run continues from {self.state.saved}"

    def _interrupt(self, detail: str) -> RunInterrupted:
        assert self._catcher is not None and self._catcher.requested is not None and self.run_dir is not None
        return RunInterrupted(self._catcher.requested, self.run_dir, detail)

    def run(self) -> EnsembleResult:
        """Train from the current position to the end (from epoch 0 on a fresh trainer), then
        evaluate. With a run folder: log.csv, checkpoints, and SIGINT/SIGTERM handling, which
        finishes the current step, writes ``last.pt`` and raises :class:`RunInterrupted`."""
        self.state.session_start = time.perf_counter()
        with SignalCatcher(self.run_dir, self._describe_stop) as catcher:
            self._catcher = catcher
            try:
                self._start()
                c = self.config
                start = self.state.position.epoch
                bar = progress_bar(
                    range(start, c.epochs),
                    c.progress and self.writes,
                    f"{c.method} [{c.backend}/{c.batching}]",
                    start=start,
                )
                for epoch in bar:
                    record = self._epoch(epoch)
                    if hasattr(bar, "set_postfix"):
                        losses = record["train_loss"]
                        bar.set_postfix(
                            phase=record["phase"],
                            loss=f"{sum(losses) / len(losses):.3f}",
                            acc=fmt_acc(record["ensemble_test_acc"]),
                        )
                return self._finish()
            finally:
                self._catcher = None

    def _start(self) -> None:
        """The run's first moments: its folder (config.json, log.csv from the history), the
        hooks, and at the end of phase 1 the phase-1 checkpoint that a fork or a stop between
        two writes left to write."""
        c, s = self.config, self.state
        if self.folder is not None:
            self.folder.begin(c, self.device, s.history)
        self.callbacks.call("on_train_start", c, [m.model for m in self.members])
        p = s.position
        at_phase1_end = (
            self.run_dir is not None
            and c.method in ("de_sam", "sharpbalance")
            and (p.epoch, p.member, p.step) == (c.swap_epoch + 1, 0, 0)
            and s.masks is None
        )
        if at_phase1_end and s.forked_from is not None:
            self.save(LAST, PHASE1)  # the state the scoring starts from, and the fork's own phase 1 (its config)
        elif at_phase1_end and not (self.run_dir / CHECKPOINT_DIR / PHASE1).exists():
            self.save(PHASE1)  # a run stopped between writing last.pt and phase1.pt at T_d

    def _score_if_due(self, epoch: int) -> None:
        """sharpbalance at the start of epoch T_d + 1: score and select (once per run). The state
        before scoring is on disk (last.pt of epoch T_d): a signal stops at once."""
        c, s = self.config, self.state
        if not (c.method == "sharpbalance" and epoch == c.swap_epoch + 1 and s.masks is None):
            return
        assert self._catcher is not None
        t0 = time.perf_counter()
        self._stage, self._catcher.immediate = "scoring", True
        scores, masks = self.score_and_select()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stage, self._catcher.immediate = "training", False
        s.position.score_s = time.perf_counter() - t0
        s.clock["score_s"] += s.position.score_s
        self.callbacks.call("on_scores", epoch, scores, masks)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of every member (from the position, which may be inside it), its record in
        the history, log.csv and the hooks, its checkpoints, and a stop that was asked for."""
        c, s = self.config, self.state
        catcher = self._catcher
        assert catcher is not None
        phase = c.phase_of(epoch)
        p = s.position
        if p.lr is None:
            self.callbacks.call("on_epoch_start", epoch, phase)
        self._score_if_due(epoch)
        if p.lr is None:
            p.lr = float(self.members[0].opt.param_groups[0]["lr"])
        t1 = time.perf_counter()
        try:
            train_loss, stop_all = self._train_members(phase)
        except _StopAt as stop:
            p.step, p.loss_sum = stop.step, stop.total
            p.train_s += time.perf_counter() - t1
            s.clock["train_s"] += time.perf_counter() - t1
            self.save(LAST)
            raise self._interrupt(
                f"epoch {epoch}, member {p.member}, after step {p.step}; checkpoint written"
            ) from None
        record = self._record(epoch, phase, train_loss, t1)
        diverged = self._divergence(epoch, phase, record)
        s.finish_epoch(record)
        if self.folder is not None:
            self.folder.append(record)
        self.callbacks.call("on_epoch_end", epoch, record)
        if diverged is not None:  # before this epoch's checkpoint: the folder keeps the finite state
            raise diverged
        if self.run_dir is not None:
            self._epoch_checkpoints(epoch)
            if stop_all and catcher.requested is None:  # another rank was signalled: stop with it
                catcher.requested = signal.SIGTERM
            if catcher.requested is not None:
                if s.saved_at != (epoch + 1, 0, 0):
                    self.save(LAST)
                raise self._interrupt(f"at the end of epoch {epoch}; checkpoint written")
        return record

    def _record(self, epoch: int, phase: str, train_loss: list[float], t1: float) -> dict[str, Any]:
        """The history's record of an epoch whose training started at ``t1`` and has just ended
        (the test accuracy evaluated here, every ``eval_every`` epochs and at the last)."""
        c, s = self.config, self.state
        p = s.position
        t2 = time.perf_counter()
        s.clock["train_s"] += t2 - t1
        time_s = p.train_s + t2 - t1
        record: dict[str, Any] = {
            "epoch": epoch,
            "phase": phase,
            "lr": p.lr,
            "train_loss": train_loss,
            "test_acc": None,
            "ensemble_test_acc": None,
            "time_s": time_s,
            "score_s": p.score_s,
            "samples_per_s": c.members * self.train_dev.n / max(time_s, 1e-12),
            "sam_share": self.sam_shares(phase),
        }
        skipped = {m.index: m.opt.skipped_steps for m in self.members if hasattr(m.opt, "skipped_steps")}
        if skipped:  # the fused optimizer skips non-finite steps on the device and counts them
            record["skipped_steps"] = self.plan.member_counts(skipped)
        if (epoch + 1) % c.eval_every == 0 or epoch == c.epochs - 1:
            record["test_acc"], record["ensemble_test_acc"] = self.test_accuracy()
        record["eval_s"] = time.perf_counter() - t2
        s.clock["epoch_eval_s"] += record["eval_s"]
        record["wall_s"] = self.elapsed()
        return record

    def _divergence(self, epoch: int, phase: str, record: Mapping[str, Any]) -> RunDiverged | None:
        """The stop of a run whose member diverged in this epoch (None: none did), the same on
        every process (the losses and counts are every rank's)."""
        steps = self.plan.member_counts({m.index: self._epoch_steps.get(m.index, 0) for m in self.members})
        self._epoch_steps.clear()
        before = self.state.history[-1].get("skipped_steps") if self.state.history else None
        return find_divergence(
            self.config, epoch, phase, record["train_loss"], steps, record.get("skipped_steps"), before
        )

    def _finish(self) -> EnsembleResult:
        """The final evaluation (its metrics the same on every process) and the result."""
        c, s = self.config, self.state
        catcher = self._catcher
        assert catcher is not None
        if catcher.requested is not None:
            raise self._interrupt("before the final evaluation; checkpoint written")
        self._stage, catcher.immediate = "the final evaluation", True
        evaluated = self.evaluated_members()
        ev = evaluate_ensemble(
            [m.model for m in evaluated],
            self.data,
            c,
            self.device,
            self.components.fisher,
            test_batches=self._test_batches,
            gather=self.plan.evaluation([m.index for m in evaluated], self.data.num_classes),
        )
        # the metrics, computed on rank 0, in every rank's result
        ev["metrics"], ev["ood"], ev["diversity"] = self.plan.broadcast(
            (ev["metrics"], ev["ood"], ev["diversity"]), "the final metrics"
        )
        catcher.immediate = False
        timing = {
            "total_s": self.elapsed(),
            "train_s": s.clock["train_s"],
            "score_s": s.clock["score_s"],
            "epoch_eval_s": s.clock["epoch_eval_s"],
            **ev["timing"],
        }
        components = dict(self.components.names, batching=c.batching, device=str(self.device))
        if s.forked_from is not None:
            components["from_phase1"] = s.forked_from
        if s.history and sum(s.history[-1].get("skipped_steps", [])):
            warn_once(
                f"{c.method}: steps skipped for non-finite gradients per member: {s.history[-1]['skipped_steps']}"
            )
        if c.cuda_graphs:
            components["cuda_graph_captures"] = str(sum(g.captures for m in self.members for g in m.graphs.values()))
        result = EnsembleResult(
            config=c,
            metrics=ev["metrics"],
            ood=ev["ood"],
            history=list(s.history),
            fisher_mean=ev["fisher_mean"],
            worst_case_sharpness=ev.get("worst_case_sharpness", []),
            diversity=ev["diversity"],
            scores=s.scores,
            masks=s.masks,
            timing=timing,
            components=components,
            models=[m.model for m in self.members],
            probs=ev["probs"],
        )
        self.callbacks.call("on_train_end", result)
        return result
