"""Argument checks of ``SharpBalanceSAM`` and the device-side non-finite test of its phases.

Every check raises ValueError / TypeError naming the offending value before anything changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "GRAD_NORM",
    "NONFINITE",
    "check_group",
    "check_groups_at_step",
    "check_lr",
    "is_capturing",
    "is_real",
    "nonfinite_flag",
    "unique_params",
]

NONFINITE = ("error", "skip")
GRAD_NORM = ("per_tensor", "global")


def is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python)."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC check (per phase)
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lr(lr: object, where: str) -> None:
    """A float lr must be finite and >= 0; a tensor lr must hold one floating value."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must hold one floating value, got {lr.dtype} {tuple(lr.shape)}")
    elif not is_real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite float >= 0 (or a tensor), got {lr!r}")


def check_group(group: dict[str, Any], where: str) -> None:
    """Validate a (complete) param group's hyperparameters; raises before anything changes."""
    check_lr(group["lr"], where)
    for key in ("momentum", "weight_decay", "rho"):
        v = group[key]
        if not is_real(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: {key} must be a finite float >= 0, got {v!r}")
    damp = group["dampening"]
    if not is_real(damp) or not math.isfinite(damp):
        raise ValueError(f"{where}: dampening must be a finite float, got {damp!r}")
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"{where}: adaptive must be a bool, got {group['adaptive']!r}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or damp != 0):
        raise ValueError(
            f"{where}: nesterov needs momentum > 0 and dampening == 0, got "
            f"momentum={group['momentum']!r}, dampening={damp!r}"
        )
    if group.get("maximize", False):
        raise ValueError(f"{where}: maximize=True is not supported")


def unique_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """A param group's parameters as a list (a generator is read once, here); ValueError in
    torch.optim's words if one is listed twice: it would get two updates per step from one flat
    slot, unlike the reference's de-duplicated list."""
    params = list(params)
    first: dict[int, int] = {}
    for j, p in enumerate(params):
        if id(p) in first:
            raise ValueError(
                f"optimizer contains a parameter group with duplicate parameters (entries "
                f"{first[id(p)]} and {j} are the same tensor); pass each parameter once"
            )
        first[id(p)] = j
    return params


def is_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def nonfinite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool on the device: any element of ``tensors`` is not finite. One read of each,
    as a plain sum (multi-threaded, vectorised): a NaN or inf makes it NaN or inf; finite
    gradients could only trip it by overflowing the float32 sum (|sum| > 3.4e38)."""
    sums = torch.stack(
        [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double() for t in tensors]
    )
    return ~torch.isfinite(sums).all()


def check_groups_at_step(groups: list[dict[str, Any]], update: bool = True) -> None:
    """At a phase: the hyperparameters it reads, which may have been set after construction
    (``opt.param_groups[0]["momentum"] = -1``); raises before the phase changes anything. The
    update reads them all; ``update=False`` (first_step) checks rho and adaptive only."""
    for gi, group in enumerate(groups):
        try:
            if update:
                check_group(group, f"param group {gi}")
                continue
            rho = group["rho"]
            if not is_real(rho) or not math.isfinite(rho) or rho < 0:
                raise ValueError(f"param group {gi}: rho must be a finite float >= 0, got {rho!r}")
            if not isinstance(group["adaptive"], bool):
                raise ValueError(f"param group {gi}: adaptive must be a bool, got {group['adaptive']!r}")
        except ValueError as exc:
            raise ValueError(f"{exc} (nothing changed; the step is still pending)") from None
