"""The bench harness: cases, timing, the table and the results file.

Each ``bench/bench_<op>.py`` defines ``cases(device) -> list[BenchCase]``. A case holds the
reference callable and one callable per fast face, plus what one call moves (bytes) or
processes (samples), from which the table derives GB/s or samples/s.

CUDA timings use ``triton.testing.do_bench`` (CUDA events, cache flushed between calls);
CPU timings use ``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks). Never a
wall clock around asynchronous launches.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import torch

# Imported here, not in the first timed case: an import is the slow part of a first call, and
# it belongs to no case's cap.
from torch.utils.benchmark import Timer

RESULTS_DIR = Path(__file__).parent / "results"
BENCH_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))


@dataclass
class BenchCase:
    op: str
    shape: str
    reference: Callable[[], object]
    faces: dict[str, Callable[[], object]]
    bytes_moved: int | None = None  # by the fast face, per call: gives GB/s
    samples: int | None = None  # per call: gives samples/s
    setup: Callable[[], None] | None = None  # run before every timed call (e.g. restore state)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def resnet18_param_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """Parameter shapes of the CIFAR ResNet18 at width 64: 62 tensors, 11,173,962 values for
    10 classes. Benches use the shapes, not the model, so no model code is timed."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    in_c = 64
    for out_c, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            c_in = in_c if block == 0 else out_c
            shapes += [(out_c, c_in, 3, 3), (out_c,), (out_c,), (out_c, out_c, 3, 3), (out_c,), (out_c,)]
            if block == 0 and (stride != 1 or c_in != out_c):
                shapes += [(out_c, c_in, 1, 1), (out_c,), (out_c,)]
        in_c = out_c
    return shapes + [(num_classes, 512), (num_classes,)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    """Median time of one call of ``fn`` in milliseconds, after one warm-up call.

    On CUDA a call that takes longer than ``min_run_time`` / 8 once warm is timed once (CUDA
    events): ``do_bench`` makes at least eight calls, so a slow case (a whole epoch) would spend
    many times the asked run time; faster calls go through ``do_bench``."""
    if device.type == "cuda":
        import triton.testing

        fn()  # warm-up: Triton's first compile, cuDNN's choice of algorithm, allocations
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        once = float(start.elapsed_time(end))
        if once > min_run_time * 1000 / 8:
            return once
        return float(triton.testing.do_bench(fn, warmup=25, rep=int(min_run_time * 1000), return_mode="median"))
    fn()  # warm-up: first-call allocations and lazy initialisation
    return (
        Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        .blocked_autorange(min_run_time=min_run_time)
        .median
        * 1e3
    )


def run_case(case: BenchCase, device: torch.device, min_run_time: float) -> list[dict]:
    ref_ms = time_ms(case.reference, device, min_run_time)
    rows = []
    for face, fn in case.faces.items():
        ms = time_ms(fn, device, min_run_time)
        row = {
            "op": case.op,
            "shape": case.shape,
            "face": face,
            "reference_ms": round(ref_ms, 4),
            "sbfast_ms": round(ms, 4),
            "speedup": round(ref_ms / ms, 3),
            "device": device_name(device),
            "notes": case.notes,
            **case.extra,
        }
        if case.bytes_moved:
            row["GB/s"] = round(case.bytes_moved / (ms * 1e-3) / 1e9, 2)
        if case.samples:
            row["samples/s"] = round(case.samples / (ms * 1e-3), 1)
            row["reference_samples/s"] = round(case.samples / (ref_ms * 1e-3), 1)
        rows.append(row)
    return rows


class CaseTimeout(BaseException):
    """A case ran past its cap (``run_all``'s ``case_cap_s``).

    A BaseException, as KeyboardInterrupt is: code under the cap that catches ``Exception`` (an
    optional import's ``try: import x / except Exception``) must not swallow the cut and go on
    half set up."""


IMPORT_RETRY_S = 0.01  # how soon a cap that fell inside an import is tried again


def _in_import(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it is the import machinery (a module being executed)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def time_cap(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the block once ``seconds`` of wall time have passed.

    A soft cap: the alarm is a signal, handled when control is next in Python (between timed
    calls, never inside one kernel), so one slow case cannot hold up the cases after it. An
    alarm that falls inside an import waits until the import is done (it is tried again every
    ``IMPORT_RETRY_S``): a module cut half-way would stay half-initialised in ``sys.modules``
    (or a package that swallowed the cut would lack a part) and break every later case that
    imports it. Only the main thread receives signals; elsewhere, or with ``seconds`` None,
    there is no cap."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        if _in_import(frame):
            signal.setitimer(signal.ITIMER_REAL, IMPORT_RETRY_S)
            return
        raise CaseTimeout(f"ran past its cap of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class BenchRun:
    """What :func:`run_all` did: the rows of every case that finished, and the cases that did
    not, each as ``"<module or op> [<shape>]: <why>"``. Only ``failed`` is an error; ``cut`` and
    ``not_run`` are what a cap and a budget ask for."""

    rows: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # raised an error
    cut: list[str] = field(default_factory=list)  # ran past the per-case cap
    not_run: list[str] = field(default_factory=list)  # not started: the whole run's budget was spent

    @property
    def complete(self) -> bool:
        return not self.failed and not self.cut and not self.not_run


def run_all(
    device: torch.device,
    modules: list[str] | None = None,
    min_run_time: float = 0.5,
    *,
    case_cap_s: float | None = None,
    budget_s: float | None = None,
    after_case: Callable[[BenchRun], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchRun:
    """Run every case of ``modules`` (all by default) in the order given.

    A module is imported and its cases built only when its turn comes, so one that fails to
    build is recorded and the others still run. A case that raises is recorded as failed, one
    that runs past ``case_cap_s`` as cut; once ``budget_s`` seconds have passed no further case
    is started (each is recorded as not run). ``after_case`` sees the run after every case (the
    CLI writes the results file there, so an interrupted run keeps what it measured)."""
    run = BenchRun()
    start = time.monotonic()

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - start >= budget_s

    for name in modules or BENCH_MODULES:
        if out_of_time():
            run.not_run.append(f"{name}: the bench's budget of {budget_s:g} s was spent")
            continue
        try:
            with time_cap(case_cap_s):
                cases = importlib.import_module(f"bench.{name}").cases(device)
        except CaseTimeout as exc:
            run.cut.append(f"{name} (building its cases): {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, and the next module runs
            run.failed.append(f"{name} (building its cases): {type(exc).__name__}: {exc}")
            continue
        for case in cases:
            label = f"{case.op} [{case.shape}]"
            if out_of_time():
                run.not_run.append(f"{label}: the bench's budget of {budget_s:g} s was spent")
                continue
            if progress is not None:
                progress(label)
            try:
                with time_cap(case_cap_s):
                    run.rows += run_case(case, device, min_run_time)
            except CaseTimeout as exc:
                run.cut.append(f"{label}: {exc}")
            except Exception as exc:  # noqa: BLE001 - recorded, and the next case runs
                run.failed.append(f"{label}: {type(exc).__name__}: {exc}")
            if after_case is not None:
                after_case(run)
    return run


def format_table(rows: list[dict]) -> str:
    columns = ["op", "shape", "face", "reference_ms", "sbfast_ms", "speedup", "GB/s", "samples/s"]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_cases(cases_fn: Callable[[torch.device], list[BenchCase]], min_run_time: float = 0.5) -> int:
    """A bench module run as a script: every case of ``cases_fn`` on the default device (CUDA when
    present), timed by ``run_case`` and printed as ``format_table``; nothing is written."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(format_table([row for case in cases_fn(device) for row in run_case(case, device, min_run_time)]))
    return 0


# Where a run writes unless asked to --save: the committed results/<device>.json are the
# published numbers and change only on purpose (scratch/ is git-ignored).
SCRATCH_DIR = RESULTS_DIR / "scratch"


def results_path(device: torch.device, scratch: bool = False) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    return (SCRATCH_DIR if scratch else RESULTS_DIR) / f"{slug}.json"


def write_results(rows: list[dict], device: torch.device, path: Path | None = None) -> Path:
    """Write ``rows`` to the device's results file. Rows of ops that this run did not bench
    are kept from the existing file, so ``--ops X`` refreshes X's rows only."""
    path = path or results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh_ops = {row["op"] for row in rows}
    kept = []
    if path.exists():
        try:
            kept = [row for row in json.loads(path.read_text()).get("rows", []) if row.get("op") not in fresh_ops]
        except (json.JSONDecodeError, AttributeError):
            kept = []
    payload = {
        "device": device_name(device),
        "torch": torch.__version__,
        "rows": kept + rows,
    }
    # written whole or not at all: the file is rewritten after every case of a run
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def pytest_params(cases_fn: Callable[[torch.device], list[BenchCase]], device: torch.device):
    """(case, face) pairs for a pytest-benchmark parametrisation; "reference" is a face too."""
    params = []
    for case in cases_fn(device):
        for face in ["reference", *case.faces]:
            params.append((case, face))
    return params


def run_pytest_benchmark(benchmark, case: BenchCase, face: str) -> None:
    fn = case.reference if face == "reference" else case.faces[face]
    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "face": face})
    if case.setup is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, setup=case.setup, rounds=10, warmup_rounds=1)


__all__ = ["BenchCase", "asdict"]
