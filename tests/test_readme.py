"""Every ``sbfast`` / ``python -m sbfast`` / ``python -m bench`` command written in README.md and
docs/cli.md exists with the flags it uses: each is parsed by the real parser (nothing runs).

Commands are taken from ```bash blocks (continuation lines joined, comments, prompts and
``&&`` / ``;`` / ``|`` chains handled, environment assignments and ``.venv/bin/`` prefixes
stripped) and from inline code spans that start with a command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sbfast.cli import build_parser
from sbfast.cli.errors import CliError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md"]
_SPLIT = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", text, flags=re.M | re.S)


def _logical_lines(block: str) -> list[str]:
    lines, buf = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    if buf:
        lines.append(buf)
    return lines


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a # after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def command_argv(segment: str) -> tuple[str, list[str]] | None:
    """("sbfast" | "bench", argv) when a shell segment runs sbfast or the bench package."""
    segment = segment.strip()
    if segment.startswith("$ "):
        segment = segment[2:]
    try:
        tokens = shlex.split(segment)
    except ValueError:
        return None
    while tokens and (_ENV.match(tokens[0]) or tokens[0] in ("time", "timeout", "exec", "command")):
        tokens.pop(0)
        if tokens and tokens[0].isdigit():  # timeout's duration
            tokens.pop(0)
    if not tokens:
        return None
    head = tokens[0].rsplit("/", 1)[-1]
    if head == "sbfast":
        return "sbfast", tokens[1:]
    if re.fullmatch(r"python[0-9.]*", head) and tokens[1:3] == ["-m", "sbfast"]:
        return "sbfast", tokens[3:]
    if re.fullmatch(r"python[0-9.]*", head) and tokens[1:3] == ["-m", "bench"]:
        return "bench", tokens[3:]
    return None


def commands_in(text: str) -> list[tuple[str, list[str], str]]:
    found = []
    for block in _bash_blocks(text):
        for line in _logical_lines(block):
            for seg in _SPLIT.split(_strip_comment(line)):
                cmd = command_argv(seg)
                if cmd:
                    found.append((*cmd, seg))
    for span in re.findall(r"`([^`\n]+)`", text):
        if re.match(r"(sbfast|python[0-9.]* -m (sbfast|bench))( |$)", span):
            cmd = command_argv(span)
            if cmd and cmd[1]:  # a bare program name in prose is a mention, not a command
                found.append((*cmd, span))
    return found


def _parse(kind: str, argv: list[str]) -> None:
    if kind == "bench":
        from bench.__main__ import build_parser as bench_parser

        parser = bench_parser()
    else:
        if argv[:1] == ["bench"]:  # sbfast bench hands everything after it to the bench package
            return _parse("bench", argv[1:])
        parser = build_parser()
        if argv and re.fullmatch(r"<[^>]+>", argv[0]):  # `sbfast <command> --help`: every command
            sub = next(a for a in parser._actions if a.dest == "command")
            for name in sub.choices:
                _parse(kind, [name, *argv[1:]])
            return None
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # --help prints and exits 0; argparse's own errors exit 2
        assert e.code == 0, f"{kind} {' '.join(argv)}: exit {e.code}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_parses(doc, capsys):
    if not doc.exists():
        pytest.skip(f"{doc.name} is not in this checkout")
    found = commands_in(doc.read_text())
    if doc.name == "README.md":
        assert any(kind == "sbfast" and argv[:1] in (["compare"], ["run"]) for kind, argv, _ in found), (
            "the README's quick start should run the main job (sbfast compare)"
        )
    for kind, argv, seg in found:
        try:
            _parse(kind, argv)
        except CliError as e:
            pytest.fail(f"{doc.name}: `{seg}` does not parse: {e}")
    capsys.readouterr()


def test_the_extractor_handles_shell_forms():
    text = """
```bash
python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh && sbfast compare   # the main job
SBFAST_CUDA=0 python -m sbfast train --method de \\
    --epochs 3
$ .venv/bin/sbfast eval runs/x | head
python -m bench --ops select
```
and inline `sbfast info` but not `sbfast.train`.
"""
    found = [(k, a) for k, a, _ in commands_in(text)]
    assert found == [
        ("sbfast", ["compare"]),
        ("sbfast", ["train", "--method", "de", "--epochs", "3"]),
        ("sbfast", ["eval", "runs/x"]),
        ("bench", ["--ops", "select"]),
        ("sbfast", ["info"]),
    ]
    with pytest.raises(CliError):
        build_parser().parse_args(["compare", "--no-such-flag"])  # what a stale README flag would meet
