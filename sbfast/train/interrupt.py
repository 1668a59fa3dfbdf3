"""Stopping a run cleanly on SIGINT / SIGTERM: ``RunInterrupted`` and the handler that defers a
signal to the end of the current training step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

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
