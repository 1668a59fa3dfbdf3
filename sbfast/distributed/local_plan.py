"""A one-process run as a world of size one: :class:`LocalPlan`, with :class:`RankPlan`'s
interface, so that the trainer has one member loop whether torchrun started it or not.

This process leads every member; an exchange is a stack, a selection a call, a broadcast and
``on_rank0`` the value itself; nothing is data parallel, so a member's step, model and optimizer
are its own. The checkpoint records no placement (``None``: the one-process format), and a
signal may stop the run inside an epoch (ranks stop together, at an epoch's end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from sbfast.distributed.ensemble import RankPlan
from sbfast.distributed.placement import Placement

__all__ = ["LocalPlan", "Plan"]

T = TypeVar("T")


class LocalPlan:
    """Every member of an M-member ensemble on this process's ``device``."""

    stops_inside_epoch = True  # one process: a signal is honoured after the current step
    is_main = True

    def __init__(self, members: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.placement = Placement(world_size=1, groups=((0,),) * members, mode="members")
        self.local: tuple[int, ...] = tuple(range(members))

    # -- who does what ---------------------------------------------------------------------

    def data_parallel(self, j: int) -> bool:
        return False

    def leads(self, j: int) -> bool:
        return True

    def announce(self) -> None:
        """Nothing to say: the placement line is a distributed run's."""

    def saved_placement(self) -> dict[str, Any] | None:
        """What a checkpoint records of the placement: nothing for one process."""
        return None

    # -- building a member -----------------------------------------------------------------

    def prepare_model(self, j: int, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, j: int, opt: Any) -> Any:
        return opt

    def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("no member is data parallel in a one-process run")

    def sync_buffers(self, j: int, model: nn.Module) -> None:
        """Every member's BatchNorm statistics are already its own."""

    # -- exchanges ---------------------------------------------------------------------------

    def epoch_end(self, local: Mapping[int, torch.Tensor | float], stop_requested: bool) -> tuple[list[float], bool]:
        """Every member's epoch loss as floats (the epoch's one host sync) and the stop request."""
        values = [local[j] for j in sorted(local)]
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).tolist(), stop_requested

    def member_counts(self, local: Mapping[int, int | torch.Tensor]) -> list[int]:
        return [int(local[j]) for j in sorted(local)]

    def score_pieces(self, n: int) -> list[tuple[int, int, int]]:
        """Every member scores every row: (member, 0, n)."""
        return [(j, 0, n) for j in self.local]

    def exchange_scores(self, local: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """The members' score rows [N] stacked into float32 [M, N] on the training device."""
        return torch.stack([r.to(self.device) for r in local])

    def select(self, scores: torch.Tensor, select: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return select(scores, *args)

    def gather_states(self, local: Mapping[int, Any]) -> list[Any]:
        return [local[j] for j in sorted(local)]

    def evaluation(self, members: Sequence[int], num_classes: int) -> None:
        """No exchange: the evaluation sees every member here."""
        return None

    def broadcast(self, obj: T, what: str) -> T:
        return obj

    def barrier(self, what: str) -> None:
        """Nobody to wait for."""

    def on_rank0(self, fn: Callable[[], T], what: str) -> T:
        return fn()

    def shutdown(self) -> None:
        """No process group to leave."""


Plan = RankPlan | LocalPlan
