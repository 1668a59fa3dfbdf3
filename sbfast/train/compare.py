"""Comparing methods over several seeds: ``run_comparison`` trains every method with every seed
on one data set, and ``Comparison`` holds one record per run, the per-method mean and sample
standard deviation of every metric, and paired differences between methods.

Why several seeds: on the embedded digits a member makes a handful of test errors, so DER and
EIR (ratios over the member error) move by tenths between seeds. One seed cannot tell the methods
apart; the spread over seeds says how far a difference must go before it means something, and
the paired difference (same seed, so same initialisation and batch order for every method)
removes the part of that spread that the methods share.

In a comparison, sharpbalance starts from de_sam's phase 1 of the same seed when the trainer
can fork (``TrainConfig.from_phase1``): its epochs 0..T_d are de_sam's, bit for bit, so they are
trained once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbfast.train.checkpoint import RunLock
from sbfast.train.config import METHODS, TrainConfig
from sbfast.train.results import EnsembleResult, finite_or_none, run_record, write_strict_json

# The comparison's metrics, each with the direction that is better (docs/cli.md explains them).
METRICS: dict[str, str] = {
    "member_acc": "higher",
    "ensemble_acc": "higher",
    "nll": "lower",
    "ece": "lower",
    "der": "higher",
    "eir": "higher",
    "disagreement": "higher",
    "kl": "higher",
    "cka": "lower",
    "ood_acc": "higher",
    "worst_case_sharpness": "lower",
    "fisher_mean": "lower",
    "wall_s": "lower",
}
# Keys that comparison files written before the rename use: the mean Fisher score was "sharpness".
OLD_KEYS: dict[str, str] = {"sharpness": "fisher_mean"}
# The main job, `sbfast compare` on the embedded digits: five seeds on a 400-image training
# subset. On the whole training set a member makes 1-3 errors on the 360 test images, so DER and
# EIR (ratios over the member error) are noise; with 400 training images it makes ~5-10, and five
# seeds give each metric a spread. Measured time: docs/cli.md.
MAIN_JOB: dict[str, Any] = {"train_subset": 400}
MAIN_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
# A smoke run in seconds (--quick): two seeds, so the spread is exercised too.
QUICK: dict[str, Any] = dict(
    epochs=5,
    train_subset=384,
    test_subset=180,
    batch_size=32,
    sharpness_samples=64,
    eval_corruptions=("gaussian_noise", "contrast"),
    eval_severities=(1, 5),
)
QUICK_SEEDS: tuple[int, ...] = (0, 1)

# Paired differences are reported for these pairs (a - b) when both methods ran.
PAIRS: tuple[tuple[str, str], ...] = (("sharpbalance", "de_sam"), ("sharpbalance", "de"), ("de_sam", "de"))


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation with n - 1, n) over the finite values; std is None for
    fewer than two values, mean None for none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def fmt_mean_std(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Comparison:
    """Runs of several methods with several seeds, and their aggregates.

    Attributes:
        methods, seeds: in run order.
        runs: one record per run (``results.run_record``): method, seed, the comparison row's
            metrics, per-member accuracy and mean Fisher score, the learning curve, OOD accuracy per
            severity, the run's folder.
        config: the shared TrainConfig (as a dict; ``method`` and ``seed`` vary per run).
        timing: total_s of the comparison.
    """

    methods: list[str]
    seeds: list[int]
    runs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def runs_of(self, method: str) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["method"] == method]

    def aggregate(self) -> list[dict[str, Any]]:
        """Per method: ``n_seeds`` and, per metric, ``<metric>_mean``, ``<metric>_std`` (sample
        standard deviation over seeds, n - 1; None with one seed)."""
        rows = []
        for m in self.methods:
            runs = self.runs_of(m)
            row: dict[str, Any] = {"method": m, "n_seeds": len(runs)}
            for k in METRICS:
                row[f"{k}_mean"], row[f"{k}_std"], _ = mean_std([r["metrics"].get(k) for r in runs])
            rows.append(row)
        return rows

    def ood_per_severity(self) -> dict[str, dict[int, tuple[float | None, float | None]]]:
        """method -> severity -> (mean, std) of the ensemble's OOD accuracy over seeds."""
        out: dict[str, dict[int, tuple[float | None, float | None]]] = {}
        for m in self.methods:
            sev: dict[int, list[float | None]] = {}
            for r in self.runs_of(m):
                for s, acc in (r.get("ood_per_severity") or {}).items():
                    sev.setdefault(int(s), []).append(acc)
            out[m] = {s: mean_std(v)[:2] for s, v in sorted(sev.items())}
        return out

    def paired(self) -> list[dict[str, Any]]:
        """For each pair (a, b) in PAIRS that ran and each metric but wall_s: the differences
        a - b seed by seed: their mean, sample std, standard error, and on how many seeds a is
        better than b (by the metric's direction)."""
        out = []
        for a, b in PAIRS:
            if a not in self.methods or b not in self.methods:
                continue
            by_seed_a = {r["seed"]: r for r in self.runs_of(a)}
            by_seed_b = {r["seed"]: r for r in self.runs_of(b)}
            common = [s for s in self.seeds if s in by_seed_a and s in by_seed_b]
            for k, better in METRICS.items():
                if k == "wall_s":
                    continue
                diffs = []
                for s in common:
                    va, vb = by_seed_a[s]["metrics"].get(k), by_seed_b[s]["metrics"].get(k)
                    if va is not None and vb is not None and math.isfinite(va) and math.isfinite(vb):
                        diffs.append(va - vb)
                mean, std, n = mean_std(diffs)
                wins = sum(1 for d in diffs if (d > 0 if better == "higher" else d < 0))
                out.append(
                    {
                        "pair": f"{a} - {b}",
                        "metric": k,
                        "better": better,
                        "n": n,
                        "mean_diff": mean,
                        "std_diff": std,
                        "stderr": None if std is None else std / math.sqrt(n),
                        "wins": wins,
                    }
                )
        return out

    # -- text ------------------------------------------------------------------------------

    def table(self, digits: int = 4) -> str:
        """One row per metric, one column per method: ``mean ± std`` over seeds ("-" where
        undefined), and which way is better."""
        from sbfast.metrics import format_table

        agg = {a["method"]: a for a in self.aggregate()}
        rows = []
        for k, better in METRICS.items():
            d = 1 if k == "wall_s" else digits
            row: dict[str, Any] = {"metric": k, "better": better}
            for m in self.methods:
                row[m] = fmt_mean_std(agg[m][f"{k}_mean"], agg[m][f"{k}_std"], d)
            rows.append(row)
        return format_table(rows, ["metric", "better", *self.methods])

    def paired_table(
        self,
        metrics: Sequence[str] = (
            "ensemble_acc",
            "der",
            "eir",
            "disagreement",
            "kl",
            "cka",
            "ood_acc",
            "worst_case_sharpness",
            "fisher_mean",
        ),
    ) -> str:
        """One row per metric, one column per pair (a - b): the mean paired difference ± its
        standard error, and on how many seeds a is better than b."""
        from sbfast.metrics import format_table

        cells: dict[str, dict[str, Any]] = {}
        pairs: list[str] = []
        for p in self.paired():
            if p["metric"] not in metrics:
                continue
            if p["pair"] not in pairs:
                pairs.append(p["pair"])
            row = cells.setdefault(p["metric"], {"metric": p["metric"], "better": p["better"]})
            if p["mean_diff"] is None:
                row[p["pair"]] = "-"
            else:
                se = "" if p["stderr"] is None else f" ± {p['stderr']:.4f}"
                row[p["pair"]] = f"{p['mean_diff']:+.4f}{se} ({p['wins']}/{p['n']})"
        rows = [cells[k] for k in metrics if k in cells]
        return format_table(rows, ["metric", "better", *pairs]) if rows else ""

    def report(self) -> str:
        """The text people read: the table, the paired differences and how to read them."""
        n = len(self.seeds)
        lines = [
            f"comparison over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, self.seeds))}): "
            + ("mean ± sample standard deviation over seeds" if n > 1 else "one seed: no spread, differences unproven"),
            self.table(),
        ]
        pt = self.paired_table()
        if pt and n > 1:
            lines += [
                "",
                "paired differences a - b (same seed): mean ± standard error (seeds on which a is better). A "
                "difference within about two standard errors, or one that holds on few seeds, is noise.",
                pt,
            ]
        return "\n".join(lines)

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "seeds": list(self.seeds),
            "config": dict(self.config),
            "aggregate": self.aggregate(),
            "paired": self.paired(),
            "runs": list(self.runs),
            "timing": dict(self.timing),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        runs = [upgrade_record(r) for r in d.get("runs", [])]
        for r in runs:  # JSON turned the int severity keys into str
            if r.get("ood_per_severity"):
                r["ood_per_severity"] = {int(k): v for k, v in r["ood_per_severity"].items()}
        return cls(
            methods=list(d["methods"]),
            seeds=[int(s) for s in d["seeds"]],
            runs=runs,
            config=dict(d.get("config", {})),
            timing=dict(d.get("timing", {})),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (undefined numbers are null, never NaN); written to ``path`` if given."""
        return write_strict_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Comparison:
        s = str(path_or_text)
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        return cls.from_dict(json.loads(text))

    def save(self, output_dir: str | Path, diversity: str = "der") -> dict[str, Path]:
        """comparison.json, comparison.txt and the figures (comparison.png, curves.png,
        sharpness_diversity.png, whose y axis is ``diversity``: der, disagreement, kl or cka)
        under ``output_dir``."""
        from sbfast.train.plots import plot_comparison, plot_learning_curves, plot_sharpness_diversity

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / "comparison.json",
            "table": out / "comparison.txt",
            "plot": out / "comparison.png",
            "curves": out / "curves.png",
            "sharpness_diversity": out / "sharpness_diversity.png",
        }
        self.to_json(paths["json"])
        paths["table"].write_text(self.report() + "\n")
        plot_comparison(self, paths["plot"])
        plot_learning_curves(self, paths["curves"])
        plot_sharpness_diversity(self, paths["sharpness_diversity"], diversity)
        return paths


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A run record as today's code writes it, from one of any version: the metrics and the
    per-member list that older files call "sharpness" (the mean Fisher score) renamed
    ``fisher_mean``; the values untouched."""
    r = dict(record)
    metrics = dict(r.get("metrics") or {})
    for old, new in OLD_KEYS.items():
        if old in metrics and new not in metrics:
            metrics[new] = metrics.pop(old)
    r["metrics"] = metrics
    if "member_sharpness" in r and "member_fisher_mean" not in r:
        r["member_fisher_mean"] = r.pop("member_sharpness")
    return r


def run_order(methods: Sequence[str]) -> list[str]:
    """The methods in METHODS order, so de_sam (whose phase 1 sharpbalance reuses) runs first."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty list of {METHODS}, got {list(methods)!r}")
    return [m for m in METHODS if m in methods]


def can_fork(config: TrainConfig) -> bool:
    """Whether this trainer can start a sharpbalance run from another run's phase 1."""
    return any(f.name == "from_phase1" for f in dataclasses.fields(config))


def run_comparison(
    config: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | Path,
    *,
    data: Any = None,
    trainer: Callable[..., EnsembleResult] | None = None,
    fork_phase1: bool | None = None,
    on_run: Callable[[dict[str, Any], EnsembleResult], None] | None = None,
    diversity: str = "der",
) -> Comparison:
    """Train ``config`` with every method and seed; save each run under
    ``<output_dir>/<method>/seed<k>/`` and the comparison under ``output_dir``.

    Args:
        config: the shared configuration; its ``method``, ``seed`` and ``output_dir`` are set per run.
        methods: names from METHODS (run in METHODS order). seeds: distinct ints >= 0.
        data: a TrainData to reuse (default: loaded once here).
        trainer: ``train_ensemble`` (default) or ``train_ensemble_reference``.
        fork_phase1: sharpbalance starts from de_sam's phase 1 of the same seed when both run.
            None (default): when the trainer is the default one (``train_ensemble`` supports
            ``from_phase1``); True: also with a given trainer (a wrapper of train_ensemble).
        on_run: called after each run with its record and result (e.g. to print a line).
        diversity: the sharpness-diversity figure's y axis (der, disagreement, kl, cka).
    Returns:
        the Comparison (also saved).
    Raises:
        RunFolderLocked (a ValueError) when another process writes ``output_dir``.
    """
    from sbfast.train.plots import DIVERSITY_AXES

    if diversity not in DIVERSITY_AXES:
        raise ValueError(f"diversity must be one of {sorted(DIVERSITY_AXES)}, got {diversity!r}")
    order = run_order(methods)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "comparison folder"):  # one comparison writes a folder at a time
        return _compare(config, order, seeds, out, data, trainer, fork_phase1, on_run, diversity)


def _compare(
    config: TrainConfig,
    order: list[str],
    seeds: list[int],
    out: Path,
    data: Any,
    trainer: Callable[..., EnsembleResult] | None,
    fork_phase1: bool | None,
    on_run: Callable[[dict[str, Any], EnsembleResult], None] | None,
    diversity: str,
) -> Comparison:
    from sbfast.train.data import load_data
    from sbfast.train.run import train_ensemble

    data = data if data is not None else load_data(config)
    if fork_phase1 is None:
        fork_phase1 = trainer is None
    fork = fork_phase1 and can_fork(config) and "de_sam" in order and "sharpbalance" in order
    trainer = trainer or train_ensemble
    comp = Comparison(methods=order, seeds=seeds, config=config.to_dict())
    t0 = time.perf_counter()
    for seed in seeds:
        dirs: dict[str, Path] = {}
        for method in order:
            run_dir = out / method / f"seed{seed}"
            changes: dict[str, Any] = {"method": method, "seed": seed, "output_dir": str(run_dir)}
            if fork and method == "sharpbalance":
                changes["from_phase1"] = str(dirs["de_sam"])
            result = trainer(config.replace(**changes), data=data)
            dirs[method] = run_dir
            record = run_record(result)
            record["run_dir"] = str(run_dir)
            comp.runs.append(record)
            if on_run is not None:
                on_run(record, result)
    comp.timing["total_s"] = time.perf_counter() - t0
    comp.save(out, diversity)
    return comp


__all__ = [
    "MAIN_JOB",
    "MAIN_SEEDS",
    "METRICS",
    "OLD_KEYS",
    "PAIRS",
    "QUICK",
    "QUICK_SEEDS",
    "Comparison",
    "finite_or_none",
    "mean_std",
    "run_comparison",
    "run_order",
    "upgrade_record",
]
