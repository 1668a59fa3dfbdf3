"""theory: one simulated point of the release notebook's theory figures at its sizes and draw
counts (n 3000, d 150, p 1000, 10 data draws x 100 initialisations), SAM (k 3, as in its
"SAM simulated vs bounds" cell) and SharpBalance (s 10, k 5, as in its "varying rho" cell).

reference: the notebook's algorithm as plain loops, written here from the model (NumPy float64,
as the notebook): per data draw, per initialisation, per part, k explicit full-batch SAM steps
of matrix-vector products; the error of every member; the mean predictor; the part operators'
matrix powers and the projected gradient ascent (50 steps of 0.01, tolerance 1e-6) per data
draw; each w_0 drawn with ``multivariate_normal(0, sigma2 I)`` as the notebook draws it (an SVD
of the d x d covariance per call, a third of the reference's time at k 3). sbfast: ``sbfast.theory.simulate`` (every draw batched; k steps as one
matrix power per part). ``samples`` counts trained members per call (data draws x inits x parts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.harness import BenchCase, pytest_params, run_pytest_benchmark
from sbfast.theory import simulate

N, D, P, S = 3000, 150, 1000, 10
DATA_DRAWS, INIT_DRAWS = 10, 100
SIGMA2, ETA, RHO0 = 0.1, 0.01, 0.01
POINTS = [("sam", 0.4, 3), ("sharpbalance", 0.7, 5)]


def _loop_point(method: str, rho: float, k: int, w_hat: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(sharpness, variance) of one point by loops, as described in the module docstring."""
    parts = np.array_split(np.arange(N), S if method == "sharpbalance" else 1)
    sharps, variances = [], []
    for _ in range(DATA_DRAWS):
        A = rng.standard_normal((N, D)) / math.sqrt(D)
        T = rng.standard_normal((P, D)) / math.sqrt(D)
        G, TTT, y = A.T @ A, T.T @ T, A @ w_hat
        members, errors = [], []
        for _ in range(INIT_DRAWS):
            w0 = rng.multivariate_normal(np.zeros(D), SIGMA2 * np.eye(D))
            for idx in parts:
                Ap, yp = A[idx], y[idx]
                w = w0.copy()
                for _ in range(k):
                    w_adv = w + rho * (Ap.T @ (Ap @ w - yp))
                    w -= ETA * (Ap.T @ (Ap @ w_adv - yp))
                members.append(w)
                e = w - w_hat
                errors.append(e @ TTT @ e)
        e_bar = np.mean(members, axis=0) - w_hat
        variances.append((np.mean(errors) - e_bar @ TTT @ e_bar) / P)
        mean_power = np.zeros((D, D))
        for idx in parts:
            Gp = A[idx].T @ A[idx]
            mean_power += np.linalg.matrix_power(np.eye(D) - ETA * Gp - ETA * rho * Gp @ Gp, k) / len(parts)
        target = G @ mean_power @ w_hat
        eps = rng.standard_normal(D)
        eps *= RHO0 / (2 * np.linalg.norm(eps))
        for _ in range(50):
            new = eps + 0.01 * (G @ eps - target)
            new *= RHO0 / max(np.linalg.norm(new), RHO0)
            if np.linalg.norm(new - eps) <= 1e-6:
                break
            eps = new
        moved = e_bar + new
        sharps.append((moved @ G @ moved - e_bar @ G @ e_bar) / 2)
    return float(np.mean(sharps)), float(np.mean(variances))


def cases(device: torch.device) -> list[BenchCase]:
    rng = np.random.default_rng(0)
    w_hat_np = rng.standard_normal(D) * math.sqrt(SIGMA2)
    w_hat = torch.as_tensor(w_hat_np, device=device)
    out = []
    for method, rho, k in POINTS:
        generator = torch.Generator(device=device).manual_seed(0)
        parts = S if method == "sharpbalance" else 1
        out.append(
            BenchCase(
                op="theory simulated point",
                shape=f"{method} n {N} d {D} p {P} k {k} rho {rho}, {DATA_DRAWS}x{INIT_DRAWS} draws",
                samples=DATA_DRAWS * INIT_DRAWS * parts,
                reference=lambda m=method, r=rho, k=k: _loop_point(m, r, k, w_hat_np, rng),
                faces={
                    "batched": lambda m=method, r=rho, k=k, g=generator: simulate(
                        m, rho=r, k=k, w_hat=w_hat, generator=g, device=device
                    )
                },
                notes="reference: NumPy loops of the notebook's algorithm (CPU); samples = members trained",
            )
        )
    return out


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case,face", pytest_params(cases, _DEVICE), ids=lambda v: getattr(v, "shape", v))
def bench_theory(benchmark, case, face):
    run_pytest_benchmark(benchmark, case, face)
