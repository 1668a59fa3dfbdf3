"""sbfast.train.tradeoff and ``sbfast tradeoff``: the sweep's runs and their order, aggregates by
hand, every point equal to its run's own results, sharpbalance forked from de_sam at the same rho,
a stopped sweep continued (finished runs read back, a stopped run resumed) to the numbers of an
unbroken one, refusals before any run, and the figure."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_cli import TINY

from sbfast import train as T
from sbfast.train.tradeoff import (
    PLAN_FILE,
    POINT_METRICS,
    Tradeoff,
    check_sweep,
    run_tradeoff,
    sweep_runs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw):
    base = dict(
        dataset="synthetic",
        members=2,
        epochs=2,
        swap_epoch=0,
        train_subset=48,
        test_subset=40,
        batch_size=16,
        model_kwargs={"width": 2},
        sharpness_samples=8,
        progress=False,
        eval_corruptions=(),
        worst_case_batches=2,
        worst_case_iters=3,
    )
    base.update(kw)
    return T.TrainConfig(**base)


RHOS, SB, SEEDS = (0.05, 0.5), (0.5,), (0, 1)


def test_the_sweep_runs_de_then_each_rho_with_sharpbalance_after_its_de_sam():
    assert sweep_runs(RHOS, SB, SEEDS) == [
        ("de", 0.0, 0),
        ("de_sam", 0.05, 0),
        ("de_sam", 0.5, 0),
        ("sharpbalance", 0.5, 0),
        ("de", 0.0, 1),
        ("de_sam", 0.05, 1),
        ("de_sam", 0.5, 1),
        ("sharpbalance", 0.5, 1),
    ]


@pytest.mark.parametrize(
    "rhos, sb, seeds, match",
    [
        ((), (), (0,), "rhos must be a non-empty list"),
        ((0.1, -1.0), (), (0,), r"rhos must .* got \[0.1, -1.0\]"),
        ((0.1, math.nan), (), (0,), "finite numbers > 0"),
        ((0.1, 0.1), (), (0,), "rhos must be distinct"),
        ((0.1,), (0.3,), (0,), r"sharpbalance rhos \[0.3\]: each must be one of the de_sam rhos \[0.1\]"),
        ((0.1,), (), (0, 0), "seeds must be a non-empty list of distinct"),
        ((0.1,), (), (-1,), "integers >= 0"),
    ],
)
def test_a_sweep_that_cannot_run_is_refused_in_one_line(rhos, sb, seeds, match):
    with pytest.raises(ValueError, match=match) as e:
        check_sweep(rhos, sb, seeds)
    assert "\n" not in str(e.value)


def _point(method, rho, seed, sharp, der):
    metrics = dict.fromkeys(POINT_METRICS, 0.5)
    metrics.update(worst_case_sharpness=sharp, der=der)
    return {"method": method, "rho": rho, "seed": seed, "metrics": metrics}


def test_aggregate_per_method_and_rho_by_hand():
    t = Tradeoff(
        rhos=[0.1, 0.5],
        sb_rhos=[0.5],
        seeds=[0, 1, 2],
        points=[
            _point("de_sam", 0.5, 0, 1.0, 0.8),
            _point("de", 0.0, 0, 3.0, 1.0),
            _point("de_sam", 0.5, 1, 2.0, None),
            _point("de_sam", 0.1, 0, 2.5, 0.9),
            _point("de_sam", 0.5, 2, 4.0, 0.6),
            _point("sharpbalance", 0.5, 0, 1.5, 1.1),
        ],
    )
    rows = t.aggregate()
    assert [(r["method"], r["rho"]) for r in rows] == [
        ("de", 0.0),
        ("de_sam", 0.1),
        ("de_sam", 0.5),
        ("sharpbalance", 0.5),
    ]
    r = rows[2]
    assert r["n_seeds"] == 3
    # sharpness 1, 2, 4: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
    assert r["worst_case_sharpness_mean"] == pytest.approx(7 / 3, abs=1e-12)
    assert r["worst_case_sharpness_std"] == pytest.approx(math.sqrt(7 / 3), abs=1e-12)
    # DER undefined on seed 1: over 0.8 and 0.6
    assert r["der_mean"] == pytest.approx(0.7, abs=1e-12)
    assert r["der_std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)
    assert rows[0]["worst_case_sharpness_std"] is None  # one seed: no spread
    text = t.table()
    assert "2.3333 ± 1.5275" in text and "de_sam" in text
    back = Tradeoff.from_json(t.to_json())
    assert back.aggregate() == rows


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("tradeoff") / "sweep"
    return out, run_tradeoff(_tiny(), RHOS, SB, SEEDS, out)


def test_every_point_is_its_runs_own_measure(swept):
    out, t = swept
    assert [(p["method"], p["rho"], p["seed"]) for p in t.points] == sweep_runs(RHOS, SB, SEEDS)
    assert all(p["how"] == "trained" for p in t.points)
    for p in t.points:
        saved = json.loads((out / p["run_dir"].split(str(out) + "/")[1] / "results.json").read_text())
        cfg = saved["config"]
        assert cfg["method"] == p["method"] and cfg["seed"] == p["seed"]
        if p["method"] != "de":
            assert cfg["rho"] == p["rho"]
        members = saved["worst_case_sharpness"]
        assert len(members) == 2 and all(v > 0 for v in members)
        assert p["metrics"]["worst_case_sharpness"] == pytest.approx(statistics.fmean(members), rel=1e-12)
        assert p["metrics"]["der"] == pytest.approx(saved["metrics"]["der"], rel=1e-12)
        assert p["metrics"]["ensemble_acc"] == saved["metrics"]["ensemble_acc"]
        if p["method"] == "sharpbalance":  # phase 1 is de_sam's at the same rho and seed
            assert cfg["from_phase1"] == str(out / "de_sam" / "rho0.5" / f"seed{p['seed']}")
    agg = {(a["method"], a["rho"]): a for a in t.aggregate()}
    pts = [p for p in t.points if p["method"] == "de_sam" and p["rho"] == 0.5]
    assert agg[("de_sam", 0.5)]["worst_case_sharpness_mean"] == pytest.approx(
        statistics.fmean(p["metrics"]["worst_case_sharpness"] for p in pts), rel=1e-12
    )


def test_the_saved_sweep_is_strict_json_a_table_and_a_figure(swept):
    out, t = swept
    text = (out / "tradeoff.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = Tradeoff.from_json(out / "tradeoff.json")
    assert back.points == json.loads(json.dumps(t.points))
    assert "worst_case_sharpness" in (out / "tradeoff.txt").read_text()
    assert (out / "tradeoff.png").stat().st_size > 20_000
    assert json.loads((out / PLAN_FILE).read_text())["rhos"] == list(RHOS)


def test_a_stopped_sweep_continues_to_the_numbers_of_an_unbroken_one(swept, tmp_path):
    _, whole = swept
    out = tmp_path / "sweep"

    class Stop(Exception):
        pass

    def stop_after_three(point, i, n):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        run_tradeoff(_tiny(), RHOS, SB, SEEDS, out, on_run=stop_after_three)
    # a run that stopped after its checkpoint but before its results: resumed, not retrained
    (out / "de_sam" / "rho0.05" / "seed0" / "results.json").unlink()
    again = run_tradeoff(_tiny(), RHOS, SB, SEEDS, out)
    assert [p["how"] for p in again.points] == ["reused", "resumed", "reused"] + ["trained"] * 5
    for a, b in zip(again.points, whole.points, strict=True):
        assert a["metrics"] == b["metrics"], (a["method"], a["rho"], a["seed"])
    assert [p["how"] for p in run_tradeoff(_tiny(), RHOS, SB, SEEDS, out).points] == ["reused"] * 8


def test_a_folder_of_another_sweep_or_other_files_is_refused_before_any_run(swept, tmp_path):
    out, _ = swept
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"other settings \(rhos\)"):
        run_tradeoff(_tiny(), (0.5,), SB, SEEDS, out)
    with pytest.raises(ValueError, match=r"other settings \(config.epochs\)"):
        run_tradeoff(_tiny(epochs=3), RHOS, SB, SEEDS, out)
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a trade-off sweep"):
        run_tradeoff(_tiny(), RHOS, SB, SEEDS, other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# test_cli's tiny run, shorter: sharpbalance scores at the start of epoch 1, a cheap worst-case
TINY_CLI = [*TINY, "--epochs", "2", "--swap-epoch", "0", "--worst-case-batches", "1", "--worst-case-iters", "2"]


def test_the_command_prints_and_writes_the_sweep(tmp_path, capsys):
    from sbfast.cli import main

    out = tmp_path / "t"
    args = ["tradeoff", *TINY_CLI, "--rhos", "0.1", "--sharpbalance-rhos", "0.1", "--seeds", "3", "--output", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "[3/3] sharpbalance rho 0.1   seed 3: trained" in text
    saved = Tradeoff.from_json(out / "tradeoff.json")
    assert [(p["method"], p["rho"]) for p in saved.points] == [("de", 0.0), ("de_sam", 0.1), ("sharpbalance", 0.1)]
    de = json.loads((out / "de" / "seed3" / "results.json").read_text())
    assert saved.points[0]["metrics"]["worst_case_sharpness"] == pytest.approx(
        statistics.fmean(de["worst_case_sharpness"]), rel=1e-12
    )
    assert main(args) == 0  # the same command again: every run read back
    assert capsys.readouterr().out.count(": reused") == 3


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--rhos", "0.1", "--sharpbalance-rhos", "0.3"], "sharpbalance rhos [0.3]: each must be one of"),
        (["--rhos", "0", "0.1"], "--rhos must be a non-empty list of finite numbers > 0"),
        (["--seeds", "1", "1"], "--seeds must be a non-empty list of distinct"),
        (["--epochs", "0"], "--epochs"),
        (["--reference-trainer"], "--reference-trainer: sbfast tradeoff forks sharpbalance"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line_before_any_folder(tmp_path, capsys, flags, match):
    from sbfast.cli import main

    out = tmp_path / "t"
    assert main(["tradeoff", *TINY_CLI, *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists()
