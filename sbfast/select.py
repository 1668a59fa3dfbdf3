"""SharpBalance's subset selection (docs/algorithm.md, section 4) on the scores' device.

``select_sam_masks`` has the contract of :func:`sbfast.reference.select_sam_masks` and returns
the same masks bit for bit. ``balance`` and ``boost`` run as two ``sbfast`` ops, with no host
round trip between them:

1. ``sbfast::ksmallest_mask(scores, k)``: F_j = the k smallest of row j, ties by ascending
   index (a stable sort's first k), by an O(N) radix select per row;
2. ``sbfast::sharpbalance_masks(flat, variant)``: U, R = ~U in ascending index, R_i = R[i::M]
   (rank in R by a scan, then rank mod M), A_i = union of F_j over j != i, then balance
   (A_i | R_i) or boost (A_i | (R minus R_i)), in one pass over the samples.

``random`` and ``same`` stay in Python: they must reproduce the reference's draws exactly,
which are ``torch.randperm`` on a CPU generator seeded per member (seed 0 for all in ``same``),
so they are computed on the CPU and moved to the scores' device (N log N per member; once per
run, beside the scoring).

Validation (finite scores) synchronises once with the host: selection runs once per training
run, not in a step. The ops themselves never synchronise (see :mod:`sbfast.ops`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from sbfast import ops
from sbfast.common import VARIANTS, floor_count


class SelectionTypeError(TypeError, ValueError):
    """A wrong type or dtype given to :func:`select_sam_masks`.

    A ``TypeError`` as sbfast's convention asks, and a ``ValueError`` too, because that is what
    :func:`sbfast.reference.select_sam_masks` raises for the same inputs: code written against
    either catches it.
    """


def _check_scores(scores: object) -> tuple[int, int]:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [M, N], got shape {tuple(scores.shape)}")
    m, n = scores.shape
    if m == 0:
        raise ValueError("scores has M = 0 members; expected at least one row")
    if not scores.is_floating_point():
        raise SelectionTypeError(f"scores must be floating point, got {scores.dtype}")
    if n > 0:
        # One reduction and one sync: min and max propagate NaN, and inf shows in one of them.
        lo, hi = torch.aminmax(scores)
        if not bool(torch.isfinite(torch.stack([lo, hi])).all()):
            nan = int(torch.isnan(scores).sum())
            inf = int(torch.isinf(scores).sum())
            rows = torch.nonzero(~torch.isfinite(scores).all(1)).squeeze(1).tolist()
            raise ValueError(
                f"scores contain {nan} NaN and {inf} inf values (members {rows}); expected finite "
                "scores (was every sample scored?)"
            )
    return m, n


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise SelectionTypeError(f"ratio must be a real number, got {ratio!r} ({type(ratio).__name__})")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    return ratio


def _check_seeds(seeds: Sequence[int] | None, m: int) -> list[int]:
    if seeds is None:
        return list(range(m))
    seeds = list(seeds)
    if len(seeds) != m:
        raise ValueError(f"len(seeds) = {len(seeds)} but scores has M = {m} members")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise SelectionTypeError(f"seeds must be ints, got {s!r} ({type(s).__name__})")
        if not -(2**63) <= s < 2**64:
            raise ValueError(f"seeds must lie in [-2**63, 2**64) (a torch.Generator seed), got {s}")
    return [int(s) for s in seeds]


def select_sam_masks(
    scores: torch.Tensor,
    ratio: float,
    variant: str = "balance",
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-member SAM sets of SharpBalance, equal to :func:`sbfast.reference.select_sam_masks`.

    Args:
        scores: floating [M, N] (float16, bfloat16, float32 or float64), finite, M >= 1;
            S[j, i] = sharpness of sample i under member j (smaller = flatter). Only its shape
            and device are used by ``random`` and ``same``.
        ratio: r in [0, 1]; k = floor(N * r + 1e-9) flattest samples per member.
        variant: ``balance`` (SAM set of i = A_i | R_i), ``boost`` (A_i | (R minus R_i)),
            ``random`` (normal set = floor(N (1 - r) + 1e-9) samples drawn with member i's seed),
            ``same`` (one such draw with seed 0, shared by all members).
        seeds: one int per member, used by ``random`` only; default 0..M-1.
    Returns:
        bool [M, N] on scores' device; True = SAM for that member.
    Raises:
        TypeError: scores not a tensor. :class:`SelectionTypeError` (a TypeError and a
            ValueError): non-floating scores, a ratio that is not a real number, non-int seeds.
        ValueError: scores not 2-D, M = 0, NaN or inf scores, ratio outside [0, 1], an unknown
            variant, len(seeds) != M.

    Synchronises once with the host (the finiteness check); everything after is on device.
    """
    m, n = _check_scores(scores)
    ratio = _check_ratio(ratio)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    seeds = _check_seeds(seeds, m)

    if variant in ("random", "same"):
        # The reference's draws, exactly: CPU generator, randperm, first n_normal are normal.
        n_normal = floor_count(n, 1.0 - ratio)
        member_seeds = seeds if variant == "random" else [0] * m
        mask = torch.ones(m, n, dtype=torch.bool)
        for i, seed in enumerate(member_seeds):
            mask[i, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_normal]] = False
        return mask.to(scores.device)

    k = floor_count(n, ratio)
    return ops.sharpbalance_masks(ops.ksmallest_mask(scores, k), variant)


def sam_index_split(mask_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One member's SAM and normal sample indices.

    Args:
        mask_row: bool [N], True = SAM (a row of :func:`select_sam_masks`).
    Returns:
        (sam_idx, normal_idx): int64, ascending, on mask_row's device; together a partition of
        0..N-1. Their lengths depend on the data, so this synchronises with the host.
    """
    if not isinstance(mask_row, torch.Tensor):
        raise TypeError(f"mask_row must be a torch.Tensor, got {type(mask_row).__name__}")
    if mask_row.dtype != torch.bool:
        raise TypeError(f"mask_row must be a bool tensor, got {mask_row.dtype}")
    if mask_row.dim() != 1:
        raise ValueError(f"mask_row must be 1-D [N] (one member's row), got shape {tuple(mask_row.shape)}")
    return torch.nonzero(mask_row).squeeze(1), torch.nonzero(~mask_row).squeeze(1)


def sam_share(masks: torch.Tensor) -> torch.Tensor:
    """Share of SAM samples per member: ``masks.sum(1) / N``, without host sync.

    Static-shape batching gives every batch of b samples round(b * share_i) SAM samples for
    member i, so every shape is fixed for the whole second phase (docs/algorithm.md, section 5).

    Args:
        masks: bool [M, N] (from :func:`select_sam_masks`).
    Returns:
        float32 [M] on masks' device, in [0, 1]; zeros when N = 0.
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be 2-D [M, N], got shape {tuple(masks.shape)}")
    n = masks.shape[1]
    # counts in int64 and the division in float64: exact counts past 2^24 samples
    return (masks.sum(1).to(torch.float64) / max(n, 1)).to(torch.float32)
