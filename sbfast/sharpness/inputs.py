"""Data handling shared by the scores: loaders, batch checks, target checks, eval mode, and the
table that gathers per-sample values into a per-index mean (with its duplicate and non-finite
checks)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sbfast.common import module_modes, restore_modes

__all__ = [
    "Batch",
    "ScoreTable",
    "as_loader",
    "check_batch",
    "check_positive_int",
    "check_targets",
    "eval_mode",
    "loader_length",
    "progress_bar",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_positive_int(value: object, name: str, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def as_loader(data: Any, batch_size: int) -> Iterable:
    """A data set batched by ``batch_size`` in order, or the loader itself (TypeError otherwise)."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a data set or a loader yielding (index, x, y), got {type(data).__name__}")
    return data


def check_targets(y: torch.Tensor, n_classes: int) -> None:
    """Raise unless every target lies in [0, n_classes) (on CPU; asynchronously on an accelerator)."""
    if y.device.type == "cpu":
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"targets must lie in [0, {n_classes}) (the model's outputs), got [{lo}, {hi}]")
    else:  # no host sync on an accelerator: the check fails asynchronously
        torch._assert_async(((y >= 0) & (y < n_classes)).all(), "targets out of range")


def check_batch(batch: Any) -> Batch:
    """One (index int [b], x [b, ...], y int [b]) batch, checked; raises naming what is wrong."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
        raise ValueError("data must yield (index, x, y) triples")
    index, x, y = batch
    for name, t in (("index", index), ("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if index.dim() != 1 or y.dim() != 1 or x.dim() < 1:
        raise ValueError(
            f"expected index [b], x [b, ...], y [b]; got shapes {tuple(index.shape)}, "
            f"{tuple(x.shape)}, {tuple(y.shape)}"
        )
    if not (index.shape[0] == x.shape[0] == y.shape[0]):
        raise ValueError(f"batch sizes differ: index {index.shape[0]}, x {x.shape[0]}, y {y.shape[0]}")
    if index.is_floating_point() or y.is_floating_point() or index.dtype == torch.bool or y.dtype == torch.bool:
        raise ValueError(f"index and y must be integer tensors, got {index.dtype} and {y.dtype}")
    if index.numel() and index.device.type == "cpu" and int(index.min()) < 0:
        raise ValueError(f"sample indices must be >= 0, got min {int(index.min())}")
    return index, x, y


class ScoreTable:
    """Per-sample values gathered batch by batch, and their mean per sample index.

    ``add`` keeps each batch's values on the device without a host synchronisation; the checks
    read the device once per pass (:meth:`end_pass`) and once at the end (:meth:`mean`):

    - a sample index seen twice within one pass is refused: two different samples' values would
      be averaged into one score (repeated passes, ``trials``, are what averages);
    - a non-finite value is refused, naming the sample indices, their pass and batch, and
      whether their input x holds a NaN or inf (else the model's output or gradient is not
      finite there).

    Args:
        what: the function's name, for the messages.
        device: where the values live.
        note: added to the non-finite message (what else a non-finite value means).
    """

    def __init__(self, what: str, device: torch.device, note: str = "") -> None:
        self.what, self.device, self.note = what, device, note
        self.indices: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.x_finite: list[torch.Tensor | None] = []
        self.where: list[tuple[int, int]] = []  # (pass, batch) of each added chunk
        self.pass_no, self.batch_no, self.pass_start = 0, -1, 0

    def next_batch(self, pass_no: int) -> None:
        """A new batch of pass ``pass_no`` (0-based) begins; a new pass ends the previous one."""
        while self.pass_no < pass_no:
            self.end_pass()
        self.batch_no += 1

    def add(self, index: torch.Tensor, values: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Values [b] of one chunk of the current batch: index int [b], x [b, ...] its inputs."""
        self.indices.append(index.to(self.device).long())
        self.values.append(values)
        ok = None
        if x is not None and x.is_floating_point() and x.numel():
            ok = torch.isfinite(x).reshape(x.shape[0], -1).all(1).to(self.device)
        self.x_finite.append(ok)
        self.where.append((self.pass_no, self.batch_no))

    def end_pass(self) -> None:
        """Refuse a sample index seen twice in the pass that ends here (one host read)."""
        chunks = self.indices[self.pass_start :]
        if chunks:
            index = torch.cat(chunks)
            ordered, order = torch.sort(index, stable=True)
            twice = ordered[1:] == ordered[:-1]
            if bool(twice.any()):
                first = int(twice.nonzero()[0, 0])
                sample = int(ordered[first])
                positions = order[ordered == sample].tolist()
                batches = sorted({self._locate(self.pass_start, pos)[1] for pos in positions})
                where = (
                    f"batch {batches[0]}"
                    if len(batches) == 1
                    else f"batches {', '.join(map(str, batches[:-1]))} and {batches[-1]}"
                )
                raise ValueError(
                    f"{self.what}: sample index {sample} appears {len(positions)} times in pass {self.pass_no} "
                    f"({where}); each sample may come once per pass (its scores would be averaged with "
                    "another sample's); trials= repeats whole passes"
                )
        self.pass_no, self.batch_no, self.pass_start = self.pass_no + 1, -1, len(self.indices)

    def _locate(self, first_chunk: int, position: int) -> tuple[int, int]:
        """(pass, batch) of element ``position`` counted from chunk ``first_chunk``."""
        for chunk in range(first_chunk, len(self.indices)):
            n = self.indices[chunk].shape[0]
            if position < n:
                return self.where[chunk]
            position -= n
        raise IndexError(position)

    def mean(self, num_samples: int | None) -> torch.Tensor:
        """float32 [N] on the device: per sample index, the mean of its values over the passes
        (NaN for an index never seen). Raises ValueError for no samples, an index >= N, or a
        non-finite value."""
        if not self.indices:
            raise ValueError("data yielded no samples")
        index = torch.cat(self.indices)
        values = torch.cat(self.values)
        top = int(index.max())
        n = top + 1 if num_samples is None else num_samples
        if top >= n:
            raise ValueError(f"sample index {top} >= num_samples={n}")
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            self._raise_non_finite(index, bad)
        # mean per index: trials average, and an index never seen is NaN rather than a fake score
        sums = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, index, values.double())
        counts = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(
            0, index, torch.ones_like(index, dtype=torch.float64)
        )
        return (sums / counts).float()

    def _raise_non_finite(self, index: torch.Tensor, bad: torch.Tensor) -> None:
        positions = bad.nonzero()[:, 0].tolist()
        x_ok = torch.cat(
            [
                torch.ones(len(i), dtype=torch.bool, device=self.device) if ok is None else ok
                for i, ok in zip(self.indices, self.x_finite, strict=True)
            ]
        )
        bad_x = [p for p in positions if not bool(x_ok[p])]
        shown = positions[:5]
        samples = ", ".join(str(int(index[p])) for p in shown) + (", ..." if len(positions) > 5 else "")
        pass_no, batch_no = self._locate(0, positions[0])
        if bad_x:
            cause = (
                f"{len(bad_x)} of them have an input x that holds NaN or inf (first: sample index "
                f"{int(index[bad_x[0]])})"
            )
        else:
            cause = "their inputs are finite: the model's output or gradient is not finite there (check the weights)"
        count = f"{len(positions)} sample{'s' if len(positions) > 1 else ''}"
        raise ValueError(
            f"{self.what}: the score is not finite for {count}, sample indices [{samples}] (the first "
            f"is sample index {int(index[positions[0]])} (pass {pass_no}, batch {batch_no})); {cause}"
            + (f"; {self.note}" if self.note else "")
        )


def progress_bar(iterable: Iterable, enabled: bool, desc: str, total: int | None) -> Iterator:
    """``iterable`` behind a tqdm bar when ``enabled``."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, unit="batch"))


def loader_length(loader: Iterable, trials: int) -> int | None:
    """Batches in ``trials`` passes over ``loader``, None if it has no length."""
    try:
        return len(loader) * trials  # type: ignore[arg-type]
    except TypeError:
        return None


def eval_mode(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode; returns the modes to restore (ValueError, modes restored, if a
    BatchNorm stays in training mode)."""
    modes = module_modes(model)
    model.eval()  # BatchNorm on running statistics, no dropout; running stats stay untouched
    stuck = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if stuck:
        restore_modes(modes)
        raise ValueError(
            f"{', '.join(stuck)} stayed in training mode after model.eval(): batch statistics "
            "would mix samples; per-sample scores need eval-mode normalisation"
        )
    return modes
