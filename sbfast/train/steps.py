"""One optimizer step of each kind (SGD, SAM, mixed) as functions of a forward and a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


def sgd_step(forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain SGD on the batch mean loss through the optimizer's ``third_step`` (no normal_step
    before it: the base update on the current gradients). Returns the loss (0-d, on device)."""
    opt.zero_grad()
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.third_step(zero_grad=True)
    return loss.detach()


def sam_step(forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SAM on every sample (section 2): two forward/backward passes. Returns the loss at w."""
    opt.zero_grad()
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(forward(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss.detach()


def mixed_step_static(
    forward: Forward,
    opt: Any,
    xn: torch.Tensor,
    yn: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
) -> torch.Tensor:
    """Section 5 on a batch already split into its normal part (xn, yn) and SAM part (xs, ys).

    The weights |Nb|/b and |S|/b come from the shapes, so nothing reads device memory: the step
    is free of host synchronisation and, at fixed shapes, capturable. The arithmetic is
    ``reference.mixed_step``'s, operation for operation. Returns the batch mean loss at w.
    """
    k_n, k_s = yn.shape[0], ys.shape[0]
    b = k_n + k_s
    opt.zero_grad()
    total = None
    if k_n > 0:
        loss_n = F.cross_entropy(forward(xn), yn) * (k_n / b)
        loss_n.backward()
        total = loss_n.detach()
        opt.normal_step(zero_grad=True)
    if k_s > 0:
        loss_s = F.cross_entropy(forward(xs), ys)
        loss_s.backward()
        part = loss_s.detach() * (k_s / b)
        total = part if total is None else total + part
        opt.first_step(zero_grad=True)
        (F.cross_entropy(forward(xs), ys) * (k_s / b)).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.third_step(zero_grad=True)
    assert total is not None
    return total


def mixed_step_exact(
    forward: Forward, opt: Any, x: torch.Tensor, y: torch.Tensor, sam_mask: torch.Tensor
) -> torch.Tensor:
    """Section 5 on a random batch with a per-sample mask (the release's batches): one host sync
    per boolean index, as ``reference.mixed_step``."""
    sam_mask = sam_mask.to(x.device)
    return mixed_step_static(forward, opt, x[~sam_mask], y[~sam_mask], x[sam_mask], y[sam_mask])
