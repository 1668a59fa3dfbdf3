"""Input contracts of the diversity measures: one-line errors before any work.

Every diversity measure reads member outputs stacked as [M, n, C] (M members, n samples, C
classes). These checks run once per call, on the whole tensor, and never move it off its device
except for the scalars they report.
"""

from __future__ import annotations

from typing import Any

import torch

PROB_SUM_TOL = 1e-3  # |sum_c p - 1| allowed per row: float32 / half softmax outputs


def check_outputs(outputs: Any, what: str = "outputs", *, min_members: int = 1) -> torch.Tensor:
    """``outputs`` as a floating [M, n, C] tensor with M >= ``min_members`` and n, C >= 1.

    Raises:
        TypeError: not a tensor, or not floating.
        ValueError: wrong number of dims, an empty dim, fewer members than needed, NaN or inf.
    """
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [M, n, C], got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"{what} must be floating, got {outputs.dtype}")
    if outputs.dim() != 3:
        raise ValueError(f"{what} must be [M, n, C] (members, samples, classes), got shape {tuple(outputs.shape)}")
    m, n, c = outputs.shape
    if m < min_members:
        raise ValueError(f"{what} needs at least {min_members} members for a pairwise measure, got M = {m}")
    if n == 0 or c == 0:
        raise ValueError(f"{what} needs at least one sample and one class, got shape {tuple(outputs.shape)}")
    if not bool(torch.isfinite(torch.stack(torch.aminmax(outputs))).all()):  # NaN propagates
        raise ValueError(f"{what} contains NaN or inf")
    return outputs


def check_probs(probs: Any, *, min_members: int = 2) -> torch.Tensor:
    """``probs`` as [M, n, C] probability rows: in [0, 1] and summing to 1 within PROB_SUM_TOL.

    Raises:
        TypeError / ValueError as :func:`check_outputs`, and ValueError naming the first row
        that is not a distribution (with a hint when the tensor looks like logits).
    """
    p = check_outputs(probs, "probs", min_members=min_members)
    dev = (p.sum(-1, dtype=torch.float64) - 1).abs()
    worst = dev.max()
    lo, hi = torch.aminmax(p)
    if bool(worst > PROB_SUM_TOL) or bool(lo < -PROB_SUM_TOL) or bool(hi > 1 + PROB_SUM_TOL):
        flat = int(dev.argmax())
        m, s = divmod(flat, p.shape[1])
        raise ValueError(
            f"probs must be distributions over the last dim (values in [0, 1], rows summing to 1 within "
            f"{PROB_SUM_TOL}): member {m}, sample {s} sums to {float(p[m, s].sum()):.6g}, values lie in "
            f"[{float(lo):.6g}, {float(hi):.6g}]; pass softmax outputs, not logits"
        )
    return p


def check_targets(targets: Any, n: int, c: int) -> torch.Tensor:
    """``targets`` as an integer [n] tensor with values in [0, c).

    Raises:
        TypeError: not a tensor of integers. ValueError: wrong shape, or a label out of range.
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor [n] of class indices, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [n] with n = {n} (the outputs' sample dim), got {tuple(targets.shape)}")
    if n and (bool(targets.min() < 0) or bool(targets.max() >= c)):
        raise ValueError(f"targets must lie in [0, {c}), got values in [{int(targets.min())}, {int(targets.max())}]")
    return targets
