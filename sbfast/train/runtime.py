"""Small pieces of a training process: threads, progress bars, device syncs, one-time warnings."""

from __future__ import annotations

import warnings
from typing import Any

import torch

_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Warn with ``msg`` once per process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.4f}"


def progress_bar(it: Any, enabled: bool, desc: str, start: int = 0) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    total = start + len(it) if hasattr(it, "__len__") else None
    return tqdm(it, desc=desc, unit="epoch", leave=True, dynamic_ncols=True, initial=start, total=total)


class thread_limit:
    """Set torch's intra-op threads for a block (CPU runs), restoring them after."""

    def __init__(self, n: int | None, device: torch.device) -> None:
        self.n = n if (n and device.type == "cpu") else None
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n is not None:
            torch.set_num_threads(self.before)
