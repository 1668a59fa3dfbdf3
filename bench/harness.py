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
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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
    """Median time of one call of ``fn`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=int(min_run_time * 1000), return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call allocations and lazy initialisation
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time).median * 1e3


def collect_cases(device: torch.device, modules: list[str] | None = None) -> list[BenchCase]:
    cases = []
    for name in modules or BENCH_MODULES:
        module = importlib.import_module(f"bench.{name}")
        cases += module.cases(device)
    return cases


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


def format_table(rows: list[dict]) -> str:
    columns = ["op", "shape", "face", "reference_ms", "sbfast_ms", "speedup", "GB/s", "samples/s"]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


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
    path.write_text(json.dumps(payload, indent=2) + "\n")
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
