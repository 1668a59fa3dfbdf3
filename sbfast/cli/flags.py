"""Command-line flags generated from ``TrainConfig``'s fields, and the config they build.

Each field becomes ``--field-name``: its type gives the parser (bool: ``--x/--no-x``; tuple:
several values; dict: a JSON object), its ``metadata["help"]`` the help text and its
``metadata["choices"]`` the accepted names. So a field added to the dataclass appears on the
command line with its help, and the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sbfast.cli.errors import CliError
from sbfast.train.config import PRESETS, TrainConfig

DEST_PREFIX = "cfg__"


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _kind(annotation: Any) -> tuple[str, Any]:
    """(kind, element type) of a field annotation: "bool", "optional_bool", "int", "float", "str",
    "tuple", "dict" or "bool_or_str"."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if set(non_none) == {bool, str}:
            return "bool_or_str", None
        if len(non_none) == 1:
            kind, elem = _kind(non_none[0])
            return ("optional_bool", None) if kind == "bool" else (kind, elem)
        raise TypeError(f"no command-line form for a field of type {annotation!r}")
    if annotation is bool:
        return "bool", None
    if annotation in (int, float, str):
        return annotation.__name__, None
    if origin is tuple:
        return "tuple", args[0]
    if origin is dict or annotation is dict:
        return "dict", None
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({e.msg}); expected an object such as '{{\"width\": 8}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; expected one such as '{{\"width\": 8}}'")
    return value


def _true_false_or(choices: Sequence[str]) -> Any:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def parse(text: str) -> bool | str:
        if text.lower() in words:
            return words[text.lower()]
        if text in choices:
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is not true, false or one of {', '.join(choices)}")

    return parse


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return " ".join(map(str, v)) if v else "(none)"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, dict):
        return json.dumps(v) if v else "{}"
    return str(v)


def default_text(f: dataclasses.Field, overrides: Mapping[str, Any]) -> str:
    """The default shown in a field's help: the subcommand's own, the field's, or the presets'."""
    if f.name in overrides:
        return f"default: {_show(overrides[f.name])}"
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    if default is None and any(f.name in p for p in PRESETS.values()):
        by_value: dict[str, list[str]] = {}
        for ds, preset in PRESETS.items():
            by_value.setdefault(_show(preset[f.name]) if preset[f.name] is not None else "as is", []).append(ds)
        if len(by_value) == 1:
            return f"default: {next(iter(by_value))}"
        return "default per dataset: " + "; ".join(f"{'/'.join(ds)} {v}" for v, ds in by_value.items())
    if default is None:
        return "default: none"
    return f"default: {_show(default)}"


def add_config_flags(
    parser: argparse.ArgumentParser,
    *,
    exclude: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    title: str = "run configuration (TrainConfig fields)",
) -> list[str]:
    """Add one flag per TrainConfig field (but ``exclude``) to ``parser``; returns the field names.

    Flags store into ``cfg__<field>`` and are absent from the namespace unless given, so that
    :func:`config_overrides` returns exactly what the user typed. ``defaults`` only changes the
    default shown (the subcommand applies it); ``aliases`` adds more spellings of a flag.
    """
    defaults = defaults or {}
    aliases = aliases or {}
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(TrainConfig)
    added = []
    for f in config_fields():
        if f.name in exclude:
            continue
        kind, elem = _kind(hints[f.name])
        doc = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        kw: dict[str, Any] = {"dest": DEST_PREFIX + f.name, "default": argparse.SUPPRESS}
        names = [flag_name(f.name), *aliases.get(f.name, ())]
        if kind in ("bool", "optional_bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "bool_or_str":
            kw.update(nargs="?", const=True, type=_true_false_or(choices or ()), metavar="BACKEND")
            doc += f" (bare flag: true; or one of {', '.join(choices or ())})"
        elif kind == "tuple":
            kw.update(nargs="*" if elem is str else "+", type=elem, metavar="NAME" if elem is str else "N")
        elif kind == "dict":
            kw.update(type=_json_object, metavar="JSON")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[kind]
            if choices:
                kw["choices"] = choices
            else:
                kw["metavar"] = {"int": "N", "float": "X", "str": "PATH" if _is_path(f.name) else "NAME"}[kind]
        # a help text that states its own default (a derived one, like T_d's) keeps it
        shown = doc if ("default" in doc and f.name not in defaults) else f"{doc} ({default_text(f, defaults)})"
        group.add_argument(*names, help=shown.replace("%", "%%"), **kw)
        added.append(f.name)
    return added


def _is_path(name: str) -> bool:
    return name.endswith(("_root", "_dir")) or name in ("resume", "from_phase1")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line, by field name."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith(DEST_PREFIX):
            name = key[len(DEST_PREFIX) :]
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


# Fields of a saved config that describe where that run lived, not how to train: a rerun from
# the file must not write into, resume or fork from the old run's folder unless asked to.
_RUN_PLACE_FIELDS = ("output_dir", "resume", "from_phase1")


def is_comparison(data: Any) -> bool:
    """Whether a JSON object is a comparison's file (``comparison.json``: methods, seeds, runs)."""
    return isinstance(data, dict) and {"methods", "seeds", "runs"} <= set(data)


def read_config_file(path: str, *, comparison: bool = False) -> dict[str, Any]:
    """TrainConfig fields from a JSON file: a dict of fields, or a run's ``config.json`` /
    ``results.json`` (whose ``"config"`` is used). Where the old run lived is dropped.

    A comparison's ``comparison.json`` holds the config its runs share; it is taken only with
    ``comparison`` (``sbfast compare``); ``sbfast train`` refuses it (which of its runs?)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CliError(f"--config {path!r}: no such file; expected a JSON file of TrainConfig fields") from None
    except IsADirectoryError:
        raise CliError(f"--config {path!r}: is a folder; expected a JSON file of TrainConfig fields") from None
    except UnicodeDecodeError as e:
        raise CliError(
            f"--config {path!r}: not UTF-8 text (byte {e.start}: {e.reason}); expected a JSON file of TrainConfig fields"
        ) from None
    except OSError as e:
        raise CliError(f"--config {path!r}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(
            f"--config {path!r}: not JSON ({e.msg} at line {e.lineno}); expected an object of TrainConfig fields"
        ) from None
    if is_comparison(data) and not comparison:
        runs = data.get("runs") or []
        example = (
            Path(runs[0]["run_dir"]) / "config.json"
            if runs and isinstance(runs[0], dict) and runs[0].get("run_dir")
            else None
        )
        raise CliError(
            f"--config {path!r}: a comparison's file ({len(runs)} runs of {', '.join(map(str, data['methods']))} over "
            f"seeds {' '.join(map(str, data['seeds']))}), not one run's config; expected a run's config.json"
            + (f" such as {str(example)!r}" if example else "")
            + " (or sbfast compare --config with this file)"
        )
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise CliError(f"--config {path!r}: expected a JSON object of TrainConfig fields, got {type(data).__name__}")
    names = {f.name for f in config_fields()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CliError(f"--config {path!r}: unknown TrainConfig fields {unknown}; expected names from {sorted(names)}")
    out = {k: v for k, v in data.items() if k not in _RUN_PLACE_FIELDS}
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = tuple(v)
    return out
