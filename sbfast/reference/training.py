"""Section 5 of the algorithm: the mixed SharpBalance step, and one epoch of a member written
like the release's loop (plain SGD, SAM on every sample, or mixed steps).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sbfast.reference.sam import SAM


def mixed_step(
    model: nn.Module,
    optimizer: SAM,
    x: torch.Tensor,
    y: torch.Tensor,
    sam_mask: torch.Tensor,
) -> float:
    """One SharpBalance step on a batch: SAM on the samples where ``sam_mask``, SGD on the rest.

    The update is the base optimizer's step on the gradient of the batch-mean loss in which
    the SAM samples are evaluated at w + e (e from the SAM part's mean loss). The normal part
    and the SAM part are separate forward passes, as the release (BatchNorm sees three a step).
    The model's mode is left as is (normally train). Gradients are zeroed first, as the
    release's loop does before each step.

    Args:
        x: [b, ...] inputs; y: int64 [b] targets; sam_mask: bool [b], True = SAM sample.
    Returns:
        the batch-mean loss at w, a python float.
    """
    if not all(hasattr(optimizer, f) for f in ("normal_step", "first_step", "second_step", "third_step")):
        raise TypeError(f"optimizer must be a SAM, got {type(optimizer).__name__}")
    if not isinstance(sam_mask, torch.Tensor) or sam_mask.dtype != torch.bool:
        raise ValueError(f"sam_mask must be a bool tensor, got {getattr(sam_mask, 'dtype', sam_mask)!r}")
    if x.dim() < 1 or y.dim() != 1 or sam_mask.dim() != 1:
        raise ValueError(
            f"expected x [b, ...], y [b], sam_mask [b]; got shapes {tuple(x.shape)}, "
            f"{tuple(y.shape)}, {tuple(sam_mask.shape)}"
        )
    b = x.shape[0]
    if not (b == y.shape[0] == sam_mask.shape[0]) or b == 0:
        raise ValueError(f"batch sizes differ or are empty: x {b}, y {y.shape[0]}, sam_mask {sam_mask.shape[0]}")
    sam_mask = sam_mask.to(x.device)
    n_sam = int(sam_mask.sum())
    n_normal = b - n_sam
    optimizer.zero_grad()
    total = 0.0
    if n_normal > 0:
        loss_n = F.cross_entropy(model(x[~sam_mask]), y[~sam_mask]) * (n_normal / b)
        loss_n.backward()
        total += loss_n.item()
        optimizer.normal_step(zero_grad=True)
    if n_sam > 0:
        xs, ys = x[sam_mask], y[sam_mask]
        loss_s = F.cross_entropy(model(xs), ys)
        loss_s.backward()
        total += (loss_s * (n_sam / b)).item()
        optimizer.first_step(zero_grad=True)
        (F.cross_entropy(model(xs), ys) * (n_sam / b)).backward()
        optimizer.second_step(zero_grad=True)
    else:
        optimizer.third_step(zero_grad=True)
    return total


def train_member_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    phase: str,
    *,
    sam_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """One epoch of one member, written like the release's loop.

    Args:
        optimizer: torch.optim.SGD for phase "sgd"; a SAM for "sam" and "mixed".
        loader: yields (index [b], x [b, ...] float32, y [b]); batches move to device/dtype here.
        phase: "sgd" (plain SGD), "sam" (SAM on every sample) or "mixed" (``mixed_step`` with
            ``sam_mask[index]``; sam_mask: bool [N], True = SAM for this member).
    Returns:
        the mean over batches of the batch-mean loss at w.
    """
    if phase not in ("sgd", "sam", "mixed"):
        raise ValueError(f"phase must be 'sgd', 'sam' or 'mixed', got {phase!r}")
    if phase == "mixed" and sam_mask is None:
        raise ValueError("phase 'mixed' needs sam_mask (bool [N])")
    model.train()
    losses = []
    for index, x, y in loader:
        x = x.to(device=device, dtype=dtype)
        y = y.to(device)
        if phase == "sgd":
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        elif phase == "sam":
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
            losses.append(loss.item())
        else:
            losses.append(mixed_step(model, optimizer, x, y, sam_mask[index]))
    if not losses:
        raise ValueError("loader yielded no batches")
    return sum(losses) / len(losses)
