"""``python -m bench [--ops NAME ...] [--device cpu|cuda] [--min-run-time S] [--case-cap S] [--budget S]
[--save | --output PATH]``: print the table and write JSON (rows of ops not benched this time are
kept in the file; the file is rewritten after every case, so an interrupted run keeps what it
measured). Exit status 1 when a case raised an error; cases cut by --case-cap or left by
--budget are listed, and are not errors.

By default the JSON goes to ``bench/results/scratch/<device>.json`` (git-ignored); ``--save``
writes the committed ``bench/results/<device>.json``, the published numbers.
``sbfast bench ...`` runs the same."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from bench import harness


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ops", nargs="*", help=f"bench modules to run (default all: {', '.join(harness.BENCH_MODULES)})"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds per timing (CPU) or per do_bench rep (CUDA)"
    )
    parser.add_argument(
        "--case-cap",
        type=float,
        default=None,
        metavar="S",
        help="cut a case that runs longer than S seconds (listed as cut; the next case runs)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="start no case after S seconds (the rest are listed as not run)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--save",
        action="store_true",
        help="write the committed bench/results/<device>.json (default: bench/results/scratch/<device>.json)",
    )
    where.add_argument("--output", help="results JSON path")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    modules = [m if m.startswith("bench_") else f"bench_{m}" for m in args.ops] if args.ops else None
    unknown = set(modules or []) - set(harness.BENCH_MODULES)
    if unknown:
        parser.error(f"unknown bench modules {sorted(unknown)}; have {harness.BENCH_MODULES}")
    for name, value in (
        ("--case-cap", args.case_cap),
        ("--budget", args.budget),
        ("--min-run-time", args.min_run_time),
    ):
        if value is not None and not value > 0:
            parser.error(f"{name} must be a positive number of seconds, got {value}")
    path = Path(args.output) if args.output else harness.results_path(device, scratch=not args.save)
    name = harness.device_name(device)
    bar = tqdm(desc=f"bench on {name}", unit="case")

    def after_case(run: harness.BenchRun) -> None:
        bar.update(1)
        if run.rows:
            harness.write_results(run.rows, device, path)

    run = harness.run_all(
        device,
        modules,
        args.min_run_time,
        case_cap_s=args.case_cap,
        budget_s=args.budget,
        after_case=after_case,
        progress=lambda label: bar.set_postfix_str(label[:60]),
    )
    bar.close()
    print(f"\nsbfast bench on {name} (torch {torch.__version__})\n")
    print(harness.format_table(run.rows))
    if run.rows:
        print(f"\nwrote {path}")
    for kind, labels in (("failed", run.failed), ("cut", run.cut), ("not run", run.not_run)):
        for label in labels:
            print(f"{kind}: {label}")
    if not run.complete:
        print(
            f"bench incomplete: {len(run.failed)} failed, {len(run.cut)} cut at --case-cap, "
            f"{len(run.not_run)} not run (--budget)"
        )
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
