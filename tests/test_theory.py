"""sbfast.theory: the bounds against a plain summation written from the math, the batched
simulation against a plain step-loop twin fed the same draws, the closed-form SAM power against
explicit steps, and a CI-sized ``sbfast theory --quick`` whose numbers are checked."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sbfast.cli import main
from sbfast.theory import bounds as B
from sbfast.theory import sam_bounds, sharpbalance_bounds, simulate
from sbfast.theory import simulation as S
from tests.conftest import DEVICES

# ---------------------------------------------------------------------------------------------
# bounds


def plain_phi(i: int, j: int, eta: float, rho: float, r: float) -> float:
    """phi(i, j) by direct summation, exactly (fractions of the float inputs), over the
    multinomial terms (k1, k2, k3) with k1 + k2 + k3 = i, each against the Marchenko-Pastur
    moment mu_m = sum_l N(m, l) r^l of order m = k2 + 2 k3 + j (mu_0 = 1); one rounding at the end.
    (Float64 summation of the same terms loses up to ~1e-11 to cancellation at rho r^2 eta ~ 1.)"""
    eta, rho, r = Fraction(eta), Fraction(rho), Fraction(r)
    total = Fraction(0)
    for k2 in range(i + 1):
        for k3 in range(i + 1 - k2):
            k1 = i - k2 - k3
            m = k2 + 2 * k3 + j
            mult = math.factorial(i) // (math.factorial(k1) * math.factorial(k2) * math.factorial(k3))
            moment = (
                1
                if m == 0
                else sum(Fraction(math.comb(m - 1, q - 1) * math.comb(m, q - 1), q) * r**q for q in range(1, m + 1))
            )
            total += mult * (-eta) ** (k2 + k3) * rho**k3 * moment
    return float(abs(total))


def plain_sam(n, d, k, rho, eta, sigma2, rho0, wn):
    r = n / d
    a = plain_phi(2 * k, 2, eta, rho, r)
    b = plain_phi(4 * k, 4, eta, rho, r)
    up = rho0**2 / 2 * (math.sqrt(r) + 1) ** 2 + rho0 * math.sqrt(a) * wn
    lo = rho0**2 / 2 * (math.sqrt(r) - 1) ** 2 + rho0 * math.sqrt(a) * wn - rho0 * (b - a * a) / (2 * wn * a**1.5)
    return up, lo, plain_phi(2 * k, 0, eta, rho, r) * sigma2


def plain_sharpbalance(n, d, s, k, rho, eta, sigma2, rho0, wn):
    r = n / s / d
    f = {(i, j): plain_phi(i, j, eta, rho, r) for i in (k, 2 * k) for j in (0, 1, 2)}
    K = 2 * k
    q = 0.0
    q += s * f[K, 2]
    q += 2 * s * (s - 1) * (r * f[K, 1] + f[k, 2] * f[k, 0] + f[k, 1] ** 2)
    q += s * (s - 1) * r * (1 + r) * f[K, 0]
    q += 1.5 * s * (s - 1) * (s - 2) * (r * (1 + r) * f[k, 0] ** 2 + r * r * f[K, 0])
    q += 3 * s * (s - 1) * (s - 2) * r * f[k, 0] * f[k, 1]
    q += s * (s - 1) * (s - 2) * (s - 3) * r * r * f[k, 0] ** 2
    up = rho0**2 / 2 * (math.sqrt(n / d) + 1) ** 2 + rho0 * math.sqrt(q) * wn / s
    var = f[K, 0] * sigma2 + (s - 1) / (s * d) * (f[K, 0] - f[k, 0] ** 2) * wn**2
    return up, var


def test_narayana_numbers():
    assert [B.narayana(4, q) for q in range(1, 5)] == [1, 6, 6, 1]
    assert [B.narayana(5, q) for q in range(1, 6)] == [1, 10, 20, 10, 1]
    for m in range(1, 12):  # the row sums are the Catalan numbers
        assert sum(B.narayana(m, q) for q in range(1, m + 1)) == math.comb(2 * m, m) // (m + 1)
    with pytest.raises(ValueError, match="1 <= l <= m"):
        B.narayana(3, 0)


@pytest.mark.parametrize("i,j", [(0, 0), (0, 2), (1, 1), (3, 0), (6, 2), (12, 4), (10, 1)])
@pytest.mark.parametrize("rho,r", [(0.5, 20.0), (0.24, 20.0), (1.5, 2.0), (0.01, 2.0), (0.0, 7.0)])
def test_phi_equals_plain_summation(i, j, rho, r):
    exact = B.phi(i, j, 0.01, rho, r)
    plain = plain_phi(i, j, 0.01, rho, r)
    assert exact == pytest.approx(plain, rel=1e-15, abs=1e-300)


def test_phi_is_the_limit_of_the_random_gram_trace():
    """phi(i, j) ~ tr(M^i G^j) / d for one large draw of G = A^T A (A: n x d, N(0, 1/d))."""
    g = torch.Generator().manual_seed(0)
    n, d, eta, rho = 1200, 240, 0.01, 0.5
    A = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    G = A.T @ A
    M = torch.eye(d, dtype=torch.float64) - eta * G - eta * rho * G @ G
    for i, j in [(3, 0), (6, 0), (6, 1), (6, 2)]:
        trace = torch.trace(torch.linalg.matrix_power(M, i) @ torch.linalg.matrix_power(G, j)).item() / d
        assert abs(trace) == pytest.approx(B.phi(i, j, eta, rho, n / d), rel=0.03)


CASES = [
    (3000, 150, 3, 0.5),
    (3000, 150, 3, 0.255),
    (3000, 150, 5, 1.0),
    (600, 30, 1, 0.3),
    (129, 7, 4, 0.2),
    (7, 1, 0, 0.9),
]


@pytest.mark.parametrize("n,d,k,rho", CASES)
def test_sam_bounds_equal_plain_formulas(n, d, k, rho):
    b = sam_bounds(n, d, k, rho, 0.01, 0.1, 0.01, 3.87)
    up, lo, var = plain_sam(n, d, k, rho, 0.01, 0.1, 0.01, 3.87)
    assert b.sharpness_upper == pytest.approx(up, rel=1e-13)
    assert b.sharpness_lower == pytest.approx(lo, rel=1e-12, abs=1e-14)  # its terms partly cancel
    assert b.variance == pytest.approx(var, rel=1e-13)
    assert b.sharpness_lower <= b.sharpness_upper


@pytest.mark.parametrize("n,d,k,rho,s", [(*case, s) for case in CASES for s in (1, 2, 3, 10) if s <= case[0]])
def test_sharpbalance_bounds_equal_plain_formulas(n, d, k, rho, s):
    b = sharpbalance_bounds(n, d, 1000, s, k, rho, 0.01, 0.1, 0.01, 3.87)
    up, var = plain_sharpbalance(n, d, s, k, rho, 0.01, 0.1, 0.01, 3.87)
    assert b.sharpness_lower is None
    assert b.sharpness_upper == pytest.approx(up, rel=1e-13)
    assert b.variance == pytest.approx(var, rel=1e-13)


def test_sharpbalance_with_one_part_has_no_split_variance():
    """s = 1: the variance is SAM's (no spread between parts)."""
    one = sharpbalance_bounds(3000, 150, 1000, 1, 3, 0.3, 0.01, 0.1, 0.01, 3.87)
    assert one.variance == pytest.approx(sam_bounds(3000, 150, 3, 0.3, 0.01, 0.1, 0.01, 3.87).variance, rel=1e-14)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n=0), ValueError, "n must be >= 1"),
        (dict(k=1.5), TypeError, "k must be an integer"),
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(rho=-0.1), ValueError, "rho must be finite and >= 0"),
        (dict(eta=0.0), ValueError, "eta must be finite and > 0"),
        (dict(rho0=float("nan")), ValueError, "rho0 must be finite"),
        (dict(w_hat_norm="1"), TypeError, "w_hat_norm must be a real number"),
        (dict(sigma2=True), TypeError, "sigma2 must be a real number"),
    ],
)
def test_bounds_bad_input(kwargs, error, match):
    args = dict(n=3000, d=150, k=3, rho=0.5, eta=0.01, sigma2=0.1, rho0=0.01, w_hat_norm=1.0) | kwargs
    with pytest.raises(error, match=match):
        sam_bounds(**args)
    with pytest.raises(error, match=match):
        sharpbalance_bounds(p=1000, s=10, **args)


def test_sharpbalance_bounds_reject_more_parts_than_rows():
    with pytest.raises(ValueError, match="s must be <= n"):
        sharpbalance_bounds(5, 2, 3, 6, 1, 0.5, 0.01, 0.1, 0.01, 1.0)


# ---------------------------------------------------------------------------------------------
# simulation


def test_part_sizes_are_numpy_array_split():
    for n, s in [(7, 3), (3000, 10), (9, 9), (1, 1), (129, 10)]:
        assert S.part_sizes(n, s) == [len(x) for x in np.array_split(np.arange(n), s)]


def test_part_grams_equal_explicit_parts():
    A = torch.randn(2, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grams = S.part_grams(A, 4)
    rows = np.array_split(np.arange(11), 4)
    for b in range(2):
        for part, idx in enumerate(rows):
            Ap = A[b, torch.as_tensor(idx)]
            torch.testing.assert_close(grams[b, part], Ap.T @ Ap, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [0, 1, 5, 14])
@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (129, 7)])
def test_closed_form_power_equals_explicit_sam_steps(k, n, d):
    g = torch.Generator().manual_seed(k + n)
    A = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    w_hat = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = A @ w_hat
    rho, eta = 0.4, 0.01
    power = S.sam_step_power((A.T @ A).unsqueeze(0), k, rho, eta)[0]
    closed = w_hat + power @ (w - w_hat)
    for _ in range(k):  # w_adv = w + rho grad(w); w -= eta grad(w_adv), grad(v) = A^T (A v - y)
        w_adv = w + rho * (A.T @ (A @ w - y))
        w = w - eta * (A.T @ (A @ w_adv - y))
    torch.testing.assert_close(closed, w, rtol=1e-12, atol=1e-12)


def plain_point(method, draws, w_hat, *, s, k, rho, eta, sigma2, rho0, steps=50, step_size=0.01, tol=1e-6):
    """The simulated point with Python loops: per data draw, per initialisation, per part, k
    explicit SAM steps; then the ascent one draw at a time with the first-step-within-tol stop."""
    data_draws, n, d = draws.A.shape
    p = draws.T.shape[1]
    parts = np.array_split(np.arange(n), s if method == "sharpbalance" else 1)
    sharps, variances = [], []
    for b in range(data_draws):
        A = draws.A[b].double() / math.sqrt(d)
        T = draws.T[b].double() / math.sqrt(d)
        y = A @ w_hat
        members, errors = [], []
        for i in range(draws.w0.shape[1]):
            w0 = draws.w0[b, i].double() * math.sqrt(sigma2)
            for idx in parts:
                Ap, yp = A[torch.as_tensor(idx)], y[torch.as_tensor(idx)]
                w = w0.clone()
                for _ in range(k):
                    w_adv = w + rho * (Ap.T @ (Ap @ w - yp))
                    w = w - eta * (Ap.T @ (Ap @ w_adv - yp))
                members.append(w)
                errors.append(float((T @ (w - w_hat)).square().sum()))
        e_bar = torch.stack(members).mean(0) - w_hat
        bias = float((T @ e_bar).square().sum())
        variances.append((sum(errors) / len(errors) - bias) / p)
        G = A.T @ A
        mean_power = torch.zeros(d, d, dtype=A.dtype)
        for idx in parts:
            Ap = A[torch.as_tensor(idx)]
            Gp = Ap.T @ Ap
            step = torch.eye(d, dtype=A.dtype) - eta * Gp - eta * rho * Gp @ Gp
            mean_power += torch.linalg.matrix_power(step, k) / len(parts)
        target = G @ mean_power @ w_hat
        eps0 = draws.eps0[b].double()
        eps = eps0 / (eps0.norm() * 2) * rho0
        for _ in range(steps):
            new = eps + step_size * (G @ eps - target)
            new = new * rho0 / max(float(new.norm()), rho0)
            if float((new - eps).norm()) <= tol:
                break
            eps = new
        moved = e_bar + new
        sharps.append(float(moved @ G @ moved) / 2 - float(e_bar @ G @ e_bar) / 2)
    return sharps, variances


@pytest.mark.parametrize("method", ["sam", "sharpbalance"])
@pytest.mark.parametrize("n,d,p,s,k", [(7, 3, 5, 3, 4), (129, 7, 11, 10, 2), (9, 2, 1, 9, 0), (2, 1, 1, 2, 1)])
def test_batched_simulation_equals_step_loop_twin(method, n, d, p, s, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    w_hat = S.draw_teacher(d, 0.1, generator=g)
    draws = S.draw(n, d, p, 3, 4, generator=g)
    kw = dict(s=s, k=k, rho=0.7, eta=0.05, sigma2=0.1, rho0=0.05)
    sim = S.simulate_draws(method, draws, w_hat, **kw)
    sharps, variances = plain_point(method, draws, w_hat, **kw)
    torch.testing.assert_close(
        sim.per_draw_sharpness, torch.tensor(sharps, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        sim.per_draw_variance, torch.tensor(variances, dtype=torch.float64), rtol=1e-10, atol=1e-12
    )
    assert sim.sharpness == pytest.approx(float(np.mean(sharps)), rel=1e-10, abs=1e-14)
    assert sim.variance_se == pytest.approx(float(np.std(variances, ddof=1) / math.sqrt(3)), rel=1e-8, abs=1e-14)


def test_ascent_finds_the_top_eigenvector_on_the_sphere():
    """With no linear term the ascent maximises eps^T G eps / 2 on the ball: +-rho0 times the top
    eigenvector of G (here diagonal), for every draw of the batch, and never leaves the ball."""
    gram = torch.diag(torch.tensor([1.0, 5.0, 0.5], dtype=torch.float64)).expand(6, 3, 3)
    eps0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = S.projected_ascent(gram, torch.zeros(6, 3, dtype=torch.float64), eps0, 0.1, 3000, 0.01, 1e-13)
    assert (eps.norm(dim=-1) <= 0.1 * (1 + 1e-12)).all()
    torch.testing.assert_close(eps[:, 1].abs(), torch.full((6,), 0.1, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(eps[:, [0, 2]], torch.zeros(6, 2, dtype=torch.float64), rtol=0, atol=1e-9)


def test_simulate_is_reproducible_from_its_generator():
    kw = dict(n=60, d=6, p=20, s=3, k=2, data_draws=3, init_draws=5)
    a = simulate("sharpbalance", generator=torch.Generator().manual_seed(5), **kw)
    b = simulate("sharpbalance", generator=torch.Generator().manual_seed(5), **kw)
    assert a.sharpness == b.sharpness and a.variance == b.variance
    assert a.sharpness_se > 0 and a.variance_se > 0


def test_sharpbalance_variance_above_sam_at_equal_sharpness():
    """The paper's trade-off, simulated: SharpBalance at rho 0.5 is no sharper than SAM at rho
    0.255 (k 3, the top of the notebook's SAM sweep), and its variance (diversity) is higher by
    more than two standard errors of the difference."""
    g = torch.Generator().manual_seed(0)
    w_hat = S.draw_teacher(30, 0.1, generator=g)
    kw = dict(n=600, d=30, p=200, s=10, k=3, data_draws=10, init_draws=20, w_hat=w_hat, generator=g)
    sam = simulate("sam", rho=0.255, **kw)
    sb = simulate("sharpbalance", rho=0.5, **kw)
    assert sb.sharpness <= sam.sharpness + 2 * math.hypot(sb.sharpness_se, sam.sharpness_se)
    assert sb.variance - sam.variance > 2 * math.hypot(sb.variance_se, sam.variance_se)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="adam"), ValueError, "method must be one of"),
        (dict(data_draws=1), ValueError, "data_draws must be >= 2"),
        (dict(init_draws=0), ValueError, "init_draws must be >= 1"),
        (dict(k=2.0), TypeError, "k must be an integer"),
        (dict(w_hat=torch.zeros(3)), ValueError, r"w_hat must have shape \(6,\)"),
        (dict(method="sharpbalance", s=61), ValueError, "s must be <= n"),
        (dict(rho0=0), ValueError, "rho0 must be finite and > 0"),
    ],
)
def test_simulate_bad_input(kwargs, error, match):
    args = dict(method="sam", n=60, d=6, p=20, s=3, data_draws=2, init_draws=2) | kwargs
    method = args.pop("method")
    with pytest.raises(error, match=match):
        simulate(method, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_simulation_on_device_equals_cpu(device):
    g = torch.Generator().manual_seed(2)
    w_hat = S.draw_teacher(9, 0.1, generator=g)
    draws = S.draw(50, 9, 13, 3, 6, generator=g)
    on = S.Draws(*(t.to(device) for t in (draws.A, draws.T, draws.w0, draws.eps0)))
    kw = dict(s=4, k=3, rho=0.5, eta=0.01, sigma2=0.1, rho0=0.01)
    cpu = S.simulate_draws("sharpbalance", draws, w_hat, **kw)
    dev = S.simulate_draws("sharpbalance", on, w_hat.to(device), **kw)
    assert dev.sharpness == pytest.approx(cpu.sharpness, rel=1e-9)
    assert dev.variance == pytest.approx(cpu.variance, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    assert main(["theory", "--figure", "all", "--quick", "--output", str(out), "--no-progress"]) == 0
    return out, {f: json.loads((out / f"{f}.json").read_text()) for f in S_FIGURES}


S_FIGURES = ("sam-vs-sharpbalance", "sam-bounds", "sharpbalance-rho", "vary-k")


def test_quick_run_writes_a_figure_and_strict_json_each(quick_run):
    out, data = quick_run
    import matplotlib.image

    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{ext}" for n in S_FIGURES for ext in ("json", "png"))

    for name in S_FIGURES:
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something is drawn
        assert data[name]["figure"] == name and len(data[name]["points"]) == 5 * (2 if name == S_FIGURES[0] else 1)


def test_quick_run_bounds_are_the_public_functions(quick_run):
    _, data = quick_run
    for name, figure in data.items():
        st, wn = figure["settings"], figure["w_hat_norm"]
        for p in figure["points"]:
            common = dict(k=p["k"], rho=p["rho"], eta=st["eta"], sigma2=st["sigma2"], rho0=st["rho0"], w_hat_norm=wn)
            if p["method"] == "sam":
                b = sam_bounds(st["n"], st["d"], **common)
            else:
                b = sharpbalance_bounds(st["n"], st["d"], st["p"], st["s"], **common)
            assert (p["sharpness_upper"], p["variance_bound"]) == (b.sharpness_upper, b.variance), name


def test_quick_run_sharpbalance_has_more_diversity_at_equal_sharpness(quick_run):
    """The theory figure: at every SharpBalance point inside SAM's range of sharpness, SAM's
    variance there (interpolated along its curve) is lower."""
    _, data = quick_run
    pts = data["sam-vs-sharpbalance"]["points"]
    sam = sorted((p["sharpness_upper"], p["variance_bound"]) for p in pts if p["method"] == "sam")
    sb = [(p["sharpness_upper"], p["variance_bound"]) for p in pts if p["method"] == "sharpbalance"]
    inside = [(x, y) for x, y in sb if sam[0][0] <= x <= sam[-1][0]]
    assert len(inside) >= 2
    for x, y in inside:
        assert y > 1.2 * float(np.interp(x, *zip(*sam, strict=True)))


def test_quick_run_simulation_meets_the_theorem(quick_run):
    """The simulated sharpness is under the theorem's upper bound and (SAM) over its lower bound,
    and the variance is the theorem's: at every point within 4 standard errors (4 data draws give
    a t-distributed error with 3 degrees of freedom: one-sided 4 s.e. has a 1.4% tail) and over
    each sweep's points together within 2.5 s.e. of the sum. The variance also within 10%, the
    finite-size gap at d = 30 (the theorem's figures are limits in n and d: at the notebook's
    d = 150 the simulated SharpBalance variance sits about 1% under the limit, at d = 30 about
    5-8%). Along each sweep the simulation moves the way the theorem does."""
    _, data = quick_run
    for name in ("sharpbalance-rho", "vary-k", "sam-bounds"):
        points = data[name]["points"]
        above_upper, below_lower, var_gap, se2, var_se2 = 0.0, 0.0, 0.0, 0.0, 0.0
        for p in points:
            x, se = p["simulated_sharpness"], p["simulated_sharpness_se"]
            assert x <= p["sharpness_upper"] + 4 * se, (name, p)
            above_upper += x - p["sharpness_upper"]
            if p["sharpness_lower"] is not None:
                assert x >= p["sharpness_lower"] - 4 * se, (name, p)
                below_lower += p["sharpness_lower"] - x
            gap = p["simulated_variance"] - p["variance_bound"]
            assert abs(gap) <= 4 * p["simulated_variance_se"] + 0.10 * p["variance_bound"], (name, p)
            var_gap += abs(gap) - 0.10 * p["variance_bound"]
            se2 += se**2
            var_se2 += p["simulated_variance_se"] ** 2
        assert above_upper <= 2.5 * math.sqrt(se2) and below_lower <= 2.5 * math.sqrt(se2), name
        assert var_gap <= 2.5 * math.sqrt(var_se2), name
        first, last = points[0], points[-1]
        for sim, bound in (("simulated_sharpness", "sharpness_upper"), ("simulated_variance", "variance_bound")):
            se = math.hypot(first[f"{sim}_se"], last[f"{sim}_se"])
            theory_moves = last[bound] - first[bound]
            assert abs(theory_moves) > 0
            moved = (last[sim] - first[sim]) * math.copysign(1, theory_moves)
            # the theorem's direction: by more than 2 s.e. where it moves a lot (SAM's rho, k),
            # and not against it by more than 2 s.e. along SharpBalance's rho (a 12% move, about
            # 3 s.e. of 4 x 20 draws)
            assert moved > (-2 * se if name == "sharpbalance-rho" else 2 * se), (name, sim)
    # the notebook's reading: more SAM steps (k) at fixed rho is flatter and less diverse
    vk = data["vary-k"]["points"]
    assert vk[-1]["sharpness_upper"] < vk[0]["sharpness_upper"] and vk[-1]["variance_bound"] < vk[0]["variance_bound"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--figure", "nope"], "invalid choice: 'nope'"),
        (["--figure", "all", "--draws", "1"], "--draws 1: expected an integer >= 2"),
        (["--figure", "all", "--init-draws", "0"], "--init-draws 0: expected an integer >= 1"),
        (["--figure", "all", "--device", "tpu"], "--device 'tpu'"),
        (["--figure", "all", "--draws", "x"], "invalid int value: 'x'"),
        ([], "--figure"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2_before_work(argv, match, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["theory", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not out.exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["theory", "--figure", "sam-vs-sharpbalance", "--quick", "--output", str(f)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


def test_sweeps_are_the_notebook_grids():
    from sbfast.theory.figures import Settings, sweeps

    grids = {
        "sam-vs-sharpbalance": [
            ("sam", np.linspace(0.255, 0.24, 50), 3),
            ("sharpbalance", np.linspace(1.5, 1e-2, 50), 3),
        ],
        "sam-bounds": [("sam", np.linspace(0.5, 0.3, 20), 3)],
        "sharpbalance-rho": [("sharpbalance", np.linspace(1.0, 0.4, 20), 5)],
        "vary-k": [("sharpbalance", np.arange(1, 15), 0.4)],
    }
    for figure, want in grids.items():
        got = sweeps(figure)
        assert [(sw.method, sw.fixed) for sw in got] == [(m, f) for m, _, f in want]
        for sw, (_, values, _) in zip(got, want, strict=True):
            assert list(sw.values) == [float(v) for v in values]  # bit for bit
    s = Settings()
    assert (s.n, s.d, s.p, s.s, s.sigma2, s.eta, s.rho0, s.data_draws, s.init_draws) == (
        3000,
        150,
        1000,
        10,
        0.1,
        0.01,
        0.01,
        10,
        100,
    )
    with pytest.raises(ValueError, match="figure must be one of"):
        sweeps("sam")
