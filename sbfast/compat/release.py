"""The one-line switch: ``import sbfast.compat.release`` at the top of the release's
``main.py`` (before its own imports) makes its imports resolve to sbfast:

- ``engine`` -> :mod:`sbfast.compat.engine`;
- ``sam`` / ``sam.sam`` -> :mod:`sbfast.compat.nsam` (``from sam.sam import NSAM``);
- ``utils`` -> :mod:`sbfast.compat.utils`, but only where that shadows nothing of the user's:
  when no ``utils`` is importable, or when the one that is importable is the release's own
  ``utils.py`` (recognised by its definitions, read without running it). Any other ``utils``
  is left alone, with a warning saying to import ``sbfast.compat.utils`` explicitly.

Modules are registered in ``sys.modules``; a name that a module already imported under
another meaning is replaced with a RuntimeWarning (names bound before the switch keep the old
objects). :func:`register` does the same and returns what it registered; :func:`unregister`
undoes it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

from sbfast.compat import engine, nsam, utils

__all__ = ["register", "unregister", "registered"]

# what the release's utils.py defines: a utils module with all of these is the release's
_RELEASE_UTILS_MARKERS = (
    "class CustomDataset",
    "def create_dataset",
    "def create_model",
    "def save_model",
    "def load_model",
)

registered: dict[str, types.ModuleType] = {}
_previous: dict[str, types.ModuleType | None] = {}


def _is_release_utils(spec: importlib.machinery.ModuleSpec) -> bool:
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return False
    try:
        with open(origin, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return False
    return all(marker in source for marker in _RELEASE_UTILS_MARKERS)


def _utils_is_free() -> bool:
    loaded = sys.modules.get("utils")
    if loaded is not None:
        return loaded is utils or _is_release_utils(getattr(loaded, "__spec__", None) or types.SimpleNamespace())
    try:
        spec = importlib.util.find_spec("utils")
    except (ImportError, ValueError):
        return True
    return spec is None or _is_release_utils(spec)


def _sam_package() -> types.ModuleType:
    existing = sys.modules.get("sam")
    if existing is not None and getattr(existing, "__sbfast_alias__", False):
        return existing
    pkg = types.ModuleType("sam", "sbfast alias of the release's sam package (sam.sam -> sbfast.compat.nsam)")
    pkg.__path__ = []  # a package, so that 'sam.sam' resolves through sys.modules
    pkg.__sbfast_alias__ = True
    pkg.sam = nsam
    return pkg


def _put(name: str, module: types.ModuleType) -> None:
    old = sys.modules.get(name)
    if old is not None and old is not module and not getattr(old, "__sbfast_alias__", False):
        warnings.warn(
            f"sbfast.compat.release: module {name!r} was already imported ({getattr(old, '__file__', old)}); "
            f"later imports of {name!r} get sbfast's, names bound before keep the old one. Import "
            "sbfast.compat.release first.",
            RuntimeWarning,
            stacklevel=3,
        )
    _previous.setdefault(name, old)
    sys.modules[name] = module
    registered[name] = module


def register() -> dict[str, types.ModuleType]:
    """Register the aliases (idempotent); returns {module name: module} of what is registered."""
    _put("engine", engine)
    _put("sam", _sam_package())
    _put("sam.sam", nsam)
    if _utils_is_free():
        _put("utils", utils)
    elif "utils" not in registered:
        warnings.warn(
            "sbfast.compat.release: a 'utils' module that is not the release's is importable; it is left "
            "alone. Import create_dataset etc. from sbfast.compat.utils.",
            RuntimeWarning,
            stacklevel=2,
        )
    return dict(registered)


def unregister() -> None:
    """Put back what :func:`register` replaced (tests; a process that wants the release back)."""
    for name in list(registered):
        old = _previous.pop(name, None)
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old
        del registered[name]


register()
