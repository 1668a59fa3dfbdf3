"""The interface of a per-layer rule and the squared-norm helpers the rules share.

A rule turns a layer's (input, output gradient) pairs of one batch into the per-sample squared
norms of that layer's parameter gradients (see :mod:`sbfast.sharpness` for the identities).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Rule", "acc", "norm_total", "sq"]


def acc(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 values are reduced in float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sq(v: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norm of [B, ...]."""
    return acc(v).pow(2).reshape(v.shape[0], -1).sum(1)


class Rule:
    """How one module type turns (input, output gradient) pairs into per-sample squared norms."""

    params: tuple[str, ...] = ("weight", "bias")

    def capture(self, module: nn.Module, x: torch.Tensor) -> Any:
        """What the backward will need, taken in the forward hook (inside the functional call,
        so buffers are the ones in use)."""
        return x.detach()

    def inputs_of(self, ctx: Any) -> list[torch.Tensor]:
        """The captured tensors whose in-place modification would invalidate ``ctx``."""
        return [ctx]

    def score(
        self, module: nn.Module, calls: list[tuple[Any, torch.Tensor]], names: frozenset[str], form: str
    ) -> torch.Tensor:
        raise NotImplementedError


def norm_total(gw: torch.Tensor | None, gb: torch.Tensor | None) -> torch.Tensor:
    if gw is None:
        return sq(gb)
    return sq(gw) if gb is None else sq(gw) + sq(gb)
