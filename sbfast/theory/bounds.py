"""The theorem's closed forms for the random-design linear model: sharpness bounds and variance.

The model (docs/reproduce.md): a design ``A`` (n x d, entries N(0, 1/d)), a teacher ``w_hat``,
members trained by k full-batch SAM steps ``w <- w - eta A^T A (w + rho A^T A (w - w_hat) - w_hat)``
from ``w_0 ~ N(0, sigma2 I)``, so that ``w_k - w_hat = M^k (w_0 - w_hat)`` with
``M = I - eta G - eta rho G^2``, ``G = A^T A``. SAM trains every member on all n rows;
SharpBalance trains one member on each of s disjoint parts of n / s rows.

Every bound is built from

    phi(i, j) = | [j == 0] + sum_{k1 + k2 + k3 = i, m = k2 + 2 k3 + j >= 1}
                  i! / (k1! k2! k3!) (-eta)^(k2 + k3) rho^k3 mu_m(r) |

with ``mu_m(r) = sum_{l=1}^{m} N(m, l) r^l`` the m-th Marchenko-Pastur moment (N the Narayana
numbers) at aspect ratio ``r = n / (s d)``: phi(i, j) is the limit of ``tr(M^i G^j) / d`` with
the Gram matrix of one part. The multinomial sum is the expansion of the polynomial
``(1 - eta x - eta rho x^2)^i x^j``; here its coefficients are computed once, exactly, and
contracted with the moments, in rational arithmetic (``fractions.Fraction`` of the float
inputs), and rounded to a float at the end, so that the only rounding is the final one plus the
float arithmetic of the bound formulas.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache


@dataclass(frozen=True)
class Bounds:
    """The theorem's figures for one setting.

    ``sharpness_upper``: the upper bound on the sharpness of the mean predictor.
    ``sharpness_lower``: the lower bound (SAM only; None for SharpBalance, where the theorem
    gives none). ``variance``: the variance (diversity) term of the ensemble's error."""

    sharpness_upper: float
    sharpness_lower: float | None
    variance: float


def narayana(m: int, ell: int) -> int:
    """The Narayana number N(m, l) = C(m-1, l-1) C(m, l-1) / l, for 1 <= l <= m."""
    if not (1 <= ell <= m):
        raise ValueError(f"narayana(m, l) needs 1 <= l <= m, got m={m}, l={ell}")
    return math.comb(m - 1, ell - 1) * math.comb(m, ell - 1) // ell


@lru_cache(maxsize=4096)
def _mp_moment(m: int, r: Fraction) -> Fraction:
    # the m-th moment of the Marchenko-Pastur law of ratio r, scaled so that its mean is r
    if m == 0:
        return Fraction(1)
    return sum((narayana(m, ell) * r**ell for ell in range(1, m + 1)), Fraction(0))


@lru_cache(maxsize=4096)
def _step_polynomial(i: int, eta: Fraction, rho: Fraction) -> tuple[Fraction, ...]:
    # coefficients c_0..c_2i of (1 - eta x - eta rho x^2)^i, by repeated multiplication
    coeffs = [Fraction(1)]
    factor = (Fraction(1), -eta, -eta * rho)
    for _ in range(i):
        nxt = [Fraction(0)] * (len(coeffs) + 2)
        for a, ca in enumerate(coeffs):
            if ca:
                for b, fb in enumerate(factor):
                    nxt[a + b] += ca * fb
        coeffs = nxt
    return tuple(coeffs)


def phi_exact(i: int, j: int, eta: float, rho: float, ratio: float) -> Fraction:
    """phi(i, j) of the module docstring, exactly, for the float inputs taken as exact rationals.

    ``ratio`` is the aspect ratio r = rows / d of the Gram matrix (n / d for SAM, n / (s d) for a
    SharpBalance part)."""
    eta_q, rho_q, r_q = Fraction(eta), Fraction(rho), Fraction(ratio)
    coeffs = _step_polynomial(i, eta_q, rho_q)
    # the coefficient of x^0 with j == 0 is the bare "1 +" of the series (the moment mu_0 = 1)
    total = sum((c * _mp_moment(a + j, r_q) for a, c in enumerate(coeffs) if c), Fraction(0))
    return abs(total)


def phi(i: int, j: int, eta: float, rho: float, ratio: float) -> float:
    """phi(i, j) rounded to a float (see :func:`phi_exact`)."""
    return float(phi_exact(i, j, eta, rho, ratio))


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_real(name: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")


def check_model_args(**kwargs: object) -> None:
    """Raise TypeError/ValueError naming the first bad argument of the model: sizes ``n``, ``d``,
    ``p``, ``s`` (integers >= 1), ``k`` (integer >= 0); ``eta``, ``rho0``, ``w_hat_norm`` (> 0);
    ``rho``, ``sigma2`` (>= 0); ``s <= n``. Names not given are not checked."""
    for name in ("n", "d", "p", "s"):
        if name in kwargs:
            _check_int(name, kwargs[name], 1)
    if "k" in kwargs:
        _check_int("k", kwargs["k"], 0)
    for name in ("eta", "rho0", "w_hat_norm"):
        if name in kwargs:
            _check_real(name, kwargs[name], positive=True)
    for name in ("rho", "sigma2"):
        if name in kwargs:
            _check_real(name, kwargs[name])
    if "s" in kwargs and "n" in kwargs and kwargs["s"] > kwargs["n"]:
        raise ValueError(f"s must be <= n (every part needs a row), got s={kwargs['s']}, n={kwargs['n']}")


def sam_bounds(n: int, d: int, k: int, rho: float, eta: float, sigma2: float, rho0: float, w_hat_norm: float) -> Bounds:
    """SAM (every member on all n rows): the sharpness bounds and the variance.

    With r = n / d and phi on the whole design:

        upper    = rho0^2 / 2 (sqrt(r) + 1)^2 + rho0 sqrt(phi(2k, 2)) ||w_hat||
        lower    = rho0^2 / 2 (sqrt(r) - 1)^2 + rho0 sqrt(phi(2k, 2)) ||w_hat||
                   - rho0 (phi(4k, 4) - phi(2k, 2)^2) / (2 ||w_hat|| phi(2k, 2)^(3/2))
        variance = phi(2k, 0) sigma2

    (the last term of the lower bound is the Jensen gap of the square root)."""
    check_model_args(n=n, d=d, k=k, rho=rho, eta=eta, sigma2=sigma2, rho0=rho0, w_hat_norm=w_hat_norm)
    r = n / d
    p2k2 = phi(2 * k, 2, eta, rho, r)
    if p2k2 == 0:
        raise ValueError(f"phi(2k, 2) is 0 at k={k}, rho={rho}, eta={eta}: the lower bound divides by it")
    edge_up = rho0**2 / 2 * (math.sqrt(r) + 1) ** 2
    edge_lo = rho0**2 / 2 * (math.sqrt(r) - 1) ** 2
    main = rho0 * math.sqrt(p2k2) * w_hat_norm
    jensen_gap = rho0 * (phi(4 * k, 4, eta, rho, r) - p2k2**2) / (2 * w_hat_norm * p2k2**1.5)
    variance = phi(2 * k, 0, eta, rho, r) * sigma2
    return Bounds(sharpness_upper=edge_up + main, sharpness_lower=edge_lo + main - jensen_gap, variance=variance)


def sharpbalance_bounds(
    n: int, d: int, p: int, s: int, k: int, rho: float, eta: float, sigma2: float, rho0: float, w_hat_norm: float
) -> Bounds:
    """SharpBalance (one member per part of n / s rows): the sharpness upper bound and the
    variance. ``p`` (the test rows) is part of the model's signature; the limits do not depend
    on it.

    With r = n / (s d) and phi_ij = phi(i, j) on one part, the upper bound is

        rho0^2 / 2 (sqrt(n / d) + 1)^2 + rho0 ||w_hat|| sqrt(Q) / s,

    Q the theorem's expansion of the second moment of ``sum_parts G M_part^k w_hat`` over the
    draws of the parts (products of phi over one, two, three and four distinct parts):

        Q = s phi_{2k,2} + 2 s (s-1) r phi_{2k,1} + 2 s (s-1) phi_{k,2} phi_{k,0}
          + s (s-1) r (1 + r) phi_{2k,0} + 2 s (s-1) phi_{k,1}^2
          + 3/2 s (s-1)(s-2) r (1 + r) phi_{k,0}^2 + 3/2 s (s-1)(s-2) r^2 phi_{2k,0}
          + 3 s (s-1)(s-2) r phi_{k,0} phi_{k,1} + s (s-1)(s-2)(s-3) r^2 phi_{k,0}^2

    and the variance is ``phi_{2k,0} sigma2 + (s-1) / (s d) (phi_{2k,0} - phi_{k,0}^2) ||w_hat||^2``
    (the initialisation's spread plus the spread between the parts' solutions)."""
    check_model_args(n=n, d=d, p=p, s=s, k=k, rho=rho, eta=eta, sigma2=sigma2, rho0=rho0, w_hat_norm=w_hat_norm)
    r = n / s / d
    f = {(i, j): phi(i, j, eta, rho, r) for i, j in ((2 * k, 2), (2 * k, 1), (2 * k, 0), (k, 2), (k, 1), (k, 0))}
    k2 = 2 * k
    pairs = s * (s - 1)
    triples = pairs * (s - 2)
    quads = triples * (s - 3)
    q = (
        s * f[k2, 2]
        + 2 * pairs * r * f[k2, 1]
        + 2 * pairs * f[k, 2] * f[k, 0]
        + pairs * r * (1 + r) * f[k2, 0]
        + 2 * pairs * f[k, 1] * f[k, 1]
        + 3 / 2 * triples * r * (1 + r) * f[k, 0] * f[k, 0]
        + 3 / 2 * triples * r * r * f[k2, 0]
        + 3 * triples * r * f[k, 0] * f[k, 1]
        + quads * r * r * f[k, 0] * f[k, 0]
    )
    upper = rho0**2 / 2 * (math.sqrt(n / d) + 1) ** 2 + rho0 * math.sqrt(q) * w_hat_norm / s
    variance = f[k2, 0] * sigma2 + (s - 1) / s / d * (f[k2, 0] - f[k, 0] * f[k, 0]) * w_hat_norm * w_hat_norm
    return Bounds(sharpness_upper=upper, sharpness_lower=None, variance=variance)


__all__ = ["Bounds", "check_model_args", "narayana", "phi", "phi_exact", "sam_bounds", "sharpbalance_bounds"]
