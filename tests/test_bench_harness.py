"""The bench harness keeps going past a slow or broken case, stops on its budget, and writes
what it measured after every case (bench/harness.py, bench/__main__.py)."""

from __future__ import annotations

import json
import signal
import sys
import time
import types

import pytest
import torch

from bench import harness
from bench.__main__ import main as bench_main

CPU = torch.device("cpu")
FAST = 0.01  # min_run_time per timing, seconds
LONG_CAP = 600.0  # a cap that never runs out by itself: a test makes it run out (see _cap_runs_out)
GIVE_UP_S = 30.0  # a "forever" case returns after this, so a cap that never fires fails, not hangs

# Nothing here depends on how busy the machine is: the cases are timed by a stand-in (one call),
# a cap runs out when a case raises SIGALRM itself (what the timer would do at that moment), and
# the budget reads a clock that the cases move on.


def _quick() -> None:
    torch.ones(8).sum()


def _sleep_forever() -> None:
    end = time.monotonic() + GIVE_UP_S
    while time.monotonic() < end:
        time.sleep(0.01)


def _cap_runs_out() -> None:
    """The case's cap runs out now (the timer's signal, raised by the case), then it would go on."""
    signal.raise_signal(signal.SIGALRM)
    _sleep_forever()


def _raise() -> None:
    raise RuntimeError("this face is broken")


def _case(op: str, face=_quick, shape: str = "8") -> harness.BenchCase:
    return harness.BenchCase(op=op, shape=shape, reference=_quick, faces={"fast": face})


def _one_call(fn, device, min_run_time) -> float:
    fn()
    return 1.0


@pytest.fixture
def fake_module(monkeypatch):
    """install(name, cases_fn): a bench module ``bench.<name>`` whose cases() is cases_fn; cases
    are timed by one call each (:func:`_one_call`)."""
    monkeypatch.setattr(harness, "time_ms", _one_call)

    def install(name: str, cases_fn) -> str:
        module = types.ModuleType(f"bench.{name}")
        module.cases = cases_fn
        monkeypatch.setitem(sys.modules, f"bench.{name}", module)
        monkeypatch.setattr(harness, "BENCH_MODULES", [*harness.BENCH_MODULES, name])
        return name

    return install


@pytest.fixture
def clock(monkeypatch):
    """The harness's clock for its budget, moved on only by ``clock.advance(seconds)``."""

    class Clock:
        now = 0.0

        def monotonic(self) -> float:
            return self.now

        def advance(self, seconds: float) -> None:
            self.now += seconds

    fake = Clock()
    monkeypatch.setattr(harness, "time", fake)
    return fake


def test_a_case_past_its_cap_is_cut_and_the_next_case_runs(fake_module):
    name = fake_module("bench_fake_slow", lambda d: [_case("slow", _cap_runs_out), _case("after")])
    run = harness.run_all(CPU, [name], FAST, case_cap_s=LONG_CAP)
    assert [r["op"] for r in run.rows] == ["after"]
    assert run.cut == [f"slow [8]: ran past its cap of {LONG_CAP:g} s"]
    assert not run.failed and not run.not_run and not run.complete


def test_the_cap_timer_cuts_a_case_that_never_returns(fake_module):
    name = fake_module("bench_fake_sleeper", lambda d: [_case("sleeps", _sleep_forever), _case("after")])
    run = harness.run_all(CPU, [name], FAST, case_cap_s=0.2)
    assert run.cut == ["sleeps [8]: ran past its cap of 0.2 s"]
    assert [r["op"] for r in run.rows] == ["after"]


def test_a_case_that_catches_exception_cannot_swallow_its_cut(fake_module):
    def stubborn() -> None:
        try:
            _cap_runs_out()
        except Exception:  # noqa: BLE001 - what careless case code does
            pass

    name = fake_module("bench_fake_stubborn", lambda d: [_case("stubborn", stubborn)])
    run = harness.run_all(CPU, [name], FAST, case_cap_s=LONG_CAP)
    assert run.cut == [f"stubborn [8]: ran past its cap of {LONG_CAP:g} s"] and not run.rows


def test_a_cap_that_runs_out_mid_import_waits_for_the_import(fake_module, tmp_path, monkeypatch):
    # a package whose optional part swallows errors (as libraries write it): a cut inside that
    # part's import used to leave the package without it for every later case
    pkg = tmp_path / "halfpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("try:\n    from halfpkg import part\nexcept Exception:\n    part = None\n")
    (pkg / "part.py").write_text(
        "import signal\nsignal.raise_signal(signal.SIGALRM)  # the cap runs out here\nVALUE = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "halfpkg", raising=False)
    monkeypatch.delitem(sys.modules, "halfpkg.part", raising=False)
    seen = []

    def importer() -> None:
        import halfpkg  # noqa: F401 - the import is the point

        _sleep_forever()  # the cut comes once the import is done

    def user() -> None:
        import halfpkg

        seen.append(halfpkg.part.VALUE)

    name = fake_module("bench_fake_import", lambda d: [_case("imports", importer), _case("uses", user)])
    try:
        run = harness.run_all(CPU, [name], FAST, case_cap_s=LONG_CAP)
    finally:
        sys.modules.pop("halfpkg", None)
        sys.modules.pop("halfpkg.part", None)
    assert run.cut == [f"imports [8]: ran past its cap of {LONG_CAP:g} s"]
    assert not run.failed and [r["op"] for r in run.rows] == ["uses"] and seen == [42]


def test_a_broken_case_or_module_is_recorded_and_the_rest_runs(fake_module):
    broken = fake_module("bench_fake_broken", lambda d: [_case("raises", _raise), _case("fine")])

    def cannot_build(device):
        raise ValueError("no such model")

    unbuildable = fake_module("bench_fake_unbuildable", cannot_build)
    fine = fake_module("bench_fake_fine", lambda d: [_case("fine too")])
    run = harness.run_all(CPU, [broken, unbuildable, fine], FAST, case_cap_s=0.05)
    assert [r["op"] for r in run.rows] == ["fine", "fine too"]
    assert run.failed == [
        "raises [8]: RuntimeError: this face is broken",
        "bench_fake_unbuildable (building its cases): ValueError: no such model",
    ]
    # the timer's cap is cleared after each case: nothing fires later
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    time.sleep(0.1)


def test_no_case_starts_after_the_budget(fake_module, clock):
    def cases(device):
        return [_case("first", lambda: clock.advance(0.3)), _case("second"), _case("third")]

    name = fake_module("bench_fake_budget", cases)
    other = fake_module("bench_fake_later", lambda d: [_case("later")])
    run = harness.run_all(CPU, [name, other], FAST, budget_s=0.2)
    assert [r["op"] for r in run.rows] == ["first"]
    assert [label.split(":")[0] for label in run.not_run] == ["second [8]", "third [8]", "bench_fake_later"]
    assert not run.failed and not run.complete


def test_the_cli_writes_after_every_case_and_keeps_it_on_interrupt(fake_module, tmp_path):
    def interrupted(device):
        return [_case("measured"), _case("interrupted", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))]

    name = fake_module("bench_fake_interrupted", interrupted)
    out = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        bench_main(["--ops", name, "--device", "cpu", "--min-run-time", str(FAST), "--output", str(out)])
    payload = json.loads(out.read_text())
    assert [r["op"] for r in payload["rows"]] == ["measured"]
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, by rename


def test_the_cli_exits_1_when_a_case_raised(fake_module, tmp_path, capsys):
    name = fake_module("bench_fake_half", lambda d: [_case("ok"), _case("raises", _raise)])
    out = tmp_path / "results.json"
    rc = bench_main(
        ["--ops", name, "--device", "cpu", "--min-run-time", str(FAST), "--case-cap", "600", "--output", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 1
    assert "failed: raises [8]: RuntimeError: this face is broken" in text
    assert "bench incomplete: 1 failed, 0 cut at --case-cap, 0 not run (--budget)" in text
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == ["ok"]


def test_the_cli_lists_cut_and_unstarted_cases_without_failing(fake_module, tmp_path, capsys, clock):
    def slow() -> None:
        clock.advance(1.0)
        _cap_runs_out()

    name = fake_module("bench_fake_slow_cli", lambda d: [_case("slow", slow), _case("unstarted")])
    rc = bench_main(
        [
            "--ops",
            name,
            "--device",
            "cpu",
            "--min-run-time",
            str(FAST),
            "--case-cap",
            "600",
            "--budget",
            "0.4",
            "--output",
            str(tmp_path / "results.json"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "cut: slow [8]: ran past its cap of 600 s" in text and "not run: unstarted [8]:" in text
    assert "bench incomplete: 0 failed, 1 cut at --case-cap, 1 not run (--budget)" in text
    assert not (tmp_path / "results.json").exists()  # nothing measured, nothing written


def test_cpu_timing_calls_the_function_and_gives_a_positive_median():
    calls = []
    ms = harness.time_ms(lambda: calls.append(1), CPU, min_run_time=FAST)
    assert ms > 0 and len(calls) >= 2  # the warm-up call and at least one timed one


@pytest.mark.parametrize("flag", ["--case-cap", "--budget", "--min-run-time"])
def test_the_cli_refuses_a_non_positive_time(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--ops", "global_sq_norm", "--device", "cpu", flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag} must be a positive number of seconds, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("once_ms,expect_do_bench", [(40.0, False), (2.0, True)])
def test_cuda_timing_takes_one_event_timed_call_when_a_call_is_slow(monkeypatch, once_ms, expect_do_bench):
    # no GPU here: CUDA events, synchronize and do_bench are stood in for, to check which way
    # time_ms goes (min_run_time 0.05 s: a warm call over 6.25 ms is timed once)
    import triton.testing

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing

        def record(self) -> None:
            pass

        def elapsed_time(self, end: FakeEvent) -> float:
            return once_ms

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: calls.append(rep) or 1.5)
    counted = []
    ms = harness.time_ms(lambda: counted.append(1), torch.device("cuda"), min_run_time=0.05)
    assert len(counted) == 2  # the warm-up call and the timed one
    assert (ms, calls) == ((1.5, [50]) if expect_do_bench else (once_ms, []))
