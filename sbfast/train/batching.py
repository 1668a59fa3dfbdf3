"""Static batching for the mixed phase: every batch of a member has the same SAM/normal composition."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sbfast.train.config import is_int


@dataclass(frozen=True)
class StaticPlan:
    """How a member's epoch of phase 2 is cut into batches.

    ``full_batches`` batches of exactly (``n_sam``, ``n_normal``) samples (n_sam + n_normal =
    batch size), then ``tail``: the leftover of both parts, as a few batches of at most the batch
    size each, listed as (n_sam, n_normal). Every sample is in exactly one batch per epoch.
    """

    n_sam: int
    n_normal: int
    full_batches: int
    tail: tuple[tuple[int, int], ...]

    @property
    def batch_size(self) -> int:
        return self.n_sam + self.n_normal

    @property
    def num_batches(self) -> int:
        return self.full_batches + len(self.tail)


def static_batch_plan(n_sam: int, n_normal: int, batch_size: int) -> StaticPlan:
    """Pick the per-batch composition of a member's phase-2 batches.

    Among compositions (k, b - k) with b = min(batch_size, N), take the one that fills the most
    full batches F = min(n_sam // k, n_normal // (b - k)) (a part with 0 per batch does not
    limit F), ties to the k closest to b * n_sam / N. The maximum is always at floor or ceil of
    b * n_sam / N, so the full batches carry the member's SAM share to within one sample. The
    leftover N - F b forms the tail: t = ceil(leftover / b) batches of near-equal size, each with
    a near-equal share of the leftover SAM samples. With the release's batch of 128 the tail is
    about one batch (the analogue of the release's last partial batch); with tiny batches and a
    share far from a multiple of 1/b it can be many batches of another composition (b = 4 and a
    20% share: 4 of every 5 batches are (1, 3), the rest (0, 4)), which ``StaticBatcher``
    interleaves with the full ones. Every sample is used once per epoch, so an epoch's summed
    gradient is the release's; per batch, the expected gradient matches random batches up to
    the rounding of the SAM share. The shapes are the same every epoch (a handful in all), so
    compiled code and captured graphs are reused.
    """
    for name, v in (("n_sam", n_sam), ("n_normal", n_normal)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = n_sam + n_normal
    if n == 0:
        raise ValueError("no samples to batch (n_sam + n_normal = 0)")
    b = min(batch_size, n)
    target = b * n_sam / n
    best: tuple[int, float, int] | None = None
    for k in range(b + 1):
        f_s = n_sam // k if k else n  # n bounds every F, standing in for infinity
        f_n = n_normal // (b - k) if b - k else n
        f = min(f_s, f_n, n // b)
        key = (-f, abs(k - target), k)
        if best is None or key < best:
            best = key
    assert best is not None
    f, k = -best[0], best[2]
    rs, rn = n_sam - f * k, n_normal - f * (b - k)
    left = rs + rn
    tail: list[tuple[int, int]] = []
    if left:
        t = -(-left // b)
        for i in range(t):
            # batch i holds positions [lo, hi) of the leftover laid out with its SAM samples evenly
            # spaced (position q is SAM where floor(q rs / left) steps up), so 0 <= s <= hi - lo
            lo, hi = left * i // t, left * (i + 1) // t
            s = rs * hi // left - rs * lo // left
            tail.append((s, hi - lo - s))
    return StaticPlan(k, b - k, f, tuple(tail))


class StaticBatcher:
    """Per epoch: shuffle a member's SAM indices and normal indices separately and zip them into
    batches of ``plan`` (:func:`static_batch_plan`), then visit the batches in a random order, so
    the tail batches (other compositions) do not all come at the end of the epoch.

    Args:
        sam_idx, normal_idx: int64 [n_sam], [n_normal] sample indices (disjoint).
        batch_size: the run's batch size. generator: CPU generator for the shuffles.
        device: where the yielded index tensors live (moved once per epoch).
    Yields (per ``epoch()``): (sam indices [k_s], normal indices [k_n]) per batch.
    """

    def __init__(
        self,
        sam_idx: torch.Tensor,
        normal_idx: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sam_idx = sam_idx.detach().to("cpu", torch.int64)
        self.normal_idx = normal_idx.detach().to("cpu", torch.int64)
        self.plan = static_batch_plan(len(self.sam_idx), len(self.normal_idx), batch_size)
        self.generator = generator
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.plan.num_batches

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self.generator
        sam = self.sam_idx[torch.randperm(len(self.sam_idx), generator=g)].to(self.device, non_blocking=True)
        nor = self.normal_idx[torch.randperm(len(self.normal_idx), generator=g)].to(self.device, non_blocking=True)
        p = self.plan
        cuts = [(i * p.n_sam, p.n_sam, i * p.n_normal, p.n_normal) for i in range(p.full_batches)]
        s0, n0 = p.full_batches * p.n_sam, p.full_batches * p.n_normal
        for ks, kn in p.tail:
            cuts.append((s0, ks, n0, kn))
            s0, n0 = s0 + ks, n0 + kn
        for i in torch.randperm(len(cuts), generator=g).tolist() if p.tail else range(len(cuts)):
            s, ks, n, kn = cuts[i]
            yield sam[s : s + ks], nor[n : n + kn]
