"""APGD on several worst-case problems side by side: K batches (or restarts) of one shape ascend
together, one vmapped forward + backward per iteration for all of them.

The problems are independent and each follows exactly the steps of
:func:`sbfast.measure.apgd.one_problem` (the same step sizes, projections, momentum,
checkpoints and halvings, decided per problem on the host from one read of the K losses per
iteration). What is shared is the model's pass: ``torch.func.vmap`` of ``grad_and_value`` over
the K points [K, P] and batches [K, b, ...] (convolutions with per-problem weights become one
grouped convolution), so K batches of 5, launch-bound on a GPU, are one launch sequence.

Costs against K problems one after another: the same number of forward + backward passes, but
each computes both at every iteration (one problem at a halving would skip the backward); memory
about 8 K P values. Measured on this project's 2-core CPU (ResNet18, batches of 5, K = 4): a
vmapped forward + backward is 1.15x faster than four at width 16 and 1.3x slower at width 64, so
the CPU solves problems one by one and CUDA stacks them (``worst_case_sharpness(stack=...)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad_and_value, vmap

from .apgd import MOMENTUM, Ascent, StepSchedule
from .perturbation import FlatModel, Scale, momentum_step_

__all__ = ["stacked_problems"]


def _loss_fn(flat: FlatModel):
    def loss(point: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = flat.logits(point, x)
        return F.cross_entropy(logits, y), logits

    return loss


def _masked(flat: FlatModel, g: Tensor) -> Tensor:
    return g.mul_(flat.mask) if flat.mask is not None else g


def stacked_problems(
    flat: FlatModel,
    xs: Tensor,
    ys: Tensor,
    deltas: Tensor,
    c: Scale | None,
    ascent: Ascent,
    init_losses: list[float],
    init_errs: list[float],
) -> list[tuple[float, float, Tensor]]:
    """APGD on K problems at once: batch k is ``(xs[k] [b, ...], ys[k] [b])`` from ``deltas[k]``
    ([K, P]), starting loss and error ``init_losses[k]``, ``init_errs[k]``. Returns per problem
    the worst loss, its error and its delta [P] (as :func:`sbfast.measure.apgd.one_problem` does)."""
    k_count = deltas.shape[0]
    w0 = flat.w0
    rho, norm, checkpoints = ascent.rho, ascent.norm, ascent.checkpoints
    loss_and_grad = vmap(grad_and_value(_loss_fn(flat), has_aux=True))
    delta = deltas.clone()
    prev = delta.clone()
    free = torch.empty_like(delta)
    work = torch.empty_like(w0)
    worst_delta = delta.clone()
    worst_grad = torch.empty_like(delta)
    point = torch.add(w0, delta)
    memories: list[dict[float, float]] = [{} for _ in range(k_count)]
    schedules = [StepSchedule(ascent.step, loss) for loss in init_losses]
    worst_loss, worst_err = list(init_losses), list(init_errs)
    from_worst = [False] * k_count
    g, _ = loss_and_grad(point, xs, ys)
    g = _masked(flat, g)
    worst_grad.copy_(g)  # every problem's pending point is its worst so far
    for i in range(ascent.n_iters):
        with torch.no_grad():
            for k in range(k_count):
                if from_worst[k]:
                    g[k].copy_(worst_grad[k])
            if norm == "l2":
                norms = torch.linalg.vector_norm(g, dim=1).tolist()
                value = torch.tensor(
                    [s.step / (n + 1e-12) for s, n in zip(schedules, norms, strict=True)], dtype=w0.dtype
                )
                d = g
            else:
                value = torch.tensor([s.step for s in schedules], dtype=w0.dtype)
                d = torch.sign(g)
            value = value.to(w0.device)[:, None]
            if c is not None:
                z = torch.mul(d, c.c, out=free).mul_(value).add_(delta)
            else:
                z = torch.mul(d, value, out=free).add_(delta)
            for k in range(k_count):
                momentum_step_(z[k], prev[k], point[k], w0, c, rho, norm, MOMENTUM, work, memory=memories[k])
            delta, prev, free = z, delta, prev
        last = i == ascent.n_iters - 1
        if last:
            with torch.no_grad():
                logits = vmap(flat.logits)(point, xs)
                losses = F.cross_entropy(logits.transpose(1, 2), ys, reduction="none").mean(1)
        else:
            g, (losses, logits) = loss_and_grad(point, xs, ys)
            g = _masked(flat, g)
        errs = (logits.detach().argmax(2) != ys).float().mean(1)
        cur = torch.stack([losses.detach().to(torch.float64), errs.to(torch.float64)]).tolist()
        for k in range(k_count):
            cur_loss, cur_err = cur[0][k], cur[1][k]
            at_worst = cur_loss > worst_loss[k]
            from_worst[k] = False
            if at_worst:
                worst_loss[k], worst_err[k] = cur_loss, cur_err
                worst_delta[k].copy_(delta[k])
                if not last:
                    worst_grad[k].copy_(g[k])
                schedules[k].improved()
            if i in checkpoints and schedules[k].halves_at(i, worst_loss[k]):
                if ascent.restart_from_best:
                    delta[k].copy_(worst_delta[k])
                    prev[k].copy_(worst_delta[k])
                from_worst[k] = not at_worst
    return [(worst_loss[k], worst_err[k], worst_delta[k].clone()) for k in range(k_count)]
