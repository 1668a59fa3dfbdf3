"""Bias-variance decomposition of the ensemble's squared error (the release's "variance" diversity).

Over M members with outputs o_m(x) in R^C and one-hot targets e_y:

    bias^2   = (1/n) sum_x || mean_m o_m(x) - e_y ||^2
    variance = (1/n) sum_x (1/(M-1)) sum_m || o_m(x) - mean_m o_m(x) ||^2

i.e. the unbiased (M/(M-1)-corrected) across-member variance of the output vector, averaged
over samples; bias^2 + variance * (M-1)/M is the members' mean squared error against e_y.
Which outputs is the caller's choice: the release passes **logits** (its models return them);
on **probabilities** the decomposition is that of the Brier score (see ``variance_outputs``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sbfast.measure.diversity_checks import check_outputs, check_targets

SPACES = ("probs", "logits")
DEFAULT_SPACE = "probs"  # why: docs/measure_diversity.md, "Bias-variance"


class BiasVariance(NamedTuple):
    """0-d float64 tensors on the outputs' device (``float(...)`` reads them)."""

    bias2: torch.Tensor
    variance: torch.Tensor
    mse: torch.Tensor  # (1/(M n)) sum_m sum_x ||o_m(x) - e_y||^2 = bias2 + variance (M-1)/M


def bias_variance(outputs: torch.Tensor, targets: torch.Tensor) -> BiasVariance:
    """Bias^2 and unbiased variance of M members' outputs against one-hot targets.

    Args:
        outputs: [M, n, C] floating (logits or probabilities), M >= 2 (the correction needs two).
        targets: [n] integer labels in [0, C).
    Returns:
        :class:`BiasVariance` (float64, computed in two passes: mean, then squared deviations,
        which is the release's sum-of-squares formula without its cancellation).
    Raises:
        ValueError / TypeError: shapes, dtypes, M < 2, labels out of range, NaN.
    """
    o = check_outputs(outputs, "outputs", min_members=2).to(torch.float64)
    m, n, c = o.shape
    t = check_targets(targets, n, c).to(o.device)
    onehot = torch.nn.functional.one_hot(t.long(), c).to(torch.float64)
    mean = o.mean(0)  # [n, C]
    bias2 = (mean - onehot).pow(2).sum(-1).mean()
    variance = (o - mean).pow(2).sum(-1).sum(0).mean() / (m - 1)
    return BiasVariance(bias2, variance, bias2 + variance * (m - 1) / m)


def variance_outputs(logits: torch.Tensor, space: str = DEFAULT_SPACE) -> torch.Tensor:
    """The outputs the decomposition runs on: softmax probabilities (``"probs"``, the default)
    or the logits themselves (``"logits"``, the release's convention). [M, n, C] -> [M, n, C]."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return logits.softmax(-1) if space == "probs" else logits
