"""The exchanges of a distributed run, each one torch.distributed collective.

* :func:`exchange_scores` (at T_d): every rank contributes the Fisher scores it computed (whole
  rows for the members it holds alone; a slice of the samples for a data-parallel member, split
  over its group) and every rank ends with the same float32 [M, N] matrix: one ``all_gather``.
* :func:`select_on_rank0` : the selection runs once, on rank 0 (``sbfast.select.select_sam_masks``
  by default), and its masks are broadcast, so every rank holds identical masks bool [M, N].
* :func:`gather_probs`: each member's leader sends its test probabilities; rank 0 gets
  float32 [M, n, C] for the ensemble metrics: one ``gather``.

Ranks hold different numbers of members (3 members on 2 ranks: 2 and 1), while gloo's and NCCL's
``all_gather`` / ``gather`` need equal sizes: every rank flattens its pieces into one vector padded
to the longest rank's length, which every rank can compute from the placement alone (no size
exchange). The padding is at most one member's row.

Failure: a collective whose peer died, raised, or did not arrive within the process group's
timeout raises :class:`CollectiveError` with one line saying which rank, which exchange and why;
the run then ends with that error instead of hanging.

Traffic: :data:`traffic` counts, per exchange, the calls and the payload bytes this rank handed
to its collectives (its padded piece for a gather, the whole buffer for an all-reduce or a
broadcast); ``bench/distributed_report.py`` prints it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sbfast.distributed.launch import DistContext
from sbfast.distributed.placement import Placement

__all__ = [
    "CollectiveError",
    "Traffic",
    "broadcast_module_state",
    "exchange_scores",
    "gather_probs",
    "guard",
    "row_pieces",
    "select_on_rank0",
    "traffic",
]

Piece = tuple[int, int, int]  # (member, start, end): rows start..end-1 of that member


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died, raised, or did not arrive within the timeout."""


class Traffic:
    """Per exchange (a name such as "scores"), the number of collective calls and the payload
    bytes this rank handed to them."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def add(self, what: str, nbytes: int) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        self.bytes[what] = self.bytes.get(what, 0) + int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in self.calls}


traffic = Traffic()


@contextlib.contextmanager
def guard(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`CollectiveError` naming the rank and the exchange."""
    try:
        yield
    except CollectiveError:
        raise
    except Exception as e:  # DistBackendError, DistNetworkError, RuntimeError from gloo/NCCL
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"rank {ctx.rank}/{ctx.world_size}: {what} failed: another rank died, was killed or stopped with an "
            f"error, or did not arrive within the {ctx.timeout_s:g} s timeout ({type(e).__name__}: {first})"
        ) from e


def row_pieces(placement: Placement, n: int, *, split: bool = True) -> list[list[Piece]]:
    """Who computes which rows: per rank, its pieces (member, start, end) in member order.

    A member held by one rank: that rank, rows 0..n-1. A data-parallel member: with ``split``
    its rows are cut into contiguous near-equal slices, one per rank of its group in rank order
    (``torch.tensor_split``'s sizes); without ``split`` its leader has all of them.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[list[Piece]] = [[] for _ in range(placement.world_size)]
    for j, ranks in enumerate(placement.groups):
        if len(ranks) == 1 or not split:
            out[ranks[0]].append((j, 0, n))
            continue
        g = len(ranks)
        base, extra = divmod(n, g)
        start = 0
        for k, r in enumerate(ranks):
            end = start + base + (1 if k < extra else 0)
            out[r].append((j, start, end))
            start = end
    return out


def _flat_length(pieces: Sequence[Piece], width: int) -> int:
    return sum((e - s) * width for _, s, e in pieces)


def _pack(
    ctx: DistContext,
    pieces: Sequence[Piece],
    local: Sequence[torch.Tensor],
    tail: tuple[int, ...],
    dtype: torch.dtype,
    length: int,
    what: str,
) -> torch.Tensor:
    if len(local) != len(pieces):
        raise ValueError(
            f"{what}: rank {ctx.rank} gave {len(local)} tensors; its placement computes {len(pieces)} "
            f"(members {[j for j, _, _ in pieces]})"
        )
    flat = torch.zeros(length, dtype=dtype, device=ctx.comm_device)
    at = 0
    for (j, s, e), t in zip(pieces, local, strict=True):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (e - s, *tail):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what}: rank {ctx.rank}'s piece of member {j} is {got}; expected {(e - s, *tail)}")
        k = t.numel()
        flat[at : at + k] = t.detach().reshape(-1).to(device=ctx.comm_device, dtype=dtype)
        at += k
    return flat


def _unpack(
    chunks: Sequence[torch.Tensor],
    layout: list[list[Piece]],
    members: int,
    n: int,
    tail: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    out = torch.empty((members, n, *tail), dtype=dtype, device=chunks[0].device)
    width = 1
    for t in tail:
        width *= t
    for chunk, pieces in zip(chunks, layout, strict=True):
        at = 0
        for j, s, e in pieces:
            k = (e - s) * width
            out[j, s:e] = chunk[at : at + k].reshape(e - s, *tail)
            at += k
    return out


def _gather_rows(
    ctx: DistContext,
    placement: Placement,
    local: Sequence[torch.Tensor],
    n: int,
    tail: tuple[int, ...],
    *,
    split: bool,
    dst: int | None,
    what: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    if placement.world_size != ctx.world_size:
        raise ValueError(f"{what}: the placement is for {placement.world_size} ranks, the job has {ctx.world_size}")
    layout = row_pieces(placement, n, split=split)
    width = 1
    for t in tail:
        width *= t
    length = max(1, max(_flat_length(p, width) for p in layout))  # collectives refuse empty tensors
    flat = _pack(ctx, layout[ctx.rank], local, tail, dtype, length, what)
    traffic.add(what, flat.numel() * flat.element_size())
    with guard(ctx, what):
        if dst is None:
            chunks = [torch.empty_like(flat) for _ in range(ctx.world_size)]
            dist.all_gather(chunks, flat)
        else:
            chunks = [torch.empty_like(flat) for _ in range(ctx.world_size)] if ctx.rank == dst else None
            dist.gather(flat, chunks, dst=dst)
    if chunks is None:
        return None
    return _unpack(chunks, layout, placement.members, n, tail, dtype)


def exchange_scores(
    ctx: DistContext,
    placement: Placement,
    local: Sequence[torch.Tensor],
    n: int,
) -> torch.Tensor:
    """Every member's scores on every rank.

    Args:
        ctx: this rank's context.
        placement: the run's placement.
        local: this rank's pieces in ``row_pieces(placement, n)[ctx.rank]`` order: for each,
            float32 [end - start] scores of that member on samples start..end-1 (any floating
            dtype and device; sent as float32).
        n: N, the number of training samples.
    Returns:
        float32 [M, N] on ``ctx.device``, identical on every rank.
    Raises:
        ValueError for pieces that do not match the placement (before communicating);
        CollectiveError when a rank fails.
    """
    out = _gather_rows(ctx, placement, local, n, (), split=True, dst=None, what="the score exchange")
    assert out is not None
    return out.to(ctx.device)


def select_on_rank0(
    ctx: DistContext,
    scores: torch.Tensor,
    select: Callable[..., torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """``select(scores, *args, **kwargs)`` computed once, on rank 0, and broadcast.

    Args:
        scores: [M, N] (every rank holds the same, e.g. from :func:`exchange_scores`).
        select: e.g. ``sbfast.select.select_sam_masks`` (ratio, variant, seeds as args).
    Returns:
        bool [M, N] on ``scores``' device, identical on every rank.
    Raises:
        The selection's own error on rank 0; on the other ranks a CollectiveError saying that
        rank 0's selection failed (rank 0 says first, so no rank waits for the timeout).
    """
    m, n = scores.shape
    what = "the mask broadcast"
    status = torch.zeros(1, dtype=torch.int32, device=ctx.comm_device)
    masks_u8 = torch.empty((m, n), dtype=torch.uint8, device=ctx.comm_device)
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            masks = select(scores, *args, **kwargs)
            if masks.shape != (m, n):
                raise ValueError(f"the selection returned shape {tuple(masks.shape)}; expected {(m, n)}")
            masks_u8.copy_(masks.to(device=ctx.comm_device, dtype=torch.uint8))
            status.fill_(1)
        except Exception as e:  # told to the others first, then raised here
            error = e
    traffic.add(what, status.numel() * 4 + (masks_u8.numel() if error is None else 0))
    with guard(ctx, what):
        dist.broadcast(status, src=0)
    if error is not None:
        raise error
    if int(status.item()) != 1:
        raise CollectiveError(f"rank {ctx.rank}/{ctx.world_size}: the selection failed on rank 0 (its error says why)")
    with guard(ctx, what):
        dist.broadcast(masks_u8, src=0)
    return masks_u8.to(device=scores.device, dtype=torch.bool)


def gather_probs(
    ctx: DistContext,
    placement: Placement,
    local: Mapping[int, torch.Tensor],
    n: int,
    num_classes: int,
    *,
    dst: int = 0,
) -> torch.Tensor | None:
    """Test probabilities of every member on rank ``dst`` (the ensemble metrics need them all).

    Args:
        local: member -> float32 [n, C] for every member this rank leads
            (``placement.led_by(ctx.rank)``; the other ranks of a data-parallel group send none).
        n, num_classes: the test set's size and C.
    Returns:
        float32 [M, n, C] on the CPU on rank ``dst``; None on the other ranks.
    """
    led = placement.led_by(ctx.rank)
    if sorted(local) != list(led):
        raise ValueError(f"gather_probs: rank {ctx.rank} leads members {list(led)} but gave {sorted(local)}")
    out = _gather_rows(
        ctx, placement, [local[j] for j in led], n, (num_classes,), split=False, dst=dst, what="the probability gather"
    )
    return None if out is None else out.cpu()


def broadcast_module_state(
    ctx: DistContext, tensors: Sequence[torch.Tensor], src: int, group: Any = None, what: str = "the buffer broadcast"
) -> None:
    """Copy ``tensors`` (e.g. a data-parallel member's BatchNorm running statistics) from rank
    ``src`` to the other ranks of ``group``, in place; one broadcast per tensor through the
    backend's device."""
    with guard(ctx, what):
        for t in tensors:
            buf = t if t.device == ctx.comm_device else t.to(ctx.comm_device)
            traffic.add(what, buf.numel() * buf.element_size())
            dist.broadcast(buf, src=src, group=group)
            if buf is not t:
                t.copy_(buf)
