"""The bench harness keeps going past a slow or broken case, stops on its budget, and writes
what it measured after every case (bench/harness.py, bench/__main__.py)."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from bench import harness
from bench.__main__ import main as bench_main

CPU = torch.device("cpu")
FAST = 0.01  # min_run_time per timing, seconds


def _quick() -> None:
    torch.ones(8).sum()


def _sleep_forever() -> None:
    while True:
        time.sleep(0.01)


def _raise() -> None:
    raise RuntimeError("this face is broken")


def _case(op: str, face=_quick, shape: str = "8") -> harness.BenchCase:
    return harness.BenchCase(op=op, shape=shape, reference=_quick, faces={"fast": face})


@pytest.fixture
def fake_module(monkeypatch):
    """install(name, cases_fn): a bench module ``bench.<name>`` whose cases() is cases_fn."""

    def install(name: str, cases_fn) -> str:
        module = types.ModuleType(f"bench.{name}")
        module.cases = cases_fn
        monkeypatch.setitem(sys.modules, f"bench.{name}", module)
        monkeypatch.setattr(harness, "BENCH_MODULES", [*harness.BENCH_MODULES, name])
        return name

    return install


def test_a_case_past_its_cap_is_cut_and_the_next_case_runs(fake_module):
    name = fake_module("bench_fake_slow", lambda d: [_case("slow", _sleep_forever), _case("after")])
    start = time.monotonic()
    run = harness.run_all(CPU, [name], FAST, case_cap_s=0.5)
    assert time.monotonic() - start < 10
    assert [r["op"] for r in run.rows] == ["after"]
    assert run.cut == ["slow [8]: ran past its cap of 0.5 s"]
    assert not run.failed and not run.not_run and not run.complete


def test_a_broken_case_or_module_is_recorded_and_the_rest_runs(fake_module):
    broken = fake_module("bench_fake_broken", lambda d: [_case("raises", _raise), _case("fine")])

    def cannot_build(device):
        raise ValueError("no such model")

    unbuildable = fake_module("bench_fake_unbuildable", cannot_build)
    fine = fake_module("bench_fake_fine", lambda d: [_case("fine too")])
    run = harness.run_all(CPU, [broken, unbuildable, fine], FAST)
    assert [r["op"] for r in run.rows] == ["fine", "fine too"]
    assert run.failed == [
        "raises [8]: RuntimeError: this face is broken",
        "bench_fake_unbuildable (building its cases): ValueError: no such model",
    ]
    # the timer's cap is cleared after each case: nothing fires later
    time.sleep(0.05)


def test_no_case_starts_after_the_budget(fake_module):
    def cases(device):
        return [_case("first", lambda: time.sleep(0.3)), _case("second"), _case("third")]

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
        ["--ops", name, "--device", "cpu", "--min-run-time", str(FAST), "--case-cap", "30", "--output", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 1
    assert "failed: raises [8]: RuntimeError: this face is broken" in text
    assert "bench incomplete: 1 failed, 0 cut at --case-cap, 0 not run (--budget)" in text
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == ["ok"]


def test_the_cli_lists_cut_and_unstarted_cases_without_failing(fake_module, tmp_path, capsys):
    name = fake_module("bench_fake_slow_cli", lambda d: [_case("slow", _sleep_forever), _case("unstarted")])
    rc = bench_main(
        [
            "--ops",
            name,
            "--device",
            "cpu",
            "--min-run-time",
            str(FAST),
            "--case-cap",
            "0.5",
            "--budget",
            "0.4",
            "--output",
            str(tmp_path / "results.json"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "cut: slow [8]: ran past its cap of 0.5 s" in text and "not run: unstarted [8]:" in text
    assert "bench incomplete: 0 failed, 1 cut at --case-cap, 1 not run (--budget)" in text
    assert not (tmp_path / "results.json").exists()  # nothing measured, nothing written


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
