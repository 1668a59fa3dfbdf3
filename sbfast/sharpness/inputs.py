"""Data handling shared by the scores: loaders, batch checks, target checks, eval mode, the
per-index mean of the scores."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sbfast.common import module_modes, restore_modes

__all__ = ["Batch", "as_loader", "check_batch", "check_positive_int", "check_targets", "eval_mode", "loader_length",
           "progress_bar", "scores_by_index"]

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
        raise TypeError(
            f"data must be a data set or a loader yielding (index, x, y), got {type(data).__name__}"
        )
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


def scores_by_index(indices: list[torch.Tensor], values: list[torch.Tensor], num_samples: int | None,
                    device: torch.device) -> torch.Tensor:
    """float32 [N] on ``device``: per sample index, the mean of its values (NaN if never seen)."""
    if not indices:
        raise ValueError("data yielded no samples")
    index = torch.cat(indices)
    top = int(index.max())
    n = top + 1 if num_samples is None else num_samples
    if top >= n:
        raise ValueError(f"sample index {top} >= num_samples={n}")
    # mean per index: trials average, and an index never seen is NaN rather than a fake score
    sums = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, index, torch.cat(values).double())
    counts = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64))
    return (sums / counts).float()


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
        raise ValueError(f"{', '.join(stuck)} stayed in training mode after model.eval(): batch statistics "
                         "would mix samples; per-sample scores need eval-mode normalisation")
    return modes
