"""The fast ensemble trainer: the schedule of de, de_sam and SharpBalance end to end, with
checkpoints, exact resume and the phase-1 fork (docs/runs.md)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sbfast.data import augment_batch
from sbfast.distributed.ensemble import RankPlan, start_plan
from sbfast.select import sam_index_split
from sbfast.train.batching import StaticBatcher
from sbfast.train.callbacks import Callback, CallbackList
from sbfast.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    PHASE1,
    PREVIOUS,
    load_checkpoint,
    load_latest,
    phase1_path,
    remove_stale_temporaries,
)
from sbfast.train.components import get_components
from sbfast.train.config import TrainConfig, as_config
from sbfast.train.data import DeviceData, TrainData, augment_fill, load_data
from sbfast.train.evaluate import accuracies, evaluate_ensemble, predict_probs
from sbfast.train.graphs import GraphedStep
from sbfast.train.interrupt import RunInterrupted, SignalCatcher
from sbfast.train.members import build_member, make_lr_scheduler, member_seeds, release_order
from sbfast.train.results import EnsembleResult
from sbfast.train.resume import (
    check_phase1_compatible,
    data_fingerprint,
    requested_fields,
    resumed_config,
)
from sbfast.train.run_folder import RunLog, check_output_dir, write_config
from sbfast.train.runtime import fmt_acc, progress_bar, sync_device, thread_limit, warn_once
from sbfast.train.steps import Forward, mixed_step_exact, mixed_step_static, sam_step, sgd_step
from sbfast.train.trainer_state import Member, Position, TrainerState


class _StopAt(Exception):  # noqa: N818 - control flow inside the trainer, never escapes it
    def __init__(self, step: int, total: torch.Tensor) -> None:
        self.step, self.total = step, total


class EnsembleTrainer(TrainerState):
    """The fast trainer behind :func:`train_ensemble`, exposed so that single epochs can be run
    and timed (``bench/bench_train.py``). ``run()`` does the whole schedule.

    With ``run_dir`` (a folder checked by ``check_output_dir``) the run writes ``log.csv`` and
    its checkpoints there and stops cleanly on SIGINT / SIGTERM (see docs/runs.md);
    ``state_dict()`` / ``load_state_dict()`` are the checkpoint's contents.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: TrainData | None = None,
        callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None = None,
        *,
        run_dir: str | Path | None = None,
        plan: RankPlan | None = None,
    ) -> None:
        self.config = config = as_config(config)
        # under torchrun (``plan``) this rank trains only its members, on its own device
        self.plan = plan
        self.device = plan.ctx.device if plan is not None else config.check_device()
        if plan is not None and config.cuda_graphs and any(plan.data_parallel(j) for j in plan.local):
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
        self.train_dev = DeviceData(self.data.train, self.device)
        self.test_dev = DeviceData(self.data.test, self.device)
        self.fill = augment_fill(self.data.train)
        self.scores: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        # one memory pool for every captured step of the run (see GraphedStep)
        self.graph_pool = torch.cuda.graph_pool_handle() if config.cuda_graphs else None
        self.members = [self._make_member(j) for j in (plan.local if plan is not None else range(config.members))]
        self._member_at = {m.index: m for m in self.members}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # only one rank writes the run folder: rank 0 (every rank checkpoints through it)
        self.writes = plan is None or plan.is_main
        self.log = RunLog(self.run_dir) if self.run_dir is not None and self.writes else None
        self.history: list[dict[str, Any]] = []
        self.position = Position()
        self.clock = {"train_s": 0.0, "score_s": 0.0, "epoch_eval_s": 0.0, "elapsed_s": 0.0}
        self.forked_from: str | None = None  # the phase1.pt this run started from
        self._fingerprint: str | None = None
        self._catcher: SignalCatcher | None = None
        self._session_start = time.perf_counter()
        self._saved = "no checkpoint yet"  # what last.pt holds, for the interrupt message
        self._saved_at: tuple[int, int, int] | None = None  # last.pt's position (epoch, member, step)
        self._stage = "training"
        self.placement_note: str | None = None  # set by a resume whose placement changed

    # -- setup -----------------------------------------------------------------------------

    def _make_member(self, j: int) -> Member:
        c = self.config
        model = build_member(c, self.data, j, self.device)
        if self.plan is not None:
            model = self.plan.prepare_model(j, model)  # synchronised BatchNorm, before the optimizer
        opt = self.components.make_optimizer(model, c)  # before compile: a fused optimizer may re-home params
        sched = make_lr_scheduler(opt, c)
        if self.plan is not None:
            opt = self.plan.wrap_optimizer(j, opt)  # a data-parallel member averages its gradients
        forward: Forward = model
        if c.compile:
            backend = "inductor" if c.compile is True else c.compile
            forward = torch.compile(model, backend=backend, dynamic=True if c.batching == "exact" else False)
        seeds = member_seeds(c, j)
        aug_gen = None
        if c.augment:
            aug_gen = torch.Generator(device=self.device).manual_seed(seeds["augment"])
        return Member(
            index=j,
            model=model,
            forward=forward,
            opt=opt,
            sched=sched,
            order_gen=torch.Generator().manual_seed(seeds["order"]),
            aug_gen=aug_gen,
        )

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.data)
        return self._fingerprint

    # -- data ------------------------------------------------------------------------------

    def _batch(self, member: Member, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_dev.fetch(idx)
        if member.aug_gen is not None:
            x = augment_batch(x, member.aug_gen, self.config.augment_pad, flip=self.config.augment_flip, fill=self.fill)
        return x.to(self.config.torch_dtype), y

    def _epoch_batches(self, m: Member, phase: str) -> list[Any]:
        """The epoch's batches of member m: index tensors [b], or (sam [k_s], normal [k_n]) pairs
        (static mixed phase). Draws the epoch's order from m.order_gen, all of it up front, so
        that a resumed epoch draws the same order from the same generator state."""
        c = self.config
        if phase == "mixed":
            if (m.batcher if c.batching == "static" else m.mask) is None:
                raise RuntimeError("mixed phase before selection: call score_and_select() first")
            if c.batching == "static":
                return list(m.batcher.epoch())  # type: ignore[union-attr]
        order = release_order(self.train_dev.n, m.order_gen).to(self.device, non_blocking=True)
        return [order[s : s + c.batch_size] for s in range(0, self.train_dev.n, c.batch_size)]

    # -- steps -----------------------------------------------------------------------------

    def _lr_key(self, member: Member) -> tuple[float, ...] | None:
        # a float lr may be baked into a capture: re-capture when it changes; a tensor lr is read
        # by the kernels at replay (and float() of it would synchronise), so it needs no key
        if any(isinstance(g["lr"], torch.Tensor) for g in member.opt.param_groups):
            return None
        return tuple(float(g["lr"]) for g in member.opt.param_groups)

    def _run(self, member: Member, kind: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """Run a step, through a CUDA graph when enabled and the batch has the run's full size."""
        full = inputs[0].shape[0] + (inputs[2].shape[0] if kind == "mixed" else 0) == self.config.batch_size
        if not (self.config.cuda_graphs and full):
            return fn(*inputs)
        g = member.graphs.get(kind)
        if g is None:
            g = member.graphs[kind] = GraphedStep(fn, self.graph_pool)
        return g(self._lr_key(member), *inputs)

    def member(self, j: int) -> Member:
        """Member j (under torchrun: one of this rank's members)."""
        if j not in self._member_at:
            raise ValueError(f"member {j} is not trained here (this rank trains members {sorted(self._member_at)})")
        return self._member_at[j]

    def _step(self, m: Member, phase: str, batch: Any) -> torch.Tensor:
        fwd, opt = m.forward, m.opt
        if self.plan is not None and self.plan.data_parallel(m.index):
            return self.plan.step(m.index, fwd, opt, phase, batch, lambda idx: self._batch(m, idx), m.mask)
        if phase == "mixed" and self.config.batching == "static":
            sam_idx, nor_idx = batch
            x, y = self._batch(m, torch.cat([nor_idx, sam_idx]))
            k_n = nor_idx.shape[0]
            return self._run(
                m,
                "mixed",
                lambda a, b, s, t: mixed_step_static(fwd, opt, a, b, s, t),
                x[:k_n],
                y[:k_n],
                x[k_n:],
                y[k_n:],
            )
        x, y = self._batch(m, batch)
        if phase == "sgd":
            return self._run(m, "sgd", lambda a, b: sgd_step(fwd, opt, a, b), x, y)
        if phase == "sam":
            return self._run(m, "sam", lambda a, b: sam_step(fwd, opt, a, b), x, y)
        return mixed_step_exact(fwd, opt, x, y, m.mask[batch])  # type: ignore[index]

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
        batches = self._epoch_batches(m, phase)
        total = torch.zeros((), device=self.device, dtype=torch.float64) if loss_sum is None else loss_sum
        stop = self._catcher if self.plan is None else None  # ranks stop together, at an epoch's end
        for k in range(start_step, len(batches)):
            total += self._step(m, phase, batches[k])
            if stop is not None and stop.requested is not None:
                raise _StopAt(k + 1, total)  # the step is done: a resume continues with step k + 1
        m.sched.step()
        if self.plan is not None:
            self.plan.sync_buffers(j, m.model)  # per-rank BatchNorm statistics: the leader's
        return total / max(len(batches), 1)

    # -- scoring and selection ---------------------------------------------------------------

    def score_and_select(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member scores the training set (eval mode, no augmentation), the scores [M, N]
        are shared, the masks selected; per member, the static batcher or the exact mask is set.
        Returns (scores float32 [M, N], masks bool [M, N]), both on the CPU."""
        c = self.config
        # a bar per member only where scoring takes a while (it would interleave with the epoch bar)
        progress = c.progress and len(self.data.train) >= 5000
        seeds = [member_seeds(c, j)["init"] for j in range(c.members)]
        if self.plan is not None:
            # this rank's rows (a data-parallel member's slice of the samples), then every rank's
            n = len(self.data.train)
            pieces = self.plan.score_pieces(n)
            rows = [
                self.components.fisher(
                    self.member(j).model,
                    self.data.train if (s, e) == (0, n) else self.data.train.subset(torch.arange(s, e)),
                    config=c,
                    device=self.device,
                    progress=progress and self.plan.is_main,
                )
                for j, s, e in pieces
            ]
            scores = self.plan.exchange_scores([r.float() for r in rows], n)
            masks = self.plan.select(scores, self.components.select, c.ratio, c.variant, seeds).bool()
        else:
            rows = [
                self.components.fisher(m.model, self.data.train, config=c, device=self.device, progress=progress)
                for m in self.members
            ]
            scores = torch.stack([r.float().to(self.device) for r in rows])
            masks = self.components.select(scores, c.ratio, c.variant, seeds).bool()
        self.set_masks(masks)
        self.scores = scores.cpu()
        return self.scores, self.masks  # type: ignore[return-value]

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
        self.masks = masks.cpu()

    def sam_shares(self, phase: str) -> list[float]:
        """Each member's share of SAM samples in an epoch of ``phase``."""
        if phase == "mixed" and self.masks is not None:
            return self.masks.double().mean(1).tolist()
        return [1.0 if phase == "sam" else 0.0] * self.config.members

    # -- evaluation --------------------------------------------------------------------------

    def evaluated_members(self) -> list[Member]:
        """The members this rank evaluates: all of them, or under torchrun those it leads."""
        return [m for m in self.members if self.plan is None or self.plan.leads(m.index)]

    def test_accuracy(self) -> tuple[list[float], float]:
        models = [m.model for m in self.evaluated_members()]
        batches = lambda: (x for x, _ in self.test_dev.slices(self.config.eval_batch_size))  # noqa: E731
        if self.plan is None:
            return accuracies(predict_probs(models, batches, self.config.torch_dtype), self.data.test.y)
        n = len(self.data.test)
        local = (
            predict_probs(models, batches, self.config.torch_dtype)
            if models
            else torch.zeros(0, n, self.data.num_classes)
        )
        probs = self.plan.evaluation([m.index for m in self.evaluated_members()], self.data.num_classes).probs(local, n)
        acc = accuracies(probs, self.data.test.y) if probs is not None else None
        return self.plan.broadcast(acc, "the test accuracies")  # the same history on every rank

    # -- checkpoints -------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall seconds of the run, over every session (a resumed run carries the earlier ones)."""
        return self.clock["elapsed_s"] + time.perf_counter() - self._session_start

    def _describe_stop(self) -> str:
        return f"during {self._stage}; the run continues from {self._saved}"

    def _interrupt(self, detail: str) -> RunInterrupted:
        assert self._catcher is not None and self._catcher.requested is not None and self.run_dir is not None
        return RunInterrupted(self._catcher.requested, self.run_dir, detail)

    # -- the schedule --------------------------------------------------------------------------

    def run(self) -> EnsembleResult:
        """Train from the current position to the end (from epoch 0 on a fresh trainer), then
        evaluate. With a run folder: log.csv, checkpoints, and SIGINT/SIGTERM handling, which
        finishes the current step, writes ``last.pt`` and raises :class:`RunInterrupted`."""
        self._session_start = time.perf_counter()
        with SignalCatcher(self.run_dir, self._describe_stop) as catcher:
            self._catcher = catcher
            try:
                return self._schedule(catcher)
            finally:
                self._catcher = None

    def _schedule(self, catcher: SignalCatcher) -> EnsembleResult:
        c = self.config
        self.callbacks.call("on_train_start", c, [m.model for m in self.members])
        if self.log is not None:
            self.log.rewrite(self.history)
        if self.run_dir is not None:
            if self.writes:
                remove_stale_temporaries(self.run_dir / CHECKPOINT_DIR)
            p = self.position
            at_phase1_end = (
                c.method in ("de_sam", "sharpbalance")
                and (p.epoch, p.member, p.step) == (c.swap_epoch + 1, 0, 0)
                and self.masks is None
            )
            if at_phase1_end and self.forked_from is not None:
                self.save(LAST, PHASE1)  # the state the scoring starts from, and the fork's own phase 1 (its config)
            elif at_phase1_end and not (self.run_dir / CHECKPOINT_DIR / PHASE1).exists():
                self.save(PHASE1)  # a run stopped between writing last.pt and phase1.pt at T_d
        n = self.train_dev.n
        start = self.position.epoch
        bar = progress_bar(
            range(start, c.epochs), c.progress and self.writes, f"{c.method} [{c.backend}/{c.batching}]", start=start
        )
        for epoch in bar:
            phase = c.phase_of(epoch)
            p = self.position
            if p.lr is None:
                self.callbacks.call("on_epoch_start", epoch, phase)
            if c.method == "sharpbalance" and epoch == c.swap_epoch + 1 and self.masks is None:
                # the state before scoring is on disk (last.pt of epoch T_d): a signal stops at once
                t0 = time.perf_counter()
                self._stage, catcher.immediate = "scoring", True
                scores, masks = self.score_and_select()
                sync_device(self.device)
                self._stage, catcher.immediate = "training", False
                p.score_s = time.perf_counter() - t0
                self.clock["score_s"] += p.score_s
                self.callbacks.call("on_scores", epoch, scores, masks)
            if p.lr is None:
                p.lr = float(self.members[0].opt.param_groups[0]["lr"])
            t1 = time.perf_counter()
            stop_all = False
            try:
                if self.plan is not None:
                    train_loss, stop_all = self._epoch_on_ranks(phase, catcher)
                while self.plan is None and p.member < c.members:
                    p.losses.append(self.train_epoch(p.member, phase, start_step=p.step, loss_sum=p.loss_sum))
                    p.member, p.step, p.loss_sum = p.member + 1, 0, None
            except _StopAt as stop:
                p.step, p.loss_sum = stop.step, stop.total
                p.train_s += time.perf_counter() - t1
                self.clock["train_s"] += time.perf_counter() - t1
                self.save(LAST)
                raise self._interrupt(
                    f"epoch {epoch}, member {p.member}, after step {p.step}; checkpoint written"
                ) from None
            if self.plan is None:
                train_loss = torch.stack(p.losses).tolist()  # the epoch's one host sync
            t2 = time.perf_counter()
            self.clock["train_s"] += t2 - t1
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
                "samples_per_s": c.members * n / max(time_s, 1e-12),
                "sam_share": self.sam_shares(phase),
            }
            skipped = [m.opt.skipped_steps for m in self.members if hasattr(m.opt, "skipped_steps")]
            if skipped:  # the fused optimizer skips non-finite steps on the device and counts them
                record["skipped_steps"] = [int(v) for v in skipped]
                if self.plan is not None:
                    record["skipped_steps"] = self.plan.member_counts(
                        {m.index: m.opt.skipped_steps for m in self.members}
                    )
            if (epoch + 1) % c.eval_every == 0 or epoch == c.epochs - 1:
                record["test_acc"], record["ensemble_test_acc"] = self.test_accuracy()
            record["eval_s"] = time.perf_counter() - t2
            self.clock["epoch_eval_s"] += record["eval_s"]
            record["wall_s"] = self.elapsed()
            self.history.append(record)
            self.position = Position(epoch=epoch + 1)
            if self.log is not None:
                self.log.append(record)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    phase=phase,
                    loss=f"{sum(train_loss) / len(train_loss):.3f}",
                    acc=fmt_acc(record["ensemble_test_acc"]),
                )
            self.callbacks.call("on_epoch_end", epoch, record)
            if self.run_dir is not None:
                self._epoch_checkpoints(epoch)
                if stop_all and catcher.requested is None:  # another rank was signalled: stop with it
                    catcher.requested = signal.SIGTERM
                if catcher.requested is not None:
                    if self._saved_at != (epoch + 1, 0, 0):
                        self.save(LAST)
                    raise self._interrupt(f"at the end of epoch {epoch}; checkpoint written")
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
            test_batches=lambda: (x for x, _ in self.test_dev.slices(c.eval_batch_size)),
            gather=self.plan.evaluation([m.index for m in evaluated], self.data.num_classes) if self.plan else None,
        )
        if self.plan is not None:  # the metrics, computed on rank 0, in every rank's result
            ev["metrics"], ev["ood"] = self.plan.broadcast((ev["metrics"], ev["ood"]), "the final metrics")
        catcher.immediate = False
        timing = {
            "total_s": self.elapsed(),
            "train_s": self.clock["train_s"],
            "score_s": self.clock["score_s"],
            "epoch_eval_s": self.clock["epoch_eval_s"],
            **ev["timing"],
        }
        components = dict(self.components.names, batching=c.batching, device=str(self.device))
        if self.forked_from is not None:
            components["from_phase1"] = self.forked_from
        if self.history and sum(self.history[-1].get("skipped_steps", [])):
            warn_once(
                f"{c.method}: steps skipped for non-finite gradients per member: {self.history[-1]['skipped_steps']}"
            )
        if c.cuda_graphs:
            components["cuda_graph_captures"] = str(sum(g.captures for m in self.members for g in m.graphs.values()))
        result = EnsembleResult(
            config=c,
            metrics=ev["metrics"],
            ood=ev["ood"],
            history=list(self.history),
            sharpness=ev["sharpness"],
            scores=self.scores,
            masks=self.masks,
            timing=timing,
            components=components,
            models=[m.model for m in self.members],
            probs=ev["probs"],
        )
        self.callbacks.call("on_train_end", result)
        return result

    def _epoch_on_ranks(self, phase: str, catcher: SignalCatcher) -> tuple[list[float], bool]:
        """One epoch of this rank's members under torchrun; every member's mean loss (gathered)
        and whether any rank was signalled. A position inside the epoch (a resumed single-process
        checkpoint) is honoured: members before it are done, its member continues from its step."""
        p = self.position
        local: dict[int, torch.Tensor | float] = {}
        for m in self.members:
            j = m.index
            if j < p.member:  # done before the checkpoint: its loss is in the position, counted once
                if self.plan.leads(j):  # type: ignore[union-attr]
                    local[j] = p.losses[j]
                continue
            resume_here = j == p.member and p.step > 0
            lead = self.plan.leads(j)  # type: ignore[union-attr]
            # a data-parallel member's running sum is the whole member's: its leader carries it
            start_sum = p.loss_sum if resume_here and lead else None
            start_step = p.step if resume_here else 0
            if start_sum is None and resume_here:
                start_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            local[j] = self.train_epoch(j, phase, start_step=start_step, loss_sum=start_sum)
        return self.plan.epoch_end(local, catcher.requested is not None)  # type: ignore[union-attr]

    def _epoch_checkpoints(self, epoch: int) -> None:
        c = self.config
        if c.method in ("de_sam", "sharpbalance") and epoch == c.swap_epoch:
            # phase 1 ends here: the state a sharpbalance run (this one, or a fork) scores from;
            # last.pt first, so that a stop between the two writes leaves a resumable run
            self.save(LAST, PHASE1)
        elif epoch == c.epochs - 1 or (c.checkpoint_every and (epoch + 1) % c.checkpoint_every == 0):
            self.save(LAST)


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
    asked = config.get("resume") if isinstance(config, Mapping) else getattr(config, "resume", None)
    if resume is not None and asked is not None and Path(resume) != Path(asked):
        raise ValueError(f"resume={str(resume)!r} and config.resume={asked!r} name different runs")
    resume = resume if resume is not None else asked
    payload: dict[str, Any] | None = None
    bad_last: Path | None = None
    if resume is not None:
        run_dir: Path | None = check_output_dir(resume, resume=True)
        path, payload = load_latest(run_dir)
        if path.name == PREVIOUS and (path.parent / LAST).exists():
            bad_last = path.parent / LAST
        saved = TrainConfig.from_dict(payload["config"])
        config = resumed_config(saved, requested_fields(config), run_dir, payload["device"])
    else:
        config = as_config(config)
        if config.from_phase1 is not None:
            source = phase1_path(config.from_phase1)
            payload = load_checkpoint(source)
            check_phase1_compatible(TrainConfig.from_dict(payload["config"]), config, source)
            payload = dict(payload, forked_from=str(source))
        config.check_device()  # before the folder is created: a bad device leaves nothing behind
        run_dir = Path(config.output_dir) if config.output_dir else None
    device = config.check_device()
    # under torchrun: join the job, place the members (docs/distributed.md); None otherwise
    plan = start_plan(
        config.members,
        config.resolved_device(),
        placement=config.placement,
        sam_grad_sync=config.sam_grad_sync,
        sync_batchnorm=config.sync_batchnorm,
        timeout_s=config.dist_timeout,
    )
    try:
        if plan is not None and resume is None:
            # rank 0's folder is the run's; a folder this rank's caller made for it (each rank of
            # a command line names one) is left empty, so it goes
            own = run_dir
            run_dir = plan.on_rank0(
                lambda: check_output_dir(own) if own is not None else None, "the output folder check"
            )
            if (
                own is not None
                and run_dir is not None
                and own.resolve() != run_dir.resolve()
                and own.is_dir()
                and not any(own.iterdir())
            ):
                own.rmdir()
            config = config.replace(output_dir=str(run_dir) if run_dir is not None else None)
        elif resume is None and run_dir is not None:
            run_dir = check_output_dir(run_dir)
        if plan is not None and plan.is_main:
            print(plan.describe(), flush=True)
        with thread_limit(config.num_threads, device):
            trainer = EnsembleTrainer(config, data, callbacks, run_dir=run_dir, plan=plan)
            if payload is not None:
                trainer.load_state_dict(payload, fork=resume is None)
                if trainer.placement_note is not None and trainer.writes:
                    print(trainer.placement_note, flush=True)
            if plan is not None and payload is not None:
                plan.barrier("reading the checkpoint")  # every rank has read it before rank 0 writes
            if bad_last is not None and trainer.writes:  # keep the damaged file for inspection, out of the rotation
                bad_last.replace(bad_last.with_name(LAST + ".bad"))
            if run_dir is not None and trainer.writes:
                write_config(run_dir, config, trainer.device)
            try:
                result = trainer.run()
            except RunInterrupted as e:
                if trainer.writes:
                    print(str(e), file=sys.stderr, flush=True)
                raise
        if run_dir is not None and trainer.writes:
            result.save(run_dir)
    finally:
        if plan is not None:
            plan.shutdown()
    return result
