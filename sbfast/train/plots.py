"""The run's figure: learning curves and the comparison bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sbfast.train.results import EnsembleResult



def plot_results(results: Sequence[EnsembleResult], path: str | Path) -> Path:
    """PNG: left, per-epoch test accuracy of every member (thin) and the ensemble (thick), one
    colour per method, with the T_d + 1 scoring epoch marked; right, bars of ensemble accuracy,
    member accuracy, DER, EIR and OOD accuracy per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        c = colours[i % len(colours)]
        rows = [h for h in r.history if h.get("test_acc") is not None]
        ep = [h["epoch"] for h in rows]
        for j in range(r.config.members):
            ax1.plot(ep, [h["test_acc"][j] for h in rows], color=c, alpha=0.35, linewidth=0.8)
        ax1.plot(ep, [h["ensemble_test_acc"] for h in rows], color=c, linewidth=2.2, label=f"{r.config.method} (ensemble)")
        if r.config.method == "sharpbalance":
            ax1.axvline(r.config.swap_epoch + 1, color=c, linestyle=":", linewidth=1)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("test accuracy (thin: members; dotted: scoring at T_d + 1)")
    accs = [h["ensemble_test_acc"] for r in results for h in r.history if h.get("ensemble_test_acc") is not None]
    if accs:
        ax1.set_ylim(max(0.0, min(accs[len(accs) // 4 :] or accs) - 0.05), 1.0)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)

    names = ["ensemble_acc", "member_acc", "der", "eir", "ood_acc"]
    width = 0.8 / max(1, len(results))
    lowest = 0.0
    for i, r in enumerate(results):
        s = r.summary()
        vals = [s[k] if isinstance(s[k], (int, float)) else math.nan for k in names]
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(names))]
        # NaN (e.g. DER of one member) is drawn as an empty slot labelled "nan"
        bars = ax2.bar(xs, [0.0 if math.isnan(v) else v for v in vals], width, label=r.config.method,
                       color=colours[i % len(colours)])  # fmt: skip
        for b, v in zip(bars, vals, strict=True):
            y = 0.0 if math.isnan(v) else v
            lowest = min(lowest, y)
            ax2.text(b.get_x() + b.get_width() / 2, y, "nan" if math.isnan(v) else f"{v:.3f}", ha="center",
                     va="bottom" if y >= 0 else "top", fontsize=7, rotation=90)  # fmt: skip
    ax2.axhline(0.0, color="black", linewidth=0.6)
    ax2.set_xticks(range(len(names)), ["ens. acc", "member acc", "DER", "EIR", "OOD acc"])
    ax2.set_ylim(min(0.0, lowest * 1.2 - 0.15), max(1.05, ax2.get_ylim()[1] * 1.15))
    ax2.set_title(f"{results[0].config.dataset}, M = {results[0].config.members}")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
