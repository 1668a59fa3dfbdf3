"""Hooks into a run (``Callback``) and the list that calls them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sbfast.train.config import TrainConfig

if TYPE_CHECKING:
    from sbfast.train.results import EnsembleResult


class Callback:
    """Hooks into a run; override what you need. Plain callables are accepted too and are called
    as ``fn(epoch, record)`` at the end of every epoch."""

    def on_train_start(self, config: TrainConfig, models: Sequence[nn.Module]) -> None:
        pass

    def on_epoch_start(self, epoch: int, phase: str) -> None:
        pass

    def on_scores(self, epoch: int, scores: torch.Tensor, masks: torch.Tensor) -> None:
        """Right after scoring and selection (sharpbalance, start of epoch T_d + 1): scores
        float32 [M, N], masks bool [M, N] (True = SAM), both on the CPU."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_train_end(self, result: EnsembleResult) -> None:
        pass


class CallbackList:
    def __init__(self, callbacks: Sequence[Callback | Callable[[int, dict], Any]] | None) -> None:
        self.items = list(callbacks or [])
        for c in self.items:
            if not isinstance(c, Callback) and not callable(c):
                raise TypeError(f"callbacks must be Callback instances or callables, got {type(c).__name__}")

    def call(self, hook: str, *args: Any) -> None:
        for c in self.items:
            if isinstance(c, Callback):
                getattr(c, hook)(*args)
            elif hook == "on_epoch_end":
                c(*args)
