"""What one rank of a distributed ensemble run does differently: the trainer's side of
:mod:`sbfast.distributed`.

A :class:`RankPlan` is built once per run on every rank (collectively: data-parallel members get
their own process group, created on every rank in member order). The trainer asks it which
members to build, wraps their optimizers, routes a data-parallel member's steps through the
sliced steps, and uses it for every exchange: the epoch's losses, the scores at T_d, the masks,
test probabilities, sharpness, and the member states for rank 0's checkpoints.

Checkpoints: rank 0 gathers every member's state (each rank sends its members' state dicts,
serialised with ``torch.save`` to bytes on the CPU) and writes one file in the single-process
format. So a checkpoint does not depend on the placement: it resumes on any number of ranks
where the numbers allow it (:func:`check_resume_placement`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sbfast.distributed.collectives import (
    exchange_scores,
    gather_probs,
    guard,
    row_pieces,
    select_on_rank0,
    traffic,
)
from sbfast.distributed.data_parallel import (
    DataParallelOptimizer,
    broadcast_buffers,
    dp_mixed_step,
    dp_sam_step,
    dp_sgd_step,
    shard,
)
from sbfast.distributed.launch import DistContext, init_distributed, shutdown
from sbfast.distributed.placement import Placement, place
from sbfast.distributed.sync_batchnorm import convert_sync_batchnorm, has_collective_forward

__all__ = ["RankPlan", "check_resume_placement", "start_plan"]

Fetch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
T = TypeVar("T")


class RankPlan:
    """This rank's share of an ensemble run.

    Args:
        ctx: from :func:`sbfast.distributed.init_distributed`.
        members: M.
        placement: a :func:`sbfast.distributed.place` spec ("auto", "members", "data-parallel",
            "0,0,1", ...).
        sam_grad_sync, sync_batchnorm: how data-parallel members treat the SAM perturbation's
            gradient and BatchNorm (:mod:`sbfast.distributed.data_parallel`).
    """

    def __init__(
        self,
        ctx: DistContext,
        members: int,
        placement: str = "auto",
        *,
        sam_grad_sync: str = "local",
        sync_batchnorm: bool = False,
    ) -> None:
        self.ctx = ctx
        self.placement: Placement = place(members, ctx.world_size, placement)
        self.sam_grad_sync = sam_grad_sync
        self.sync_batchnorm = sync_batchnorm
        self.groups: dict[int, Any] = {}
        for j, ranks in enumerate(self.placement.groups):
            if len(ranks) > 1:  # every rank takes part in creating every group, in member order
                with guard(ctx, f"creating member {j}'s process group"):
                    pg = dist.new_group(list(ranks))
                if ctx.rank in ranks:
                    self.groups[j] = pg
        self.local: tuple[int, ...] = self.placement.members_of(ctx.rank)
        self._collective: dict[int, bool] = {}

    # -- who does what ---------------------------------------------------------------------

    stops_inside_epoch = False  # ranks stop together, at an epoch's end (one all-reduce says so)

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's training device."""
        return self.ctx.device

    def data_parallel(self, j: int) -> bool:
        return self.placement.data_parallel(j)

    def leads(self, j: int) -> bool:
        """Whether this rank's copy of member j is the member's (evaluation, checkpoints)."""
        return self.placement.leader(j) == self.ctx.rank

    def describe(self) -> str:
        line = self.placement.describe()
        if any(len(g) > 1 for g in self.placement.groups):
            line += f"; sam_grad_sync={self.sam_grad_sync}, batchnorm={'synchronised' if self.sync_batchnorm else 'per rank'}"
        return line

    def announce(self) -> None:
        """Print the placement once, on rank 0, as the run starts."""
        if self.is_main:
            print(self.describe(), flush=True)

    def saved_placement(self) -> dict[str, Any]:
        """What a checkpoint records of the placement (``check_resume_placement`` reads it)."""
        return {
            "world_size": self.ctx.world_size,
            "groups": [list(g) for g in self.placement.groups],
            "sam_grad_sync": self.sam_grad_sync,
            "sync_batchnorm": self.sync_batchnorm,
        }

    # -- building a member -----------------------------------------------------------------

    def prepare_model(self, j: int, model: nn.Module) -> nn.Module:
        """Member j's model as this rank trains it: with synchronised BatchNorm over its group
        when asked for and the member is data parallel. Call before building the optimizer."""
        if self.data_parallel(j) and self.sync_batchnorm:
            model = convert_sync_batchnorm(model, self.ctx, self.groups[j])
        self._collective[j] = self.data_parallel(j) and has_collective_forward(model)
        return model

    def wrap_optimizer(self, j: int, opt: Any) -> Any:
        """``opt`` itself, or for a data-parallel member a :class:`DataParallelOptimizer`."""
        if not self.data_parallel(j):
            return opt
        return DataParallelOptimizer(opt, self.ctx, self.groups[j], sam_grad_sync=self.sam_grad_sync)

    # -- a data-parallel member's step -------------------------------------------------------

    def step(
        self,
        j: int,
        forward: Callable[[torch.Tensor], torch.Tensor],
        opt: DataParallelOptimizer,
        phase: str,
        batch: Any,
        fetch: Fetch,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step of data-parallel member j on this rank's slice of ``batch``.

        ``batch``: index tensor [b], or (sam [k_s], normal [k_n]) for the static mixed phase;
        ``fetch(idx)`` gives the (augmented) inputs and labels of the whole batch, drawn exactly
        as one rank draws them, and this rank keeps its slice. ``mask``: the member's SAM mask
        bool [N] (exact mixed phase). Returns this rank's share of the batch mean loss.
        """
        ranks = self.placement.ranks_of(j)
        k, g = ranks.index(self.ctx.rank), len(ranks)
        coll = self._collective.get(j, False)
        if isinstance(batch, tuple):
            sam_idx, nor_idx = batch
            x, y = fetch(torch.cat([nor_idx, sam_idx]))
            k_n, k_s = nor_idx.shape[0], sam_idx.shape[0]
            xn, yn, xs, ys = x[:k_n], y[:k_n], x[k_n:], y[k_n:]
        else:
            x, y = fetch(batch)
            b = x.shape[0]
            if phase == "sgd":
                return dp_sgd_step(forward, opt, shard(x, k, g), shard(y, k, g), b, collective_forward=coll)
            if phase == "sam":
                return dp_sam_step(forward, opt, shard(x, k, g), shard(y, k, g), b, collective_forward=coll)
            if mask is None:
                raise RuntimeError("mixed phase before selection: no SAM mask for this member")
            sel = mask[batch].to(x.device)
            xn, yn, xs, ys = x[~sel], y[~sel], x[sel], y[sel]
            k_n, k_s = xn.shape[0], xs.shape[0]
        return dp_mixed_step(
            forward,
            opt,
            shard(xn, k, g),
            shard(yn, k, g),
            shard(xs, k, g),
            shard(ys, k, g),
            k_n,
            k_s,
            collective_forward=coll,
        )

    def sync_buffers(self, j: int, model: nn.Module) -> None:
        """A data-parallel member's BatchNorm running statistics: the leader's, on every rank."""
        if self.data_parallel(j):
            broadcast_buffers(self.ctx, model, self.placement.leader(j), self.groups[j])

    # -- exchanges ---------------------------------------------------------------------------

    def _sum_over_ranks(
        self,
        values: Mapping[int, float | torch.Tensor],
        what: str,
        leaders_only: bool,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        m = self.placement.members
        buf = torch.zeros(m, dtype=dtype, device=self.ctx.comm_device)
        for j, v in values.items():
            if not leaders_only or self.leads(j):
                buf[j] = v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype)
        traffic.add(what, buf.numel() * buf.element_size())
        with guard(self.ctx, what):
            dist.all_reduce(buf)
        return buf

    def epoch_losses(self, local: Mapping[int, torch.Tensor]) -> list[float]:
        """Every member's mean batch loss of the epoch, on every rank. ``local``: this rank's
        members' epoch totals (a data-parallel rank's share; the group's shares add up)."""
        return self._sum_over_ranks(local, "the epoch's losses", leaders_only=False).tolist()

    def member_counts(self, local: Mapping[int, int | torch.Tensor]) -> list[int]:
        """Per-member integers known to each member's ranks (skipped steps), on every rank."""
        return [int(v) for v in self._sum_over_ranks(local, "the skipped-step counts", True, torch.int64).tolist()]

    def member_floats(self, local: Mapping[int, float]) -> list[float]:
        """Per-member floats computed by each member's leader (sharpness), on every rank."""
        return self._sum_over_ranks(local, "the sharpness values", leaders_only=True).tolist()

    def score_pieces(self, n: int) -> list[tuple[int, int, int]]:
        """The (member, start, end) rows of the training set this rank scores."""
        return row_pieces(self.placement, n)[self.ctx.rank]

    def exchange_scores(self, local: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        return exchange_scores(self.ctx, self.placement, local, n)

    def select(self, scores: torch.Tensor, select: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return select_on_rank0(self.ctx, scores, select, *args)

    def gather_probs(self, local: Mapping[int, torch.Tensor], n: int, num_classes: int) -> torch.Tensor | None:
        """float32 [M, n, C] on rank 0 (None elsewhere) from the leaders' [n, C]."""
        return gather_probs(self.ctx, self.placement, {j: v for j, v in local.items() if self.leads(j)}, n, num_classes)

    def gather_states(self, local: Mapping[int, Any]) -> list[Any] | None:
        """Every member's state (dicts of tensors and plain values) on rank 0, in member order
        (None elsewhere). Each rank sends the members it leads, serialised on the CPU."""
        mine = {}
        for j, state in local.items():
            if self.leads(j):
                buf = io.BytesIO()
                torch.save(state, buf)
                mine[j] = buf.getvalue()
        traffic.add("the checkpoint gather", sum(len(v) for v in mine.values()))
        out: list[Any] | None = [None] * self.ctx.world_size if self.is_main else None
        with guard(self.ctx, "the checkpoint gather"):
            dist.gather_object(mine, out, dst=0)
        if out is None:
            return None
        states: list[Any] = [None] * self.placement.members
        for part in out:
            for j, raw in part.items():
                states[j] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        return states

    def broadcast(self, obj: Any, what: str) -> Any:
        """A picklable value from rank 0 to every rank."""
        box = [obj if self.is_main else None]
        with guard(self.ctx, what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        with guard(self.ctx, what):
            dist.barrier()

    def on_rank0(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` run on rank 0 only (creating the run folder, writing a file); its value, or
        the exception it raised, handed to every rank, so that all ranks go on or stop together
        with the same message."""
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as e:
                outcome = ("error", e)
        outcome = self.broadcast(outcome, what)
        kind, value = outcome
        if kind == "error":
            raise value
        return value

    def epoch_end(self, local: Mapping[int, torch.Tensor], stop_requested: bool) -> tuple[list[float], bool]:
        """The epoch's member losses on every rank (``local``: this rank's members' epoch totals;
        a data-parallel rank's share, the group's shares add up), and whether any rank was asked
        to stop (SIGINT/SIGTERM): one all-reduce of M + 1 numbers."""
        m = self.placement.members
        buf = torch.zeros(m + 1, dtype=torch.float64, device=self.ctx.comm_device)
        for j, v in local.items():
            buf[j] = v.to(buf.device) if isinstance(v, torch.Tensor) else v
        buf[m] = 1.0 if stop_requested else 0.0
        traffic.add("the epoch's losses", buf.numel() * buf.element_size())
        with guard(self.ctx, "the epoch's losses"):
            dist.all_reduce(buf)
        values = buf.tolist()
        return values[:m], values[m] > 0

    def evaluation(self, members: Sequence[int], num_classes: int) -> EvaluationGather:
        """The exchanges of an evaluation in which this rank evaluated ``members`` (the ones it
        leads), for ``sbfast.train.evaluate.evaluate_ensemble``."""
        return EvaluationGather(self, tuple(members), num_classes)

    def shutdown(self) -> None:
        """Leave the process group if this run created it."""
        shutdown(self.ctx)


class EvaluationGather:
    """Turns a rank's evaluation of the members it leads into the ensemble's (see
    :meth:`RankPlan.evaluation`): ``probs`` gathers [m_local, n, C] into [M, n, C] on rank 0
    (None elsewhere), for the test set or a corrupted one; ``floats`` gives every member's value
    on every rank."""

    def __init__(self, plan: RankPlan, members: tuple[int, ...], num_classes: int) -> None:
        self.plan, self.members, self.num_classes = plan, members, num_classes

    def probs(self, local: torch.Tensor, n: int) -> torch.Tensor | None:
        """``local``: float32 [len(members), n, C] (a rank that evaluated nothing: [0, n, C])."""
        if local.shape[0] != len(self.members):
            raise ValueError(f"{local.shape[0]} members' probabilities for {len(self.members)} members evaluated here")
        return self.plan.gather_probs(dict(zip(self.members, local, strict=True)), n, self.num_classes)

    def floats(self, local: Sequence[float]) -> list[float]:
        return self.plan.member_floats(dict(zip(self.members, local, strict=True)))


def start_plan(
    members: int,
    device: str | torch.device | None,
    *,
    placement: str = "auto",
    sam_grad_sync: str = "local",
    sync_batchnorm: bool = False,
    timeout_s: float = 600.0,
) -> RankPlan | None:
    """Join the job torchrun started (or the caller's process group) and plan this rank's
    share of the ensemble; None in a single-process run."""
    ctx = init_distributed(device, timeout_s=timeout_s)
    if ctx is None:
        return None
    try:
        return RankPlan(ctx, members, placement, sam_grad_sync=sam_grad_sync, sync_batchnorm=sync_batchnorm)
    except BaseException:
        shutdown(ctx)
        raise


def check_resume_placement(
    saved: Mapping[str, Any] | None,
    now: Placement | None,
    members: int,
    sam_grad_sync: str,
    sync_batchnorm: bool,
    model_has_batchnorm: bool,
) -> str | None:
    """Whether a run checkpointed under placement ``saved`` (the payload's ``placement``:
    ``{"world_size", "groups", ...}``; None: one process) may continue under ``now`` (None: one
    process); returns a line for the log when the placement changed, None when it did not.

    Whole members compute the same numbers on any rank, so any change among placements without
    data parallel is free. A member whose number of ranks changes would compute differently after
    the resume (BatchNorm statistics per slice, each slice's own perturbation) unless
    ``sam_grad_sync="all"`` and its BatchNorm is synchronised (or absent): then only roundings
    change. Anything else is refused.

    Raises:
        ValueError saying which member and how to resume.
    """

    def groups_of(p: Mapping[str, Any] | Placement | None) -> tuple[int, list[list[int]]]:
        if p is None:
            return 1, [[0]] * members
        if isinstance(p, Placement):
            return p.world_size, [list(g) for g in p.groups]
        return int(p["world_size"]), [list(g) for g in p["groups"]]

    def spec(groups: list[list[int]]) -> str:
        return ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)

    saved_world, saved_groups = groups_of(saved)
    world, groups = groups_of(now)
    if len(saved_groups) != members:
        raise ValueError(f"the checkpoint places {len(saved_groups)} members, the run has {members}")
    if saved_world == world and saved_groups == groups:
        return None
    exact = sam_grad_sync == "all" and (sync_batchnorm or not model_has_batchnorm)
    for j, (a, b) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(a) != len(b) and not exact:
            raise ValueError(
                f"cannot resume: member {j} was trained on {len(a)} rank(s) and would continue on {len(b)}; a "
                "data-parallel member's numbers depend on its number of ranks (BatchNorm statistics per slice, each "
                f"slice's own SAM perturbation). Resume on {saved_world} rank(s) with placement '{spec(saved_groups)}', "
                "or train with sam_grad_sync='all' and sync_batchnorm=True, under which the number of ranks changes "
                "only roundings"
            )
    return (
        f"resuming on {world} rank(s) (placement {spec(groups)}) a run checkpointed on {saved_world} "
        f"(placement {spec(saved_groups)})"
    )
