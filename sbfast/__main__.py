"""``python -m sbfast`` and the ``sbfast`` console script: the command line lives in
:mod:`sbfast.cli` (one module per group of subcommands)."""

from __future__ import annotations

from sbfast.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
