"""The command line's errors: one line each, ``sbfast: error: ...``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_EXIT = 2  # a bad argument, path, data folder, output folder or device (argparse's own status)
INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class CliError(Exception):
    """A bad argument, path, folder or device, found before anything is trained: its message is
    one line naming the value and what was expected; the command exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``sbfast: error: <what>`` and exit status 2 (argparse
    prints the whole usage first, which buries the line that matters)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")


def fail(message: str, code: int = USAGE_EXIT) -> int:
    print(f"sbfast: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code
