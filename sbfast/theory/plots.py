"""Drawing the theory figures with matplotlib (the Agg backend: no display needed).

Each figure is sharpness (x) against diversity, the variance term (y), as in the release's
notebook: the SAM-vs-SharpBalance comparison on linear axes with every third point of the
bounds (every point of a shortened sweep); the three simulated figures on log-log axes with the simulated points (error bars: one
standard error over the data draws) and the theorem's bound(s) as dashed lines at the same
swept values. A bound that is not positive cannot be drawn on a log axis; such points are left
out of the line and counted in its legend entry.
"""

from __future__ import annotations

from pathlib import Path

from sbfast.theory.figures import FigureData, Point

SAM_COLOUR = "#1f77b4"
SHARPBALANCE_COLOUR = "#db5c49"
LOWER_COLOUR = "green"
UPPER_COLOUR = "orange"
LABELS = {"sam": "SAM", "sharpbalance": "SharpBalance"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the theory figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bound_line(ax, points: list[Point], attr: str, colour: str, label: str, log: bool) -> None:
    xy = [(getattr(p, attr), p.variance_bound) for p in points]
    shown = [(x, y) for x, y in xy if x is not None and (not log or (x > 0 and y > 0))]
    dropped = len(xy) - len(shown)
    if dropped:
        label += f" ({dropped} of {len(xy)} points <= 0, not drawn)"
    xs, ys = zip(*shown, strict=True) if shown else ((), ())
    # drawn even when empty, so that the legend says the bound was left out and why
    ax.plot(xs, ys, "--", linewidth=2, color=colour, label=label)


def _title(data: FigureData) -> str:
    s = data.settings
    points = [p for p in data.points if p.simulated_sharpness is not None]
    where = f"n={s.n}, d={s.d}, p={s.p}, s={s.s}, eta={s.eta:g}, rho0={s.rho0:g}"
    if points:
        where += f", {s.data_draws}x{s.init_draws} draws"
    return where


def plot_figure(data: FigureData, path: str | Path, dpi: int = 110) -> Path:
    """Draw ``data`` (from :func:`sbfast.theory.figures.compute_figure`) into the PNG ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.2))
    try:
        if data.figure == "sam-vs-sharpbalance":
            for method, marker, colour in (("sam", "o", SAM_COLOUR), ("sharpbalance", "v", SHARPBALANCE_COLOUR)):
                pts = [p for p in data.points if p.method == method]
                pts = pts[::3] if len(pts) >= 30 else pts  # the notebook draws every third of its 50
                ax.scatter(
                    [p.sharpness_upper for p in pts],
                    [p.variance_bound for p in pts],
                    marker=marker,
                    s=110,
                    alpha=0.6,
                    edgecolors="k",
                    color=colour,
                    label=f"{LABELS[method]} (theory)",
                )
            ax.set_xlabel("Sharpness (upper bound)", fontsize=14)
            ax.set_ylabel("Diversity (variance)", fontsize=14)
            ax.set_title("SAM vs SharpBalance: the theorem's trade-off\n" + _title(data), fontsize=10)
            ax.legend(fontsize=12, loc="lower right")
        else:
            method = data.points[0].method if data.points else "sam"
            swept = "k" if data.figure == "vary-k" else "rho"
            sims = [p for p in data.points if p.simulated_sharpness is not None]
            ax.errorbar(
                [p.simulated_sharpness for p in sims],
                [p.simulated_variance for p in sims],
                xerr=[p.simulated_sharpness_se for p in sims],
                yerr=[p.simulated_variance_se for p in sims],
                fmt="o",
                markersize=7,
                alpha=0.7,
                markeredgecolor="k",
                color=SAM_COLOUR if method == "sam" else SHARPBALANCE_COLOUR,
                ecolor="grey",
                label=f"{LABELS[method]}, simulated (± 1 s.e.)",
            )
            if method == "sam":
                _bound_line(ax, data.points, "sharpness_lower", LOWER_COLOUR, "Lower bound of sharpness (x)", True)
            _bound_line(ax, data.points, "sharpness_upper", UPPER_COLOUR, "Upper bound of sharpness (x)", True)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("Sharpness", fontsize=14)
            ax.set_ylabel("Diversity (variance)", fontsize=14)
            span = {"rho": "rho", "k": "k (SAM steps)"}[swept]
            values = [p.rho if swept == "rho" else p.k for p in data.points]
            fixed = f"k={data.points[0].k}" if swept == "rho" else f"rho={data.points[0].rho:g}"
            title = f"{LABELS[method]}: simulated vs bounds, {span} {min(values):g} to {max(values):g}, {fixed}"
            ax.set_title(title + "\n" + _title(data), fontsize=10)
            ax.legend(fontsize=10, loc="best")
        ax.grid(True, linestyle="--", which="major", color="grey", alpha=0.25)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


__all__ = ["plot_figure"]
