"""What the sharpness measures share: the model's parameters as one flat vector, the loss and error
of a batch at a perturbed point of it, the perturbation sets and their projections.

A measure perturbs every parameter (conv and linear weights and biases, BatchNorm affine
parameters; BatchNorm running statistics are buffers and stay put). The model is evaluated at
``w0 + delta`` by ``torch.func.functional_call`` on views of one flat vector, so a point is one
tensor [P], the gradient is one tensor [P], and the ascent and projection are a few elementwise
passes over flat buffers instead of a loop over parameter tensors.

Perturbation sets (c = |w0| elementwise when adaptive, 1 otherwise):
  l2:   sum_j (delta_j / c_j)^2 <= rho^2   (an ellipsoid when adaptive, a ball otherwise)
  linf: |delta_j| <= rho * c_j
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

NORMS = ("l2", "linf")

__all__ = [
    "NORMS",
    "FlatModel",
    "Scale",
    "check_masks",
    "check_norm",
    "check_rho",
    "project",
    "weighted_norm",
]


def check_rho(rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    return float(rho)


def check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return str(norm)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_masks(
    masks: Mapping[str, Tensor] | Sequence[Tensor] | None, named: Sequence[tuple[str, nn.Parameter]]
) -> list[Tensor | None] | None:
    """Parameter masks, by name (a dict ``{name: tensor shaped like the parameter}``; parameters
    not named are kept whole) or as a list aligned with ``model.named_parameters()``; returned as
    a list aligned with the parameters (None = no mask). A mask entry of 0 freezes that weight:
    its gradient is zeroed, so the perturbation stays on the kept weights."""
    if masks is None:
        return None
    out: list[Tensor | None]
    if isinstance(masks, Mapping):
        names = {n for n, _ in named}
        unknown = sorted(set(masks) - names)
        if unknown:
            raise ValueError(f"masks name {unknown[0]!r}, which is not a parameter of the model")
        out = [masks.get(n) for n, _ in named]
    else:
        out = list(masks)
        if len(out) != len(named):
            raise ValueError(f"masks has {len(out)} entries, the model has {len(named)} parameters")
    for (n, p), m in zip(named, out, strict=True):
        if m is None:
            continue
        if not isinstance(m, Tensor):
            raise TypeError(f"mask of {n!r} must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask of {n!r} has shape {tuple(m.shape)}, the parameter has {tuple(p.shape)}")
    return out


class FlatModel:
    """A model seen as a function of one flat parameter vector.

    Args:
        model: any ``nn.Module`` mapping ``x [B, ...]`` to logits ``[B, C]``, in eval mode.
        masks: the list from :func:`check_masks`, or None.

    Attributes:
        w0: [P] the model's parameters, flattened (detached copy).
        mask: [P] 0/1 in w0's dtype, or None.
    """

    def __init__(self, model: nn.Module, masks: list[Tensor | None] | None = None) -> None:
        named = list(model.named_parameters())
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"the model's parameters have several dtypes ({sorted(map(str, dtypes))}); expected one")
        self.model = model
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.w0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.buffers = dict(model.named_buffers())
        self.mask = None
        if masks is not None:
            parts = [
                (m.to(self.w0) if m is not None else torch.ones(n, dtype=self.w0.dtype, device=self.w0.device)).reshape(
                    -1
                )
                for m, n in zip(masks, self.numels, strict=True)
            ]
            self.mask = torch.cat(parts)

    def logits(self, point: Tensor, x: Tensor) -> Tensor:
        """Logits [B, C] of the model at parameters ``point`` [P] on ``x`` [B, ...]."""
        views = {n: t.view(s) for n, t, s in zip(self.names, point.split(self.numels), self.shapes, strict=True)}
        return functional_call(self.model, (views, self.buffers), (x,))

    @staticmethod
    def loss_and_error(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and top-1 error (fraction) of one batch, as 0-d tensors."""
        loss = F.cross_entropy(logits, y)
        # float32 like the release's error, so error gaps match it in every dtype
        err = (logits.detach().argmax(1) != y).float().mean()
        return loss, err

    def evaluate(self, point: Tensor, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Loss and error at ``point``, no gradient."""
        with torch.no_grad():
            loss, err = self.loss_and_error(self.logits(point, x), y)
        return float(loss), float(err)

    def starting_points(self, data: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[float, float]]:
        """Loss and error of every batch at w0, all before any measuring: a batch whose loss is
        not finite there is refused (ValueError naming it), since it has nothing to measure."""
        starts = [self.evaluate(self.w0, x, y) for x, y in data]
        bad = next((k for k, (loss, _) in enumerate(starts) if not math.isfinite(loss)), None)
        if bad is not None:
            raise ValueError(
                f"the loss at the starting point is not finite on batch {bad} ({starts[bad][0]}): "
                "nothing to measure (check the model and the data)"
            )
        return starts

    def graph(self, point: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """A forward at ``point`` that keeps its graph: the leaf [P], the loss (0-d, with graph)
        and the error; :meth:`gradient` of it is the backward."""
        leaf = point.detach().requires_grad_(True)
        loss, err = self.loss_and_error(self.logits(leaf, x), y)
        return leaf, loss, float(err)

    def gradient(self, leaf: Tensor, loss: Tensor) -> Tensor:
        """The gradient [P] of ``loss`` at ``leaf``, masked where masks are given."""
        (g,) = torch.autograd.grad(loss, leaf)
        return g * self.mask if self.mask is not None else g


class Scale:
    """The adaptive scale c = |w0| [P] and what the projections need of it, computed once:
    ``inv`` = 1 / c and ``two_inv2`` = 2 / c^2, both 0 where c = 0 (a zero weight: its step is 0,
    it is left out of the weighted norm and cannot move; the release's 0/0 there gives NaN and
    silently skips the projection)."""

    def __init__(self, c: Tensor) -> None:
        self.c = c
        nz = c > 0
        self.inv = torch.where(nz, 1.0 / torch.where(nz, c, torch.ones_like(c)), torch.zeros_like(c))
        self.two_inv2 = 2 * self.inv**2
        self.nonzero = nz
        self.has_zeros = not bool(nz.all())


def _as_scale(c: Scale | Tensor | None) -> Scale | None:
    return c if c is None or isinstance(c, Scale) else Scale(c)


def weighted_norm(delta: Tensor, c: Scale | Tensor | None) -> Tensor:
    """sqrt(sum_j (delta_j / c_j)^2) over the coordinates with c_j > 0; the plain norm when c is None."""
    scale = _as_scale(c)
    return delta.norm() if scale is None else (delta * scale.inv).norm()


def _ellipsoid(z: Tensor, scale: Scale, rho: float) -> Tensor:
    """Euclidean projection of z onto sum((z/c)^2) <= rho^2, as the release computes it: z / (1 + 2
    lambda / c^2) with lambda found by bisection (start 0.1 in [0, 10], the upper limit doubled
    when reached) until the weighted norm is within 1e-5 of rho.

    Each bisection step is one fused reduction, sum_j a_j / (1 + lambda b_j)^2 with a = (z/c)^2 and
    b = 2/c^2 computed once, instead of forming the candidate perturbation."""
    a = torch.mul(z, scale.inv).square_()
    new = float(a.sum()) ** 0.5
    if new <= rho:
        return z
    b = scale.two_inv2
    work = torch.empty_like(b)
    lmbd, limit = 0.1, 10.0
    lo, hi = 0.0, limit
    tried = None
    while abs(new - rho) > 1e-5:
        tried = lmbd
        torch.mul(b, lmbd, out=work).add_(1).pow_(-2)
        new = float(torch.dot(work, a)) ** 0.5
        if new > rho:
            lmbd, lo = (lmbd + hi) / 2, lmbd
        else:
            lmbd, hi = (lo + lmbd) / 2, lmbd
        if limit - hi < 1e-2:
            limit, hi = limit * 2, hi * 2
    out = z / torch.mul(b, tried, out=work).add_(1)
    if scale.has_zeros:  # a zero weight's set is {0} (in the measure its z is already 0)
        out.masked_fill_(~scale.nonzero, 0)
    return out


def project(z: Tensor, c: Scale | Tensor | None, rho: float, norm: str) -> Tensor:
    """z [P] projected onto the perturbation set of radius rho (c = |w0| when adaptive, else None)."""
    scale = _as_scale(c)
    if norm == "linf":
        bound = rho * scale.c if scale is not None else torch.full_like(z, rho)
        return torch.maximum(torch.minimum(z, bound), -bound)
    if scale is None:
        n = float(z.norm())
        return z * (rho / n) if n > rho else z
    return _ellipsoid(z, scale, rho)


def describe(model: nn.Module) -> dict[str, Any]:
    """The model's size, for a result's settings."""
    return {"parameters": sum(p.numel() for p in model.parameters())}
