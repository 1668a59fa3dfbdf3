"""What the sharpness measures share: the model's parameters as one flat vector, the loss and error
of a batch at a perturbed point of it, the perturbation sets and their projections.

A measure perturbs every parameter (conv and linear weights and biases, BatchNorm affine
parameters; BatchNorm running statistics are buffers and stay put). The model is evaluated at
``w0 + delta`` on views of one flat vector put in the parameters' places for the forward (what
``torch.func.functional_call`` does, without its per-call walk over the module tree: 2-3 ms a
call on a ResNet18, 10% of a width-16 iteration), so a point is one tensor [P], the gradient is
one tensor [P], and the ascent and projection are a few elementwise passes over flat buffers
instead of a loop over parameter tensors.

Perturbation sets (c = |w0| elementwise when adaptive, 1 otherwise):
  l2:   sum_j (delta_j / c_j)^2 <= rho^2   (an ellipsoid when adaptive, a ball otherwise)
  linf: |delta_j| <= rho * c_j
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbfast import ops

NORMS = ("l2", "linf")

__all__ = [
    "NORMS",
    "FlatModel",
    "Scale",
    "check_masks",
    "check_norm",
    "check_rho",
    "project",
    "project_",
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
        # every place a parameter is registered (a tied one in several modules), found once
        index = {id(p): i for i, (_, p) in enumerate(named)}
        self._slots = [
            (module, name, index[id(p)])
            for module in model.modules()
            for name, p in module._parameters.items()
            if p is not None and id(p) in index
        ]
        self.mask = None
        if masks is not None:
            parts = [
                (m.to(self.w0) if m is not None else torch.ones(n, dtype=self.w0.dtype, device=self.w0.device)).reshape(
                    -1
                )
                for m, n in zip(masks, self.numels, strict=True)
            ]
            self.mask = torch.cat(parts)

    @contextmanager
    def _at(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """The model with ``tensors`` (one per parameter, in ``names`` order) in its parameters'
        places; the parameters are put back however the block ends."""
        saved = [(module, name, module._parameters[name]) for module, name, _ in self._slots]
        try:
            for module, name, i in self._slots:
                module._parameters[name] = tensors[i]
            yield
        finally:
            for module, name, p in saved:
                module._parameters[name] = p

    def views(self, point: Tensor) -> list[Tensor]:
        """``point`` [P] as one view per parameter, shaped like it."""
        return [t.view(s) for t, s in zip(point.split(self.numels), self.shapes, strict=True)]

    def logits(self, point: Tensor, x: Tensor) -> Tensor:
        """Logits [B, C] of the model at parameters ``point`` [P] on ``x`` [B, ...]."""
        with self._at(self.views(point)):
            return self.model(x)

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

    def graph(self, point: Tensor, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor, float]:
        """A forward at ``point`` [P] that keeps its graph: the leaves (one per parameter, views of
        ``point``, which must not change until :meth:`gradient` has run), the loss (0-d, with
        graph) and the error."""
        leaves = [t.detach().requires_grad_(True) for t in self.views(point)]
        with self._at(leaves):
            logits = self.model(x)
        loss, err = self.loss_and_error(logits, y)
        return leaves, loss, float(err)

    def gradient(self, leaves: list[Tensor], loss: Tensor, out: Tensor | None = None) -> Tensor:
        """The gradient [P] of ``loss`` at the leaves of :meth:`graph`, masked where masks are
        given, written into ``out`` (a [P] buffer like w0), or a fresh tensor."""
        grads = torch.autograd.grad(loss, leaves)
        # one flat buffer filled per parameter: per-parameter gradients are small enough for the
        # allocator to recycle, a fresh [P] one of 11M is not
        flat = torch.cat([g.reshape(-1) for g in grads], out=out)
        return flat.mul_(self.mask) if self.mask is not None else flat


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
        # norms by lambda of the last ellipsoid projection: predictions for the next one, never
        # decisions (see ellipsoid_multiplier)
        self.last_norms: dict[float, float] = {}


def _as_scale(c: Scale | Tensor | None) -> Scale | None:
    return c if c is None or isinstance(c, Scale) else Scale(c)


def weighted_norm(delta: Tensor, c: Scale | Tensor | None) -> Tensor:
    """sqrt(sum_j (delta_j / c_j)^2) over the coordinates with c_j > 0; the plain norm when c is None."""
    scale = _as_scale(c)
    return delta.norm() if scale is None else (delta * scale.inv).norm()


_TOLERANCE = 1e-5  # the release's: stop when the weighted norm is within this of rho
# The first pass: 0 (is z outside at all?) and a log grid from 1e-4 to 1e5 for the norm's model.
_GRID = [0.0] + [10.0 ** (e / 2) for e in range(-8, 11)]
# Lambdas a later pass may test: the predicted rest of the walk (about 20 levels from the first
# lambda to the stop). On this project's 2-core CPU a pass costs about 3 + 0.6 K ms for K lambdas
# over 11M float32 parameters (one level in plain torch: 8.4 ms); on a GPU a pass is memory-bound.
SPECULATION = {"cpu": 24, "cuda": 64}


@dataclass(frozen=True)
class _Bisection:
    """One state of the release's bisection on lambda: the next lambda to try, its bracket and the
    bracket's growing upper limit."""

    lmbd: float
    lo: float
    hi: float
    limit: float

    def after(self, above: bool) -> _Bisection:
        """The state after trying ``lmbd``: ``above`` says the candidate's norm exceeded rho."""
        if above:
            lmbd, lo, hi = (self.lmbd + self.hi) / 2, self.lmbd, self.hi
        else:
            lmbd, lo, hi = (self.lo + self.lmbd) / 2, self.lo, self.lmbd
        limit = self.limit
        if limit - hi < 1e-2:
            limit, hi = limit * 2, hi * 2
        return _Bisection(lmbd, lo, hi, limit)


def _predicted_norm(known: dict[float, float], lmbd: float) -> float:
    """The weighted norm at ``lmbd`` predicted from the norms ``known`` at other lambdas: 1/norm
    interpolated linearly in lambda between the nearest known lambdas (extrapolated past them),
    since 1/norm is nearly affine in lambda (exactly so for a ball or a constant scale)."""
    pts = sorted((lam, 1 / n) for lam, n in known.items() if n > 0)
    if len(pts) < 2:
        return math.inf
    j = min(max(bisect.bisect_right(pts, (lmbd, math.inf)), 1), len(pts) - 1)
    (l0, h0), (l1, h1) = pts[j - 1], pts[j]
    h = h0 + (h1 - h0) * (lmbd - l0) / (l1 - l0)
    return 1 / h if h > 0 else math.inf


def _known_or_bounded(known: dict[float, float], lmbd: float, rho: float) -> float | None:
    """The weighted norm at ``lmbd`` where it is known, else a stand-in that decides the same way
    when the norms known on either side already do, else None.

    The norm cannot grow with lambda (each term a / (1 + lambda b)^2 is monotone, and so is IEEE
    rounding: on CPU each lambda's sum has one fixed order, so the computed norm is monotone too),
    so a known norm above rho + 2 tol at a larger lambda, or below rho - 2 tol at a smaller one,
    settles the level without a pass: not the stop, and on that side of rho. The margin of tol
    beyond the stop's own also absorbs the last-bit differences a GPU reduction may give one
    lambda in passes of different lengths."""
    if lmbd in known:
        return known[lmbd]
    above = [n for lam, n in known.items() if lam > lmbd]
    below = [n for lam, n in known.items() if lam < lmbd]
    if above and max(above) > rho + 2 * _TOLERANCE:
        return math.inf
    if below and min(below) < rho - 2 * _TOLERANCE:
        return -math.inf
    return None


def _predicted_path(state: _Bisection, known: dict[float, float], rho: float, length: int) -> list[_Bisection]:
    """The walk from ``state`` as the norms ``known`` predict it, up to a predicted stop or ``length``
    states (known norms, and levels the known norms settle, are used as they are)."""
    path, node = [], state
    while len(path) < length:
        path.append(node)
        new = _known_or_bounded(known, node.lmbd, rho)
        if new is None:
            new = _predicted_norm(known, node.lmbd)
        if abs(new - rho) <= _TOLERANCE:
            break
        node = node.after(new > rho)
    return path


# Where the first pass of a projection with predictions looks beside the predicted stop
# (relative offsets): points that settle the walk's early levels by monotonicity, so the pass
# needs the predicted path only near its end. Between two APGD iterations the stop moves by
# about 0.1-5%, and by -50% where the step size halves (ResNet18, widths 16 and 64): one
# point per decade of shift, and the halving, cost fewer lambdas in all than a finer ring.
_RING = (0.5, 0.05, 5e-3)
# Levels of the release's walk from its start to a stop (about 20; a stop past the limit's
# doublings takes more): how far a prediction from memory is followed to find its stop.
_LONGEST_WALK = 64


def ellipsoid_multiplier(
    z: Tensor, scale: Scale, rho: float, speculation: int | None = None, memory: dict[float, float] | None = None
) -> float | None:
    """The lambda at which the release's bisection stops projecting z onto sum((u/c)^2) <= rho^2
    (u = z / (1 + 2 lambda / c^2)), or None when z stays as it is (inside, or outside by at most
    the tolerance: the release's loop then does not start).

    The release's loop (start 0.1 in [0, 10], the upper limit doubled when reached, until the
    weighted norm is within 1e-5 of rho) tries about 20 lambdas one after another, a pass over z
    each. Here a first :func:`sbfast.ops.ellipsoid_sq_norms` pass measures the norm on a grid of
    lambdas; from then on each pass predicts the rest of the walk from the norms known so far
    (:func:`_predicted_norm`), computes the true norms of every lambda on the predicted path at
    once (up to ``speculation`` of them), and walks it with the true norms, up to the first
    prediction that was wrong. The decisions are always the true norms', so the lambdas tried and
    the stop are the sequential loop's; a good prediction only saves passes (2-3 per projection).
    A level that the known norms settle by monotonicity (:func:`_known_or_bounded`) needs no
    lambda of its own, so with predictions the first pass looks around the predicted stop
    (``_RING``) and later passes measure only the unsettled levels near the stop."""
    speculation = speculation or SPECULATION.get(z.device.type, 24)
    root = _Bisection(0.1, 0.0, 10.0, 10.0)
    memory = scale.last_norms if memory is None else memory
    if memory:
        # the last projection's norms predict this one's walk (APGD's z moves little per step)
        path = _predicted_path(root, memory, rho, _LONGEST_WALK)
        stop = path[-1].lmbd
        near = [n.lmbd for n in path if abs(n.lmbd - stop) <= _RING[-1] * stop]
        ring = [stop * (1 + sign * r) for r in _RING for sign in (-1, 1)]
        first = sorted({0.0, *near, *ring})
    else:
        first = _GRID
    values = ops.ellipsoid_sq_norms(z, scale.inv, first).tolist()
    known = {lam: v**0.5 for lam, v in zip(first, values, strict=True)}
    if known[0.0] <= rho or abs(known[0.0] - rho) <= _TOLERANCE:
        return None
    memory.clear()
    memory.update(known)
    known = memory
    state = root
    while True:
        path = _predicted_path(state, known, rho, speculation)
        todo = sorted({n.lmbd for n in path if _known_or_bounded(known, n.lmbd, rho) is None})
        if todo:
            known.update(zip(todo, (v**0.5 for v in ops.ellipsoid_sq_norms(z, scale.inv, todo).tolist()), strict=True))
        for k, node in enumerate(path):
            new = _known_or_bounded(known, node.lmbd, rho)
            assert new is not None  # every level of the path is known or settled now
            if abs(new - rho) <= _TOLERANCE:
                return node.lmbd
            state = node.after(new > rho)
            if k + 1 < len(path) and path[k + 1] != state:
                break  # mispredicted: walk on from the true child


def _ellipsoid_(
    z: Tensor, scale: Scale, rho: float, work: Tensor, zero_fixed: bool, memory: dict[float, float] | None
) -> Tensor:
    """z projected in place onto sum((z/c)^2) <= rho^2, as the release computes it:
    z / (1 + 2 lambda / c^2) with lambda from :func:`ellipsoid_multiplier` (``work``: a [P] buffer)."""
    lmbd = ellipsoid_multiplier(z, scale, rho, memory=memory)
    if lmbd is None:
        return z
    z.div_(torch.mul(scale.two_inv2, lmbd, out=work).add_(1))
    if zero_fixed and scale.has_zeros:  # a zero weight's set is {0}
        z.masked_fill_(~scale.nonzero, 0)
    return z


def project_(
    z: Tensor,
    c: Scale | Tensor | None,
    rho: float,
    norm: str,
    work: Tensor | None = None,
    zero_fixed: bool = True,
    memory: dict[float, float] | None = None,
) -> Tensor:
    """z [P] projected in place onto the perturbation set of radius rho (c = |w0| when adaptive,
    else None); ``work`` is an optional [P] buffer like z. Returns z. ``zero_fixed=False`` skips
    zeroing z where c = 0, for a caller whose z is 0 there already (APGD's: its steps scale by c).
    ``memory``: the ellipsoid's predictions for this problem (see :func:`ellipsoid_multiplier`).

    In place because at 11M parameters a fresh [P] tensor costs more than the pass that fills it
    (the allocator hands such sizes back to the system, so each new one is zero pages to fault in)."""
    scale = _as_scale(c)
    if norm == "linf":
        if scale is None:
            return z.clamp_(-rho, rho)
        bound = torch.mul(scale.c, rho, out=work if work is not None else torch.empty_like(z))
        torch.minimum(z, bound, out=z)
        return torch.maximum(z, bound.neg_(), out=z)
    if scale is None:
        n = float(z.norm())
        return z.mul_(rho / n) if n > rho else z
    return _ellipsoid_(z, scale, rho, work if work is not None else torch.empty_like(z), zero_fixed, memory)


def momentum_step_(
    z: Tensor,
    prev: Tensor,
    point: Tensor,
    w0: Tensor,
    c: Scale | None,
    rho: float,
    norm: str,
    momentum: float,
    work: Tensor,
    memory: dict[float, float] | None = None,
) -> Tensor:
    """APGD's step from its ascent candidate z [P], in place: z <- lerp(prev, project(z), momentum)
    and point <- w0 + z (prev, w0, ``work``: [P] like z; point another [P] buffer). Returns z.
    z must be 0 where c = 0 already (APGD's steps scale by c).

    The adaptive l2 set (an ellipsoid) takes one fused pass, :func:`sbfast.ops.ellipsoid_momentum_step_`,
    after its bisection has found the multiplier; on the CPU it gives the bits of the separate
    divide, lerp and add. The other sets project, then lerp and add."""
    if norm == "l2" and c is not None:
        lmbd = ellipsoid_multiplier(z, c, rho, memory=memory)
        ops.ellipsoid_momentum_step_(z, point, c.two_inv2, prev, w0, 0.0 if lmbd is None else lmbd, momentum)
        return z
    project_(z, c, rho, norm, work, zero_fixed=False, memory=memory)
    torch.lerp(prev, z, momentum, out=z)
    torch.add(w0, z, out=point)
    return z


def project(z: Tensor, c: Scale | Tensor | None, rho: float, norm: str) -> Tensor:
    """z [P] projected onto the perturbation set of radius rho (c = |w0| when adaptive, else None),
    as a new tensor."""
    return project_(z.clone(), c, rho, norm)


def describe(model: nn.Module) -> dict[str, Any]:
    """The model's size, for a result's settings."""
    return {"parameters": sum(p.numel() for p in model.parameters())}
