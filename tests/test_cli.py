"""The ``sbfast`` command line: flags generated from TrainConfig, every bad input refused in
seconds with one line and exit status 2 before any epoch, Ctrl-C, unique run folders, and the
subcommands end to end on tiny runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sbfast import train as T
from sbfast.cli import build_parser, main
from sbfast.cli.checks import new_run_dir
from sbfast.cli.errors import CliError
from sbfast.cli.flags import DEST_PREFIX, flag_name

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = [f.name for f in dataclasses.fields(T.TrainConfig)]
# compare runs every method with every seed into its own folders: these fields are set per run
# (by --methods, --seeds, --output), and a comparison neither resumes nor forks by hand
COMPARE_REPLACED = {"method": "--methods", "seed": "--seeds", "output_dir": "--output"}
COMPARE_PER_RUN = {"resume", "from_phase1"}
# a tiny run: seconds even on a busy 2-core machine
TINY = [
    "--dataset",
    "synthetic",
    "--epochs",
    "3",
    "--train-subset",
    "48",
    "--test-subset",
    "24",
    "--members",
    "2",
    "--width",
    "4",
    "--batch-size",
    "16",
    "--sharpness-samples",
    "16",
    "--eval-corruptions",
    "--no-progress",
]
BAD_INPUT_SECONDS = 20  # generous for a shared machine: a refusal needs no training, only imports and a data load


def subparser(name: str):
    p = build_parser()
    action = next(a for a in p._actions if a.dest == "command")
    return action.choices[name]


def config_flags(name: str) -> list[str]:
    return [a.dest[len(DEST_PREFIX) :] for a in subparser(name)._actions if a.dest.startswith(DEST_PREFIX)]


# ------------------------------------------------------------------------------ flags


def test_every_config_field_has_help_text():
    for f in dataclasses.fields(T.TrainConfig):
        assert f.metadata.get("help", "").strip(), f"TrainConfig.{f.name} has no metadata help"


def test_train_flags_are_exactly_the_config_fields(capsys):
    assert config_flags("train") == FIELDS  # same names, same order
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(T.TrainConfig):
        assert flag_name(f.name) in text, f.name
        assert " ".join(f.metadata["help"].split()[:4]) in " ".join(text.split()), f.name  # its help text


def test_compare_flags_are_the_config_fields_but_the_per_run_ones(capsys):
    flags = config_flags("compare")
    assert flags == [f for f in FIELDS if f not in COMPARE_REPLACED and f not in COMPARE_PER_RUN]
    for alias in ("compare", "run"):  # run: the old name, kept
        with pytest.raises(SystemExit) as e:
            main([alias, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for name in FIELDS:
            if name in COMPARE_PER_RUN:
                continue
            assert COMPARE_REPLACED.get(name, flag_name(name)) in text, name


def test_choices_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    from sbfast.models import MODEL_NAMES

    for names in (T.METHODS, T.DATASETS, MODEL_NAMES, ("balance", "boost", "random", "same"), T.BACKENDS):
        assert "{" + ",".join(names) + "}" in text


def test_config_file_and_flags_override_it(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(
        json.dumps({"config": {"dataset": "synthetic", "epochs": 7, "ratio": 0.3, "output_dir": "/old/run"}})
    )
    p = build_parser()
    args = p.parse_args(["train", "--config", str(cfg_file), "--ratio", "0.25"])
    from sbfast.cli.training import _fields

    fields = _fields(args, {})
    assert fields["epochs"] == 7 and fields["ratio"] == 0.25 and "output_dir" not in fields


# ------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any epoch starts."""
    calls = []

    def refuse(self, *a, **k):
        calls.append(a)
        raise AssertionError("an epoch ran")

    monkeypatch.setattr(T.EnsembleTrainer, "train_epoch", refuse)
    return calls


def _bad_corruption_folder(tmp_path: Path) -> str:
    root = tmp_path / "cifar-c"
    root.mkdir()
    np.save(root / "labels.npy", np.zeros(5 * 4, dtype=np.int64))
    np.save(root / "contrast.npy", np.zeros((5 * 4, 32, 32, 3), dtype=np.uint8))  # CIFAR-shaped, not 8x8 digits
    return str(root)


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_utf8 = tmp_path / "not_utf8.cfg"
    not_utf8.write_bytes(b'\xff\xfe{"epochs": 2}')
    cases = [
        (["compare", "--device", "cuda:99"], "cuda:99"),
        (["compare", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
        (["compare", "--data-root", "/nonexistent"], "/nonexistent"),  # digits reads no data root
        (["compare", "--width", "0"], "width"),
        (["compare", "--model-kwargs", '{"width": -3}'], "width"),
        (["compare", "--output", str(a_file / "x")], str(a_file / "x")),
        (["compare", "--output", str(tmp_path)], str(tmp_path)),  # holds files: an earlier comparison's place
        (["compare", "--corruption-root", "/nonexistent"], "/nonexistent"),
        (
            ["compare", "--eval-corruptions", "contrast", "--corruption-root", _bad_corruption_folder(tmp_path)],
            "cifar-c",
        ),
        (["compare", "--ratio", "1.5"], "1.5"),
        (["compare", "--epochs", "0"], "epochs"),
        (["compare", "--methods", "sgd"], "sgd"),
        (["compare", "--model", "nope"], "nope"),
        (["compare", "--model-kwargs", "{bad"], "{bad"),
        (["compare", "--seeds", "1", "1"], "--seeds"),
        (["compare", "--config", str(tmp_path / "missing.json")], "missing.json"),
        (["compare", "--eval-severities", "7"], "7"),
        (["train", "--method", "de", "--compile", "fast"], "fast"),
        (["train", "--swap-epoch", "39"], "swap_epoch"),
        (["eval", str(tmp_path / "no_run")], "no_run"),
        (["score", str(tmp_path / "no_run")], "no_run"),
        (["nonsense"], "nonsense"),
        # past the "exit 2 before training" promise until now: each failed after the run folder existed
        (["train", "--num-threads", "100000"], "--num-threads 100000"),
        (
            ["train", "--dataset", "synthetic", "--model-kwargs", '{"in_channels": 3}'],
            "does not take this data's images",
        ),
        (["train", "--model-kwargs", '{"width": 100000000}'], "training one member needs at least"),
        (["train", "--dist-timeout", "1e300"], "--dist-timeout"),
        (["train", "--config", str(not_utf8)], "not_utf8.cfg': not UTF-8"),
        # silently clamped or impossible settings
        (["train", "--dataset", "synthetic", "--train-subset", "100000"], "train_subset 100000 is larger than"),
        (["train", "--dataset", "synthetic", "--test-subset", "100000"], "test_subset 100000 is larger than"),
        (["train", "--method", "de_sam", "--epochs", "4", "--swap-epoch", "4"], "phase1.pt"),
    ]
    if Path("/proc").is_dir():
        cases.append((["compare", "--output", "/proc/x"], "/proc/x"))
    if not torch.cuda.is_available():
        cases.append((["compare", "--device", "cuda"], "cuda"))
    if "resume" in FIELDS:
        cases += [
            (["train", "--resume", str(tmp_path / "no_run")], "no_run"),
            (["train", "--from-phase1", str(tmp_path / "no_run")], "no_run"),
        ]
    return cases


def test_bad_inputs_exit_2_with_one_line_before_any_epoch(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here
    for argv, named in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        extra = ["--output", str(out)] if argv[0] == "compare" and "--output" not in argv else []
        t0 = time.perf_counter()
        code = main(argv + extra)
        took = time.perf_counter() - t0
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("sbfast: error: "), (argv, err)
        assert named in lines[0], (argv, lines[0])
        assert took < BAD_INPUT_SECONDS, (argv, took)
        written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".json") and p.name != "missing.json"]
        assert not written, (argv, written)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), argv
    assert no_training == []


def test_debug_shows_the_traceback():
    with pytest.raises(CliError, match="ratio"):
        main(["--debug", "compare", "--ratio", "1.5"])
    with pytest.raises(CliError, match="ratio"):
        main(["compare", "--ratio", "1.5", "--debug"])


def test_a_failure_during_training_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    def boom(self, *a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(T.EnsembleTrainer, "train_epoch", boom)
    code = main(["train", *TINY, "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "disk on fire" in err[0] and "--debug" in err[0]


def test_keyboard_interrupt_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.EnsembleTrainer, "train_epoch", interrupt)
    code = main(["compare", *TINY, "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and "interrupt" in err[0].lower()


def test_ctrl_c_in_a_real_process(tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sbfast", "compare", *TINY[:2], "--epochs", "400", *TINY[4:], "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "de" / "seed0" / "log.csv").exists() and not list(out.glob("de/seed0/*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr


# ------------------------------------------------------------------------------ run folders


def test_run_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-000000")
    a, b, c = (new_run_dir(tmp_path, "compare-") for _ in range(3))
    assert len({a, b, c}) == 3 and all(p.is_dir() for p in (a, b, c))


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "c"
    code = main(["compare", *TINY, "--seeds", "0", "1", "--output", str(out)])
    assert code == 0
    return out


def test_compare_writes_strict_json_table_and_figures(compared, capsys):
    text = (compared / "comparison.json").read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)
    assert data["methods"] == list(T.METHODS) and data["seeds"] == [0, 1]
    assert {(r["method"], r["seed"]) for r in data["runs"]} == {(m, s) for m in T.METHODS for s in (0, 1)}
    for m in T.METHODS:
        for s in (0, 1):
            run = compared / m / f"seed{s}"
            res = json.loads((run / "results.json").read_text(), parse_constant=no_constants)
            assert (res["config"]["method"], res["config"]["seed"]) == (m, s)
            assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    table = (compared / "comparison.txt").read_text()
    assert table.startswith("comparison over 2 seeds") and "±" in table and "nan" not in table
    for name in ("comparison.png", "curves.png", "sharpness_diversity.png"):
        assert (compared / name).stat().st_size > 10_000


def test_compare_forks_sharpbalance_from_de_sam(compared):
    if "from_phase1" not in FIELDS:
        pytest.skip("this build's trainer cannot fork phase 1")
    cfg = json.loads((compared / "sharpbalance" / "seed1" / "results.json").read_text())["config"]
    assert Path(cfg["from_phase1"]) == compared / "de_sam" / "seed1"


def test_train_from_a_runs_config_file_with_overrides(compared, tmp_path):
    out = tmp_path / "t"
    source = (
        compared
        / "de"
        / "seed0"
        / ("config.json" if (compared / "de" / "seed0" / "config.json").exists() else "results.json")
    )
    assert main(["train", "--config", str(source), "--epochs", "2", "--output", str(out)]) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    saved = json.loads(source.read_text())["config"]
    assert cfg["epochs"] == 2 and cfg["output_dir"] == str(out)
    assert {k: v for k, v in cfg.items() if k not in ("epochs", "swap_epoch", "output_dir")} == {
        k: v for k, v in saved.items() if k not in ("epochs", "swap_epoch", "output_dir")
    }


def test_eval_and_score_a_saved_run(compared, tmp_path, capsys):
    if not hasattr(T, "evaluate_run"):
        pytest.skip("this build has no saved runs")
    run = compared / "sharpbalance" / "seed0"
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    saved = json.loads((run / "results.json").read_text())
    assert ev["metrics"] == saved["metrics"]
    for ext in ("npy", "pt"):
        assert main(["score", str(run), "--output", str(tmp_path / f"s.{ext}")]) == 0
    a = np.load(tmp_path / "s.npy")
    b = torch.load(tmp_path / "s.pt")
    assert a.dtype == np.float32 and a.shape == (2, 48) and (a >= 0).all()
    assert torch.equal(torch.from_numpy(a), b)


def test_train_from_phase1(compared, tmp_path):
    if "from_phase1" not in FIELDS:
        pytest.skip("this build's trainer cannot fork phase 1")
    out = tmp_path / "fork"
    src = compared / "de_sam" / "seed0"
    assert (
        main(["train", "--from-phase1", str(src), "--ratio", "0.25", "--variant", "boost", "--output", str(out)]) == 0
    )
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["method"], cfg["ratio"], cfg["variant"], cfg["epochs"]) == ("sharpbalance", 0.25, "boost", 3)


def test_resume_refuses_a_changed_field(compared, tmp_path, capsys):
    if "resume" not in FIELDS:
        pytest.skip("this build cannot resume")
    code = main(["train", "--resume", str(compared / "de" / "seed1"), "--ratio", "0.1"])  # ratio: not resumable
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ratio" in err[0]


def test_a_folder_another_process_writes_is_refused_naming_it(compared, tmp_path, capsys):
    from sbfast.train.checkpoint import LOCK_FILE, RunFolderLocked

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = {"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "2026-01-01T00:00:00"}
        comp = tmp_path / "cmp"
        comp.mkdir()
        (comp / LOCK_FILE).write_text(json.dumps(lock))
        run = tmp_path / "run"
        shutil.copytree(compared / "de" / "seed1", run)
        (run / LOCK_FILE).write_text(json.dumps(lock))
        for argv in (
            ["compare", *TINY, "--output", str(comp)],
            ["train", "--resume", str(run)],
            ["train", *TINY, "--output", str(run)],
        ):
            code = main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and f"is in use by pid {holder.pid} on host" in err[0], (argv, err)
        with pytest.raises(RunFolderLocked, match=f"comparison folder {comp} is in use by pid {holder.pid}"):
            T.run_comparison(T.TrainConfig(**{"dataset": "synthetic", "epochs": 2}), ["de"], [0], comp)
        assert sorted(p.name for p in comp.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_resume_and_eval_of_a_folder_without_config_json_use_the_checkpoints_config(compared, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(compared / "de" / "seed1", run)
    (run / "config.json").unlink()
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    assert (
        json.loads((tmp_path / "e.json").read_text())["metrics"]
        == json.loads((run / "results.json").read_text())["metrics"]
    )
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # a finished run: evaluated again
    assert json.loads((run / "config.json").read_text())["config"]["method"] == "de"  # written again


def test_resume_with_output_naming_the_same_folder_is_no_change(compared, tmp_path, monkeypatch, capsys):
    run = tmp_path / "unf"
    shutil.copytree(compared / "de" / "seed1", run)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "unf", "--output", str(run.resolve()), "--no-progress"]) == 0
    code = main(["train", "--resume", "unf", "--output", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output_dir" in err[0]


def test_a_comparisons_file_is_not_a_runs_config(compared, capsys, no_training):
    code = main(["train", "--config", str(compared / "comparison.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a comparison's file (6 runs of de, de_sam, sharpbalance" in err[0], err
    assert "config.json" in err[0]


def test_eval_and_score_check_their_output_paths_before_the_work(compared, tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("the work ran before the output path was checked")

    monkeypatch.setattr(T, "evaluate_run", no_work)
    monkeypatch.setattr(T, "load_ensemble", no_work)
    run = str(compared / "de" / "seed0")
    folder = tmp_path / "a_folder.npy"
    folder.mkdir()
    for argv, named in [
        (["eval", run, "--json", str(tmp_path)], "--json"),
        (["eval", run, "--json", str(tmp_path / "missing" / "e.json")], "does not exist"),
        (["score", run, "--output", str(folder)], "--output"),
        (["score", run, "--output", str(tmp_path)], "--output"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and named in err[0], (argv, err)
        assert "is a folder" in err[0] or "does not exist" in err[0], err


def test_info_and_module_entry_point():
    # a real `python -m sbfast` process: the entry point and the import path work as users call them
    proc = subprocess.run([sys.executable, "-m", "sbfast", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout
    assert "global_sq_norm" in proc.stdout and "trainer components" in proc.stdout


def test_bench_is_delegated(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "python -m bench" in capsys.readouterr().out
