"""Which rank trains which member: the placement of M ensemble members on W ranks.

Three shapes, chosen from W and M (``placement="auto"``) or named:

* ``"members"`` (auto when W <= M): every rank holds whole members, in contiguous balanced
  blocks (sizes differ by at most one, the larger blocks first): 3 members on 2 ranks are
  rank 0: members 0, 1 and rank 1: member 2. W = M gives one member per rank.
* ``"data-parallel"`` (auto when W > M): every member is spread over a group of G = W / M
  consecutive ranks that split each of its batches (data parallel inside the member); W must be a
  multiple of M. 2 members on 4 ranks: member 0 on ranks 0-1, member 1 on ranks 2-3.
* an explicit list, one entry per member: the rank that holds it (``"0,0,1"``) or an inclusive
  range of ranks that share it data parallel (``"0-1,2-3"``; ``"0,1-2"`` mixes both). Every rank
  must hold something, and a rank that shares a member holds only that member: otherwise its
  partners would wait at every gradient all-reduce while it trains its other members.

The placement only says who computes what; the numbers do not depend on it (scores, masks and
parameters are the same on 1, 2 or 3 ranks, see docs/distributed.md), except that data parallel
splits every batch, so BatchNorm sees smaller batches unless its statistics are synchronised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PLACEMENT_MODES", "Placement", "check_spec", "place"]

PLACEMENT_MODES: tuple[str, ...] = ("auto", "members", "data-parallel")

_ENTRY = re.compile(r"^(\d+)(?:-(\d+))?$")


def _ranks(ranks: tuple[int, ...]) -> str:
    """ "2" or "0-1" (consecutive) or "0, 2"."""
    if len(ranks) > 1 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(str(r) for r in ranks)


@dataclass(frozen=True)
class Placement:
    """Members on ranks. ``groups[j]`` = the ranks that hold member j (ascending; one rank, or
    several sharing it data parallel). Build it with :func:`place`.

    Attributes:
        world_size: W, the number of ranks.
        groups: per member, the tuple of ranks holding it.
        mode: "members", "data-parallel" or "explicit" (how it was chosen, for the record).
    """

    world_size: int
    groups: tuple[tuple[int, ...], ...]
    mode: str

    @property
    def members(self) -> int:
        """M, the number of members."""
        return len(self.groups)

    def members_of(self, rank: int) -> tuple[int, ...]:
        """The members that ``rank`` trains (alone or with its data-parallel partners), ascending."""
        self._check_rank(rank)
        return tuple(j for j, g in enumerate(self.groups) if rank in g)

    def ranks_of(self, member: int) -> tuple[int, ...]:
        """The ranks holding ``member``."""
        if not 0 <= member < self.members:
            raise ValueError(f"member {member} out of range; the ensemble has members 0..{self.members - 1}")
        return self.groups[member]

    def leader(self, member: int) -> int:
        """The first rank of ``member``'s group: the one whose copy is the member's (evaluation,
        checkpoints, BatchNorm running statistics)."""
        return self.ranks_of(member)[0]

    def data_parallel(self, member: int) -> bool:
        """Whether ``member`` is shared by more than one rank."""
        return len(self.ranks_of(member)) > 1

    def led_by(self, rank: int) -> tuple[int, ...]:
        """The members whose leader is ``rank``."""
        self._check_rank(rank)
        return tuple(j for j, g in enumerate(self.groups) if g[0] == rank)

    def spec(self) -> str:
        """The explicit form that :func:`place` reads back into this placement (``"0,0,1"``)."""
        return ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in self.groups)

    def describe(self) -> str:
        """One readable line, printed at the start of a distributed run."""
        m, w = self.members, self.world_size
        head = f"placement: {m} member{'s' * (m != 1)} on {w} rank{'s' * (w != 1)} ({self.mode})"
        if all(len(g) == 1 for g in self.groups):
            parts = []
            for r in range(w):
                js = self.members_of(r)
                parts.append(f"rank {r}: member{'s' * (len(js) != 1)} {', '.join(str(j) for j in js)}")
        else:
            parts = [
                f"member {j}: rank{'s' * (len(g) != 1)} {_ranks(g)}" + (" (data parallel)" if len(g) > 1 else "")
                for j, g in enumerate(self.groups)
            ]
        return head + ": " + " | ".join(parts)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range; the world has ranks 0..{self.world_size - 1}")


def _blocks(members: int, world_size: int) -> tuple[tuple[int, ...], ...]:
    """Contiguous balanced blocks: rank r holds members [start_r, start_r + size_r), the first
    M % W ranks one more than the others."""
    base, extra = divmod(members, world_size)
    groups: list[tuple[int, ...]] = []
    for r in range(world_size):
        groups += [(r,)] * (base + (1 if r < extra else 0))
    return tuple(groups)


def _allowed(members: int) -> str:
    return (
        f"with {members} members a world of 1..{members} ranks places whole members, or a multiple of "
        f"{members} ({members * 2}, {members * 3}, ...) spreads each member over W/{members} ranks"
    )


def _parse_explicit(spec: str, members: int, world_size: int) -> tuple[tuple[int, ...], ...]:
    entries = [e.strip() for e in spec.split(",")]
    if len(entries) != members:
        raise ValueError(
            f"placement {spec!r} has {len(entries)} entries; expected one per member ({members}), "
            "each a rank ('0') or a range of ranks sharing the member ('0-1')"
        )
    groups: list[tuple[int, ...]] = []
    for j, e in enumerate(entries):
        mt = _ENTRY.match(e)
        if mt is None:
            raise ValueError(f"placement {spec!r}: entry {j} ({e!r}) is not a rank ('2') or a range of ranks ('0-1')")
        lo = int(mt.group(1))
        hi = int(mt.group(2)) if mt.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"placement {spec!r}: entry {j} ({e!r}) is an empty range; write it low-high")
        if hi >= world_size:
            raise ValueError(
                f"placement {spec!r}: entry {j} names rank {hi}, but the world has ranks 0..{world_size - 1}"
            )
        groups.append(tuple(range(lo, hi + 1)))
    used = [0] * world_size
    shared = [False] * world_size
    for g in groups:
        for r in g:
            used[r] += 1
            shared[r] = shared[r] or len(g) > 1
    idle = [r for r in range(world_size) if used[r] == 0]
    if idle:
        raise ValueError(
            f"placement {spec!r} leaves rank{'s' * (len(idle) != 1)} {_ranks(tuple(idle))} without a "
            f"member; every one of the {world_size} ranks must hold at least one"
        )
    crowded = [r for r in range(world_size) if shared[r] and used[r] > 1]
    if crowded:
        raise ValueError(
            f"placement {spec!r}: rank {crowded[0]} shares a member (data parallel) and holds another; "
            "a rank that shares a member must hold only that one (its partners would wait at every "
            "all-reduce while it trains the others)"
        )
    return tuple(groups)


def place(members: int, world_size: int, spec: str = "auto") -> Placement:
    """The placement of ``members`` members on ``world_size`` ranks.

    Args:
        members: M >= 1.
        world_size: W >= 1.
        spec: "auto" (W <= M: "members", W > M: "data-parallel"), "members" (needs W <= M),
            "data-parallel" (needs W a multiple of M; W = M is one rank per member) or an explicit
            list, one entry per member: a rank ("0,0,1") or a range of ranks ("0-1,2-3").
    Returns:
        Placement.
    Raises:
        ValueError naming the value and what is allowed.
    """
    for name, v in (("members", members), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(spec, str):
        raise TypeError(
            f"placement must be a string ({', '.join(PLACEMENT_MODES)} or a list like '0,0,1'), "
            f"got {type(spec).__name__}"
        )
    spec = spec.strip()
    if spec == "auto":
        spec = "members" if world_size <= members else "data-parallel"
    if spec == "members":
        if world_size > members:
            raise ValueError(
                f"placement 'members' puts whole members on ranks, so it needs at most {members} ranks "
                f"(one member each); the world has {world_size}. Use 'data-parallel' (a multiple of "
                f"{members} ranks) or an explicit list such as '0,1-2'"
            )
        return Placement(world_size, _blocks(members, world_size), "members")
    if spec == "data-parallel":
        if world_size % members != 0:
            raise ValueError(
                f"cannot spread {members} members evenly over {world_size} ranks: {_allowed(members)}; "
                "or give an explicit placement such as '0,1-2'"
            )
        g = world_size // members
        return Placement(
            world_size,
            tuple(tuple(range(j * g, (j + 1) * g)) for j in range(members)),
            "data-parallel" if g > 1 else "members",
        )
    if not spec or not spec[0].isdigit():
        raise ValueError(
            f"unknown placement {spec!r}; expected one of {PLACEMENT_MODES} or an explicit list, one "
            "entry per member: a rank ('0,0,1') or a range of ranks sharing a member ('0-1,2-3')"
        )
    return Placement(world_size, _parse_explicit(spec, members, world_size), "explicit")


def check_spec(spec: object, members: int) -> None:
    """Check a placement spec as far as it can be checked before the world size is known
    (a config's field): a mode name, or an explicit list with one valid entry per member that
    leaves no rank below its highest one idle. Raises ValueError / TypeError as :func:`place`."""
    if not isinstance(spec, str):
        raise TypeError(
            f"placement must be a string ({', '.join(PLACEMENT_MODES)} or a list like '0,0,1'), "
            f"got {type(spec).__name__}"
        )
    s = spec.strip()
    if s in PLACEMENT_MODES:
        return
    if not s or not s[0].isdigit():
        place(members, 1, s)  # raises: unknown placement
    highest = max((int(x) for x in re.findall(r"\d+", s)), default=0)
    place(members, highest + 1, s)
