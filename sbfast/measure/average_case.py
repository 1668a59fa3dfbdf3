"""Average-case (adaptive) sharpness: the mean loss increase under random perturbations.

For each batch B and K = ``n_draws`` draws:

    A_B = (1/K) sum_k L_B(w0 + xi_k) - L_B(w0),   xi_k = rho c u_k elementwise,

with c = |w0| (adaptive) or 1, and u_k standard Gaussian (``norm="l2"``: an elementwise Gaussian of
standard deviation rho c, not a point on a sphere, as in the release) or uniform in [-1, 1]
(``"linf"``). The measure is the mean of A_B over batches, and the same for the error. Forward
passes only: K + 1 per batch. The draws of one batch are independent problems: on CUDA they are
evaluated several at a time by ``torch.func.vmap`` over the perturbation (one call for a chunk of
draws instead of one per draw): on CUDA that removes a launch per layer and draw, and on this
project's 2-core CPU it measured 1.15-1.25x faster than draw by draw (docs/measure.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from .batches import as_batches, check_model, measuring
from .perturbation import FlatModel, check_norm, check_positive_int, check_rho
from .results import MeasureResult

__all__ = ["average_sharpness", "draw_noise"]


def draw_noise(model: nn.Module, n_draws: int, norm: str = "l2", generator: torch.Generator | None = None) -> Tensor:
    """Standard draws u [n_draws, P] (before the rho c scaling) in the release's order: for each
    draw, for each parameter in ``named_parameters()`` order, one ``randn`` (l2) or ``2 rand - 1``
    (linf) of its shape. With a generator seeded like torch's global one, these are the numbers the
    release's ``randn_like`` / ``rand_like`` calls draw on the CPU. Written in place into one
    buffer (no per-parameter tensors to concatenate)."""
    params = [p for _, p in model.named_parameters()]
    numels = [p.numel() for p in params]
    out = torch.empty(n_draws, sum(numels), dtype=params[0].dtype)
    for row in out:
        for part in row.split(numels):
            if norm == "l2":
                part.normal_(generator=generator)
            else:
                part.uniform_(generator=generator).mul_(2).sub_(1)
    return out


def _losses(flat: FlatModel, points: Tensor, x: Tensor, y: Tensor, stack: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """Loss and error [K] at each of points [K, P]."""
    with torch.no_grad():
        if not stack:
            pairs = [flat.loss_and_error(flat.logits(p, x), y) for p in points]
            return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        out_l, out_e = [], []
        for part in points.split(chunk):
            logits = vmap(lambda p: flat.logits(p, x))(part)  # [k, B, C]
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), y.expand(part.shape[0], -1), reduction="none"
            )
            out_l.append(loss.mean(1))
            out_e.append((logits.argmax(2) != y).float().mean(1))
        return torch.cat(out_l), torch.cat(out_e)


def average_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = True,
    n_draws: int = 100,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
    stack: bool | None = None,
    chunk: int = 16,
    batch_size: int | None = None,
    n_batches: int | None = None,
) -> MeasureResult:
    """Average-case sharpness: the mean over batches of E_xi L(w0 + xi) - L(w0).

    Args:
        model: any ``nn.Module`` mapping ``x [B, ...]`` to logits; measured in eval mode and left as
            it came.
        batches: ``(x, y)`` / ``(index, x, y)`` batches in the order given, or a data set with
            ``batch_size`` / ``n_batches``.
        rho: the noise scale (relative to |w| when adaptive).
        norm: ``"l2"`` (Gaussian) or ``"linf"`` (uniform in [-1, 1]).
        n_draws: draws per batch.
        generator: the CPU generator the draws come from (a fresh one seeded 0 when None), batch by
            batch, each batch's draws as :func:`draw_noise` makes them.
        noise: instead, the standard draws themselves: one [n_draws, P] tensor per batch.
        stack: evaluate draws several at a time with vmap (default True; False: one by one).
        chunk: draws per vmapped call.

    Returns:
        ``MeasureResult`` with ``value`` (mean loss gap), ``per_batch``, ``error_delta``,
        ``per_batch_error`` and ``extra["initial_loss"]``.
    """
    named = check_model(model)
    rho = check_rho(rho)
    norm = check_norm(norm)
    n_draws = check_positive_int(n_draws, "n_draws")
    chunk = check_positive_int(chunk, "chunk")
    device = named[0][1].device
    data = as_batches(batches, batch_size=batch_size, n_batches=n_batches, device=device)
    n_params = sum(p.numel() for _, p in named)
    if noise is not None:
        noise = list(noise)
        if len(noise) != len(data):
            raise ValueError(f"noise has {len(noise)} entries, expected one per batch ({len(data)})")
        for k, u in enumerate(noise):
            if not isinstance(u, Tensor) or tuple(u.shape) != (n_draws, n_params):
                shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
                raise ValueError(f"noise[{k}] has shape {shape}, expected ({n_draws}, {n_params})")
    if generator is None and noise is None:
        generator = torch.Generator().manual_seed(0)
    if stack is None:
        stack = True  # measured faster than draw by draw on this project's CPU too (docs/measure.md)

    gaps, err_gaps, init_losses = [], [], []
    with measuring(model):
        flat = FlatModel(model)
        scale = rho * (flat.w0.abs() if adaptive else torch.ones_like(flat.w0))
        starts = flat.starting_points(data)
        for k, ((x, y), (l0, e0)) in enumerate(zip(data, starts, strict=True)):
            u = noise[k] if noise is not None else draw_noise(model, n_draws, norm, generator)
            points = u.to(flat.w0, copy=noise is not None).mul_(scale).add_(flat.w0)
            losses, errs = _losses(flat, points, x, y, stack, chunk)
            # the release sums Python floats draw by draw; a float64 sum of the same values
            gaps.append(float(losses.double().sum()) / n_draws - l0)
            err_gaps.append(float(errs.double().sum()) / n_draws - e0)
            init_losses.append(l0)
    n = len(gaps)
    return MeasureResult(
        name="average_sharpness",
        value=sum(gaps) / n,
        per_batch=gaps,
        error_delta=sum(err_gaps) / n,
        per_batch_error=err_gaps,
        settings={
            "rho": rho,
            "norm": norm,
            "adaptive": bool(adaptive),
            "n_draws": n_draws,
            "batches": n,
            "stacked": bool(stack),
            "batch_sizes": sorted({int(x.shape[0]) for x, _ in data}),
        },
        extra={"initial_loss": init_losses},
    )
