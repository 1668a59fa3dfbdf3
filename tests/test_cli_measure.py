"""``sbfast measure``: on a tiny run trained here (digits, 2 members, 1 epoch), the measures of
measures.json equal the library's on the same members and the recorded sample positions; the
file is strict JSON, merged with what is there, written atomically; every bad flag or folder is
one line with exit status 2 before any work; Ctrl-C leaves the folder as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sbfast
import sbfast.cli.measure as CM
from sbfast.cli import build_parser, main
from sbfast.measure import fisher_trace, hessian_eigenvalues, hessian_trace, ntk_logdet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("measure") / "run"
    code = main(
        ["train", "--dataset", "digits", "--method", "de", "--epochs", "1", "--members", "2", "--no-progress"]
        + ["--eval-corruptions", "--output", str(out)]
    )
    assert code == 0
    return out


def _strict(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _folder(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _fresh(run_dir: Path) -> Path:
    (run_dir / CM.MEASURES_FILE).unlink(missing_ok=True)
    return run_dir


def test_defaults_are_the_release_protocol():
    args = build_parser().parse_args(["measure", "somewhere"])
    CM._resolve(args)
    assert (args.batches, args.batch_size, args.seed, args.probes, args.iters, args.rho, args.norm) == (
        100,
        5,
        13,
        100,
        20,
        0.5,
        "l2",
    )
    quick = build_parser().parse_args(["measure", "somewhere", "--quick", "--probes", "3"])
    CM._resolve(quick)
    assert quick.batches == CM.QUICK["batches"] and quick.probes == 3  # a flag given wins over the preset


def test_measures_equal_the_library_on_the_recorded_sample(run_dir, capsys):
    run = _fresh(run_dir)
    args = ["measure", str(run), "--quick", "--no-progress", "--batches", "3", "--batch-size", "7", "--seed", "2"]
    code = main([*args, "--measures", "fisher,hessian_trace", "hessian_eigenvalues", "ntk"])
    assert code == 0, capsys.readouterr().err
    doc = _strict(run / CM.MEASURES_FILE)
    assert doc["members"] == 2 and set(doc["measures"]) == {"fisher", "hessian_trace", "hessian_eigenvalues", "ntk"}
    members = sbfast.load_ensemble(run)
    from sbfast.train.data import load_data
    from sbfast.train.run_folder import read_config

    train = load_data(read_config(run)).train
    positions = torch.randperm(len(train), generator=torch.Generator().manual_seed(2))[:21]
    batches = [train[positions[7 * b : 7 * b + 7]][1:] for b in range(3)]
    for entry in doc["measures"].values():
        assert entry["settings"]["positions"] == positions.tolist()
        assert (entry["settings"]["batches"], entry["settings"]["batch_size"], entry["settings"]["seed"]) == (3, 7, 2)
        assert len(entry["per_member"]) == 2
    want = {
        "fisher": [fisher_trace(m, batches).value for m in members],
        "hessian_trace": [
            hessian_trace(m, batches, max_iter=CM.QUICK["probes"], generator=torch.Generator().manual_seed(2)).value
            for m in members
        ],
        "hessian_eigenvalues": [
            hessian_eigenvalues(
                m, batches, max_iter=CM.QUICK["probes"], generator=torch.Generator().manual_seed(2)
            ).value[0]
            for m in members
        ],
        "ntk": [ntk_logdet(m, batches).value for m in members],
    }
    for name, values in want.items():
        entry = doc["measures"][name]
        got = [r["value"][0] if isinstance(r["value"], list) else r["value"] for r in entry["per_member"]]
        for g, w in zip(got, values, strict=True):
            assert (g is None and math.isnan(w)) or math.isclose(g, w, rel_tol=1e-6), (name, got, values)  # float32
        mean = entry["mean"][0] if isinstance(entry["mean"], list) else entry["mean"]
        if all(math.isfinite(v) for v in values):
            assert math.isclose(mean, sum(values) / 2, rel_tol=1e-6)
    hs = doc["measures"]["hessian_trace"]["per_member"][0]
    assert hs["std_error"] is not None and hs["extra"]["probes"] <= CM.QUICK["probes"]


def test_merged_with_what_is_there(run_dir, capsys):
    run = _fresh(run_dir)
    base = ["measure", str(run), "--quick", "--no-progress", "--batches", "2"]
    assert main([*base, "--measures", "ntk"]) == 0
    first = _strict(run / CM.MEASURES_FILE)["measures"]["ntk"]
    assert main([*base, "--measures", "fisher"]) == 0
    doc = _strict(run / CM.MEASURES_FILE)
    assert set(doc["measures"]) == {"ntk", "fisher"} and doc["measures"]["ntk"] == first
    assert main([*base, "--measures", "fisher", "--seed", "5"]) == 0
    assert _strict(run / CM.MEASURES_FILE)["measures"]["fisher"]["settings"]["seed"] == 5
    assert not list(run.glob(".measures.json.*"))  # no temporary file left


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--measures", "sharpest"], "--measures 'sharpest': unknown measure"),
        (["--measures", ","], "--measures: expected at least one measure name"),
        (["--rho", "0"], "--rho 0.0: expected a finite number > 0"),
        (["--rho", "nan"], "--rho nan"),
        (["--batches", "0"], "--batches 0: expected an integer >= 1"),
        (["--batch-size", "-1"], "--batch-size -1"),
        (["--probes", "0"], "--probes 0"),
        (["--iters", "0"], "--iters 0"),
        (["--k", "0"], "--k 0"),
        (["--tol", "0"], "--tol 0.0"),
        (["--seed", "-1"], "--seed -1"),
        (["--norm", "l1"], "invalid choice: 'l1'"),
        (["--batches", "x"], "invalid int value: 'x'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--batches", "1000", "--batch-size", "100"], "= 100000 samples, the run's training split has"),
    ],
)
def test_bad_flags_one_line_exit_2_folder_untouched(run_dir, flags, message, capsys):
    before = _folder(run_dir)
    code = main(["measure", str(run_dir), "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert _folder(run_dir) == before


def test_a_measure_missing_from_the_build_is_refused(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(CM.MEASURES, "future", (CM.MEASURES["fisher"][0], "not yet", "no_such_function"))
    code = main(["measure", str(run_dir), "--measures", "future"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not available in this build" in err[0]


def test_bad_folders(tmp_path, run_dir, capsys):
    (tmp_path / "empty").mkdir()
    no_members = tmp_path / "no_members"
    no_members.mkdir()
    (no_members / "config.json").write_text((run_dir / "config.json").read_text())
    cases = [
        (tmp_path / "missing", "no such folder"),
        (tmp_path / "empty", "cannot read a run config"),
        (no_members, "no members to measure"),
    ]
    for folder, message in cases:
        code = main(["measure", str(folder), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in no_members.iterdir()) == ["config.json"]


def test_unreadable_measures_file_refused_and_kept(run_dir, capsys):
    path = run_dir / CM.MEASURES_FILE
    path.write_text("{not json")
    code = main(["measure", str(run_dir), "--quick", "--no-progress", "--measures", "fisher"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a readable measures file" in err[0]
    assert path.read_text() == "{not json"
    path.unlink()


def test_ctrl_c_leaves_the_folder_as_it_was(run_dir, monkeypatch, capsys):
    run = _fresh(run_dir)
    assert main(["measure", str(run), "--quick", "--no-progress", "--batches", "2", "--measures", "ntk"]) == 0
    before = _folder(run)
    calls = {"n": 0}
    real = CM.MEASURES["fisher"][0]

    def interrupted(members, data, opts, bar):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setitem(CM.MEASURES, "fisher", (interrupted, *CM.MEASURES["fisher"][1:]))
    code = main(["measure", str(run), "--quick", "--no-progress", "--measures", "ntk", "fisher"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and calls["n"] == 1
    assert _folder(run) == before
    assert real is not interrupted


def test_diversity_measures_equal_the_library_on_the_test_split(run_dir, capsys):
    """disagreement, kl, cka and variance through the CLI: the same numbers as sbfast.measure's
    functions on the members' test predictions (one prediction pass per member)."""
    from sbfast.measure import bias_variance, disagreement, js_divergence, predictions, symmetric_kl_divergence
    from sbfast.train.data import load_data
    from sbfast.train.run_folder import read_config

    run = _fresh(run_dir)
    code = main(["measure", str(run), "--no-progress", "--measures", "disagreement", "kl", "cka", "variance"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "disagreement: test disagreement mean" in out and "cka logits mean" in out
    doc = _strict(run / CM.MEASURES_FILE)["measures"]
    members = sbfast.load_ensemble(run)
    test = load_data(read_config(run)).test
    _, x, y = test[torch.arange(len(test))]
    probs = predictions(members, {"test": (x, y)})["test"].probs
    got = doc["disagreement"]["ensemble"]["sets"]["test"]["disagreement"]
    torch.testing.assert_close(torch.tensor(got["matrix"], dtype=torch.float64), disagreement(probs).double())
    kl = doc["kl"]["ensemble"]["sets"]["test"]
    m = probs.shape[0]
    off = ~torch.eye(m, dtype=torch.bool)
    assert math.isclose(kl["kl"]["mean"], symmetric_kl_divergence(probs)[off].mean().item(), rel_tol=1e-5)
    assert math.isclose(kl["js"]["mean"], js_divergence(probs)[off].mean().item(), rel_tol=1e-5)
    bv = bias_variance(probs, y)
    var = doc["variance"]["ensemble"]["sets"]["test"]["variance"]
    assert math.isclose(var["variance"], float(bv.variance), rel_tol=1e-5)
    cka = doc["cka"]["ensemble"]["cka"]["representations"]
    assert cka["input"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= cka["logits"]["mean"] <= 1.0 + 1e-6


def test_corrupted_sets_and_layers_through_the_cli(tmp_path, capsys):
    """--corrupted adds the run's corrupted test sets to the diversity measures (the same numbers
    as diversity_report on those sets), --layers adds a hidden layer's CKA; a layer the members
    lack, and --corrupted on a run without corruptions, are one line with exit 2 before any work;
    diversity measures need no training sample."""
    from sbfast.measure import diversity_report
    from sbfast.train.data import load_data
    from sbfast.train.run_folder import read_config

    run = tmp_path / "ood"
    code = main(
        ["train", "--dataset", "digits", "--method", "de", "--epochs", "1", "--members", "2", "--no-progress"]
        + [
            "--train-subset",
            "40",
            "--eval-corruptions",
            "gaussian_noise",
            "--eval-severities",
            "2",
            "--output",
            str(run),
        ]
    )
    assert code == 0
    code = main(
        ["measure", str(run), "--no-progress", "--measures", "disagreement", "cka", "--corrupted"]
        + ["--layers", "features.3"]
    )
    assert code == 0, capsys.readouterr().err
    doc = _strict(run / CM.MEASURES_FILE)["measures"]
    assert set(doc["disagreement"]["ensemble"]["sets"]) == {"test", "gaussian_noise/2"}
    assert set(doc["cka"]["ensemble"]["cka"]["representations"]) == {"input", "logits", "softmax", "features.3"}
    config = read_config(run)
    data = load_data(config)
    ds = data.corrupted(config.eval_corruptions, config.eval_severities)[("gaussian_noise", 2)]
    _, cx, cy = ds[torch.arange(len(ds))]
    _, tx, ty = data.test[torch.arange(len(data.test))]
    sets = {"test": (tx, ty), ("gaussian_noise", 2): (cx, cy)}
    want = diversity_report(sbfast.load_ensemble(run), sets, measures=["disagreement"])
    got = doc["disagreement"]["ensemble"]["sets"]["gaussian_noise/2"]["disagreement"]
    assert got["matrix"] == want["sets"]["gaussian_noise/2"]["disagreement"]["matrix"]
    capsys.readouterr()
    before = _folder(run)
    assert main(["measure", str(run), "--measures", "cka", "--layers", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--layers 'nope'" in err and "features.3" in err and "\n" not in err
    assert _folder(run) == before
    plain = tmp_path / "plain"
    assert (
        main(
            ["train", "--dataset", "digits", "--method", "de", "--epochs", "1", "--members", "2"]
            + ["--no-progress", "--eval-corruptions", "--output", str(plain)]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["measure", str(plain), "--measures", "kl", "--corrupted"]) == 2
    assert "evaluates no corruptions" in capsys.readouterr().err
