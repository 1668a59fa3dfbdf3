"""``python -m bench [--ops NAME ...] [--device cpu|cuda] [--min-run-time S] [--save | --output PATH]``:
print the table and write JSON (rows of ops not benched this time are kept in the file).

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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--ops", nargs="*", help=f"bench modules to run (default all: {', '.join(harness.BENCH_MODULES)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (CPU) or per do_bench rep (CUDA)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--save", action="store_true",
                       help="write the committed bench/results/<device>.json (default: bench/results/scratch/<device>.json)")  # fmt: skip
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
    cases = harness.collect_cases(device, modules)
    rows = []
    for case in tqdm(cases, desc=f"bench on {harness.device_name(device)}", unit="case"):
        rows += harness.run_case(case, device, args.min_run_time)
    print(f"\nsbfast bench on {harness.device_name(device)} (torch {torch.__version__})\n")
    print(harness.format_table(rows))
    path = harness.write_results(rows, device, Path(args.output) if args.output else harness.results_path(device, scratch=not args.save))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
