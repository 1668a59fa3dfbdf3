"""Input checks shared by the data package: :class:`DataError` for files that are not what they
should be, and :func:`check_seed` for every seed that enters a generator."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: every torch and numpy generator takes them as they are


class DataError(ValueError):
    """A data file that cannot be read as what it should be (truncated, corrupted, wrong contents).

    ``str(err)`` is one line, ``"<path>: <problem>"``. Attributes: ``path`` (the file; a member of
    an archive is ``"<archive>:<member>"``) and ``problem`` (what is wrong with it).
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # The default reduce would call DataError(message) with one argument; keep both fields.
        return (type(self), (self.path, self.problem))


def check_seed(seed: Any, name: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``seed`` as a Python int, after checking it is an int (Python or NumPy, not bool) in [0, limit).

    Raises:
        TypeError: not an integer. ValueError: out of range (a seed of 2**70 would otherwise
        surface deep inside torch as "Overflow when unpacking long long").
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, {_pow2(limit)}), got {seed!r} ({type(seed).__name__})")
    value = int(seed)
    if not 0 <= value < limit:
        raise ValueError(f"{name} must be in [0, {_pow2(limit)}), got {value}")
    return value


def _pow2(v: int) -> str:
    return f"2**{v.bit_length() - 1}" if v > 0 and v & (v - 1) == 0 else str(v)
