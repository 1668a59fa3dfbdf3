"""Figures of runs and comparisons, drawn from plain run records (dicts, as
``results.run_record`` makes them); this module knows no result or trainer type.

* ``plot_comparison``: one panel per family of metrics, each on its own scale: in-distribution
  accuracies; NLL and ECE; DER and EIR; OOD accuracy per severity, absolute and as the gain over
  the first method (de) on the same seed; the members' mean Fisher score. Markers are means over seeds, whiskers one
  sample standard deviation, small dots the seeds.
* ``plot_learning_curves``: test error per epoch on a log scale (accuracies near 1 differ by
  tenths of a percent, which a linear accuracy axis draws as one line), mean over seeds with the
  seeds' range shaded, the scoring epoch T_d + 1 of sharpbalance marked.
* ``plot_sharpness_diversity``: the paper's picture: sharpness (the paper's worst-case sharpness
  when the runs measured it, else the members' mean Fisher score, labelled so) against a
  diversity measure the caller picks (DER, disagreement, KL or CKA), one point per run and each
  method's mean with ± 1 std.
* ``plot_run_records``: the figure of one run (or a few), ``plot.png`` in a run's folder
  (``results.plot_results`` draws it from results).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One colour per method in every figure.
METHOD_COLOURS = {"de": "#1f77b4", "de_sam": "#ff7f0e", "sharpbalance": "#2ca02c"}
_FALLBACK = ["#d62728", "#9467bd", "#8c564b", "#e377c2"]


def method_colour(method: str, methods: Sequence[str]) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    others = [m for m in methods if m not in METHOD_COLOURS]
    return _FALLBACK[others.index(method) % len(_FALLBACK)]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finite(xs: Sequence[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def _mean_std(xs: Sequence[Any]) -> tuple[float | None, float]:
    v = _finite(xs)
    if not v:
        return None, 0.0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _by_method(methods: Sequence[str], runs: Sequence[dict]) -> dict[str, list[dict]]:
    return {m: [r for r in runs if r["method"] == m] for m in methods}


def _dots(
    ax: Any, methods: Sequence[str], runs: Sequence[dict], metrics: Sequence[tuple[str, str]], title: str
) -> None:
    """One group per metric, one marker per method: the mean over seeds with ± 1 std whiskers and
    the seeds as small dots. The axis spans the data (accuracies that differ in the third digit
    would be one flat line on 0..1), which is why these are markers, not bars: a bar's length
    would mean nothing on an axis that does not start at 0. A value that does not exist (DER of
    one member) is written "n/a"."""
    groups = _by_method(methods, runs)
    step = 0.7 / max(1, len(methods))
    lo, hi = math.inf, -math.inf
    for i, m in enumerate(methods):
        c = method_colour(m, methods)
        for k, (key, _) in enumerate(metrics):
            x = k - 0.35 + step * (i + 0.5)
            pts = _finite([r["metrics"].get(key) for r in groups[m]])
            mean, std = _mean_std(pts)
            if mean is None:
                ax.text(x, 0.5, "n/a", transform=ax.get_xaxis_transform(), ha="center", fontsize=7, color=c)
                continue
            if len(pts) > 1:
                ax.scatter([x + step * 0.22] * len(pts), pts, s=9, color=c, alpha=0.55, linewidths=0, zorder=2)
            ax.errorbar(
                [x],
                [mean],
                yerr=[std] if len(pts) > 1 else None,
                color=c,
                marker="o",
                markersize=7,
                capsize=4,
                linewidth=1.5,
                markeredgecolor="black",
                markeredgewidth=0.6,
                zorder=3,
                label=m if k == 0 else None,
            )
            lo = min(lo, mean - std, *pts)
            hi = max(hi, mean + std, *pts)
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    for k in range(1, len(metrics)):
        ax.axvline(k - 0.5, color="grey", linewidth=0.5, alpha=0.5)
    if math.isfinite(lo):
        pad = max((hi - lo) * 0.15, abs(hi) * 0.02, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _ood_panel(ax: Any, methods: Sequence[str], runs: Sequence[dict]) -> None:
    groups = _by_method(methods, runs)
    drawn = False
    for i, m in enumerate(methods):
        c = method_colour(m, methods)
        per_sev: dict[int, list[float]] = {}
        for r in groups[m]:
            per_sev.setdefault(0, []).append(r["metrics"].get("ensemble_acc"))
            for s, acc in (r.get("ood_per_severity") or {}).items():
                per_sev.setdefault(int(s), []).append(acc)
        if len(per_sev) <= 1:
            continue
        xs = sorted(per_sev)
        stats = [_mean_std(per_sev[s]) for s in xs]
        ok = [(x, mu, sd) for x, (mu, sd) in zip(xs, stats, strict=True) if mu is not None]
        shift = (i - (len(methods) - 1) / 2) * 0.06  # keep overlapping whiskers apart
        ax.errorbar(
            [x + shift for x, _, _ in ok],
            [mu for _, mu, _ in ok],
            yerr=[sd for _, _, sd in ok],
            color=c,
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.5,
            label=m,
        )
        drawn = True
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no OOD evaluation\n(no corruptions requested)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_xticks(range(0, 6), ["clean", "1", "2", "3", "4", "5"])
        ax.set_xlabel("corruption severity")
        ax.set_ylabel("ensemble accuracy, mean over corruptions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax.set_title("OOD accuracy per severity (higher is better)", fontsize=10)


def _describe(runs: Sequence[dict], seeds: Sequence[int]) -> str:
    r0 = runs[0] if runs else {}
    n = len(seeds)
    spread = (
        f"{n} seeds: large markers are means, whiskers ± 1 std, small dots single seeds"
        if n > 1
        else "one seed: no spread"
    )
    return f"{r0.get('dataset', '?')}, M = {r0.get('members', '?')}, {spread}"


def _ood_paired_panel(ax: Any, methods: Sequence[str], runs: Sequence[dict]) -> None:
    """Each method's ensemble accuracy minus the baseline's (the first method, de in a full
    comparison) on the same seed, per severity ("clean" = the test set): mean over seeds ± 1
    std. Differences of a few tenths of a percent, invisible on the absolute panel's axis."""
    base = methods[0]
    by_seed = {r["seed"]: r for r in runs if r["method"] == base}

    def acc(r: dict, s: int) -> float | None:
        if s == 0:
            return r["metrics"].get("ensemble_acc")
        per = {int(k): v for k, v in (r.get("ood_per_severity") or {}).items()}  # JSON made the keys str
        return per.get(s)

    severities = sorted({int(s) for r in runs for s in (r.get("ood_per_severity") or {})})
    if not severities or len(methods) < 2:
        ax.text(0.5, 0.5, "needs OOD evaluation and two methods", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    xs = [0, *severities]
    ax.axhline(0.0, color=method_colour(base, methods), linewidth=1.5, label=f"{base} (baseline)")
    for i, m in enumerate(methods[1:], start=1):
        pts = []
        for s in xs:
            diffs = []
            for r in runs:
                b = by_seed.get(r["seed"])
                if r["method"] != m or b is None:
                    continue
                a1, a0 = acc(r, s), acc(b, s)
                if a1 is not None and a0 is not None:
                    diffs.append(a1 - a0)
            mu, sd = _mean_std(diffs)
            if mu is not None:
                pts.append((s, mu, sd))
        shift = (i - len(methods) / 2) * 0.08
        ax.errorbar(
            [x + shift for x, _, _ in pts],
            [mu for _, mu, _ in pts],
            yerr=[sd for _, _, sd in pts],
            color=method_colour(m, methods),
            marker="o",
            markersize=5,
            capsize=3,
            linewidth=1.5,
            label=m,
        )
    ax.set_xticks(xs, ["clean", *map(str, severities)])
    ax.set_xlabel("corruption severity")
    ax.set_ylabel(f"accuracy minus {base}'s (same seed)")
    ax.set_title(f"OOD accuracy gain over {base}, paired by seed (higher is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# In-distribution accuracy only: the OOD accuracy (~0.2 lower on digits) would stretch the axis
# until the methods' differences in the third digit vanish; it has its own panels.
ACCURACY = [("member_acc", "member acc"), ("ensemble_acc", "ensemble acc")]
SHARPNESS = [("fisher_mean", "mean Fisher score")]
# The sharpness-diversity figure's x axis: the first of these that the runs hold. "sharpness" is
# the paper's worst-case adaptive sharpness; the mean Fisher score is the fallback.
SHARPNESS_AXES: tuple[tuple[str, str], ...] = (
    ("sharpness", "sharpness: worst-case adaptive l2 of the members (flatter: left)"),
    ("worst_case_sharpness", "worst-case sharpness of the members (flatter: left)"),
    ("fisher_mean", "mean Fisher score of the members, not the paper's sharpness (flatter: left)"),
)
# The figure's y axis: diversity name -> (run metric, axis label).
DIVERSITY_AXES: dict[str, tuple[str, str]] = {
    "der": ("der", "diversity: DER (more diverse: up)"),
    "disagreement": ("disagreement", "diversity: mean pairwise disagreement (more diverse: up)"),
    "kl": ("kl", "diversity: mean pairwise symmetric KL, nats (more diverse: up)"),
    "cka": ("cka", "similarity: mean pairwise CKA of the logits (more diverse: down)"),
}
CALIBRATION = [("nll", "NLL"), ("ece", "ECE")]
DIVERSITY = [("der", "DER"), ("eir", "EIR")]


def _legend(fig: Any, methods: Sequence[str]) -> None:
    """One legend for the figure, above the panels (a legend inside a zoomed panel hides data)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=method_colour(m, methods),
            marker="o",
            markeredgecolor="black",
            markersize=7,
            linewidth=1.5,
            label=m,
        )
        for m in methods
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(methods), bbox_to_anchor=(0.5, 0.955), frameon=False)


def save_figure(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_comparison(methods: Sequence[str], seeds: Sequence[int], runs: Sequence[dict], path: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    _dots(axes[0, 0], methods, runs, ACCURACY, "in-distribution accuracy (higher is better)")
    axes[0, 0].set_ylabel("test accuracy")
    _dots(axes[0, 1], methods, runs, CALIBRATION, "calibration: NLL, ECE (lower is better)")
    _dots(axes[0, 2], methods, runs, DIVERSITY, "diversity: DER, EIR (higher is better)")
    _ood_panel(axes[1, 0], methods, runs)
    _ood_paired_panel(axes[1, 1], methods, runs)
    _dots(
        axes[1, 2], methods, runs, SHARPNESS, "mean Fisher score of the members, a sharpness proxy (lower is flatter)"
    )
    fig.suptitle(_describe(runs, seeds), fontsize=11)
    _legend(fig, methods)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, plt, path)


def _error_curves(ax: Any, methods: Sequence[str], runs: Sequence[dict], key: str, title: str) -> None:
    """Test error (1 - accuracy) per epoch, log scale: mean over seeds, the seeds' range shaded.
    The y range covers the second half of training, where the methods differ; errors of 0 are
    drawn at half an error (log scale)."""
    groups = _by_method(methods, runs)
    late: list[float] = []
    floor = math.inf
    marked = False
    means: list[tuple[list[int], list[float]]] = []
    for m in methods:
        rs = [r for r in groups[m] if r.get("curve") and r["curve"]["epoch"]]
        if not rs:
            continue
        c = method_colour(m, methods)
        epochs = rs[0]["curve"]["epoch"]
        n_test = max(1, int(round(1 / _smallest_step(rs))))
        zero = 0.5 / n_test
        floor = min(floor, zero)
        errs = [[max(1.0 - a, zero) for a in r["curve"][key]] for r in rs if len(r["curve"]["epoch"]) == len(epochs)]
        mean = [statistics.fmean(col) for col in zip(*errs, strict=True)]
        ax.plot(epochs, mean, color=c, linewidth=2, label=m)
        means.append((epochs, mean))
        if len(errs) > 1:
            ax.fill_between(
                epochs,
                [min(col) for col in zip(*errs, strict=True)],
                [max(col) for col in zip(*errs, strict=True)],
                color=c,
                alpha=0.15,
                linewidth=0,
            )
        half = len(epochs) // 2
        late += [e for row in errs for e in row[half:]]
        td = rs[0].get("swap_epoch")
        if td is not None:
            ax.axvline(
                td + 1,
                color=c,
                linestyle=":",
                linewidth=1.2,
                label=None if marked else "scoring at T_d + 1 (sharpbalance)",
            )
            marked = True
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    ax.set_yscale("log")
    if late:
        top = max(late) * 2.0
        ax.set_ylim(max(min(late) / 1.5, floor / 1.5), top)
        # and the x axis from the first epoch where every method's curve is inside that range
        inside = [next((e for e, v in zip(ep, mu, strict=True) if v <= top), ep[-1]) for ep, mu in means]
        if inside and max(inside) > 0:
            ax.set_xlim(left=max(inside) - 0.5)
    percent = FuncFormatter(lambda v, _: f"{v * 100:.3g}%")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(percent)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (1 - accuracy), log scale")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")


def _smallest_step(runs: Sequence[dict]) -> float:
    """1 / (test set size) when known from the accuracies' granularity; 1/1000 otherwise."""
    n = runs[0].get("n_test")
    return 1.0 / n if n else 1e-3


def _draw_curves(methods: Sequence[str], seeds: Sequence[int], runs: Sequence[dict], path: str | Path) -> Path:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    _error_curves(a1, methods, runs, "ensemble_acc", "ensemble test error (lower is better)")
    _error_curves(a2, methods, runs, "member_acc", "mean member test error (lower is better)")
    shade = "; shaded: range over seeds" if len(seeds) > 1 else ""
    forked = (
        "\nsharpbalance's epochs 0..T_d are de_sam's (one shared phase 1)" if any(r.get("forked") for r in runs) else ""
    )
    fig.suptitle(
        f"learning curves: mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}{shade}; "
        f"zoomed to the second half of training{forked}",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, plt, path)


def _is_number(v: Any) -> bool:
    return v is not None and math.isfinite(v)


def sharpness_axis(runs: Sequence[dict]) -> tuple[str, str]:
    """(metric, label) of the sharpness-diversity figure's x axis: the first of SHARPNESS_AXES
    that some run holds a finite value of (the mean Fisher score when none does)."""
    for key, label in SHARPNESS_AXES:
        if any(_is_number(r["metrics"].get(key)) for r in runs):
            return key, label
    return SHARPNESS_AXES[-1]


def _draw_sharpness_diversity(
    methods: Sequence[str], seeds: Sequence[int], runs: Sequence[dict], path: str | Path, diversity: str = "der"
) -> Path:
    if diversity not in DIVERSITY_AXES:
        raise ValueError(f"diversity must be one of {sorted(DIVERSITY_AXES)}, got {diversity!r}")
    xkey, xlabel = sharpness_axis(runs)
    ykey, ylabel = DIVERSITY_AXES[diversity]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    drawn = False
    for m in methods:
        c = method_colour(m, methods)
        pts = [(r["metrics"].get(xkey), r["metrics"].get(ykey)) for r in runs if r["method"] == m]
        pts = [(x, y) for x, y in pts if _is_number(x) and _is_number(y)]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, color=c, s=22, alpha=0.45, linewidths=0)
        mx, sx = _mean_std(xs)
        my, sy = _mean_std(ys)
        ax.errorbar(
            [mx],
            [my],
            xerr=[sx],
            yerr=[sy],
            color=c,
            marker="D",
            markersize=8,
            capsize=4,
            markeredgecolor="black",
            linewidth=1.5,
            label=f"{m} (mean ± std)",
        )
        drawn = True
    if not drawn:
        ax.text(
            0.5,
            0.5,
            f"needs {xkey} (sharpness_samples > 0)\nand {ykey} (2 or more members)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title("sharpness-diversity trade-off (small dots: one ensemble per seed)", fontsize=10)
    if drawn:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def plot_comparison(comparison: Any, path: str | Path) -> Path:
    """PNG of a ``compare.Comparison``: accuracies; NLL and ECE; DER and EIR; OOD accuracy per severity."""
    return _draw_comparison(comparison.methods, comparison.seeds, comparison.runs, path)


def plot_learning_curves(comparison: Any, path: str | Path) -> Path:
    """PNG of a ``compare.Comparison``'s learning curves (test error per epoch, log scale)."""
    return _draw_curves(comparison.methods, comparison.seeds, comparison.runs, path)


def plot_sharpness_diversity(comparison: Any, path: str | Path, diversity: str = "der") -> Path:
    """PNG of a ``compare.Comparison``: sharpness (x: ``sharpness_axis``) against the diversity
    measure ``diversity`` (y: "der", "disagreement", "kl" or "cka"), per run and per method."""
    return _draw_sharpness_diversity(comparison.methods, comparison.seeds, comparison.runs, path, diversity)


def _members_panel(ax: Any, runs: Sequence[dict]) -> None:
    """Each member's test accuracy, one marker per member, per run."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for i, r in enumerate(runs):
        accs = [a for a in r.get("member_acc") or [] if a is not None]
        xs = [j + (i - (len(runs) - 1) / 2) * 0.12 for j in range(len(accs))]
        ax.plot(
            xs,
            accs,
            "o",
            color=method_colour(r["method"], methods),
            markeredgecolor="black",
            markersize=7,
            label=f"{r['method']} seed {r['seed']}",
        )
    n = max((len(r.get("member_acc") or []) for r in runs), default=0)
    ax.set_xticks(range(n), [f"member {j}" for j in range(n)])
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylabel("test accuracy")
    ax.set_title("members' test accuracy (higher is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def plot_run_records(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG of one run (or a few, e.g. one per method) from their run records: the learning curve
    (ensemble test error, log scale, T_d + 1 marked), each member's accuracy, and the
    comparison's panels, each family of metrics on its own axis."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    _error_curves(axes[0, 0], methods, runs, "ensemble_acc", "ensemble test error (lower is better)")
    _dots(axes[0, 1], methods, runs, ACCURACY, "in-distribution accuracy (higher is better)")
    _ood_panel(axes[0, 2], methods, runs)
    _dots(axes[1, 0], methods, runs, CALIBRATION, "calibration: NLL, ECE (lower is better)")
    _dots(axes[1, 1], methods, runs, DIVERSITY, "diversity: DER, EIR (higher is better)")
    _members_panel(axes[1, 2], runs)
    fig.suptitle(_describe(runs, seeds), fontsize=11)
    _legend(fig, methods)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, plt, path)
