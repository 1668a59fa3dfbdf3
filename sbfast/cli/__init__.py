"""The ``sbfast`` command line (also ``python -m sbfast``).

Subcommands: ``compare`` (the main job; ``run`` is its old name), ``train``, ``eval``,
``score``, ``bench``, ``info``; docs/cli.md describes each and its outputs.

Every bad argument, path, data folder, corruption folder, output folder and device is found
before any training starts and reported as one line ``sbfast: error: ...`` with exit status 2
(``--debug`` shows the traceback instead). Ctrl-C prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from sbfast.cli.errors import INTERRUPT_EXIT, USAGE_EXIT, CliError, Parser, fail

DESCRIPTION = """\
sbfast: SharpBalance ensembles (de, de_sam, sharpbalance), fast.

  sbfast compare                 the main job: the three methods over five seeds on the embedded digits
  sbfast train --method de_sam   one run; --resume RUN_DIR continues one, --from-phase1 RUN_DIR forks one
  sbfast eval RUN_DIR            recompute a run's metrics from its saved members
  sbfast score RUN_DIR           Fisher scores of a run's saved members (.npy / .pt)
  sbfast bench                   the benchmark table (every op against the reference)
  sbfast info                    versions, kernels per device, trainer components

'sbfast <command> --help' lists every option of a command; docs/cli.md explains the outputs.
"""


# The modules that register subcommands, in the order --help lists them: each has
# ``add_parsers(sub, parents)``. A new subcommand module is one more line here.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "sbfast.cli.training",
    "sbfast.cli.tools",
    "sbfast.cli.theory",
    "sbfast.cli.measure",
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )
    p = Parser(prog="sbfast", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub, [common])
    return p


def _command_and_rest(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    rest = list(argv)
    while rest and rest[0] == "--debug":
        rest.pop(0)
    return (rest[0], rest[1:]) if rest else (None, [])


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"sbfast: warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a run failed, 2 a bad argument,
    130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:  # a warning (a stale lock taken over, a damaged last.pt passed over) is one line too
        warnings.formatwarning = _one_line_warning
    try:
        command, rest = _command_and_rest(argv)
        if command == "bench":  # every argument after it belongs to python -m bench, --help included
            from sbfast.cli.tools import find_bench_main

            return int(find_bench_main()(rest) or 0)
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except CliError as e:
        if debug:
            raise
        return fail(str(e), USAGE_EXIT)
    except KeyboardInterrupt as e:
        if debug:
            raise
        # sbfast.train.RunInterrupted (a KeyboardInterrupt with an exit_code) is a run that wrote
        # its checkpoint and has already printed the one line saying how to resume it
        if not hasattr(e, "exit_code"):
            print("sbfast: interrupted (Ctrl-C)", file=sys.stderr)
        return int(getattr(e, "exit_code", INTERRUPT_EXIT))
    except BrokenPipeError:  # output piped into a reader that stopped (| head)
        return 0
    except Exception as e:
        if debug:
            raise
        if getattr(e, "one_line", False):  # a run's own stop that says what to do (RunDiverged, a full disk)
            return fail(f"{e}", 1)
        return fail(f"{type(e).__name__}: {e} (run again with --debug for the traceback)", 1)


__all__ = ["SUBCOMMAND_MODULES", "CliError", "build_parser", "main"]
