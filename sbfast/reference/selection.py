"""Section 4 of the algorithm: subset selection, and the op-level twins of its two stages.

``select_sam_masks(s, r, v) == sharpbalance_masks(ksmallest_mask(s, k), v)`` with
``k = floor_count(N, r)`` and v = 0 (balance) or 1 (boost): the two stages are the twins of the
ops ``sbfast::ksmallest_mask`` and ``sbfast::sharpbalance_masks`` (and their CPU fallback where
``sbfast._C`` is missing).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from sbfast.common import VARIANTS, floor_count


def select_sam_masks(
    scores: torch.Tensor,
    ratio: float,
    variant: str = "balance",
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """SharpBalance's per-member SAM sets (section 4).

    Args:
        scores: floating [M, N], finite; S[j, i] = sharpness of sample i under member j
            (smaller = flatter). Only its shape is used by `random` and `same`.
        ratio: r in [0, 1]; k = floor(N * r + 1e-9) flattest samples per member.
        variant: `balance` (SAM set of i = A_i | R_i), `boost` (A_i | (R minus R_i)),
            `random` (normal set = floor(N (1 - r) + 1e-9) samples drawn with member i's seed),
            `same` (one such draw with seed 0, shared by all members).
        seeds: one int per member, used by `random` only; default 0..M-1.
    Returns:
        bool [M, N] on scores' device; True = SAM for that member, False = normal.

    F_j takes the k smallest scores of row j with ties broken by ascending index (stable sort);
    R is the complement of the union of the F_j in ascending index order and R_i = R[i::M];
    A_i is the union of F_j over j != i (empty when M = 1).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [M, N], got shape {tuple(scores.shape)}")
    m, n = scores.shape
    if m == 0:
        raise ValueError("scores has M = 0 members")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf (was every sample scored?)")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"ratio must be a real number, got {ratio!r} ({type(ratio).__name__})")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if seeds is None:
        seeds = list(range(m))
    else:
        seeds = list(seeds)
        if len(seeds) != m:
            raise ValueError(f"len(seeds) = {len(seeds)} but scores has M = {m} members")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise ValueError(f"seeds must be ints, got {s!r}")
    device = scores.device

    if variant in ("random", "same"):
        n_normal = floor_count(n, 1.0 - ratio)
        member_seeds = seeds if variant == "random" else [0] * m
        mask = torch.ones(m, n, dtype=torch.bool)
        for i, seed in enumerate(member_seeds):
            g = torch.Generator().manual_seed(int(seed))
            mask[i, torch.randperm(n, generator=g)[:n_normal]] = False
        return mask.to(device)

    k = floor_count(n, ratio)
    flat = ksmallest_mask(scores, k)  # row j = F_j, the k flattest samples of member j
    return sharpbalance_masks(flat, 0 if variant == "balance" else 1)


def ksmallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [M, N]: per row of floating ``scores`` [M, N], True at its k smallest (0 <= k <= N),
    ties by ascending index: the first k of a stable ascending sort (so -0.0 == +0.0, NaN last)."""
    m, n = scores.shape
    flat = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    flat.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return flat


def sharpbalance_masks(flat_mask: torch.Tensor, variant: int) -> torch.Tensor:
    """Bool [M, N] SAM masks from the members' flat sets ``flat_mask`` (bool [M, N], row j = F_j).

    variant 0 (balance): A_i | R_i; 1 (boost): A_i | (R minus R_i); R = samples in no F_j, in
    ascending index, R_i = R[i::M]; A_i = union of F_j over j != i.
    """
    m, n = flat_mask.shape
    device = flat_mask.device
    flat_count = flat_mask.sum(0)
    rest = torch.nonzero(flat_count == 0).squeeze(1)
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    for i in range(m):
        others = (flat_count - flat_mask[i].long()) > 0
        in_r_i = torch.zeros(n, dtype=torch.bool, device=device)
        in_r_i[rest[i::m]] = True
        if variant == 0:
            mask[i] = others | in_r_i
        else:
            in_r = torch.zeros(n, dtype=torch.bool, device=device)
            in_r[rest] = True
            mask[i] = others | (in_r & ~in_r_i)
    return mask
