"""Worst-case (adaptive) sharpness by APGD: the paper's sharpness measure.

For each batch B (its own problem; m-sharpness with m = the batch size):

    S_B = max over delta in D(rho) of  L_B(w0 + delta) - L_B(w0)

with D(rho) the l2 set sum_j (delta_j / c_j)^2 <= rho^2 or the linf box |delta_j| <= rho c_j, and
c = |w0| (adaptive, the default) or 1. The maximum is approximated by the ascent of Andriushchenko
et al. (2023) as the SharpBalance release runs it, iteration k (step size eta, starting at
2 rho x ``step_multiplier``):

1. g = grad L_B at the current point (masked weights' gradients zeroed);
2. z = delta + eta g c / (||g||_2 + 1e-12)  (l2; the norm of the raw gradient over all parameters)
   or z = delta + eta sign(g) c  (linf);
3. z projected onto D(rho) (a ball scaling, the ellipsoid by bisection, or a clamp);
4. delta <- 0.75 z + 0.25 delta_prev (delta_prev: the perturbation before this step);
5. the loss and error at w0 + delta; the worst loss (strictly larger) is kept with its error;
6. at the APGD checkpoints (fractions 0.22, +max(previous gap - 0.03, 0.06), rounded up in floating
   point: 5, 9, 12, 15, 16, 18, 19 for 20 iterations), if fewer than 75% of the iterations since
   the last checkpoint improved, or neither the step nor the worst loss changed since then, the
   step is halved and the next gradient is taken at the worst point (the iterate itself goes on
   from delta, as in the release; ``restart_from_best=True`` also moves delta back to the best).

The batch contributes worst - initial loss (>= 0: delta = 0 is a candidate) and the error change
at the worst point. Cost per batch: one forward + n_iters x (forward + backward): the loss of step
5 is the forward of the next gradient, and a halving step reuses the gradient kept at the worst
point, so it costs a backward less (the release spends one more forward per iteration, another
forward at every halving, and copies the state dict at every improvement).
One host read per iteration (the comparison of step 5 decides the control flow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .apgd import Ascent, apgd_checkpoints, one_problem
from .apgd_stacked import stacked_problems
from .batches import as_batches, check_model, measuring
from .perturbation import (
    FlatModel,
    Scale,
    check_masks,
    check_norm,
    check_positive_int,
    check_rho,
    project,
    weighted_norm,
)
from .results import MeasureResult

__all__ = ["INITS", "STACK_BY_DEVICE", "apgd_checkpoints", "worst_case_sharpness"]

INITS = ("zero", "random")
# Whether a device solves problems side by side by default: on CUDA batches of 5 are
# launch-bound, so K of them share one vmapped pass; on this project's 2-core CPU a vmapped
# forward + backward of 4 batches was 1.15x faster at width 16 and 1.3x slower at width 64 than
# four passes (docs/measure.md), so the CPU goes one by one.
STACK_BY_DEVICE = {"cuda": True, "cpu": False}


def _groups(problems: list[tuple], chunk: int) -> list[list[tuple]]:
    """Consecutive problems whose batches have one shape, at most ``chunk`` per group."""
    out: list[list[tuple]] = []
    for p in problems:
        last = out[-1] if out else None
        if last and len(last) < chunk and last[0][1].shape == p[1].shape and last[0][2].shape == p[2].shape:
            last.append(p)
        else:
            out.append([p])
    return out


def _initial_delta(
    init: str, flat: FlatModel, c: Scale | None, rho: float, norm: str, generator: torch.Generator | None
) -> Tensor:
    w0 = flat.w0
    if init == "zero":
        return torch.zeros_like(w0)
    if norm == "l2":
        draw = torch.randn(w0.shape, generator=generator, dtype=w0.dtype, device="cpu")
    else:
        draw = 2 * torch.rand(w0.shape, generator=generator, dtype=w0.dtype, device="cpu") - 1
    delta = draw.to(w0.device) * rho * (c.c if c is not None else 1.0)
    if flat.mask is not None:
        delta = delta * flat.mask
    return project(delta, c, rho, norm)


def worst_case_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = True,
    n_iters: int = 20,
    init: str = "zero",
    restarts: int = 1,
    step_multiplier: float = 1.0,
    masks: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
    restart_from_best: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    n_batches: int | None = None,
    stack: bool | None = None,
    chunk: int = 16,
) -> MeasureResult:
    """Worst-case sharpness: the mean over batches of max_{delta in D(rho)} L(w0 + delta) - L(w0).

    Args:
        model: any ``nn.Module`` mapping ``x [B, ...]`` to logits ``[B, C]``; measured in eval mode
            and left exactly as it came.
        batches: ``(x, y)`` or ``(index, x, y)`` batches (each its own problem, in the order given),
            or a data set with ``batch_size`` / ``n_batches``.
        rho: the radius (relative to |w| when adaptive). The paper's headline: 0.5, l2, adaptive.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: scale the set by |w0| elementwise.
        n_iters: ascent iterations per batch and restart.
        init: ``"zero"`` (the release's, deterministic) or ``"random"`` (Gaussian for l2, uniform
            in [-1, 1] for linf, times rho c, projected onto the set; drawn from ``generator``).
        restarts: with random init, the worst over this many restarts.
        step_multiplier: the first step is 2 rho x this.
        masks: parameter masks (name -> 0/1 tensor shaped like the parameter, or a list aligned
            with ``named_parameters()``): masked weights' gradients are zeroed.
        restart_from_best: at a step halving, also move the iterate back to the worst point
            (APGD's restart; the release moves only the model's parameters).
        stack: solve up to ``chunk`` problems (batches and restarts of one shape) side by side,
            one vmapped forward + backward for all (:mod:`apgd_stacked`; the same steps per
            problem). None: per device (``STACK_BY_DEVICE``: CUDA stacks, the CPU does not).

    Returns:
        ``MeasureResult``: ``value`` the mean loss gap, ``per_batch`` each batch's gap,
        ``error_delta`` / ``per_batch_error`` the error change at the worst point, ``extra``:
        ``initial_loss`` per batch, ``max_delta_norm`` (the largest plain l2 norm of a worst delta
        over batches, as the release reports it) and ``max_weighted_delta_norm`` (the constrained one).
    """
    named = check_model(model)
    rho = check_rho(rho)
    norm = check_norm(norm)
    n_iters = check_positive_int(n_iters, "n_iters")
    restarts = check_positive_int(restarts, "restarts")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if restarts > 1 and init == "zero":
        raise ValueError(f"restarts={restarts} needs init='random' (every zero-init restart is the same problem)")
    if (
        isinstance(step_multiplier, bool)
        or not isinstance(step_multiplier, (int, float))
        or not math.isfinite(step_multiplier)
        or step_multiplier <= 0
    ):
        raise ValueError(f"step_multiplier must be a finite number > 0, got {step_multiplier!r}")
    chunk = check_positive_int(chunk, "chunk")
    if stack is not None and not isinstance(stack, bool):
        raise TypeError(f"stack must be True, False or None, got {stack!r}")
    mask_list = check_masks(masks, named)
    device = named[0][1].device
    data = as_batches(batches, batch_size=batch_size, n_batches=n_batches, device=device)
    checkpoints = apgd_checkpoints(n_iters)
    if generator is None and init == "random":
        generator = torch.Generator().manual_seed(0)

    gaps, err_gaps, init_losses, plain_norms, weighted_norms = [], [], [], [], []
    with measuring(model):
        flat = FlatModel(model, mask_list)
        c = Scale(flat.w0.abs()) if adaptive else None
        starts = flat.starting_points(data)
        if stack is None:
            stack = STACK_BY_DEVICE.get(device.type, False)
        ascent = Ascent(rho, norm, n_iters, 2 * rho * step_multiplier, tuple(checkpoints), bool(restart_from_best))
        # every (batch, restart) problem, in the order the sequential loop draws their deltas
        problems = [(b, x, y, l0, e0) for b, ((x, y), (l0, e0)) in enumerate(zip(data, starts, strict=True))]
        problems = [p for p in problems for _ in range(restarts)]
        found: list[tuple[float, float, Tensor]] = []
        if stack:
            for group in _groups(problems, chunk):
                deltas = torch.stack([_initial_delta(init, flat, c, rho, norm, generator) for _ in group])
                found += stacked_problems(
                    flat,
                    torch.stack([p[1] for p in group]),
                    torch.stack([p[2] for p in group]),
                    deltas,
                    c,
                    ascent,
                    init_losses=[p[3] for p in group],
                    init_errs=[p[4] for p in group],
                )
        else:
            for _, x, y, l0, e0 in problems:
                delta = _initial_delta(init, flat, c, rho, norm, generator)
                found.append(one_problem(flat, x, y, delta, c, ascent, l0, e0))
        for b, (l0, e0) in enumerate(starts):
            best = (l0, e0, torch.zeros_like(flat.w0))
            for candidate in found[b * restarts : (b + 1) * restarts]:
                if candidate[0] > best[0]:
                    best = candidate
            gaps.append(best[0] - l0)
            err_gaps.append(best[1] - e0)
            init_losses.append(l0)
            plain_norms.append(float(best[2].norm()))
            weighted_norms.append(float(weighted_norm(best[2], c)))
    n = len(gaps)
    return MeasureResult(
        name="worst_case_sharpness",
        value=sum(gaps) / n,
        per_batch=gaps,
        error_delta=sum(err_gaps) / n,
        per_batch_error=err_gaps,
        settings={
            "rho": rho,
            "norm": norm,
            "adaptive": bool(adaptive),
            "n_iters": n_iters,
            "init": init,
            "restarts": restarts,
            "step_multiplier": float(step_multiplier),
            "masked": mask_list is not None,
            "restart_from_best": bool(restart_from_best),
            "stacked": bool(stack),
            "batches": n,
            "batch_sizes": sorted({int(x.shape[0]) for x, _ in data}),
        },
        extra={
            "initial_loss": init_losses,
            "max_delta_norm": max(plain_norms),
            "max_weighted_delta_norm": max(weighted_norms),
            "checkpoints": checkpoints,
        },
    )
