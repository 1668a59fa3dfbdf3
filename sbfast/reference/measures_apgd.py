"""Plain twins of the worst-case and average-case sharpness measures, written from their
definitions (docs/measure.md): a loop over parameter tensors, the model's own parameters moved
in place, a state copy at every improvement. Slow and obvious; the baseline of the measures'
tests.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["reference_average_sharpness", "reference_worst_case_sharpness"]


def _loss_err(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) != y).float().mean())


def _checkpoints(n: int) -> list[int]:
    p = [0.0, 0.22]
    w = [0, math.ceil(n * 0.22)]
    while w[-1] < n and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n))
    return w[1:]


def _project(delta: list[Tensor], w0: list[Tensor], rho: float, norm: str, adaptive: bool) -> list[Tensor]:
    if norm == "linf":
        return [
            torch.clamp(
                d,
                min=-(rho * (w.abs() if adaptive else torch.ones_like(w))),
                max=rho * (w.abs() if adaptive else torch.ones_like(w)),
            )
            for d, w in zip(delta, w0, strict=True)
        ]

    def wnorm(ds: list[Tensor]) -> float:
        total = 0.0
        for d, w in zip(ds, w0, strict=True):
            if adaptive:
                keep = w != 0
                total += float(((d[keep] / w.abs()[keep]) ** 2).sum())
            else:
                total += float((d**2).sum())
        return math.sqrt(total)

    n = wnorm(delta)
    if n <= rho:
        return delta
    if not adaptive:
        return [d * (rho / n) for d in delta]

    def candidate(lmbd: float) -> list[Tensor]:
        return [
            torch.where(
                w != 0, d / (1 + 2 * lmbd / torch.where(w != 0, w.abs(), torch.ones_like(w)) ** 2), torch.zeros_like(d)
            )
            for d, w in zip(delta, w0, strict=True)
        ]

    lmbd = release_bisection(lambda lam: wnorm(candidate(lam)), n, rho)
    return delta if lmbd is None else candidate(lmbd)


def release_bisection(norm_at: Callable[[float], float], start: float, rho: float) -> float | None:
    """The release's bisection for the ellipsoid's multiplier, one lambda at a time: start 0.1 in
    [0, 10], the upper limit doubled when reached, until the weighted norm ``norm_at(lambda)`` is
    within 1e-5 of rho. ``start`` is the norm of the point itself (lambda 0). Returns the lambda
    it stops at, or None when the loop does not start (``start`` within 1e-5 of rho)."""
    lmbd, limit, lo, hi = 0.1, 10.0, 0.0, 10.0
    new, tried = start, None
    while abs(new - rho) > 1e-5:
        tried = lmbd
        new = norm_at(lmbd)
        if new > rho:
            lmbd, lo = (lmbd + hi) / 2, lmbd
        else:
            lmbd, hi = (lo + lmbd) / 2, lmbd
        if limit - hi < 1e-2:
            limit, hi = limit * 2, hi * 2
    return tried


def reference_worst_case_sharpness(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = True,
    n_iters: int = 20,
    masks: list[Tensor | None] | None = None,
) -> tuple[float, float, list[float]]:
    """(mean loss gap, mean error gap, per-batch loss gaps) by APGD from delta = 0; ``model`` is
    deep-copied and put in eval mode."""
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    cps = _checkpoints(n_iters)
    gaps, errs = [], []
    for x, y in batches:
        l0, e0 = _loss_err(net, x, y)
        delta = [torch.zeros_like(w) for w in w0]
        prev = [d.clone() for d in delta]
        worst, worst_err = l0, e0
        worst_params = [w.clone() for w in w0]
        step = prev_step = 2 * rho
        prev_worst, prev_cp, n_upd = l0, 0, 0
        for i in range(n_iters):
            for p in params:
                p.grad = None
            F.cross_entropy(net(x), y).backward()
            grads = [p.grad.detach().clone() for p in params]
            if masks is not None:
                grads = [g * m if m is not None else g for g, m in zip(grads, masks, strict=True)]
            scale = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
            if norm == "l2":
                gn = math.sqrt(sum(float((g**2).sum()) for g in grads))
                z = [d + step / (gn + 1e-12) * g * s for d, g, s in zip(delta, grads, scale, strict=True)]
            else:
                z = [d + step * g.sign() * s for d, g, s in zip(delta, grads, scale, strict=True)]
            z = _project(z, w0, rho, norm, adaptive)
            new = [0.75 * a + 0.25 * b for a, b in zip(z, prev, strict=True)]
            prev, delta = delta, new
            with torch.no_grad():
                for p, w, d in zip(params, w0, delta, strict=True):
                    p.copy_(w + d)
            cur, cur_err = _loss_err(net, x, y)
            if cur > worst:
                worst, worst_err = cur, cur_err
                worst_params = [p.detach().clone() for p in params]
                n_upd += 1
            if i in cps:
                cond1 = n_upd < 0.75 * (i - prev_cp)
                cond2 = prev_step == step and prev_worst == worst
                prev_step, prev_worst, prev_cp, n_upd = step, worst, i, 0
                if cond1 or cond2:
                    step *= 0.5
                    with torch.no_grad():
                        for p, b in zip(params, worst_params, strict=True):
                            p.copy_(b)
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)
        gaps.append(worst - l0)
        errs.append(worst_err - e0)
    return sum(gaps) / len(gaps), sum(errs) / len(errs), gaps


def reference_average_sharpness(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    noise: list[Tensor],
    *,
    rho: float,
    adaptive: bool = True,
) -> tuple[float, float]:
    """(mean loss gap, mean error gap) of the draws ``noise[b]`` [K, P] (standard draws, scaled by
    rho |w| here), one forward per draw."""
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    gaps, errs = [], []
    for (x, y), u in zip(batches, noise, strict=True):
        l0, e0 = _loss_err(net, x, y)
        tot_l = tot_e = 0.0
        for row in u:
            parts = row.split([w.numel() for w in w0])
            with torch.no_grad():
                for p, w, part in zip(params, w0, parts, strict=True):
                    p.copy_(w + rho * (w.abs() if adaptive else 1.0) * part.view_as(w))
            loss, err = _loss_err(net, x, y)
            tot_l += loss
            tot_e += err
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)
        gaps.append(tot_l / len(u) - l0)
        errs.append(tot_e / len(u) - e0)
    return sum(gaps) / len(gaps), sum(errs) / len(errs)
