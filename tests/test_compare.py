"""sbfast.train.compare: mean and spread over seeds against a hand computation, paired
differences, strict JSON that round-trips, "-" for undefined numbers, and the figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sbfast import train as T
from sbfast.train.compare import METRICS, Comparison, fmt_mean_std, mean_std, run_order
from sbfast.train.results import dumps_strict, finite_or_none, jsonable


def _record(method: str, seed: int, **metrics: float | None) -> dict:
    full = {k: 0.5 for k in METRICS}
    full.update(metrics)
    return {
        "method": method,
        "seed": seed,
        "metrics": full,
        "member_acc": [0.9, 0.91],
        "member_fisher_mean": [1.0, 2.0],
        "curve": {"epoch": [0, 1, 2], "ensemble_acc": [0.5, 0.9, 0.95], "member_acc": [0.4, 0.85, 0.9]},
        "ood_per_severity": {1: 0.8, 5: 0.5},
        "swap_epoch": 0 if method == "sharpbalance" else None,
        "epochs": 3,
        "dataset": "digits",
        "members": 2,
        "n_test": 360,
    }


@pytest.fixture
def comparison() -> Comparison:
    # ensemble_acc and der by hand below; sharpbalance's DER is undefined on seed 2 (None)
    acc = {"de": [0.90, 0.92, 0.97], "de_sam": [0.93, 0.93, 0.96], "sharpbalance": [0.95, 0.94, 0.98]}
    der = {"de": [1.2, 1.4, 1.0], "de_sam": [1.0, 1.1, 0.9], "sharpbalance": [1.3, 1.5, None]}
    runs = [_record(m, s, ensemble_acc=acc[m][i], der=der[m][i]) for i, s in enumerate([0, 1, 2]) for m in acc]
    return Comparison(
        methods=["de", "de_sam", "sharpbalance"], seeds=[0, 1, 2], runs=runs, config={"dataset": "digits"}
    )


def test_mean_and_sample_std_by_hand(comparison):
    agg = {a["method"]: a for a in comparison.aggregate()}
    # de ensemble_acc 0.90, 0.92, 0.97: mean 0.93, deviations -0.03, -0.01, +0.04,
    # sample variance (0.0009 + 0.0001 + 0.0016) / (3 - 1) = 0.0013
    assert agg["de"]["ensemble_acc_mean"] == pytest.approx(0.93, abs=1e-12)
    assert agg["de"]["ensemble_acc_std"] == pytest.approx(math.sqrt(0.0013), abs=1e-12)
    assert agg["de"]["n_seeds"] == 3
    # de_sam 0.93, 0.93, 0.96: mean 0.94, variance (0.0001 + 0.0001 + 0.0004) / 2 = 0.0003
    assert agg["de_sam"]["ensemble_acc_std"] == pytest.approx(math.sqrt(0.0003), abs=1e-12)
    # sharpbalance DER 1.3, 1.5 and an undefined one: over the two that exist, mean 1.4, std sqrt(0.02)
    assert agg["sharpbalance"]["der_mean"] == pytest.approx(1.4, abs=1e-12)
    assert agg["sharpbalance"]["der_std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)


def test_paired_differences_by_hand(comparison):
    p = {(r["pair"], r["metric"]): r for r in comparison.paired()}
    d = p[("sharpbalance - de", "ensemble_acc")]
    # 0.95-0.90, 0.94-0.92, 0.98-0.97 = 0.05, 0.02, 0.01: mean 0.08/3, sample variance of the diffs
    diffs = [0.05, 0.02, 0.01]
    mean = sum(diffs) / 3
    var = sum((x - mean) ** 2 for x in diffs) / 2
    assert d["mean_diff"] == pytest.approx(mean, abs=1e-12)
    assert d["std_diff"] == pytest.approx(math.sqrt(var), abs=1e-12)
    assert d["stderr"] == pytest.approx(math.sqrt(var / 3), abs=1e-12)
    assert (d["wins"], d["n"], d["better"]) == (3, 3, "higher")
    # DER of sharpbalance - de_sam: seed 2 has no DER for sharpbalance, so two pairs: 0.3, 0.4
    d = p[("sharpbalance - de_sam", "der")]
    assert d["n"] == 2 and d["mean_diff"] == pytest.approx(0.35, abs=1e-12) and d["wins"] == 2
    # lower is better for the mean Fisher score: equal values are no win
    assert p[("de_sam - de", "fisher_mean")]["wins"] == 0 and p[("de_sam - de", "fisher_mean")]["better"] == "lower"


def test_mean_std_edge_cases():
    assert mean_std([]) == (None, None, 0)
    assert mean_std([None, float("nan")]) == (None, None, 0)
    assert mean_std([0.25]) == (0.25, None, 1)
    assert fmt_mean_std(None, None) == "-"
    assert fmt_mean_std(0.5, None) == "0.5000"
    assert fmt_mean_std(0.5, 0.01234, 3) == "0.500 ± 0.012"


def test_json_round_trips_and_is_strict(comparison, tmp_path):
    comparison.runs[0]["metrics"]["eir"] = float("nan")  # an undefined number in a run
    path = tmp_path / "comparison.json"
    text = comparison.to_json(path)

    def no_constants(name):  # NaN / Infinity are not JSON: a standard reader refuses them
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data["runs"][0]["metrics"]["eir"] is None
    back = Comparison.from_json(path)
    assert json.loads(back.to_json()) == json.loads(text)
    assert back.aggregate() == json.loads(text)["aggregate"]
    assert {r["method"]: r for r in data["aggregate"]}["de"]["ensemble_acc_mean"] == pytest.approx(0.93)
    rows = {(r["method"], r["seed"]) for r in data["runs"]}
    assert rows == {(m, s) for m in ("de", "de_sam", "sharpbalance") for s in (0, 1, 2)}  # each seed's row


def test_table_shows_mean_std_and_dashes(comparison):
    for r in comparison.runs_of("de_sam"):
        r["metrics"]["der"] = None
    lines = {line.split()[0]: line for line in comparison.table().splitlines()}
    assert lines["metric"].split() == ["metric", "better", "de", "de_sam", "sharpbalance"]
    assert "0.9300 ± 0.0361" in lines["ensemble_acc"]
    assert lines["der"].split()[5] == "-"  # de_sam's DER column: undefined on every seed
    text = comparison.report()
    assert "paired differences" in text and "+0.0267 ± 0.0120 (3/3)" in text  # sharpbalance - de, by hand above


def test_strict_json_helpers():
    assert finite_or_none(float("inf")) is None and finite_or_none(1.5) == 1.5
    assert jsonable({1: torch.tensor([1.0, float("nan")]), "t": (float("-inf"), 2)}) == {
        "1": [1.0, None],
        "t": [None, 2],
    }
    with pytest.raises(TypeError):
        dumps_strict({"x": object()})
    assert "NaN" not in dumps_strict({"x": float("nan")})


def test_run_order_and_validation():
    assert run_order(["sharpbalance", "de"]) == ["de", "sharpbalance"]
    assert run_order(["sharpbalance", "de_sam"]) == ["de_sam", "sharpbalance"]  # de_sam first: sharpbalance forks it
    with pytest.raises(ValueError, match="methods"):
        run_order(["sgd"])
    with pytest.raises(ValueError, match="methods"):
        run_order([])


def test_figures_are_written(comparison, tmp_path):
    comparison.runs[0]["metrics"]["der"] = None
    for r in comparison.runs_of("de"):
        r["ood_per_severity"] = None
    paths = comparison.save(tmp_path)
    for key in ("plot", "curves", "sharpness_diversity"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG" and paths[key].stat().st_size > 10_000
    assert (tmp_path / "comparison.txt").read_text().startswith("comparison over 3 seeds")


def test_result_json_is_strict_and_sam_share_is_a_dash(tmp_path):
    cfg = T.TrainConfig(
        dataset="synthetic",
        method="de",
        members=1,
        epochs=1,
        train_subset=32,
        test_subset=16,
        batch_size=16,
        model_kwargs={"width": 2},
        sharpness_samples=0,
        progress=False,
        eval_corruptions=(),
    )
    res = T.train_ensemble(cfg)
    assert math.isnan(res.metrics["der"])  # one member: no disagreement to measure
    text = res.to_json(tmp_path / "r.json")
    assert "NaN" not in text and json.loads(text)["metrics"]["der"] is None
    table = res.table()
    member_line = [line for line in table.splitlines() if line.strip().startswith("0 ")][0]
    assert member_line.split()[-1] == "-" and "nan" not in table
    back = T.EnsembleResult.from_json(tmp_path / "r.json")
    assert back.metrics["der"] is None and back.summary()["der"] is None


def test_strict_json_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A results file a reader finds is complete: a write that fails midway leaves the old file
    as it was and no temporary file beside it."""
    import os

    from sbfast.train.results import write_strict_json

    path = tmp_path / "results.json"
    write_strict_json({"a": 1}, path)

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        write_strict_json({"a": 2, "b": float("nan")}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
