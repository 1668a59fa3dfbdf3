"""The sharpness-diversity trade-off measured on trained ensembles: ``run_tradeoff`` trains
de (rho = 0), de_sam at a sweep of SAM radii and sharpbalance at some of them, over several
seeds, and ``Tradeoff`` holds one point per run, each (method, rho)'s mean and sample standard
deviation over seeds, the table, strict JSON and the figure.

What a point is: one ensemble. Its sharpness is the mean over members of the paper's worst-case
adaptive sharpness (``sbfast.measure.worst_case_sharpness`` at the config's ``worst_case_*``
settings: one measuring radius for every run, whatever radius it trained with); its diversity
the ensemble's DER, mean pairwise disagreement and mean pairwise symmetric KL; beside them EIR
and the ensemble's accuracy. The paper's claim is the shape: raising SAM's rho moves de_sam
left (flatter) and down (less diverse); sharpbalance should sit above de_sam at the same
sharpness.

A sweep is resumable: every run has its own folder (``<method>/rho<r>/seed<k>/``); a finished
run (``results.json``) is read back, a stopped one resumed from its checkpoint, the others
trained; ``tradeoff_plan.json`` holds what the sweep was asked, and a second call with other
settings on the same folder is refused before anything runs. sharpbalance's phase 1 is de_sam's
at the same rho and seed (``TrainConfig.from_phase1``), so it is trained once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbfast.train.checkpoint import LOCK_FILE, RunLock
from sbfast.train.compare import fmt_mean_std, mean_std
from sbfast.train.config import TrainConfig
from sbfast.train.results import EnsembleResult, run_record, write_strict_json
from sbfast.train.run_folder import resumable

# What a point reports, each with the direction that is better; the first is the x axis.
POINT_METRICS: dict[str, str] = {
    "worst_case_sharpness": "lower",
    "der": "higher",
    "disagreement": "higher",
    "kl": "higher",
    "eir": "higher",
    "ensemble_acc": "higher",
    "member_acc": "higher",
}
# The figure's panels: y metric and label (x is always the worst-case sharpness).
PANELS: tuple[tuple[str, str], ...] = (
    ("der", "DER (more diverse: up)"),
    ("disagreement", "mean pairwise disagreement"),
    ("kl", "mean pairwise symmetric KL, nats"),
    ("eir", "EIR (ensemble gain: up)"),
)
# The default sweep on the embedded digits (the main job's 400-image subset, 3 members): de_sam's
# radii span flat to sharp there (docs/reproduce.md has the figure), sharpbalance at two of them.
TRADEOFF_JOB: dict[str, Any] = {"train_subset": 400}
TRADEOFF_RHOS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
TRADEOFF_SB_RHOS: tuple[float, ...] = (0.2, 0.5)
TRADEOFF_SEEDS: tuple[int, ...] = (0, 1, 2)
PLAN_FILE = "tradeoff_plan.json"


def _rho_name(rho: float) -> str:
    return f"rho{rho:g}"


def sweep_runs(rhos: Sequence[float], sb_rhos: Sequence[float], seeds: Sequence[int]) -> list[tuple[str, float, int]]:
    """The runs of a sweep in training order, as (method, rho, seed): per seed de (rho 0), then
    for each rho de_sam and, where it is one of ``sb_rhos``, sharpbalance right after it."""
    out: list[tuple[str, float, int]] = []
    for s in seeds:
        out.append(("de", 0.0, s))
        for r in rhos:
            out.append(("de_sam", r, s))
            if r in sb_rhos:
                out.append(("sharpbalance", r, s))
    return out


def run_dir_of(out: Path, method: str, rho: float, seed: int) -> Path:
    return out / method / f"seed{seed}" if method == "de" else out / method / _rho_name(rho) / f"seed{seed}"


def check_sweep(rhos: Sequence[float], sb_rhos: Sequence[float], seeds: Sequence[int]) -> None:
    """Refuse a sweep that cannot run, in one line naming the values."""
    bad = [r for r in rhos if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)]
    if not rhos or bad:
        raise ValueError(f"rhos must be a non-empty list of finite numbers > 0 (de is rho 0), got {list(rhos)!r}")
    if len(set(rhos)) != len(rhos):
        raise ValueError(f"rhos must be distinct, got {list(rhos)!r}")
    missing = [r for r in sb_rhos if r not in rhos]
    if missing or len(set(sb_rhos)) != len(sb_rhos):
        raise ValueError(
            f"sharpbalance rhos {list(sb_rhos)!r}: each must be one of the de_sam rhos {list(rhos)!r}, once "
            "(sharpbalance's phase 1 is de_sam's at the same rho)"
        )
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got {list(seeds)!r}")


@dataclass
class Tradeoff:
    """The points of a trade-off sweep and their aggregates.

    Attributes:
        rhos, sb_rhos, seeds: the sweep (de_sam radii, sharpbalance radii, seeds).
        points: one per run, in training order: method, rho (0 for de), seed, ``metrics``
            (POINT_METRICS; None where undefined), member_worst_case_sharpness [M], run_dir, how
            (trained, resumed or reused).
        config: the shared TrainConfig as a dict (method, rho, seed, output_dir vary per run).
        timing: total_s of this call (reused runs cost nothing).
    """

    rhos: list[float]
    sb_rhos: list[float]
    seeds: list[int]
    points: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def groups(self) -> list[tuple[str, float]]:
        """(method, rho) of every point group, de first, then de_sam and sharpbalance by rho."""
        seen: list[tuple[str, float]] = []
        for p in self.points:
            key = (p["method"], float(p["rho"]))
            if key not in seen:
                seen.append(key)
        order = {"de": 0, "de_sam": 1, "sharpbalance": 2}
        return sorted(seen, key=lambda k: (order.get(k[0], 3), k[1]))

    def aggregate(self) -> list[dict[str, Any]]:
        """Per (method, rho): ``n_seeds`` and, per metric, ``<metric>_mean`` and ``<metric>_std``
        (sample standard deviation over seeds, n - 1; None with one seed)."""
        rows = []
        for method, rho in self.groups():
            pts = [p for p in self.points if p["method"] == method and float(p["rho"]) == rho]
            row: dict[str, Any] = {"method": method, "rho": rho, "n_seeds": len(pts)}
            for k in POINT_METRICS:
                row[f"{k}_mean"], row[f"{k}_std"], _ = mean_std([p["metrics"].get(k) for p in pts])
            rows.append(row)
        return rows

    def table(self, digits: int = 4) -> str:
        """One row per (method, rho), one column per metric: ``mean ± std`` over seeds."""
        from sbfast.metrics import format_table

        rows = []
        for a in self.aggregate():
            row: dict[str, Any] = {"method": a["method"], "rho": f"{a['rho']:g}", "seeds": a["n_seeds"]}
            for k in POINT_METRICS:
                row[k] = fmt_mean_std(a[f"{k}_mean"], a[f"{k}_std"], digits)
            rows.append(row)
        return format_table(rows, ["method", "rho", "seeds", *POINT_METRICS])

    def report(self) -> str:
        n = len(self.seeds)
        head = (
            f"sharpness-diversity trade-off over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, self.seeds))}): "
            "mean ± sample standard deviation over seeds; worst_case_sharpness is the members' mean "
            f"(measured at rho {self.config.get('worst_case_rho', '?')}, whatever rho a run trained with)"
        )
        return "\n".join([head, self.table()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "rhos": list(self.rhos),
            "sharpbalance_rhos": list(self.sb_rhos),
            "seeds": list(self.seeds),
            "config": dict(self.config),
            "aggregate": self.aggregate(),
            "points": list(self.points),
            "timing": dict(self.timing),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tradeoff:
        return cls(
            rhos=[float(r) for r in d["rhos"]],
            sb_rhos=[float(r) for r in d["sharpbalance_rhos"]],
            seeds=[int(s) for s in d["seeds"]],
            points=[dict(p) for p in d.get("points", [])],
            config=dict(d.get("config", {})),
            timing=dict(d.get("timing", {})),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (undefined numbers are null, never NaN); written to ``path`` if given."""
        return write_strict_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Tradeoff:
        s = str(path_or_text)
        return cls.from_dict(json.loads(s if s.lstrip().startswith("{") else Path(s).read_text()))

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """tradeoff.json, tradeoff.txt and tradeoff.png under ``output_dir``."""
        out = Path(output_dir)
        paths = {"json": out / "tradeoff.json", "table": out / "tradeoff.txt", "plot": out / "tradeoff.png"}
        self.to_json(paths["json"])
        paths["table"].write_text(self.report() + "\n")
        plot_tradeoff(self, paths["plot"])
        return paths


def plot_tradeoff(tradeoff: Tradeoff, path: str | Path) -> Path:
    """PNG with the paper's axes: worst-case sharpness (x) against DER, disagreement, KL and EIR
    (one panel each). Per (method, rho): the mean over seeds with ± 1 std whiskers on both axes,
    labelled with its rho; de_sam's radii joined in rho order; small dots the seeds. The x axis is
    logarithmic when the means span more than a factor of 10."""
    from sbfast.train.plots import method_colour, pyplot, save_figure

    plt = pyplot()
    methods = list(dict.fromkeys(m for m, _ in tradeoff.groups()))
    agg = tradeoff.aggregate()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    xs_all = [a["worst_case_sharpness_mean"] for a in agg if a["worst_case_sharpness_mean"] is not None]
    log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10
    for ax, (key, label) in zip(axes.ravel(), PANELS, strict=True):
        for m in methods:
            c = method_colour(m, methods)
            rows = [a for a in agg if a["method"] == m]
            for p in tradeoff.points:
                x, y = p["metrics"].get("worst_case_sharpness"), p["metrics"].get(key)
                if p["method"] == m and x is not None and y is not None:
                    ax.scatter([x], [y], color=c, s=14, alpha=0.35, linewidths=0)
            line = [(a["worst_case_sharpness_mean"], a[f"{key}_mean"]) for a in rows]
            line = [(x, y) for x, y in line if x is not None and y is not None]
            if len(line) > 1:
                ax.plot([x for x, _ in line], [y for _, y in line], color=c, linewidth=1, alpha=0.6)
            for a in rows:
                x, y = a["worst_case_sharpness_mean"], a[f"{key}_mean"]
                if x is None or y is None:
                    continue
                ax.errorbar(
                    [x],
                    [y],
                    xerr=[a["worst_case_sharpness_std"] or 0.0],
                    yerr=[a[f"{key}_std"] or 0.0],
                    color=c,
                    marker="D" if m == "sharpbalance" else "o",
                    markersize=7,
                    markeredgecolor="black",
                    capsize=3,
                    linewidth=1.2,
                )
                ax.annotate(f"ρ={a['rho']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=c)
        ax.set_xlabel("worst-case adaptive sharpness, members' mean (flatter: left)", fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=method_colour(m, methods),
            marker="D" if m == "sharpbalance" else "o",
            markeredgecolor="black",
            label=m,
        )
        for m in methods
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(methods), bbox_to_anchor=(0.5, 0.95), frameon=False)
    n = len(tradeoff.seeds)
    fig.suptitle(
        f"sharpness-diversity trade-off: mean ± std over {n} seed{'s' if n != 1 else ''} per (method, ρ); "
        "small dots: one ensemble",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, plt, path)


def sweep_plan(config: TrainConfig, rhos: Sequence[float], sb_rhos: Sequence[float], seeds: Sequence[int]) -> dict:
    shared = {k: v for k, v in config.to_dict().items() if k not in ("method", "rho", "seed", "output_dir", "resume")}
    shared.pop("from_phase1", None)
    return {"rhos": list(rhos), "sharpbalance_rhos": list(sb_rhos), "seeds": list(seeds), "config": shared}


def check_tradeoff_dir(out: Path, plan: dict[str, Any]) -> bool:
    """Whether ``out`` holds this sweep already (True: continue it), or is new or empty (False).
    Raises ValueError when it holds another sweep (naming the settings that differ) or files
    that are not a sweep's."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out}: exists and is not a folder")
    plan_file = out / PLAN_FILE
    if plan_file.is_file():
        try:
            saved = json.loads(plan_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{plan_file}: unreadable ({e}); not a trade-off sweep this code wrote") from None
        mine = json.loads(write_strict_json(plan))
        differ = [k for k in ("rhos", "sharpbalance_rhos", "seeds") if saved.get(k) != mine[k]]
        sc, mc = saved.get("config", {}), mine["config"]
        differ += [f"config.{k}" for k in sorted(set(sc) | set(mc)) if sc.get(k) != mc.get(k)]
        if differ:
            raise ValueError(
                f"{out} holds a trade-off sweep with other settings ({', '.join(differ)}); continue it with the "
                "same flags, or give another --output"
            )
        return True
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"output folder {out}: not empty and not a trade-off sweep (no {PLAN_FILE})")
    return False


def run_tradeoff(
    config: TrainConfig,
    rhos: Sequence[float] = TRADEOFF_RHOS,
    sharpbalance_rhos: Sequence[float] = TRADEOFF_SB_RHOS,
    seeds: Sequence[int] = TRADEOFF_SEEDS,
    output_dir: str | Path = "runs/tradeoff",
    *,
    data: Any = None,
    trainer: Callable[..., EnsembleResult] | None = None,
    on_run: Callable[[dict[str, Any], int, int], None] | None = None,
) -> Tradeoff:
    """Train (or read back, or resume) every run of the sweep and save the trade-off.

    Args:
        config: the shared configuration; ``method``, ``rho``, ``seed`` and ``output_dir`` are
            set per run (``<output_dir>/<method>/rho<r>/seed<k>/``, de's ``de/seed<k>/``).
        rhos: de_sam's SAM radii (> 0). sharpbalance_rhos: a subset of them. seeds: distinct ints >= 0.
        data: a TrainData to reuse (default: loaded once here).
        trainer: ``train_ensemble`` (default) or a wrapper of it taking ``(config, data=..., resume=...)``.
        on_run: called after each run with its point, its index and the number of runs.
    Returns:
        the Tradeoff (also saved: tradeoff.json, tradeoff.txt, tradeoff.png).
    Raises:
        ValueError for a bad sweep, or a folder holding another sweep or other files, before
        anything is trained; RunFolderLocked when another process writes the folder.
    """
    from sbfast.train.data import load_data
    from sbfast.train.run import train_ensemble

    rhos, sb_rhos, seeds = [float(r) for r in rhos], [float(r) for r in sharpbalance_rhos], list(seeds)
    check_sweep(rhos, sb_rhos, seeds)
    out = Path(output_dir)
    plan = sweep_plan(config, rhos, sb_rhos, seeds)
    check_tradeoff_dir(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    trainer = trainer or train_ensemble
    with RunLock(out, "trade-off folder"):
        check_tradeoff_dir(out, plan)  # again under the lock: another sweep may have written it
        write_strict_json(plan, out / PLAN_FILE)
        data = data if data is not None else load_data(config)
        result = Tradeoff(rhos=rhos, sb_rhos=sb_rhos, seeds=seeds, config=config.to_dict())
        runs = sweep_runs(rhos, sb_rhos, seeds)
        t0 = time.perf_counter()
        for i, (method, rho, seed) in enumerate(runs):
            run_dir = run_dir_of(out, method, rho, seed)
            changes: dict[str, Any] = {"method": method, "rho": rho, "seed": seed, "output_dir": str(run_dir)}
            if method == "sharpbalance":
                changes["from_phase1"] = str(run_dir_of(out, "de_sam", rho, seed))
            res, how = _run_or_reuse(trainer, config.replace(**changes), run_dir, data)
            rec = run_record(res)
            point = {
                "method": method,
                "rho": rho,
                "seed": seed,
                "metrics": {k: rec["metrics"].get(k) for k in POINT_METRICS},
                "member_worst_case_sharpness": rec["member_worst_case_sharpness"],
                "run_dir": str(run_dir),
                "how": how,
            }
            result.points.append(point)
            if on_run is not None:
                on_run(point, i, len(runs))
        result.timing["total_s"] = time.perf_counter() - t0
        result.save(out)
    return result


def _run_or_reuse(
    trainer: Callable[..., EnsembleResult], config: TrainConfig, run_dir: Path, data: Any
) -> tuple[EnsembleResult, str]:
    """A finished run is read back, a stopped one resumed, a new one trained."""
    done = run_dir / "results.json"
    if done.is_file():
        return EnsembleResult.from_json(done), "reused"
    if run_dir.is_dir() and resumable(run_dir):
        return trainer({}, data=data, resume=str(run_dir)), "resumed"
    return trainer(config, data=data), "trained"


__all__ = [
    "PANELS",
    "POINT_METRICS",
    "TRADEOFF_JOB",
    "TRADEOFF_RHOS",
    "TRADEOFF_SB_RHOS",
    "TRADEOFF_SEEDS",
    "Tradeoff",
    "check_sweep",
    "plot_tradeoff",
    "run_tradeoff",
    "sweep_runs",
]
