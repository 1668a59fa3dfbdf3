"""``sbfast theory``: the release notebook's theory figures (sharpness against diversity on a
random-design linear model), each a table, strict JSON and a PNG (docs/reproduce.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sbfast.cli.errors import CliError

CHOICES = ("sam-vs-sharpbalance", "sam-bounds", "sharpbalance-rho", "vary-k", "all")


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "theory",
        parents=parents,
        help="the theory figures: sharpness vs diversity on a linear model, simulated and bounds",
        description="The release notebook's theory figures: SAM and SharpBalance on a random-design "
        "linear regression (n 3000, d 150, p 1000, s 10), the theorem's bounds and, for the simulated "
        "figures, the simulation with standard errors. Writes <figure>.png and <figure>.json into "
        "--output and prints a table (docs/reproduce.md).",
    )
    t.add_argument("--figure", required=True, choices=CHOICES, help="which figure (all: the four)")
    t.add_argument(
        "--output", default="runs/theory", metavar="DIR", help="folder for the PNG and JSON files (default runs/theory)"
    )
    t.add_argument("--draws", type=int, metavar="N", help="data draws per point (default 10; --quick 4)")
    t.add_argument(
        "--init-draws", type=int, metavar="N", help="initialisations per data draw (default 100; --quick 20)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the generator (teacher, data, inits)")
    t.add_argument("--quick", action="store_true", help="a run of seconds: n 600, d 30, p 200, 5 points a sweep")
    t.add_argument("--device", default="cpu", help="device to simulate on (default: cpu)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=cmd_theory)


def _check_device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r}: not a device name; expected cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name!r}: CUDA is not available here; expected cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s); expected cuda:0..")
    elif device.type != "cpu":
        raise CliError(f"--device {name!r}: expected cpu or cuda[:N]")
    return str(device)


def _check_output(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CliError(f"--output {str(path)!r} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sbfast-theory-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CliError(
            f"--output {str(path)!r} cannot be written ({e.strerror or e}); expected a writable folder"
        ) from None


def _strict(value: Any) -> Any:
    # strict JSON: a non-finite float (a diverged run) becomes null
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _progress(enabled: bool):
    def wrap(it, total, desc):
        if not enabled:
            return iter(it)
        from tqdm import tqdm

        return iter(tqdm(it, total=total, desc=desc, unit="point", leave=False, dynamic_ncols=True, file=sys.stderr))

    return wrap


def cmd_theory(args: argparse.Namespace) -> int:
    for flag, value, low in (("--draws", args.draws, 2), ("--init-draws", args.init_draws, 1)):
        if value is not None and value < low:
            raise CliError(f"{flag} {value}: expected an integer >= {low}")
    device = _check_device(args.device)
    try:
        import matplotlib  # noqa: F401 - needed for the PNGs, checked before any work
    except ImportError:
        raise CliError("the theory figures need matplotlib (pip install matplotlib)") from None
    from sbfast.theory.figures import FIGURES, Settings, compute_figure, format_table, quick_settings
    from sbfast.theory.plots import plot_figure

    settings = quick_settings() if args.quick else Settings()
    changes = {"seed": args.seed, "device": device}
    if args.draws is not None:
        changes["data_draws"] = args.draws
    if args.init_draws is not None:
        changes["init_draws"] = args.init_draws
    settings = replace(settings, **changes)
    output = Path(args.output)
    _check_output(output)
    figures = FIGURES if args.figure == "all" else (args.figure,)
    progress = _progress(not args.no_progress and sys.stderr.isatty())
    for name in figures:
        data = compute_figure(name, settings, progress)
        print(format_table(data))
        # each file written whole or not at all (a temporary name, then one rename), so a
        # Ctrl-C leaves the figures finished so far and no half-written file
        json_path, png_path = output / f"{name}.json", output / f"{name}.png"
        tmp_json, tmp_png = output / f".{name}.json.tmp", output / f".{name}.tmp.png"
        tmp_json.write_text(json.dumps(_strict(data.to_dict()), indent=2, allow_nan=False) + "\n")
        plot_figure(data, tmp_png)
        os.replace(tmp_json, json_path)
        os.replace(tmp_png, png_path)
        print(f"wrote {png_path} and {json_path}\n")
    return 0


__all__ = ["add_parsers", "cmd_theory"]
