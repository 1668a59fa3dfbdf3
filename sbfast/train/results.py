"""What a run produced (``EnsembleResult``): the comparison row, tables, strict JSON, and the
compact per-run record that comparisons and figures are built from."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbfast import metrics as metrics_mod
from sbfast.train.config import TrainConfig
from sbfast.train.plots import plot_run_records

UNDEFINED = "-"  # how a table shows a number that does not exist (DER of one member, sam_share of de)


def _diversity(diversity: Mapping[str, Any] | None, key: str) -> float:
    """A diversity value of the summary row: NaN where undefined (one member) or not measured."""
    v = (diversity or {}).get(key)
    return math.nan if v is None else float(v)


def finite_or_none(v: Any) -> Any:
    """``v`` with NaN and infinities turned into None (JSON has no NaN: a reader that follows the
    standard, such as a browser's JSON.parse or jq, rejects a file that contains one)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def jsonable(v: Any) -> Any:
    """Plain JSON values: tensors as (nested) lists, tuples as lists, non-finite floats as None."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    return finite_or_none(v)


def dumps_strict(obj: Any) -> str:
    """``json.dumps`` of :func:`jsonable` ``(obj)`` with ``allow_nan=False``: standard JSON."""
    return json.dumps(jsonable(obj), indent=1, allow_nan=False)


def write_strict_json(obj: Any, path: str | Path | None = None) -> str:
    """:func:`dumps_strict` of ``obj``; also written to ``path`` (with a final newline) if given,
    whole or not at all: into a temporary file beside it, then ``os.replace`` (a reader that
    finds the file, e.g. a trade-off sweep deciding a run is finished, never reads half of one)."""
    text = dumps_strict(obj)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return text


def shown(v: Any) -> Any:
    """A table cell: undefined numbers (None, NaN) as "-", everything else as it is."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return UNDEFINED
    return v


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summary_row(
    method: str,
    metrics: Mapping[str, Any],
    diversity: Mapping[str, Any] | None,
    ood: Mapping[str, Any] | None,
    fisher_mean: Sequence[float],
    worst_case_sharpness: Sequence[float],
) -> dict[str, Any]:
    """One row of the comparison table from an evaluation's parts (``evaluate_ensemble``'s, or a
    saved result's): the metrics, diversity, OOD accuracy and the members' means; NaN where a
    value is undefined (one member) or was not measured."""
    return {
        "method": method,
        "member_acc": metrics["member_acc_mean"],
        "ensemble_acc": metrics["ensemble_acc"],
        "nll": metrics["ensemble_nll"],
        "ece": metrics["ece"],
        "der": metrics["der"],
        "eir": metrics["eir"],
        "disagreement": metrics.get("mean_disagreement", math.nan),
        "kl": _diversity(diversity, "kl"),
        "cka": _diversity(diversity, "cka"),
        "ood_acc": ood["mean"]["ensemble_acc"] if ood else math.nan,
        "fisher_mean": _mean(fisher_mean),
        "worst_case_sharpness": _mean(worst_case_sharpness),
    }


@dataclass
class EnsembleResult:
    """What a run produced.

    Attributes:
        config: the TrainConfig that ran.
        metrics: ``metrics.ensemble_metrics`` on the test split (member_acc, ensemble_acc,
            ensemble_nll, ece, disagreement, der, eir, ...).
        diversity: ``evaluate.diversity_measures`` of the same test pass: ``kl`` (mean pairwise
            symmetric KL), ``cka`` (mean pairwise unbiased linear CKA of the logits) and their
            M x M matrices; None for a results file written before they existed.
        ood: ``metrics.ood_metrics`` over the corrupted test sets, or None.
        history: one dict per epoch: epoch, phase ("sgd" | "sam" | "mixed"), lr, train_loss [M]
            (mean batch loss at w), test_acc [M] and ensemble_test_acc (None on epochs not
            evaluated), time_s (training, all members), score_s (scoring + selection, the T_d + 1
            epoch only), eval_s, samples_per_s.
        fisher_mean: mean Fisher score of each member on a fixed training subset (older results
            files call it ``sharpness``; it is not the paper's worst-case sharpness).
        worst_case_sharpness: each member's worst-case adaptive l2 sharpness, the paper's measure
            (``sbfast.measure.worst_case_sharpness`` at the config's ``worst_case_*`` settings).
        scores: float32 [M, N] Fisher scores (sharpbalance), masks: bool [M, N] (True = SAM).
        timing: total_s, train_s, score_s, eval_s and the evaluation's parts.
        components: which optimizer / scorer / selector ran; batching.
        models: the trained members (not serialised). probs: test softmax [M, n, C] (not serialised).
    """

    config: TrainConfig
    metrics: dict[str, Any]
    ood: dict[str, Any] | None
    history: list[dict[str, Any]]
    fisher_mean: list[float] = field(default_factory=list)
    worst_case_sharpness: list[float] = field(default_factory=list)
    diversity: dict[str, Any] | None = None
    scores: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    timing: dict[str, float] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    models: list[nn.Module] = field(default_factory=list, repr=False, compare=False)
    probs: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """One row of the comparison table (``summary_row``) with the run's wall time."""
        row = summary_row(
            self.config.method, self.metrics, self.diversity, self.ood, self.fisher_mean, self.worst_case_sharpness
        )
        return {**row, "wall_s": self.timing.get("total_s", math.nan)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: tensors as nested lists, undefined numbers (NaN) as None."""
        return {
            "config": self.config.to_dict(),
            "metrics": jsonable(self.metrics),
            "diversity": jsonable(self.diversity),
            "ood": jsonable(self.ood),
            "history": jsonable(self.history),
            "fisher_mean": list(self.fisher_mean),
            "worst_case_sharpness": list(self.worst_case_sharpness),
            "scores": None if self.scores is None else self.scores.tolist(),
            "masks": None if self.masks is None else self.masks.to(torch.uint8).tolist(),
            "timing": jsonable(self.timing),
            "components": dict(self.components),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleResult:
        ood = d.get("ood")
        if ood is not None and "per_severity" in ood:  # JSON turned the int severity keys into str
            ood = dict(ood, per_severity={int(k): v for k, v in ood["per_severity"].items()})
        return cls(
            config=TrainConfig.from_dict(d["config"]),
            metrics=dict(d["metrics"]),
            diversity=None if d.get("diversity") is None else dict(d["diversity"]),
            ood=ood,
            history=list(d["history"]),
            # results files written before the rename call the mean Fisher score "sharpness"
            fisher_mean=list(d.get("fisher_mean", d.get("sharpness", []))),
            worst_case_sharpness=list(d.get("worst_case_sharpness", [])),
            scores=None if d.get("scores") is None else torch.tensor(d["scores"], dtype=torch.float32),
            masks=None if d.get("masks") is None else torch.tensor(d["masks"], dtype=torch.uint8).bool(),
            timing=dict(d.get("timing", {})),
            components=dict(d.get("components", {})),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON text (undefined numbers are null); also written to ``path`` if given."""
        return write_strict_json(self.to_dict(), path)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> EnsembleResult:
        """Read a result written by ``to_json`` (a path, or the JSON text itself)."""
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(path_or_text)
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """Plain-text summary: the comparison row, per-member accuracy, mean Fisher score and SAM share,
        OOD accuracy per severity. Undefined numbers show as "-" (sam_share of de and de_sam,
        which select nothing; DER of a single member)."""
        lines = [metrics_mod.format_table([{k: shown(v) for k, v in self.summary().items()}]), ""]
        members = []
        for j, a in enumerate(self.metrics["member_acc"]):
            share = float(self.masks[j].double().mean()) if self.masks is not None and self.masks.numel() else None
            fisher = self.fisher_mean[j] if j < len(self.fisher_mean) else None
            worst = self.worst_case_sharpness[j] if j < len(self.worst_case_sharpness) else None
            members.append(
                {
                    "member": j,
                    "test_acc": shown(a),
                    "worst_case_sharpness": shown(worst),
                    "fisher_mean": shown(fisher),
                    "sam_share": shown(share),
                }
            )
        lines += [metrics_mod.format_table(members), ""]
        if self.ood:
            sev = [{"severity": s, **{k: shown(x) for k, x in v.items()}} for s, v in self.ood["per_severity"].items()]
            lines += ["OOD accuracy per severity", metrics_mod.format_table(sev), ""]
        return "\n".join(lines)

    def save(self, output_dir: str | Path | None = None) -> dict[str, Path]:
        """Write results.json, metrics.txt and plot.png under ``output_dir`` (default
        ``config.output_dir``). Returns {"json", "table", "plot"} -> path."""
        out = Path(output_dir if output_dir is not None else (self.config.output_dir or "."))
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "table": out / "metrics.txt", "plot": out / "plot.png"}
        self.to_json(paths["json"])
        paths["table"].write_text(self.table() + "\n")
        plot_results([self], paths["plot"])
        return paths


def run_record(result: EnsembleResult) -> dict[str, Any]:
    """A run in a few numbers: what a comparison aggregates and the figures draw.

    Keys: method, seed, ``metrics`` (the comparison row, undefined as None), member_acc [M],
    member_fisher_mean [M], ``curve`` (epoch, ensemble and mean member test accuracy of every
    evaluated epoch), ``ood_per_severity`` {severity: ensemble accuracy}, swap_epoch (T_d,
    sharpbalance; else None), epochs, dataset, members, n_test, forked (phase 1 taken from
    another run).
    """
    c = result.config
    summary = {k: finite_or_none(v) for k, v in result.summary().items() if k != "method"}
    rows = [h for h in result.history if h.get("ensemble_test_acc") is not None]
    curve = {
        "epoch": [h["epoch"] for h in rows],
        "ensemble_acc": [h["ensemble_test_acc"] for h in rows],
        "member_acc": [sum(h["test_acc"]) / len(h["test_acc"]) for h in rows],
    }
    ood = None
    if result.ood:
        ood = {int(s): finite_or_none(v["ensemble_acc"]) for s, v in result.ood["per_severity"].items()}
    return {
        "method": c.method,
        "seed": c.seed,
        "metrics": summary,
        "member_acc": [finite_or_none(a) for a in result.metrics["member_acc"]],
        "member_fisher_mean": [finite_or_none(v) for v in result.fisher_mean],
        "member_worst_case_sharpness": [finite_or_none(v) for v in result.worst_case_sharpness],
        "curve": curve,
        "ood_per_severity": ood,
        "swap_epoch": c.swap_epoch if c.method == "sharpbalance" else None,
        "epochs": c.epochs,
        "dataset": c.dataset,
        "members": c.members,
        "n_test": result.metrics.get("num_samples"),
        "forked": bool(getattr(c, "from_phase1", None)),
    }


def plot_results(results: Sequence[EnsembleResult], path: str | Path) -> Path:
    """PNG of one run (or a few, e.g. one per method): ``plots.plot_run_records`` of their run
    records (the learning curve, each member's accuracy, the comparison's panels)."""
    return plot_run_records([run_record(r) for r in results], path)
