#!/usr/bin/env python
"""The Python steps of ``scripts/gpu_check.sh``: what the shell script cannot say in a line.

    python scripts/gpu_check_report.py env --device cuda --vars FILE
    python scripts/gpu_check_report.py load --device cuda
    python scripts/gpu_check_report.py summary OUTDIR --results PATH --device cuda --title TITLE

``env`` prints the device and the versions, and writes to FILE, as shell assignments, what the
later stages need from them (one Python start with torch for all of it): ``ARCH`` (the GPU's
compute capability, e.g. 9.0), ``TITLE`` (the device as the summary names it), ``RESULTS``
(where ``python -m bench --save`` writes for the device) and ``BENCH_ORDER`` (the bench modules,
most telling first, so that a bench cut short by its budget has measured what matters);
``load`` checks that the built extension imports and serves, on the device, every op that its
C++ sources register (exit 1 otherwise); ``summary`` writes ``OUTDIR/summary.md`` from the stage
table, the JUnit files, the GPU memory samples, the bench log and the results file.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the bench package lives at the repository root
    sys.path.insert(0, str(ROOT))

# Bench modules in the order the GPU check runs them: the ops and the training step first,
# torch.compile (the slowest to warm up) last. Modules not named here run after these.
BENCH_PRIORITY = ["global_sq_norm", "sam", "select", "sharpness", "train", "compat", "checkpoint", "compile"]

# Where each device's C++ sources register their kernels, and the face sbfast.backends() names.
SOURCES = {"cuda": ("csrc/cuda", "*.cu", "cuda-c++"), "cpu": ("csrc/cpu", "*.cpp", "c++")}

LOG_TAIL_LINES = 25  # of a failed stage's log, in the summary
MAX_LISTED_FAILURES = 40


def env(device: str, vars_file: Path) -> int:
    import torch

    from bench import harness

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        arch = f"{p.major}.{p.minor}"
        title = f"{torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor})"
        print(
            f"gpu: {torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB)"
        )
    else:
        arch, title = "", "the CPU (rehearsal)"
        print(f"cpu: {harness.device_name(torch.device('cpu'))} (a rehearsal: no GPU code runs)")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    values = {
        "ARCH": arch,
        "TITLE": title,
        "RESULTS": str(harness.results_path(torch.device(device))),
        "BENCH_ORDER": " ".join(bench_order()),
    }
    vars_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return 0


def registered_ops(device: str) -> set[str]:
    """Every op name that ``TORCH_LIBRARY_IMPL(sbfast, <device>)`` registers in the sources."""
    folder, pattern, _ = SOURCES[device]
    return {name for src in (ROOT / folder).glob(pattern) for name in re.findall(r'm\.impl\("(\w+)"', src.read_text())}


def load(device: str) -> int:
    import sbfast
    from sbfast import registry

    table = sbfast.backends()
    print(json.dumps(table, indent=1))
    if registry.EXTENSION_ERROR is not None:
        print(f"sbfast._C did not import: {registry.EXTENSION_ERROR}")
        return 1
    expected = registered_ops(device)
    face = SOURCES[device][2]
    missing = sorted(name for name in expected if table.get(name, {}).get(device) != face)
    print(f"{face} kernels expected on {device}: {sorted(expected)}")
    print(f"served otherwise on {device}: {sorted(n for n, f in table.items() if f.get(device) != face)}")
    if not expected:
        print(f"no kernels found in {SOURCES[device][0]}: the sources are not where this check looks")
        return 1
    if missing:
        print(f"{SOURCES[device][0]} kernels that this build does not serve: {missing}")
        return 1
    return 0


def bench_order() -> list[str]:
    from bench import harness

    have = [m.removeprefix("bench_") for m in harness.BENCH_MODULES]
    return [m for m in BENCH_PRIORITY if m in have] + [m for m in have if m not in BENCH_PRIORITY]


def junit_counts(path: Path) -> tuple[dict[str, list[int]], list[str]]:
    """Per test file [passed, failed, errors, skipped], and "file::test: message" per failure."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = (case.get("classname") or "?").split(".")
        file = Path(case.get("file") or next((p for p in parts if p.startswith("test_")), parts[-1]) + ".py").name
        # column 1 failed, 2 errors, 3 skipped, 0 passed: the first of those elements the case holds
        kind, bad = next(
            ((k, e) for k, tag in ((1, "failure"), (2, "error"), (3, "skipped")) if (e := case.find(tag)) is not None),
            (0, None),
        )
        counts[file][kind] += 1
        if kind in (1, 2):
            message = (bad.get("message") or "").strip().splitlines()
            failures.append(f"{file}::{case.get('name')}: {message[0][:200] if message else '(no message)'}")
    return counts, failures


def summary(out: Path, results: Path | None, device: str, title: str) -> str:
    logs = out / "logs"
    lines = [f"# sbfast GPU check on {title}", ""]
    if device != "cuda":
        lines += [
            "A rehearsal on the CPU: the script's own stages, with the CPU in place of the GPU. "
            "It proves the script, not the GPU code.",
            "",
        ]

    stages = [row.split("\t") for row in (logs / "stages.tsv").read_text().splitlines() if row.strip()]
    lines += ["## Stages", "", "| stage | status | seconds | cap |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in stages]

    lines += ["", "## Tests (per file)", "", "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    all_failures = []
    for stage in ("tests", "train"):
        path = logs / f"{stage}.xml"
        if not path.exists():
            lines.append(f"| ({stage}.xml missing: the {stage} stage did not finish) | | | | |")
            continue
        counts, failures = junit_counts(path)
        all_failures += failures
        lines += [f"| {name} | {p} | {f} | {e} | {s} |" for name, (p, f, e, s) in sorted(counts.items())]
    if all_failures:
        lines += ["", f"## Failed tests ({len(all_failures)})", ""]
        lines += [f"- {f}" for f in all_failures[:MAX_LISTED_FAILURES]]
        if len(all_failures) > MAX_LISTED_FAILURES:
            lines.append(f"- ... and {len(all_failures) - MAX_LISTED_FAILURES} more (logs.tar.gz)")

    samples = logs / "gpu_memory_samples.txt"
    peak = max((int(x) for x in samples.read_text().split() if x.isdigit()), default=None) if samples.exists() else None
    lines += [
        "",
        "## Peak GPU memory",
        "",
        f"{peak} MiB (nvidia-smi, sampled every 200 ms)" if peak is not None else "n/a (no nvidia-smi samples)",
    ]

    lines += ["", f"## Bench ({results.name if results else 'no results file'})", ""]
    if results is not None and results.is_file():
        from bench import harness

        lines += ["```", harness.format_table(json.loads(results.read_text())["rows"]), "```"]
    else:
        lines.append("no results file: the bench stage measured nothing")
    bench_log = logs / "bench.log"
    if bench_log.exists():
        notes = [
            ln
            for ln in bench_log.read_text(errors="replace").splitlines()
            if ln.startswith(("failed: ", "cut: ", "not run: ", "bench incomplete"))
        ]
        if notes:
            lines += [""] + [f"- {ln}" for ln in notes]

    for name, status, *_ in stages:
        log = logs / f"{name}.log"
        if status not in ("pass", "skipped") and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            lines += ["", f"## {name}: {status}, last {len(tail)} lines of {name}.log", "", "```", *tail, "```"]

    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check_report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env")
    e.add_argument("--device", choices=sorted(SOURCES), required=True)
    e.add_argument("--vars", type=Path, required=True)
    sub.add_parser("load").add_argument("--device", choices=sorted(SOURCES), required=True)
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("--results", type=Path, default=None)
    s.add_argument("--device", choices=sorted(SOURCES), required=True)
    s.add_argument("--title", required=True)
    args = parser.parse_args(argv)

    if args.command == "env":
        return env(args.device, args.vars)
    if args.command == "load":
        return load(args.device)
    print(summary(args.out, args.results, args.device, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
