"""The release's subset-selection functions (``engine.py``), on :mod:`sbfast.select`.

Every function takes the release's ``(args, flats, i, ...)``: ``flats`` maps member ids
0..M-1 to that member's per-sample scores (numpy [N], e.g. the shared dict that
``main_fisher`` fills), ``i`` is this member's id, ``args.flat_ratio`` is r. They return this
member's *normal* indices in the release's types.

- ``boosting_sam_split`` (variant ``balance``: SAM set A_i | R_i) and
  ``boosting_sam_split_boost`` (``boost``: A_i | (R minus R_i)): list of numpy int64, in
  ascending order. The release's order comes from iterating a Python set, which is not defined;
  so is its round robin R_i = R[i::M], which here walks R in ascending index order. F_j = the
  k = int(N * r) flattest samples of member j (the release's count, not sbfast's rounding
  guard), ties broken by ascending index (the release's argsort is not stable).
- ``sam_idx_complemetary``: numpy int64, the intersection of all F_j, then [i::M] (ascending,
  as the release's intersect1d); ``np.array([-1])`` when r == 0.
- ``random_subset`` / ``same_subset``: numpy int64, the release's draws exactly (numpy's global
  RNG / ``RandomState(0)``), in draw order.

Errors (one ValueError line) where the release silently misbehaves: members whose scores differ
in length, member ids that are not 0..M-1 (or ``i`` not among them), NaN/inf scores, a ratio
outside [0, 1]. ``flats[0]`` missing raises KeyError, as in the release.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from sbfast import ops
from sbfast.select import select_sam_masks

__all__ = ["boosting_sam_split", "boosting_sam_split_boost", "random_subset", "sam_idx_complemetary", "same_subset"]


def _size(flats: Any, where: str) -> tuple[int, dict[Any, np.ndarray]]:
    """N from ``flats[0]`` (KeyError as the release when absent) and every member's scores,
    checked to be 1-D of length N."""
    first = np.asarray(flats[0])
    if first.ndim != 1:
        raise ValueError(f"{where}: flats[0] must be 1-D per-sample scores [N], got shape {first.shape}")
    n = first.shape[0]
    arrays = {0: first}
    for key in list(flats.keys()):
        if key == 0 and not isinstance(key, bool):
            continue
        a = np.asarray(flats[key])
        if a.shape != (n,):
            raise ValueError(
                f"{where}: flats[{key!r}] has shape {a.shape} but flats[0] has {n} scores; every member "
                "must score the same data set"
            )
        arrays[key] = a
    return n, arrays


def _ratio(args: Any, where: str) -> float:
    r = args.flat_ratio
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 <= float(r) <= 1.0:
        raise ValueError(f"{where}: args.flat_ratio must be a number in [0, 1], got {r!r}")
    return float(r)


def _scores(arrays: dict[Any, np.ndarray], i: Any, where: str) -> torch.Tensor:
    """Members' scores as [M, N], row j = member j; ids must be exactly 0..M-1 and include i."""
    m = len(arrays)
    ids = sorted(arrays, key=repr)
    if set(arrays) != set(range(m)) or any(isinstance(k, bool) for k in arrays):
        raise ValueError(f"{where}: flats must map the member ids 0..{m - 1}, got keys {ids}")
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < m:
        raise ValueError(f"{where}: member i = {i!r} is not one of the ids 0..{m - 1} in flats")
    rows = [np.asarray(arrays[j]) for j in range(m)]
    if any(
        not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)) or r.dtype == np.bool_
        for r in rows
    ):
        raise ValueError(f"{where}: scores must be numbers, got dtypes {[str(r.dtype) for r in rows]}")
    stacked = np.stack(rows)
    if not np.issubdtype(stacked.dtype, np.floating):
        stacked = stacked.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def _flat_count(n: int, r: float, ascend: bool) -> int:
    total = int(n * r)  # the release's count
    # the release takes argsort[-total:] when descending, which for total == 0 is every sample
    return n if (total == 0 and not ascend) else total


def _sam_masks(args: Any, flats: Any, i: Any, ascend: bool, variant: str, where: str) -> tuple[np.ndarray, int]:
    n, arrays = _size(flats, where)
    r = _ratio(args, where)
    scores = _scores(arrays, i, where)
    if n == 0:
        return np.zeros(0, dtype=np.bool_), n
    k = _flat_count(n, r, ascend)
    # ascend=False: the k largest scores are "flat"; negating keeps ties by ascending index
    ranked = scores if ascend else -scores
    # select_sam_masks takes a ratio and rounds N * ratio with a guard; k / n lands on k exactly
    masks = select_sam_masks(ranked, k / n, variant)
    return masks[int(i)].numpy(), n


def boosting_sam_split(args: Any, flats: Any, i: int, ascend: bool = False) -> list[np.int64]:
    """The release's ``boosting_sam_split`` (variant ``balance``): member i's normal indices, the
    samples outside A_i | R_i, as a list of numpy int64 in ascending order.

    ``ascend=True`` (what main.py passes): F_j = the k smallest scores of member j; False: the k
    largest. k = int(N * args.flat_ratio).
    """
    sam, _ = _sam_masks(args, flats, i, ascend, "balance", "boosting_sam_split")
    return list(np.flatnonzero(~sam).astype(np.int64))


def boosting_sam_split_boost(args: Any, flats: Any, i: int, ascend: bool = False) -> list[np.int64]:
    """The release's ``boosting_sam_split_boost`` (variant ``boost``, main.py's choice for
    CIFAR-10): member i's normal indices, the samples outside A_i | (R minus R_i), as a list of
    numpy int64 in ascending order."""
    sam, _ = _sam_masks(args, flats, i, ascend, "boost", "boosting_sam_split_boost")
    return list(np.flatnonzero(~sam).astype(np.int64))


def sam_idx_complemetary(args: Any, flats: Any, i: int, ascend: bool = True) -> np.ndarray:
    """The release's ``sam_idx_complemetary``: the samples flat for every member (the
    intersection of all F_j), then every M-th from position i; int64 numpy, ascending.
    ``np.array([-1])`` when ``args.flat_ratio == 0``. Prints as the release does."""
    where = "sam_idx_complemetary"
    print(i)
    n, arrays = _size(flats, where)
    r = _ratio(args, where)
    if r == 0:
        return np.array([-1])
    scores = _scores(arrays, i, where)
    m = scores.shape[0]
    for _ in range(m):
        print(m)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    select_sam_masks(scores, 0.0, "balance")  # the finiteness check (one host sync)
    k = _flat_count(n, r, ascend)
    flat = ops.ksmallest_mask(scores if ascend else -scores, k)
    common = np.flatnonzero(flat.all(0).numpy()).astype(np.int64)
    return common[i::m]


def random_subset(args: Any, flats: Any, i: int) -> np.ndarray:
    """The release's ``random_subset``: int(N * (1 - r)) normal indices drawn without
    replacement from numpy's global RNG (so ``np.random.seed`` reproduces the release's draw);
    int64 numpy in draw order."""
    n, _ = _size(flats, "random_subset")
    r = _ratio(args, "random_subset")
    normal_indice_num = int(n * (1 - r))
    return np.array(np.random.choice(np.arange(n), size=normal_indice_num, replace=False))


def same_subset(args: Any, flats: Any, i: int) -> np.ndarray:
    """The release's ``same_subset``: the draw of :func:`random_subset` from
    ``np.random.RandomState(0)``, the same for every member; int64 numpy in draw order."""
    n, _ = _size(flats, "same_subset")
    r = _ratio(args, "same_subset")
    rng = np.random.RandomState(0)
    normal_indice_num = int(n * (1 - r))
    return np.array(rng.choice(np.arange(n), size=normal_indice_num, replace=False))
