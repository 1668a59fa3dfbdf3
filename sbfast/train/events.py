"""What watches a run: hooks (``Callback``), SIGINT / SIGTERM (``RunInterrupted`` and the handler that defers a signal to the end of the current training step) and the epoch progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sbfast.train.config import TrainConfig

if TYPE_CHECKING:
    from sbfast.train.results import EnsembleResult
import signal
import threading
from pathlib import Path
from types import FrameType


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


_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing a resumable checkpoint.

    A KeyboardInterrupt, so ``except Exception`` does not swallow it. ``str(e)`` is the one line
    that ``train_ensemble`` prints (how to resume); a command line turns it into ``exit_code``
    (128 + the signal number: 130 for SIGINT, 143 for SIGTERM) without a traceback.

    Attributes:
        signum: the signal. run_dir: the run folder. exit_code: 128 + signum.
    """

    def __init__(self, signum: int, run_dir: str | Path, detail: str) -> None:
        self.signum = int(signum)
        self.run_dir = Path(run_dir)
        self.exit_code = 128 + self.signum
        self.detail = detail
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"sbfast: stopped by {name} ({detail}); resume with: sbfast train --resume {self.run_dir}")


class RunDiverged(RuntimeError):
    """A run stopped at the end of an epoch in which a member diverged: its training loss is not
    finite, or every one of its steps was skipped for a non-finite gradient (the fused optimizer
    skips such a step on the device, so the run would otherwise go on without learning).
    ``str(e)`` is one line naming the epoch, the member and the likely cause.

    Attributes:
        epoch, member: where. reason: what was seen ("has training loss nan", ...).
    """

    one_line = True  # a command line prints str(e) alone: it says what to do

    def __init__(self, epoch: int, member: int, reason: str, cause: str) -> None:
        self.epoch, self.member, self.reason = epoch, member, reason
        super().__init__(
            f"the run diverged in epoch {epoch}: member {member} {reason}; {cause}. The run stopped before this "
            "epoch's checkpoint; start a new run with a smaller value"
        )


class SignalCatcher:
    """While active (a context manager), SIGINT and SIGTERM are caught.

    In deferred mode (the default) the first signal only sets ``requested``: the trainer checks it
    after every step, writes a checkpoint and raises :class:`RunInterrupted`. In immediate mode
    (``immediate = True``: phases whose state is already on disk, such as the scoring at T_d + 1
    or the final evaluation) and for a second signal, the handler raises RunInterrupted at once
    with ``describe()`` as its detail. Only the main thread can install handlers; elsewhere (or
    with ``enabled=False``) this does nothing and signals keep their usual effect.
    """

    def __init__(self, run_dir: str | Path | None, describe: Callable[[], str], enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.describe = describe
        self.enabled = enabled and run_dir is not None and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self.immediate = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.immediate or self.requested is not None:
            raise RunInterrupted(signum, self.run_dir or ".", self.describe())
        self.requested = signum

    def __enter__(self) -> SignalCatcher:
        if self.enabled:
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.4f}"


def progress_bar(it: Any, enabled: bool, desc: str, start: int = 0) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    total = start + len(it) if hasattr(it, "__len__") else None
    return tqdm(it, desc=desc, unit="epoch", leave=True, dynamic_ncols=True, initial=start, total=total)
