"""The APGD ascent of the worst-case sharpness, one problem (one batch from one start) at a time:
its settings (:class:`Ascent`), its step-size checkpoints and the solver. The measure itself, and
what each step computes, is :mod:`sbfast.measure.worst_case`; several problems side by side are
:mod:`sbfast.measure.apgd_stacked`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .perturbation import FlatModel, Scale, momentum_step_

__all__ = ["MOMENTUM", "Ascent", "StepSchedule", "apgd_checkpoints", "one_problem"]

MOMENTUM = 0.75  # the weight of the projected step against the last delta (the release's alpha)


def apgd_checkpoints(n_iters: int) -> list[int]:
    """The iterations at which APGD may halve its step, computed with the release's floating-point
    operations in its order (for 20: [5, 9, 12, 15, 16, 18, 19, 20]; exact arithmetic would give 14
    for the 15). A checkpoint >= n_iters is never reached."""
    p = [0.0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return w[1:]


@dataclass(frozen=True)
class Ascent:
    """The settings every problem of one measure ascends with: the radius and norm of the set,
    the iterations, the first step size (2 rho x the step multiplier), the checkpoints at which
    the step may halve (:func:`apgd_checkpoints`) and whether a halving moves the iterate back to
    the worst point."""

    rho: float
    norm: str
    n_iters: int
    step: float
    checkpoints: tuple[int, ...]
    restart_from_best: bool


class StepSchedule:
    """One problem's step size and APGD's rule for halving it: at a checkpoint i, the step
    halves if fewer than 75% of the iterations since the last checkpoint improved the worst
    loss, or if neither the step nor the worst loss changed since then."""

    def __init__(self, step: float, init_loss: float) -> None:
        self.step = step
        self._prev_step, self._prev_worst, self._prev_cp, self._improved = step, init_loss, 0, 0

    def improved(self) -> None:
        """The worst loss rose in this iteration."""
        self._improved += 1

    def halves_at(self, i: int, worst_loss: float) -> bool:
        """At checkpoint i (with the worst loss so far): whether the step halves (it does here)."""
        cond1 = self._improved < 0.75 * (i - self._prev_cp)
        cond2 = self._prev_step == self.step and self._prev_worst == worst_loss
        self._prev_step, self._prev_worst, self._prev_cp, self._improved = self.step, worst_loss, i, 0
        if cond1 or cond2:
            self.step *= 0.5
            return True
        return False


def one_problem(
    flat: FlatModel,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    c: Scale | None,
    ascent: Ascent,
    init_loss: float,
    init_err: float,
) -> tuple[float, float, Tensor]:
    """APGD on one batch ``x`` [b, ...], ``y`` [b] from ``delta`` [P] (its loss and error at w0:
    ``init_loss``, ``init_err``); returns the worst loss, its error and its delta [P].

    Every [P] vector lives in one of eight buffers allocated here and rewritten in place (a fresh
    [P] tensor per step would cost page faults larger than the pass that fills it). The gradient
    at the worst point is kept (written to its own buffer), so a halving step that restarts from
    the worst point reuses it instead of a forward and backward there."""
    w0 = flat.w0
    rho, norm, checkpoints = ascent.rho, ascent.norm, ascent.checkpoints
    schedule = StepSchedule(ascent.step, init_loss)
    delta = delta.clone()
    prev = delta.clone()
    free = torch.empty_like(w0)  # the next z; rotates with delta and prev
    work = torch.empty_like(w0)  # scratch: linf's signs, the projection's denominators
    grad, worst_grad = torch.empty_like(w0), torch.empty_like(w0)
    worst_loss, worst_err, worst_delta = init_loss, init_err, delta.clone()
    point = torch.add(w0, delta)  # where the next gradient is taken
    leaves, loss, _ = flat.graph(point, x, y)
    graph_at_worst, from_worst = True, False  # the pending graph is at the worst point; reuse worst_grad
    for i in range(ascent.n_iters):
        if from_worst:
            g = worst_grad
        else:
            g = flat.gradient(leaves, loss, out=worst_grad if graph_at_worst else grad)
        with torch.no_grad():
            # each line one fused pass over the flat buffers
            d = g if norm == "l2" else torch.sign(g, out=work)
            value = schedule.step / (float(g.norm()) + 1e-12) if norm == "l2" else schedule.step
            if c is not None:
                z = torch.addcmul(delta, d, c.c, value=value, out=free)
            else:
                z = torch.add(delta, d, alpha=value, out=free)
            # z = 0 where c = 0 (delta starts so); 0.75 projected z + 0.25 prev, and w0 + delta
            momentum_step_(z, prev, point, w0, c, rho, norm, MOMENTUM, work)
            delta, prev, free = z, delta, prev
        last = i == ascent.n_iters - 1
        if last:
            cur_loss, cur_err = flat.evaluate(point, x, y)
        else:
            leaves, loss, cur_err = flat.graph(point, x, y)
            cur_loss = float(loss.detach())
        graph_at_worst, from_worst = cur_loss > worst_loss, False
        if graph_at_worst:
            worst_loss, worst_err = cur_loss, cur_err
            worst_delta.copy_(delta)
            schedule.improved()
        if i in checkpoints and schedule.halves_at(i, worst_loss):
            if ascent.restart_from_best:
                delta.copy_(worst_delta)
                prev.copy_(worst_delta)
            # the next gradient at the worst point: the pending graph's, or the one kept
            from_worst = not graph_at_worst
    return worst_loss, worst_err, worst_delta
