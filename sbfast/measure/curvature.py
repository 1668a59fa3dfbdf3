"""Curvature of the loss: the Hessian's trace (Hutchinson) and its top eigenvalues.

H is the Hessian of the mean cross-entropy over every sample of the batches given (the
sample-weighted mean of the per-batch Hessians), with respect to every parameter of the model,
in eval mode (BatchNorm on its running statistics). Products H v come from
:class:`sbfast.measure.hvp.HessianOperator`: one forward and one double-backward graph for the
samples (kept across probes when the samples fit one chunk), then one backward per product.
The trace needs only v^T H v, which :class:`sbfast.measure.taylor.TaylorCurvature` gives from
one second-order forward pass where the model's functions have rules.

Random draws (probes, the starting vector) come from ``generator`` (a ``torch.Generator`` on
the CPU; a fresh one seeded 0 when None), one flat vector over all P parameter entries per draw,
in ``named_parameters`` order, so that the same seed gives the same probes on every device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .batches import as_batches, check_model, measuring
from .hvp import DEFAULT_CHUNK, HVP_MODES, HessianOperator
from .results import MeasureResult
from .taylor import NoTaylorRule, TaylorCurvature

__all__ = ["EIGEN_METHODS", "TRACE_MODES", "hessian_eigenvalues", "hessian_trace", "rademacher", "relative_change"]

EIGEN_METHODS = ("power", "lanczos")
# how the trace gets v^T H v: second-order forward ("taylor", no backward; 2.5-3x faster per
# probe than the double backward on this CPU) where every function of the forward has a rule,
# else a Hessian-vector product ("auto" picks; "taylor" refuses a model without rules)
TRACE_MODES = ("auto", "taylor", *HVP_MODES)
_GUARD = 1e-6  # PyHessian's denominator guard in its relative-change stopping rules


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_tol(tol: object) -> None:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")


def _check_generator(generator: object) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
    return generator


def rademacher(size: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """One probe: [size] of +-1 with equal probability, drawn on the CPU from ``generator``."""
    return torch.randint(0, 2, (size,), generator=generator).to(dtype) * 2 - 1


def relative_change(new: float, old: float) -> float:
    """|new - old| / (|old| + 1e-6), the stopping statistic of both estimators."""
    return abs(new - old) / (abs(old) + _GUARD)


def _prepare(model: nn.Module, batches: Any) -> list[tuple[Tensor, Tensor]]:
    check_model(model)
    device = next(model.parameters()).device
    return as_batches(batches, device=device)


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    hvp_mode: str = "auto",
) -> MeasureResult:
    """Hutchinson's estimate of tr(H): the mean of v^T H v over Rademacher probes v.

    Probe i (i = 1, 2, ...) adds t_i = v_i^T H v_i; after probe i >= 2 the estimate m_i (the mean
    of t_1..t_i) is returned as soon as |m_i - m_{i-1}| / (|m_{i-1}| + 1e-6) < tol, else after
    ``max_iter`` probes. Each t_i is one second-order forward pass (``hvp_mode="taylor"``, see
    taylor.py: about three forwards' work once the first forward is kept) or one backward
    through the gradient graph (``"backward"``) or a forward-over-reverse product (``"jvp"``);
    ``"auto"`` takes the first
    where every function of the model's forward has a second-order rule (conv, linear,
    BatchNorm, ReLU, pooling, sums: the CNNs, ResNets, WRN and MLP) and the double backward
    otherwise (e.g. a ViT). The t_i are the same numbers either way, to rounding.

    Args:
        model: maps x [b, ...] to logits [b, C]; measured in eval mode and left as it came.
        batches: (x, y) or (index, x, y) batches (or a data set: see :func:`as_batches`).
        max_iter: most probes. tol: relative-change tolerance (> 0).
        generator: CPU generator for the probes (default: a fresh one seeded 0).
        chunk_size: most samples per forward. hvp_mode: one of ``TRACE_MODES`` (above).
    Returns:
        MeasureResult "hessian_trace": value = m (float), std_error = sample std of the t_i /
        sqrt(n) (None for one probe), extra = {"probes": n, "samples": t_1..t_n, "loss": L(w),
        "converged": whether the tolerance stopped it, "parameters": P, "products": the way
        the t_i were computed ("taylor", "backward" or "jvp")}.
    Raises:
        ValueError: bad settings; ``hvp_mode="taylor"`` on a model with a function it has no rule for.
    """
    _check_int(max_iter, "max_iter")
    _check_tol(tol)
    _check_int(chunk_size, "chunk_size")
    if hvp_mode not in TRACE_MODES:
        raise ValueError(f"hvp_mode must be one of {TRACE_MODES}, got {hvp_mode!r}")
    gen = _check_generator(generator)
    data = _prepare(model, batches)
    with measuring(model):
        op = HessianOperator(
            model, data, chunk_size=chunk_size, mode="jvp" if hvp_mode == "jvp" else "backward", check_start=False
        )
        taylor = TaylorCurvature(model, op.params, op.chunks, op.n_samples) if hvp_mode in ("auto", "taylor") else None
        op.check_start(taylor.record if taylor is not None else None)  # the forward the probes then replay
        samples: list[float] = []
        converged = False
        mean = 0.0
        for i in range(max_iter):
            v = rademacher(op.size, gen, op.dtype).to(op.device)
            t = None
            if taylor is not None:
                try:
                    t = float(taylor(v))
                except NoTaylorRule as e:
                    if hvp_mode == "taylor":
                        raise ValueError(f"hvp_mode='taylor' cannot follow this model: {e}") from None
                    taylor = None
            samples.append(float(torch.dot(v, op(v))) if t is None else t)
            new_mean = math.fsum(samples) / len(samples)
            if i >= 1 and relative_change(new_mean, mean) < tol:
                mean, converged = new_mean, True
                break
            mean = new_mean
        op.release()
        if taylor is not None:
            taylor.release()
    n = len(samples)
    std_error = None
    if n > 1:
        var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
        std_error = math.sqrt(var / n)
    return MeasureResult(
        name="hessian_trace",
        value=mean,
        std_error=std_error,
        settings={"max_iter": max_iter, "tol": tol, "hvp_mode": hvp_mode, "samples": op.n_samples},
        extra={
            "probes": n,
            "samples": samples,
            "loss": op.loss,
            "converged": converged,
            "parameters": op.size,
            "products": "taylor" if taylor is not None else op.mode,
        },
    )


def _orthogonalise(v: Tensor, basis: list[Tensor]) -> Tensor:
    for b in basis:
        v = v - torch.dot(v, b) * b
    return v


def _power(
    op: HessianOperator, k: int, max_iter: int, tol: float, gen: torch.Generator
) -> tuple[list[float], list[int], list[Tensor]]:
    """PyHessian's power iteration with deflation: per eigenvalue, v from a normalised Gaussian;
    each iteration v <- orth(v against the found eigenvectors), lambda = v^T H v, v <- Hv/||Hv||;
    stop when lambda changes by less than tol relative. Largest |lambda| first."""
    values, iters, vectors = [], [], []
    for _ in range(k):
        v = torch.randn(op.size, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
        v = v / v.norm()
        value: float | None = None
        used = 0
        for _ in range(max_iter):
            used += 1
            v = _orthogonalise(v, vectors)
            v = v / v.norm()
            hv = op(v)
            new = float(torch.dot(v, hv))
            v = hv / hv.norm()
            if value is not None and relative_change(new, value) < tol:
                value = new
                break
            value = new
        values.append(float(value))  # type: ignore[arg-type]
        iters.append(used)
        vectors.append(v)
    return values, iters, vectors


def _lanczos(
    op: HessianOperator, k: int, max_iter: int, tol: float, gen: torch.Generator
) -> tuple[list[float], list[int], list[Tensor]]:
    """Lanczos with full reorthogonalisation from a normalised Gaussian start; after each step
    the Ritz values of the tridiagonal T_j are computed, and it stops when the k of largest
    magnitude each have residual |beta_j s_{j,i}| <= tol |theta_i| (or the Krylov space is
    exhausted, or after max_iter products)."""
    q = torch.randn(op.size, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    m = min(max_iter, op.size)
    theta = torch.zeros(0, dtype=torch.float64)
    s = torch.zeros(0, 0, dtype=torch.float64)
    order = torch.zeros(0, dtype=torch.long)
    for j in range(m):
        w = op(basis[j])
        alphas.append(float(torch.dot(w, basis[j])))
        # full reorthogonalisation (twice, for float32): keeps the Ritz values free of ghost copies
        for _ in range(2):
            w = w - torch.stack(basis).T @ (torch.stack(basis) @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        order = theta.abs().argsort(descending=True)[:k]
        done = len(alphas) >= k and all(
            abs(beta * float(s[-1, i])) <= tol * abs(float(theta[i])) for i in order.tolist()
        )
        if done or j == m - 1 or beta <= 1e-12 * max(1.0, float(theta.abs().max())):
            break
        betas.append(beta)
        basis.append(w / beta)
    q_mat = torch.stack(basis[: len(alphas)]).to(torch.float64)
    vectors = [(q_mat.T @ s[:, i]).to(op.dtype) for i in order.tolist()]
    values = [float(theta[i]) for i in order.tolist()]
    return values, [len(alphas)] * len(values), vectors


def hessian_eigenvalues(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    method: str = "power",
    chunk_size: int = DEFAULT_CHUNK,
    hvp_mode: str = "backward",
    return_vectors: bool = False,
) -> MeasureResult:
    """The k eigenvalues of H of largest magnitude, largest first.

    ``method="power"`` (default; PyHessian's ``eigenvalues``): power iteration with deflation,
    ``max_iter`` products per eigenvalue at most, each stopped when the Rayleigh quotient changes
    by less than ``tol`` relative. ``method="lanczos"``: Lanczos with full reorthogonalisation,
    ``max_iter`` products in all at most, stopped when the k Ritz values' residuals are below
    ``tol`` relative (converges much faster and to any precision on small models; exact once the
    iterations reach P). Cost: one backward through the gradient graph per product.

    Returns:
        MeasureResult "hessian_eigenvalues": value = [lambda_1, ..., lambda_k] (floats; fewer when
        P < k), extra = {"iterations": products per eigenvalue (power) or in all (lanczos, the
        same number repeated), "method", "loss", "parameters"}; with ``return_vectors`` also
        extra["vectors"], the unit eigenvectors [k, P] (a tensor, not JSON-ready).
    """
    _check_int(k, "k")
    _check_int(max_iter, "max_iter")
    _check_tol(tol)
    _check_int(chunk_size, "chunk_size")
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {EIGEN_METHODS}, got {method!r}")
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
    gen = _check_generator(generator)
    data = _prepare(model, batches)
    size = sum(p.numel() for p in model.parameters())
    if k > size:
        raise ValueError(f"k={k} eigenvalues asked of a Hessian of size {size} (the model's parameter count)")
    with measuring(model):
        op = HessianOperator(model, data, chunk_size=chunk_size, mode=hvp_mode)
        solve = _power if method == "power" else _lanczos
        values, iters, vectors = solve(op, k, max_iter, tol, gen)
        op.release()
    extra: dict[str, Any] = {"iterations": iters, "method": method, "loss": op.loss, "parameters": op.size}
    if return_vectors:
        extra["vectors"] = torch.stack(vectors).detach().cpu()
    return MeasureResult(
        name="hessian_eigenvalues",
        value=values,
        settings={
            "k": k,
            "max_iter": max_iter,
            "tol": tol,
            "method": method,
            "hvp_mode": hvp_mode,
            "samples": op.n_samples,
        },
        extra=extra,
    )
