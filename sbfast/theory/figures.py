"""The notebook's four theory figures as sweeps: which method, which parameter is swept over
which values, and the points (bounds, and simulation where the figure has one) of each.

=====================  ==============================================  ================
figure                 sweep (notebook defaults)                       simulated
=====================  ==============================================  ================
sam-vs-sharpbalance    SAM rho in linspace(0.255, 0.24, 50), k 3;      no (bounds only)
                       SharpBalance rho in linspace(1.5, 0.01, 50), k 3
sam-bounds             SAM rho in linspace(0.5, 0.3, 20), k 3          yes
sharpbalance-rho       SharpBalance rho in linspace(1.0, 0.4, 20), k 5 yes
vary-k                 SharpBalance k in 1..14, rho 0.4                yes
=====================  ==============================================  ================

``quick_settings`` shrinks the model (n 600, d 30, p 200, the notebook's ratios n/d = 20 and
s = 10, so the same rho ranges sit in the same regime), the draws and the sweeps, for a run of
seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from sbfast.theory.bounds import check_model_args, sam_bounds, sharpbalance_bounds
from sbfast.theory.simulation import draw_teacher, simulate

FIGURES = ("sam-vs-sharpbalance", "sam-bounds", "sharpbalance-rho", "vary-k")


@dataclass(frozen=True)
class Settings:
    """The model and draw counts shared by every figure (the notebook's defaults).

    ``data_draws`` / ``init_draws`` are the notebook's k_0 / k_1 of its simulated cells;
    ``points`` caps each sweep to that many evenly spaced values (None: the notebook's all)."""

    n: int = 3000
    d: int = 150
    p: int = 1000
    s: int = 10
    sigma2: float = 0.1
    eta: float = 0.01
    rho0: float = 0.01
    data_draws: int = 10
    init_draws: int = 100
    seed: int = 0
    points: int | None = None
    device: str = "cpu"

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        check_model_args(n=self.n, d=self.d, p=self.p, s=self.s, sigma2=self.sigma2, eta=self.eta, rho0=self.rho0)
        for name in ("data_draws", "init_draws", "points"):
            value = getattr(self, name)
            if value is None and name == "points":
                continue
            low = 2 if name in ("data_draws", "points") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def quick_settings(**changes: object) -> Settings:
    """A run of seconds: n 600, d 30, p 200 (the notebook's n/d and s), 4 data draws of 20
    initialisations, 5 points per sweep."""
    return replace(Settings(n=600, d=30, p=200, data_draws=4, init_draws=20, points=5), **changes)


@dataclass(frozen=True)
class Sweep:
    """One curve of a figure: ``method`` at every value of the swept parameter (``rho`` or
    ``k``), the other one held at ``fixed``."""

    method: str
    swept: str
    values: tuple[float, ...]
    fixed: float
    simulated: bool


def _linspace(start: float, stop: float, num: int) -> tuple[float, ...]:
    # numpy.linspace's values (the notebook's grids), endpoints exact
    if num == 1:
        return (float(start),)
    step = (stop - start) / (num - 1)
    values = [start + i * step for i in range(num)]
    values[-1] = stop
    return tuple(float(v) for v in values)


def sweeps(figure: str) -> list[Sweep]:
    """The curves of ``figure`` (one of FIGURES) at the notebook's values."""
    if figure == "sam-vs-sharpbalance":
        return [
            Sweep("sam", "rho", _linspace(0.255, 0.24, 50), 3, simulated=False),
            Sweep("sharpbalance", "rho", _linspace(1.5, 1e-2, 50), 3, simulated=False),
        ]
    if figure == "sam-bounds":
        return [Sweep("sam", "rho", _linspace(0.5, 0.3, 20), 3, simulated=True)]
    if figure == "sharpbalance-rho":
        return [Sweep("sharpbalance", "rho", _linspace(1.0, 0.4, 20), 5, simulated=True)]
    if figure == "vary-k":
        return [Sweep("sharpbalance", "k", tuple(float(k) for k in range(1, 15)), 0.4, simulated=True)]
    raise ValueError(f"figure must be one of {FIGURES}, got {figure!r}")


def _thin(values: tuple[float, ...], points: int | None) -> tuple[float, ...]:
    if points is None or points >= len(values):
        return values
    picks = sorted({round(i * (len(values) - 1) / (points - 1)) for i in range(points)})
    return tuple(values[i] for i in picks)


@dataclass
class Point:
    """One point of a sweep: the theorem's figures and, where simulated, the simulation's."""

    method: str
    rho: float
    k: int
    sharpness_upper: float
    sharpness_lower: float | None
    variance_bound: float
    simulated_sharpness: float | None = None
    simulated_sharpness_se: float | None = None
    simulated_variance: float | None = None
    simulated_variance_se: float | None = None
    seconds: float = 0.0


@dataclass
class FigureData:
    """A figure's points and what made them (``settings``, the teacher's norm, the seconds)."""

    figure: str
    settings: Settings
    w_hat_norm: float
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "figure": self.figure,
            "settings": asdict(self.settings),
            "w_hat_norm": self.w_hat_norm,
            "seconds": self.seconds,
            "points": [asdict(p) for p in self.points],
        }


Progress = Callable[[Iterable, int, str], Iterator]


def _no_progress(it: Iterable, total: int, desc: str) -> Iterator:
    return iter(it)


def compute_figure(figure: str, settings: Settings, progress: Progress = _no_progress) -> FigureData:
    """Every point of ``figure`` under ``settings``: the bounds at each swept value and, for a
    simulated sweep, :func:`sbfast.theory.simulate` at the same value. One generator seeded
    with ``settings.seed`` draws the teacher w_hat ~ N(0, sigma2 I) first, then each point's
    draws in sweep order; the bounds use that teacher's norm. ``progress(iterable, total,
    description)`` wraps the loop over the points (a progress bar)."""
    settings.check()
    curves = sweeps(figure)
    device = torch.device(settings.device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    w_hat = draw_teacher(settings.d, settings.sigma2, generator=generator, device=device)
    w_hat_norm = float(w_hat.norm())
    data = FigureData(figure, settings, w_hat_norm)
    start = time.perf_counter()
    plan = [(sw, v) for sw in curves for v in _thin(sw.values, settings.points)]
    for sw, value in progress(plan, len(plan), figure):
        t0 = time.perf_counter()
        rho, k = (value, int(sw.fixed)) if sw.swept == "rho" else (sw.fixed, int(value))
        common = dict(k=k, rho=rho, eta=settings.eta, sigma2=settings.sigma2, rho0=settings.rho0)
        if sw.method == "sam":
            b = sam_bounds(settings.n, settings.d, w_hat_norm=w_hat_norm, **common)
        else:
            b = sharpbalance_bounds(settings.n, settings.d, settings.p, settings.s, w_hat_norm=w_hat_norm, **common)
        point = Point(sw.method, rho, k, b.sharpness_upper, b.sharpness_lower, b.variance)
        if sw.simulated:
            sim = simulate(
                sw.method,
                n=settings.n,
                d=settings.d,
                p=settings.p,
                s=settings.s,
                data_draws=settings.data_draws,
                init_draws=settings.init_draws,
                w_hat=w_hat,
                generator=generator,
                device=device,
                **common,
            )
            point.simulated_sharpness, point.simulated_sharpness_se = sim.sharpness, sim.sharpness_se
            point.simulated_variance, point.simulated_variance_se = sim.variance, sim.variance_se
        point.seconds = time.perf_counter() - t0
        data.points.append(point)
    data.seconds = time.perf_counter() - start
    return data


def format_table(data: FigureData) -> str:
    """The points as a text table: one row each, simulated values as mean ± standard error."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.5g}"

    def pm(x: float | None, se: float | None) -> str:
        return "-" if x is None else f"{x:.5g} ± {se:.2g}"

    head = ["method", "rho", "k", "sharp upper", "sharp lower", "var bound", "sim sharpness", "sim variance"]
    rows = [
        [
            p.method,
            f"{p.rho:.4g}",
            str(p.k),
            num(p.sharpness_upper),
            num(p.sharpness_lower),
            num(p.variance_bound),
            pm(p.simulated_sharpness, p.simulated_sharpness_se),
            pm(p.simulated_variance, p.simulated_variance_se),
        ]
        for p in data.points
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [f"{data.figure} (||w_hat|| = {data.w_hat_norm:.4g}, {data.seconds:.1f} s)"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


__all__ = [
    "FIGURES",
    "FigureData",
    "Point",
    "Progress",
    "Settings",
    "Sweep",
    "compute_figure",
    "format_table",
    "quick_settings",
    "sweeps",
]
