"""Durable runs: a run killed (SIGKILL) anywhere, or stopped by SIGINT / SIGTERM, resumes to the
uninterrupted run's parameters, scores, masks, losses and metrics bit for bit; damaged
checkpoints fall back to the previous one; a resume refuses changes that would change the
result; a sharpbalance run forked from another run's phase1.pt equals the full run; a saved
run's members and metrics come back exactly (load_ensemble, evaluate_run).

Tiny runs (synthetic 8x8, a width-4 CNN, 2 members, 4 epochs, T_d = 1, float32 on CPU, one
thread). The kills run in a child process (``python -c CHILD``) that pauses at a chosen step or
in the middle of a checkpoint write and waits to be killed; each child costs a few seconds, most
of it importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbfast import train as T
from sbfast.train import checkpoint as C
from sbfast.train.run_folder import RunLog, check_phase1_compatible, requested_fields, resumed_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(
    dataset="synthetic",
    members=2,
    epochs=4,
    swap_epoch=1,
    train_subset=64,
    test_subset=32,
    batch_size=16,
    model_kwargs={"width": 4},
    sharpness_samples=16,
    progress=False,
    augment=True,
    augment_pad=1,
    eval_corruptions=("gaussian_noise",),
    eval_severities=(1,),
    num_threads=1,
)
# phase 1: 2 epochs x 2 members x 4 batches of 16; phase 2: 2 epochs x 2 members x 4-5 batches
PHASE1_STEPS = 16
PHASE2_STEPS = 16  # at least; static batching may add a tail batch per member epoch
PICK = random.Random(20240611)  # fixed draws of "random" steps: the same tests every run


def cfg(**kw) -> dict:
    return dict(BASE, **kw)


# The child: trains cfg (argv[1], JSON) into its output_dir, with one hook (argv[2]):
#   kill:<step fn>:<k>          at the k-th call of steps.<step fn>, print PAUSED and wait
#   signal:<step fn>:<k>:<SIG>  at the k-th call, send itself SIG, then do the step
#   write:<k>                   write half of the k-th last.pt, print PAUSED and wait
#   rotate:<k>                  after the k-th last.pt -> prev.pt rename, print PAUSED and wait
#   score:<SIG>                 send itself SIG as the scoring at T_d + 1 starts
# and exits as the command line does on RunInterrupted (its exit code, no traceback).
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import sbfast.train as T
from sbfast.train import checkpoint as C, steps as S, trainer as TR

cfg, hook = json.loads(sys.argv[1]), sys.argv[2].split(":")
calls = [0]

def pause():
    print("PAUSED", flush=True)
    time.sleep(600)

if hook[0] in ("kill", "signal"):
    real = getattr(S, hook[1])
    def step(*a, **kw):
        calls[0] += 1
        if calls[0] == int(hook[2]):
            if hook[0] == "kill":
                pause()
            os.kill(os.getpid(), getattr(signal, hook[3]))
        return real(*a, **kw)
    setattr(S, hook[1], step)
elif hook[0] == "write":
    real_write = C._write_bytes
    def write(f, data):
        if Path(f.name).name.startswith(C._TMP_PREFIX + C.LAST):
            calls[0] += 1
            if calls[0] == int(hook[1]):
                f.write(data[: len(data) // 2])
                f.flush()
                pause()
        real_write(f, data)
    C._write_bytes = write
elif hook[0] == "rotate":
    real_rotate = C._rotate
    def rotate(cur, prev):
        real_rotate(cur, prev)
        calls[0] += 1
        if calls[0] == int(hook[1]):
            pause()
    C._rotate = rotate
elif hook[0] == "score":
    real_score = TR.EnsembleTrainer.score_and_select
    def score(self):
        os.kill(os.getpid(), getattr(signal, hook[1]))
        time.sleep(60)  # the handler raises here: scoring stops at once
        return real_score(self)
    TR.EnsembleTrainer.score_and_select = score
try:
    T.train_ensemble(T.TrainConfig(**cfg))
except T.RunInterrupted as e:
    sys.exit(e.exit_code)
print("FINISHED", flush=True)
"""


def run_child(config: dict, hook: str, kill_on_pause: bool, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run CHILD; SIGKILL it once it prints PAUSED (when ``kill_on_pause``). Returns its
    exit code and output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(config), hook],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out: list[str] = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if not line:
                    break
                out.append(line)
                if "PAUSED" in line and kill_on_pause:
                    proc.send_signal(signal.SIGKILL)
                    break
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"child did not pause or finish in {timeout} s")
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), err)


def assert_same_run(got: T.EnsembleResult, want: T.EnsembleResult) -> None:
    """Parameters and buffers, scores, masks, per-epoch losses and test accuracies, metrics: equal."""
    for j, (a, b) in enumerate(zip(got.models, want.models, strict=True)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (
                f"member {j} {k} differs (max {float((sa[k].double() - sb[k].double()).abs().max())})"
            )
    for name in ("scores", "masks"):
        x, y = getattr(got, name), getattr(want, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    assert [h["train_loss"] for h in got.history] == [h["train_loss"] for h in want.history]
    assert [h["test_acc"] for h in got.history] == [h["test_acc"] for h in want.history]
    assert got.metrics == want.metrics and got.ood == want.ood and got.fisher_mean == want.fisher_mean


@pytest.fixture(scope="module")
def data() -> T.TrainData:
    return T.load_data(T.TrainConfig(**cfg()))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, tuple[Path, T.EnsembleResult]]:
    """The uninterrupted runs (each with its run folder) that the interrupted ones must equal."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, kw in {
        "static": dict(batching="static"),
        "exact": dict(batching="exact"),
        "de_sam": dict(method="de_sam"),
    }.items():
        d = root / name
        out[name] = (d, T.train_ensemble(T.TrainConfig(**cfg(output_dir=str(d), **kw)), data=data))
    return out


def resume(run_dir: Path, data: T.TrainData, **kw) -> T.EnsembleResult:
    return T.train_ensemble(T.TrainConfig(resume=str(run_dir), **kw), data=data)


# ------------------------------------------------------------------------------ what a run writes


def test_run_folder_contents(runs):
    d, res = runs["static"]
    assert {"config.json", "log.csv", "checkpoints"} <= {p.name for p in d.iterdir()}
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["last.pt", "phase1.pt", "prev.pt"]
    cfg_json = json.loads((d / "config.json").read_text())
    assert cfg_json["config"] == res.config.to_dict() and cfg_json["device"] == "cpu"
    rows = RunLog(d).read()
    assert len(rows) == res.config.epochs * (res.config.members + 1)
    ens = [r for r in rows if r["member"] == "ensemble"]
    assert [float(r["test_acc"]) for r in ens] == [h["ensemble_test_acc"] for h in res.history]
    assert [r["phase"] for r in ens] == ["sam", "sam", "mixed", "mixed"]
    shares = [float(r["sam_share"]) for r in rows if r["member"] == "0"]
    assert shares[:2] == [1.0, 1.0] and shares[2] == pytest.approx(float(res.masks[0].double().mean()))
    last = C.load_checkpoint(d / "checkpoints" / "last.pt")
    assert last["position"]["epoch"] == res.config.epochs and len(last["history"]) == res.config.epochs
    phase1 = C.load_checkpoint(d / "checkpoints" / "phase1.pt")
    assert phase1["position"] == {**phase1["position"], "epoch": 2, "member": 0, "step": 0}
    assert phase1["masks"] is None and len(phase1["history"]) == 2
    # de_sam writes phase1.pt at its T_d too: phase 1 trained once serves every sharpbalance run
    assert C.load_checkpoint(runs["de_sam"][0] / "checkpoints" / "phase1.pt")["position"]["epoch"] == 2


def test_checkpoint_every_thins_last(data, tmp_path):
    d = tmp_path / "r"
    writes = []
    real = C.save_checkpoint

    def spy(run_dir, payload, name=C.LAST):
        writes.append((name, C.decode(payload)["position"]["epoch"]))
        return real(run_dir, payload, name)

    import sbfast.train.run_folder as TR  # where the run folder writes its checkpoints

    TR.save_checkpoint, saved = spy, TR.save_checkpoint
    try:
        T.train_ensemble(
            T.TrainConfig(
                **cfg(
                    output_dir=str(d),
                    epochs=6,
                    swap_epoch=1,
                    checkpoint_every=3,
                    eval_corruptions=(),
                    sharpness_samples=0,
                )
            ),
            data=data,
        )
    finally:
        TR.save_checkpoint = saved
    # T_d = 1 ends phase 1 (last, then phase1), epoch 2 is the 3rd (every 3), epoch 5 the last
    assert writes == [("last.pt", 2), ("phase1.pt", 2), ("last.pt", 3), ("last.pt", 6)]


# ------------------------------------------------------------------------------ kills and signals


@pytest.mark.parametrize(
    "run, hook",
    [
        ("static", f"kill:mixed_step_static:{PICK.randint(1, PHASE2_STEPS)}"),
        ("exact", f"kill:mixed_step_exact:{PICK.randint(1, PHASE2_STEPS)}"),
        # in epoch 1, after the first checkpoint (a kill in epoch 0: test_a_run_killed_before_its_first_checkpoint...)
        ("exact", f"kill:sam_step:{PICK.randint(PHASE1_STEPS // 2 + 1, PHASE1_STEPS)}"),
        ("static", "write:3"),  # half of the 3rd last.pt (end of epoch 2) on disk as a temporary
        ("exact", "rotate:2"),  # last.pt renamed to prev.pt, the new one not yet in place
    ],
)
def test_sigkill_then_resume_equals_the_uninterrupted_run(run, hook, runs, data, tmp_path):
    d = tmp_path / "killed"
    child = run_child(cfg(batching=run, output_dir=str(d)), hook, kill_on_pause=True)
    assert child.returncode == -signal.SIGKILL, (hook, child.returncode, child.stderr[-2000:])
    assert "PAUSED" in child.stdout
    folder = d / "checkpoints"
    if hook.startswith("write"):
        assert any(p.name.startswith(C._TMP_PREFIX) for p in folder.iterdir())  # the torn file is there
    if hook.startswith("rotate"):
        assert not (folder / "last.pt").exists() and (folder / "prev.pt").exists()
    with contextlib.ExitStack() as expected:
        expected.enter_context(pytest.warns(RuntimeWarning, match="took over the lock of pid"))  # the killed run's
        if hook.startswith("rotate"):
            expected.enter_context(pytest.warns(RuntimeWarning, match="last.pt: missing"))
        got = resume(d, data)
    assert_same_run(got, runs[run][1])
    assert not any(p.name.startswith(C._TMP_PREFIX) for p in folder.iterdir())
    # the resumed run's log is whole again: one row per member per epoch plus the ensemble's
    assert len(RunLog(d).read()) == BASE["epochs"] * (BASE["members"] + 1)


@pytest.mark.parametrize(
    "run, hook, code",
    [
        ("static", f"signal:mixed_step_static:{PICK.randint(2, PHASE2_STEPS - 1)}:SIGINT", 130),
        ("exact", f"signal:mixed_step_exact:{PICK.randint(2, PHASE2_STEPS - 1)}:SIGTERM", 143),
        ("static", f"signal:sam_step:{PICK.randint(2, PHASE1_STEPS - 1)}:SIGINT", 130),
    ],
)
def test_signal_stops_after_the_step_and_resumes_exactly(run, hook, code, runs, data, tmp_path):
    d = tmp_path / "stopped"
    child = run_child(cfg(batching=run, output_dir=str(d)), hook, kill_on_pause=False)
    assert child.returncode == code, (child.returncode, child.stderr[-2000:])
    assert "Traceback" not in child.stderr and "FINISHED" not in child.stdout
    lines = [ln for ln in child.stderr.splitlines() if "resume" in ln]
    assert lines == [lines[0]] and lines[0].startswith(f"sbfast: stopped by {hook.rsplit(':', 1)[1]} (epoch ")
    assert lines[0].endswith(f"resume with: sbfast train --resume {d}")
    last = C.load_checkpoint(d / "checkpoints" / "last.pt")
    k = int(hook.split(":")[2])
    pos = last["position"]
    assert pos["step"] > 0 or pos["member"] > 0, pos  # stopped inside an epoch, not at its end
    assert pos["epoch"] >= (2 if "mixed" in hook else 0) and k >= 1
    got = resume(d, data)
    assert_same_run(got, runs[run][1])


def test_signal_during_scoring_stops_at_once_and_resumes_exactly(runs, data, tmp_path):
    d = tmp_path / "stopped"
    t0 = time.monotonic()
    child = run_child(cfg(batching="static", output_dir=str(d)), "score:SIGINT", kill_on_pause=False)
    assert child.returncode == 130 and "Traceback" not in child.stderr, child.stderr[-2000:]
    assert time.monotonic() - t0 < 60  # it did not sit out the sleep
    lines = [ln for ln in child.stderr.splitlines() if "resume" in ln]
    assert len(lines) == 1 and "during scoring; the run continues from the checkpoint at the end of epoch 1" in lines[0]
    assert C.load_checkpoint(d / "checkpoints" / "last.pt")["position"]["epoch"] == 2
    assert_same_run(resume(d, data), runs["static"][1])


def test_stop_between_last_and_phase1_writes_phase1_on_resume(runs, data, tmp_path):
    # last.pt at the end of T_d written, phase1.pt not yet: the resume writes phase1.pt first
    src, want = runs["static"]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    ck = d / "checkpoints"
    (ck / "phase1.pt").replace(ck / "last.pt")
    (ck / "prev.pt").unlink()
    expected = (ck / "last.pt").read_bytes()
    assert_same_run(resume(d, data), want)
    assert C.load_checkpoint(ck / "phase1.pt")["position"] == C.decode(expected)["position"]


def start_paused_child(config: dict, hook: str, timeout: float = 300.0) -> subprocess.Popen:
    """Start CHILD and return it once it prints PAUSED (it then waits to be killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(config), hook],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if "PAUSED" in line:
            return proc
        assert time.monotonic() < deadline, "child did not pause"
    proc.wait()
    raise AssertionError(f"child ended without pausing: {proc.returncode} {proc.stderr.read()[-2000:]}")


def test_two_resumes_at_once_the_second_is_refused_naming_the_holder(runs, data, tmp_path, capsys):
    # the report: two `sbfast train --resume D` at once both trained to the end, log.csv got every
    # epoch after the resume point twice. Now the second is refused in one line naming the first.
    from sbfast.cli import main
    from sbfast.train.checkpoint import LOCK_FILE, RunFolderLocked

    d = tmp_path / "run"
    child = run_child(cfg(batching="static", output_dir=str(d)), f"kill:sam_step:{PHASE1_STEPS // 2 + 2}", True)
    assert child.returncode == -signal.SIGKILL and C.has_checkpoint(d)
    first = start_paused_child({"resume": str(d), "progress": False}, "kill:mixed_step_static:2")
    try:
        code = main(["train", "--resume", str(d), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"is in use by pid {first.pid} on host" in err[0], err
        with pytest.raises(RunFolderLocked, match=f"pid {first.pid}"):
            resume(d, data)
        with pytest.raises(RunFolderLocked, match=f"pid {first.pid}"):
            T.train_ensemble(T.TrainConfig(**cfg(output_dir=str(d))), data=data)  # nor a new run there
    finally:
        first.kill()
        first.wait()
    # the first resume was killed: its lock is stale, taken over with a warning naming it
    with pytest.warns(RuntimeWarning, match=f"took over the lock of pid {first.pid} on host"):
        got = resume(d, data)
    assert_same_run(got, runs["static"][1])
    rows = RunLog(d).read()
    assert [(r["epoch"], r["member"]) for r in rows] == [
        (str(e), m) for e in range(BASE["epochs"]) for m in ("0", "1", "ensemble")
    ]  # every epoch once
    assert not (d / LOCK_FILE).exists()  # released at the end


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(runs, data, tmp_path, capsys):
    # the report: config.json and log.csv but no checkpoint; a new run there was refused ("resume
    # it"), the resume too ("nothing to resume"). Now the resume starts it again from epoch 0.
    d = tmp_path / "early"
    child = run_child(cfg(batching="static", output_dir=str(d)), "kill:sam_step:3", kill_on_pause=True)
    assert child.returncode == -signal.SIGKILL
    assert (d / "config.json").is_file() and (d / "log.csv").is_file() and not C.has_checkpoint(d)
    with pytest.raises(ValueError, match=r"another run's folder .*resume it with .*sbfast train --resume"):
        T.check_output_dir(d)
    with pytest.warns(RuntimeWarning, match="took over the lock"):
        got = resume(d, data)
    out = capsys.readouterr().out
    assert f"{d} has no checkpoint (its run stopped before writing one): it starts again from epoch 0" in out
    assert_same_run(got, runs["static"][1])
    assert len(RunLog(d).read()) == BASE["epochs"] * (BASE["members"] + 1)
    # a folder with log.csv alone cannot be resumed: the refusal says what to do instead
    (tmp_path / "log_only").mkdir()
    (tmp_path / "log_only" / "log.csv").write_text("epoch\n")
    with pytest.raises(ValueError, match="cannot be resumed .*remove it or choose a new folder"):
        T.check_output_dir(tmp_path / "log_only")


def test_a_foreign_checkpoint_or_an_edited_config_json_is_refused(runs, data, tmp_path):
    # the report: another run's last.pt copied in (checksum valid) trained the other run's config,
    # overwrote config.json and log.csv and exited 0; an edited config.json was ignored. Now the
    # two are compared, and the run's identity too, and a mismatch is one line naming each field.
    d = tmp_path / "mine"
    shutil.copytree(runs["static"][0], d)
    own_last = (d / "checkpoints" / "last.pt").read_bytes()
    kept = {name: (d / name).read_bytes() for name in ("config.json", "log.csv")}

    def refused(match: str) -> None:
        before = {p.name: p.read_bytes() for p in (d / "config.json", d / "log.csv", d / "checkpoints" / "last.pt")}
        with pytest.raises(ValueError, match=match) as e:
            resume(d, data)
        assert "\n" not in str(e.value)
        after = {p.name: p.read_bytes() for p in (d / "config.json", d / "log.csv", d / "checkpoints" / "last.pt")}
        assert after == before  # nothing written: the real run's epochs are all there
        assert (d / "log.csv").read_bytes() == kept["log.csv"]

    shutil.copy(runs["exact"][0] / "checkpoints" / "last.pt", d / "checkpoints" / "last.pt")
    refused(
        r"checkpoints/last.pt and config.json are not the same run's: run id \w+ in the checkpoint, \w+ in "
        r"config.json; batching 'exact' in the checkpoint, 'static' in config.json"
    )
    assert (d / "config.json").read_bytes() == kept["config.json"]

    (d / "checkpoints" / "last.pt").write_bytes(own_last)
    edited = json.loads(kept["config.json"])
    edited["config"]["lr"] = 0.5
    (d / "config.json").write_text(json.dumps(edited))
    refused(r"not the same run's: lr 0.1 in the checkpoint, 0.5 in config.json \(.*a resume changes only progress")

    # the same config, another run: its identity tells it apart
    (d / "config.json").write_bytes(kept["config.json"])
    twin = tmp_path / "twin"
    T.train_ensemble(T.TrainConfig(**cfg(batching="static", output_dir=str(twin))), data=data)
    shutil.copy(twin / "checkpoints" / "last.pt", d / "checkpoints" / "last.pt")
    refused(r"not the same run's: run id \w+ in the checkpoint, \w+ in config.json \(a checkpoint copied")

    # the run's own files: it resumes (a finished run evaluates again) and keeps its identity
    (d / "checkpoints" / "last.pt").write_bytes(own_last)
    run_id = json.loads(kept["config.json"])["run_id"]
    assert C.decode(own_last)["run_id"] == run_id
    assert_same_run(resume(d, data), runs["static"][1])
    assert json.loads((d / "config.json").read_text())["run_id"] == run_id


def test_a_full_disk_names_the_file_and_the_run_resumes_exactly(runs, data, tmp_path, monkeypatch, capsys):
    import errno

    from sbfast.cli import main
    from sbfast.train.checkpoint import LOCK_FILE

    d = tmp_path / "full"
    real, calls = C._write_bytes, [0]

    def write(f, data_):
        if Path(f.name).name.startswith(C._TMP_PREFIX + C.LAST):
            calls[0] += 1
            if calls[0] == 3:  # the end of epoch 2: the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data_)

    monkeypatch.setattr(C, "_write_bytes", write)
    with pytest.raises(T.RunFolderFull) as e:
        T.train_ensemble(T.TrainConfig(**cfg(batching="static", output_dir=str(d))), data=data)
    msg = str(e.value)
    assert "\n" not in msg and e.value.errno == errno.ENOSPC
    assert msg.startswith(f"the disk is full: writing {d / 'checkpoints' / 'last.pt'} (a checkpoint) failed")
    assert msg.endswith(f"sbfast train --resume {d} continues it exactly")
    assert not (d / LOCK_FILE).exists()  # released
    assert not any(p.name.startswith(C._TMP_PREFIX) for p in (d / "checkpoints").iterdir())
    # the command line says the same in one line, exit 1
    calls[0] = 0
    code = main(["train", "--config", str(d / "config.json"), "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("sbfast: error: the disk is full: writing "), err
    monkeypatch.setattr(C, "_write_bytes", real)  # space freed
    assert_same_run(resume(d, data), runs["static"][1])


# ------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_last_falls_back_to_prev(damage, runs, data, tmp_path):
    src, want = runs["exact"]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    last = d / "checkpoints" / "last.pt"
    raw = bytearray(last.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 1000]
    else:
        raw[len(raw) // 2] ^= 0x01
    last.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"last.pt: (truncated|corrupted).*using the previous checkpoint"):
        got = resume(d, data)  # prev.pt: the end of epoch 2; epoch 3 trains again
    assert_same_run(got, want)
    assert (d / "checkpoints" / "last.pt.bad").exists()  # kept for inspection, out of the rotation
    assert C.load_checkpoint(d / "checkpoints" / "last.pt")["position"]["epoch"] == BASE["epochs"]


def test_no_good_checkpoint_is_one_clear_error(runs, data, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(runs["exact"][0], d)
    for name in ("last.pt", "prev.pt"):
        p = d / "checkpoints" / name
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(C.CheckpointError, match=r"no usable checkpoint .*last.pt: truncated.*prev.pt: truncated"):
        resume(d, data)


# ------------------------------------------------------------------------------ what a resume may change


def test_requested_fields():
    assert requested_fields(T.TrainConfig(resume="r")) == {"resume": "r"}
    assert requested_fields(T.TrainConfig(resume="r", progress=False, rho=0.05)) == {
        "resume": "r",
        "progress": False,
        "rho": 0.05,
    }
    assert requested_fields({"resume": "r", "seed": 3}) == {"resume": "r", "seed": 3}
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['bogus'\\]"):
        requested_fields({"bogus": 1})


def test_resumed_config_rules():
    saved = T.TrainConfig(**cfg(output_dir="old"))
    got = resumed_config(
        saved, {"progress": True, "num_threads": 2, "eval_every": 2, "backend": "reference"}, "r", "cpu"
    )
    assert (got.progress, got.num_threads, got.eval_every, got.backend) == (True, 2, 2, "reference")
    assert got.output_dir == "r" and got.resume is None and got.rho == saved.rho
    for change, name in [
        ({"rho": 0.05}, "rho"),
        ({"seed": 1}, "seed"),
        ({"epochs": 9}, "epochs"),
        ({"batching": "exact"}, "batching"),
        ({"ratio": 0.3}, "ratio"),
        ({"corruption_root": "/c"}, "corruption_root"),
        ({"output_dir": "elsewhere"}, "output_dir"),
        ({"device": "cuda"}, "device"),
        ({"from_phase1": "x"}, "from_phase1"),
    ]:
        with pytest.raises(ValueError, match=rf"cannot resume r with changed fields .*{name}"):
            resumed_config(saved, change, "r", "cpu")
    assert resumed_config(saved, {"device": "cpu", "rho": saved.rho}, "r", "cpu").device == "cpu"


def test_resume_refuses_a_changed_result_before_training(runs, data, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(runs["static"][0], d)
    before = (d / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="rho 0.2 -> 0.05"):
        resume(d, data, rho=0.05)
    with pytest.raises(ValueError, match="name different runs"):
        T.train_ensemble(T.TrainConfig(resume=str(d)), data=data, resume=str(tmp_path / "other"))
    assert (d / "checkpoints" / "last.pt").read_bytes() == before
    # a new run may not write into a run's folder
    with pytest.raises(ValueError, match="another run's folder"):
        T.train_ensemble(T.TrainConfig(**cfg(output_dir=str(d))), data=data)
    # other data than the run's: refused by the fingerprint
    other = T.load_data(T.TrainConfig(**cfg(train_subset=48)))
    with pytest.raises(ValueError, match="written for other data"):
        resume(d, other)


def test_resume_with_the_other_backend(runs, data, tmp_path):
    # the checkpoint's optimizer state has torch.optim.SGD's layout: the reference SAM (momentum
    # in its base SGD) continues from the fused optimizer's state
    src, want = runs["exact"]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    (d / "checkpoints" / "last.pt").unlink()  # prev.pt: end of epoch 2, one mixed epoch to go
    with pytest.warns(RuntimeWarning, match="last.pt: missing"):
        got = resume(d, data, backend="reference")
    assert got.config.backend == "reference" and got.components["optimizer"].startswith("reference.SAM")
    tol = 1e-5  # float32, as tests/test_train.py holds the two backends (measured 0.0)
    for a, b in zip(got.models, want.models, strict=True):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert float((x.double() - y.double()).abs().max()) <= tol, k
    assert torch.equal(got.masks, want.masks)


# ------------------------------------------------------------------------------ phase 1 trained once


def test_fork_from_de_sam_equals_the_full_sharpbalance_run(runs, data, tmp_path):
    de_sam_dir, _ = runs["de_sam"]
    got = T.train_ensemble(
        T.TrainConfig(**cfg(batching="static", from_phase1=str(de_sam_dir), output_dir=str(tmp_path / "f"))), data=data
    )
    assert_same_run(got, runs["static"][1])
    assert got.components["from_phase1"] == str(de_sam_dir / "checkpoints" / "phase1.pt")
    # the fork writes its own phase1.pt (its own config), so it can be forked again
    assert C.load_checkpoint(tmp_path / "f" / "checkpoints" / "phase1.pt")["config"]["method"] == "sharpbalance"


def test_fork_sweeps_ratio_and_variant(runs, data, tmp_path):
    # the point of the fork: another ratio / variant from the same phase 1, equal to a full run
    kw = dict(batching="static", ratio=0.3, variant="boost", eval_corruptions=(), sharpness_samples=0)
    full = T.train_ensemble(T.TrainConfig(**cfg(**kw)), data=data)
    fork = T.train_ensemble(T.TrainConfig(**cfg(**kw, from_phase1=str(runs["static"][0]))), data=data)
    assert_same_run(fork, full)


def test_fork_is_refused_when_phase1_differs(runs, data, tmp_path):
    src = runs["de_sam"][0]
    for change, name in [
        ({"rho": 0.05}, "rho"),
        ({"seed": 1}, "seed"),
        ({"swap_epoch": 0}, "swap_epoch"),
        ({"epochs": 5}, "epochs"),
        ({"members": 3}, "members"),
        ({"lr": 0.05}, "lr"),
    ]:
        with pytest.raises(
            ValueError, match=rf"from_phase1 .*phase1.pt: phase 1 of that run is not this run's phase 1: .*{name}"
        ):
            T.train_ensemble(T.TrainConfig(**cfg(from_phase1=str(src), **change)), data=data)
    with pytest.raises(C.CheckpointError, match="phase1.pt: missing"):
        T.train_ensemble(T.TrainConfig(**cfg(from_phase1=str(tmp_path))), data=data)
    de = T.TrainConfig(**cfg(method="de"))
    with pytest.raises(ValueError, match="has no SAM phase 1"):
        check_phase1_compatible(de, T.TrainConfig(**cfg()), "x")
    with pytest.raises(ValueError, match="from_phase1 needs a method with a SAM phase 1"):
        T.TrainConfig(**cfg(method="de", from_phase1=str(src)))
    with pytest.raises(ValueError, match="exclude each other"):
        T.TrainConfig(**cfg(resume="a", from_phase1="b"))
    # free to differ: method, batching, ratio, variant
    check_phase1_compatible(
        T.TrainConfig(**cfg(method="de_sam")), T.TrainConfig(**cfg(batching="exact", ratio=0.2)), "x"
    )


# ------------------------------------------------------------------------------ using a saved run


def _results_file(run_dir: Path) -> Path:
    # EnsembleResult.save's JSON (results.json; metrics.json in newer layouts)
    for name in ("metrics.json", "results.json"):
        if (run_dir / name).exists():
            return run_dir / name
    raise AssertionError(f"no results file in {run_dir}")


def test_load_ensemble_and_evaluate_run_reproduce_the_runs_metrics(runs):
    d, res = runs["static"]
    models = T.load_ensemble(d)
    import sbfast

    assert sbfast.load_ensemble is T.load_ensemble
    assert len(models) == res.config.members and not any(m.training for mod in models for m in mod.modules())
    for a, b in zip(models, res.models, strict=True):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y) and x.device.type == "cpu", k
    saved = json.loads(_results_file(d).read_text())
    got = T.evaluate_run(d)
    assert set(got) == {"metrics", "diversity", "ood", "fisher_mean", "worst_case_sharpness"}
    assert got["ood"] is not None and got["ood"]["per_set"][0]["corruption"] == "gaussian_noise"
    for k in got:
        assert got[k] == saved[k], k


def test_load_ensemble_warns_on_an_unfinished_run(runs, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(runs["static"][0], d)
    (d / "checkpoints" / "last.pt").unlink()
    with (
        pytest.warns(RuntimeWarning, match="last.pt: missing"),
        pytest.warns(RuntimeWarning, match="has not finished training"),
    ):
        models = T.load_ensemble(d)
    assert len(models) == BASE["members"]
