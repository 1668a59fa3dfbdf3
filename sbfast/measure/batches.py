"""The batches a measure runs on, and the model state a measure must leave as it found it.

``as_batches`` turns what a caller hands over into a list of ``(x, y)`` pairs, in the order given:
an iterable of ``(x, y)`` or ``(index, x, y)`` batches (for example exactly the batches another tool
used), or a data set plus ``batch_size`` / ``n_batches`` (the first ``n_batches`` consecutive
batches; shuffled only when a ``generator`` is given).

``measuring(model)`` is the context every measure runs in: eval mode (BatchNorm uses its running
statistics, dropout is off) and ``requires_grad`` on every parameter. A model handed over in train
mode is switched to eval mode for the measure, not refused: the paper's measures are defined in
eval mode, and the training flags come back on exit. On exit, normal or not (an error, Ctrl-C),
every module's ``training`` flag, every parameter's ``requires_grad``, and the values of every
parameter and buffer are put back, in place, into the same ``Parameter`` / buffer objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["as_batches", "check_model", "measuring"]


def _split(batch: Any, k: int) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        raise TypeError(f"batch {k}: expected (x, y) or (index, x, y), got a dict")
    try:
        parts = tuple(batch)
    except TypeError:
        raise TypeError(f"batch {k}: expected (x, y) or (index, x, y), got {type(batch).__name__}") from None
    if len(parts) == 2:
        x, y = parts
    elif len(parts) == 3:
        _, x, y = parts
    else:
        raise TypeError(f"batch {k}: expected (x, y) or (index, x, y), got a tuple of {len(parts)}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"batch {k}: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"batch {k}: x and y need a batch dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch {k}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"batch {k} is empty (0 samples)")
    return x, y


def _from_dataset(
    data: torch.utils.data.Dataset, batch_size: int, n_batches: int | None, generator: torch.Generator | None
) -> list[Any]:
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the data set is empty (0 samples): no batches to measure on")
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({n} samples)")
    full = n // batch_size
    if n_batches is None:
        n_batches = full
    if n_batches > full:
        raise ValueError(
            f"n_batches={n_batches} batches of {batch_size} need {n_batches * batch_size} samples, the data set has {n}"
        )
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    out = []
    for b in range(n_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        samples = [data[int(i)] for i in idx]
        cols = list(zip(*samples, strict=True))
        out.append(tuple(torch.stack([torch.as_tensor(v) for v in c]) for c in cols))
    return out


def as_batches(
    data: Iterable[Any] | torch.utils.data.Dataset,
    *,
    batch_size: int | None = None,
    n_batches: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """The batches a measure runs on, as a list of ``(x, y)``: ``x`` of shape ``(B, ...)``, ``y``
    integer labels of shape ``(B,)``, moved to ``device`` when given.

    ``data`` is either an iterable of ``(x, y)`` / ``(index, x, y)`` batches (used in the order
    given; ``n_batches`` keeps the first ones) or, with ``batch_size``, a data set indexed by sample
    (``sbfast.data.IndexedTensorDataset`` or any ``Dataset`` yielding ``(x, y)`` / ``(i, x, y)``):
    the first ``n_batches`` consecutive batches (all full batches when ``None``), drawn from a
    random order only when ``generator`` is given.
    """
    for name, v in (("batch_size", batch_size), ("n_batches", n_batches)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if batch_size is not None:
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(f"batch_size needs a data set indexed by sample, got {type(data).__name__}")
        raw = _from_dataset(data, batch_size, n_batches, generator)  # type: ignore[arg-type]
    else:
        if isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                f"expected an iterable of (x, y) batches or a data set with batch_size, got {type(data).__name__}"
            )
        raw = []
        for b in data:
            if n_batches is not None and len(raw) == n_batches:
                break
            raw.append(b)
    out = [_split(b, k) for k, b in enumerate(raw)]
    if not out:
        raise ValueError("no batches to measure on (0 batches)")
    if device is not None:
        out = [(x.to(device), y.to(device)) for x, y in out]
    return out


def check_model(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's named parameters; refuses a non-module, a model without parameters, or one on
    the meta device (no values to measure)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to measure")
    meta = [n for n, p in named if p.is_meta]
    if meta:
        raise ValueError(f"parameter {meta[0]!r} is on the meta device: the model has no values to measure")
    return named


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad`` for the measure; everything put back on exit.

    Saved: each module's ``training``, each parameter's ``requires_grad``, a copy of every
    parameter and buffer value. Restored in place (``copy_`` under ``no_grad``), so the caller's
    ``Parameter`` objects, optimisers and hooks still point at the same tensors.
    """
    check_model(model)
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    saved_p = [p.detach().clone() for p in params]
    buffers = [b for b in model.buffers()]
    saved_b = [b.detach().clone() for b in buffers]
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
            p.grad = None  # the measure's gradients are new tensors; the caller's .grad comes back untouched
        yield model
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved_p, strict=True):
                p.copy_(v)
            for b, v in zip(buffers, saved_b, strict=True):
                b.copy_(v)
        for p, f, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(f)
            p.grad = g
        for m, t in modes:
            m.training = t
