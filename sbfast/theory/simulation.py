"""The simulated sharpness and variance of the random-design linear model, every draw at once.

One simulated point (docs/reproduce.md) draws ``data_draws`` data sets (a design ``A`` of n x d
and a test design ``T`` of p x d, entries N(0, 1/d)) and, per data set, ``init_draws``
initialisations ``w_0 ~ N(0, sigma2 I)``. Each initialisation trains one member per part of the
rows (one part for SAM; ``s`` near-equal consecutive parts for SharpBalance, the sizes of
``numpy.array_split``, all starting from the same ``w_0``) by k full-batch SAM steps towards the
teacher's labels ``y = A w_hat``:

    w <- w - eta A_s^T (A_s (w + rho A_s^T (A_s w - y_s)) - y_s)

so that, with G_s = A_s^T A_s, ``w_k - w_hat = M_s^k (w_0 - w_hat)`` and
``M_s = I - eta G_s - eta rho G_s^2``, exactly: the k steps are one matrix power per part.
Per data set, with ``e = w_k - w_hat`` of every member and ``e_bar`` their mean:

    error     = mean over members of  e^T T^T T e
    bias      = e_bar^T T^T T e_bar
    variance  = (error - bias) / p
    sharpness = f(e_bar + eps*) - f(e_bar),  f(v) = v^T G v / 2,  G = A^T A

with ``eps*`` from projected gradient ascent in the l2 ball of radius ``rho0``: from a random
point at half the radius, ``pga_steps`` steps of ``eps <- P(eps + step (G eps - G Mbar^k w_hat))``
(``Mbar^k`` the mean of the parts' M_s^k, so that ``-Mbar^k w_hat`` is the expected e_bar), each
draw stopping at the first step that moves it by at most ``pga_tol``. The point's figures are
the means over data sets, with standard errors std / sqrt(data_draws) over the data sets (each
data set is one independent draw of everything).

Everything is batched: the designs are one (data_draws, n, d) tensor, the Gram matrices and
matrix powers one batched GEMM / ``torch.linalg.matrix_power`` each, the members one batched
GEMM, the ascent one batched step per iteration over all data sets. Computed in float64 by
default, on normals drawn in float32 (see :func:`draw`). Memory grows as data_draws x n x d
(12 bytes each: the float32 draw and its float64 copy, 54 MB at the notebook's 10 x 3000 x 150
and twice that for SharpBalance's parts), so very large draw counts are better run as several
calls.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from sbfast.theory.bounds import check_model_args

METHODS = ("sam", "sharpbalance")


@dataclass(frozen=True)
class Draws:
    """Every random number of one simulated point, standard normal (scaled where used).

    ``A``: (data_draws, n, d); ``T``: (data_draws, p, d); ``w0``: (data_draws, init_draws, d);
    ``eps0``: (data_draws, d), the ascent's random start."""

    A: torch.Tensor
    T: torch.Tensor
    w0: torch.Tensor
    eps0: torch.Tensor


@dataclass(frozen=True)
class Simulation:
    """One simulated point: the means over data draws and their standard errors, and the
    per-data-draw values (``per_draw_sharpness``, ``per_draw_variance``: (data_draws,))."""

    sharpness: float
    sharpness_se: float
    variance: float
    variance_se: float
    per_draw_sharpness: torch.Tensor
    per_draw_variance: torch.Tensor


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def draw(
    n: int,
    d: int,
    p: int,
    data_draws: int,
    init_draws: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Draws:
    """Draw every random number of one point from ``generator`` (on ``device``), in the order
    A, T, w0, eps0. Standard normal: :func:`simulate_draws` applies the scales 1/sqrt(d) and
    sqrt(sigma2) in its own dtype.

    Drawn in float32 by default: a float64 normal costs about 3.5x as much on a CPU, and a
    float32 draw's rounding (relative 6e-8) is far below any Monte-Carlo error here; the
    computation then runs in float64 on these values."""
    check_model_args(n=n, d=d, p=p)
    _check_count("data_draws", data_draws, 1)
    _check_count("init_draws", init_draws, 1)
    kw = dict(generator=generator, device=device, dtype=dtype)
    return Draws(
        A=torch.randn(data_draws, n, d, **kw),
        T=torch.randn(data_draws, p, d, **kw),
        w0=torch.randn(data_draws, init_draws, d, **kw),
        eps0=torch.randn(data_draws, d, **kw),
    )


def part_sizes(n: int, s: int) -> list[int]:
    """Sizes of s consecutive parts of n rows as ``numpy.array_split`` makes them: the first
    n mod s parts one row longer."""
    base, extra = divmod(n, s)
    return [base + 1] * extra + [base] * (s - extra)


def part_grams(A: torch.Tensor, s: int) -> torch.Tensor:
    """Gram matrices of s consecutive row parts: (B, n, d) -> (B, s, d, d).

    The parts are padded to the longest with zero rows (which add nothing to A_s^T A_s), so all
    parts are one batched GEMM."""
    B, n, d = A.shape
    sizes = part_sizes(n, s)
    width = max(sizes)
    starts = [sum(sizes[:i]) for i in range(s)]
    pad_row = n  # index of an appended zero row
    index = torch.tensor(
        [[start + j if j < size else pad_row for j in range(width)] for start, size in zip(starts, sizes, strict=True)],
        device=A.device,
    )
    padded = torch.cat([A, A.new_zeros(B, 1, d)], dim=1)
    parts = padded[:, index]  # (B, s, width, d)
    return parts.transpose(-1, -2) @ parts


def sam_step_power(grams: torch.Tensor, k: int, rho: float, eta: float) -> torch.Tensor:
    """(I - eta G - eta rho G^2)^k for a batch of Gram matrices G (..., d, d): the map that k
    full-batch SAM steps apply to w - w_hat (exact: the steps are linear in w - w_hat)."""
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    step = eye - eta * grams - (eta * rho) * (grams @ grams)
    return torch.linalg.matrix_power(step, k)


def projected_ascent(
    gram: torch.Tensor,
    target: torch.Tensor,
    eps0: torch.Tensor,
    rho0: float,
    steps: int,
    step_size: float,
    tol: float,
) -> torch.Tensor:
    """Projected gradient ascent of ``eps^T G eps / 2 - eps^T target`` in the ball ||eps|| <= rho0,
    for a batch: ``gram`` (B, d, d), ``target`` (B, d), ``eps0`` (B, d) a random direction.

    Starts at ``eps0 / ||eps0|| * rho0 / 2``; each step ``eps' = P(eps + step_size (G eps - target))``
    (P scales back onto the ball); a draw stops at the first step with ``||eps' - eps|| <= tol``
    and keeps that ``eps'``, otherwise the last ``eps'`` is kept. Every draw takes the same steps
    (stopped ones are masked), so there is no host sync."""
    eps = eps0 / (eps0.norm(dim=-1, keepdim=True) * 2) * rho0
    result = eps
    active = torch.ones(eps.shape[0], dtype=torch.bool, device=eps.device)
    for _ in range(steps):
        grad = (gram @ eps.unsqueeze(-1)).squeeze(-1) - target
        moved = eps + step_size * grad
        moved = moved * (rho0 / moved.norm(dim=-1, keepdim=True).clamp_min(rho0))
        result = torch.where(active.unsqueeze(-1), moved, result)
        active = active & ((moved - eps).norm(dim=-1) > tol)
        eps = moved
    return result


def _quadratic(v: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    # v^T G v for each row of v (B, M, d) against its batch's symmetric G (B, d, d): (B, M)
    return ((v @ gram) * v).sum(-1)


def simulate_draws(
    method: str,
    draws: Draws,
    w_hat: torch.Tensor,
    *,
    s: int = 10,
    k: int = 3,
    rho: float = 0.5,
    eta: float = 0.01,
    sigma2: float = 0.1,
    rho0: float = 0.01,
    pga_steps: int = 50,
    pga_step_size: float = 0.01,
    pga_tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> Simulation:
    """The simulated point of the module docstring for given ``draws`` (see :func:`draw`) and
    teacher ``w_hat`` (d,), computed in ``dtype``. ``s`` is used by SharpBalance only."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    B, n, d = draws.A.shape
    p = draws.T.shape[1]
    s_used = s if method == "sharpbalance" else 1
    check_model_args(n=n, d=d, p=p, s=s_used, k=k, rho=rho, eta=eta, sigma2=sigma2, rho0=rho0)
    _check_count("pga_steps", pga_steps, 0)
    if B < 2:
        raise ValueError(f"data_draws must be >= 2 for a standard error, got {B}")
    if tuple(w_hat.shape) != (d,):
        raise ValueError(f"w_hat must have shape ({d},), got {tuple(w_hat.shape)}")
    w_hat = w_hat.to(device=draws.A.device, dtype=dtype)

    A = draws.A.to(dtype) / math.sqrt(d)
    T = draws.T.to(dtype) / math.sqrt(d)
    gram = A.transpose(-1, -2) @ A  # (B, d, d)
    test_gram = T.transpose(-1, -2) @ T  # (B, d, d)
    part_gram = gram.unsqueeze(1) if s_used == 1 else part_grams(A, s_used)  # (B, s, d, d)
    powers = sam_step_power(part_gram, k, rho, eta)  # (B, s, d, d)

    e0 = draws.w0.to(dtype) * math.sqrt(sigma2) - w_hat  # (B, I, d)
    # every member of every initialisation: e = M_s^k e0, (B, s, d, d) @ (B, 1, d, I) -> (B, s, I, d)
    e = (powers @ e0.transpose(-1, -2).unsqueeze(1)).transpose(-1, -2)
    error = _quadratic(e.flatten(1, 2), test_gram).mean(-1)  # (B,)
    e_bar = e.mean(dim=(1, 2))  # (B, d)
    bias = _quadratic(e_bar.unsqueeze(1), test_gram).squeeze(1)
    variance = (error - bias) / p

    target = (gram @ (powers.mean(1) @ w_hat).unsqueeze(-1)).squeeze(-1)  # G Mbar^k w_hat, (B, d)
    eps = projected_ascent(gram, target, draws.eps0.to(dtype), rho0, pga_steps, pga_step_size, pga_tol)
    f_bar = _quadratic(e_bar.unsqueeze(1), gram).squeeze(1) / 2
    f_moved = _quadratic((e_bar + eps).unsqueeze(1), gram).squeeze(1) / 2
    sharpness = f_moved - f_bar

    root = math.sqrt(B)
    return Simulation(
        sharpness=float(sharpness.mean()),
        sharpness_se=float(sharpness.std() / root),
        variance=float(variance.mean()),
        variance_se=float(variance.std() / root),
        per_draw_sharpness=sharpness,
        per_draw_variance=variance,
    )


def draw_teacher(
    d: int,
    sigma2: float = 0.1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A teacher ``w_hat ~ N(0, sigma2 I)`` of shape (d,)."""
    check_model_args(d=d, sigma2=sigma2)
    return torch.randn(d, generator=generator, device=device, dtype=dtype) * math.sqrt(sigma2)


def simulate(
    method: str,
    *,
    n: int = 3000,
    d: int = 150,
    p: int = 1000,
    s: int = 10,
    k: int = 3,
    rho: float = 0.5,
    eta: float = 0.01,
    sigma2: float = 0.1,
    rho0: float = 0.01,
    data_draws: int = 10,
    init_draws: int = 100,
    w_hat: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    pga_steps: int = 50,
    pga_step_size: float = 0.01,
    pga_tol: float = 1e-6,
) -> Simulation:
    """Simulate one point of ``method`` ("sam" or "sharpbalance"): its sharpness and variance
    with standard errors over ``data_draws`` data sets of ``init_draws`` initialisations each.

    Defaults are those of the release's notebook (its simulated cells: 10 data sets of 100
    initialisations). ``w_hat`` (d,) defaults to a teacher drawn from ``generator`` first; the
    draws come from ``generator`` in the order of :func:`draw`. All arguments are checked before
    anything is drawn."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_model_args(n=n, d=d, p=p, s=s if method == "sharpbalance" else 1, k=k, rho=rho, eta=eta)
    check_model_args(sigma2=sigma2, rho0=rho0)
    _check_count("data_draws", data_draws, 2)
    _check_count("init_draws", init_draws, 1)
    _check_count("pga_steps", pga_steps, 0)
    if w_hat is not None and tuple(w_hat.shape) != (d,):
        raise ValueError(f"w_hat must have shape ({d},), got {tuple(w_hat.shape)}")
    if w_hat is None:
        w_hat = draw_teacher(d, sigma2, generator=generator, device=device, dtype=dtype)
    draws = draw(n, d, p, data_draws, init_draws, generator=generator, device=device)
    return simulate_draws(
        method,
        draws,
        w_hat,
        s=s,
        k=k,
        rho=rho,
        eta=eta,
        sigma2=sigma2,
        rho0=rho0,
        pga_steps=pga_steps,
        pga_step_size=pga_step_size,
        pga_tol=pga_tol,
        dtype=dtype,
    )


__all__ = [
    "METHODS",
    "Draws",
    "Simulation",
    "draw",
    "draw_teacher",
    "part_grams",
    "part_sizes",
    "projected_ascent",
    "sam_step_power",
    "simulate",
    "simulate_draws",
]
