"""The shape of the package: every advertised name imports, the reference stands alone at the
bottom, no module reaches into another's private names, and the repository explains itself
(every README link resolves inside it; nothing cites a tracker instead of a reason)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import sbfast

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sbfast"
README = ROOT / "README.md"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _all_modules() -> list[str]:
    names = ["sbfast"]
    for info in pkgutil.walk_packages(sbfast.__path__, "sbfast."):
        if info.name.startswith("sbfast.kernels"):
            continue  # Triton launchers: imported by the registry, tested with the ops
        names.append(info.name)
    return names


@pytest.mark.parametrize("module", _all_modules())
def test_every_name_in_all_imports(module):
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        assert getattr(mod, name, None) is not None, f"{module}.__all__ lists {name!r}, which does not resolve"


def _readme_dotted_names() -> set[str]:
    text = README.read_text()
    return set(re.findall(r"`(sbfast(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))


def test_readme_names_exist():
    names = _readme_dotted_names()
    assert names, "the README names no sbfast API at all"
    missing = []
    for dotted in sorted(names):
        parts = dotted.split(".")
        obj = None
        # the longest importable prefix, then attributes
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                obj = None
            break
        if obj is None:
            missing.append(dotted)
    assert not missing, f"README names that do not exist: {missing}"


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported from, names, line) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def test_reference_and_common_import_nothing_above_them():
    """sbfast.reference and sbfast.common are the bottom layer: torch, and each other."""
    allowed = ("sbfast.common", "sbfast.reference")
    bad = []
    for path in [PACKAGE / "common.py", *sorted((PACKAGE / "reference").glob("*.py"))]:
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names] if module == "sbfast" else [module]
            for t in targets:
                if t.startswith("sbfast") and not t.startswith(allowed):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


# The trainer's modules, bottom to top: each imports only modules before it in this list (and
# any package below sbfast.train). reference_trainer is the slow twin, beside the trainer.
TRAIN_ORDER = (
    "config",
    "data",
    "steps",
    "evaluate",
    "plots",
    "results",
    "checkpoint",
    "run_folder",
    "run_state",
    "reference_trainer",
    "trainer",
    "run",
    "compare",
    "tradeoff",
)


def test_train_modules_import_only_down_the_trainer_order():
    """sbfast.train reads top to bottom: config, data, step, evaluate, plots, results, the disk
    (checkpoint files and the folder lock, the run folder and saved runs), the run state and what
    watches it, the trainers, the run, compare, the trade-off sweep; no cycle."""
    folder = PACKAGE / "train"
    found = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert found == sorted(TRAIN_ORDER), f"sbfast/train modules not in TRAIN_ORDER (or gone): {found}"
    bad = []
    for i, name in enumerate(TRAIN_ORDER):
        path = folder / f"{name}.py"
        below = set(TRAIN_ORDER[:i])
        for module, names, line in _imports(path):
            targets = [f"{module}.{n}" for n in names] if module == "sbfast.train" else [module]
            for t in targets:
                if t == "sbfast.train" or (t.startswith("sbfast.train.") and t.split(".")[2] not in below):
                    bad.append(f"sbfast/train/{name}.py:{line} imports {t} (not below {name} in TRAIN_ORDER)")
    assert not bad, "\n".join(bad)


# Packages above the op layer, top first: a package imports none above it. measure/ (the paper's
# measures) sits below train (train and compare may call it); theory/ stands apart on torch alone.
UPPER_PACKAGES = ("sbfast.cli", "sbfast.train", "sbfast.measure")
APART = ("sbfast.theory",)


def test_upper_packages_are_imported_only_from_above():
    bad = []
    for path in _sources():
        me = _module_name(path)
        if me == "sbfast.__main__":
            continue  # the entry point runs the command line
        mine = [i for i, pkg in enumerate(UPPER_PACKAGES) if me == pkg or me.startswith(pkg + ".")]
        allowed = set(UPPER_PACKAGES[mine[0] :]) if mine else set()
        apart = next((pkg for pkg in APART if me == pkg or me.startswith(pkg + ".")), None)
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names] if module == "sbfast" else [module]
            for t in targets:
                above = [pkg for pkg in UPPER_PACKAGES if (t == pkg or t.startswith(pkg + ".")) and pkg not in allowed]
                if above:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t}, which is above it")
                if apart is not None and t.startswith("sbfast") and not (t == apart or t.startswith(apart + ".")):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t} ({apart} stands apart: torch only)")
                if apart is None and any(t == pkg or t.startswith(pkg + ".") for pkg in APART):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t} ({t.split('.')[1]} stands apart)")


def test_theory_stands_apart():
    """sbfast.theory (the linear-model theory figures) is apart from the rest of sbfast: it
    imports torch, numpy, matplotlib and the standard library, and of sbfast only itself and
    sbfast.common."""
    import sys

    third_party = ("torch", "numpy", "matplotlib")
    bad = []
    for path in sorted((PACKAGE / "theory").glob("*.py")):
        for module, names, line in _imports(path):
            top = module.split(".")[0]
            if top == "sbfast":
                targets = [f"{module}.{n}" for n in names] if module == "sbfast" else [module]
                bad += [
                    f"{path.name}:{line} imports {t}"
                    for t in targets
                    if not t.startswith(("sbfast.theory", "sbfast.common"))
                ]
            elif top not in third_party and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{path.name}:{line} imports {module}")
    assert (PACKAGE / "theory" / "__init__.py").exists()
    assert not bad, "\n".join(bad)


def _sbfast_module_aliases(tree: ast.AST) -> dict[str, str]:
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sbfast"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sbfast"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                try:
                    importlib.import_module(full)
                except ImportError:
                    continue
                aliases[a.asname or a.name] = full
    return aliases


def test_no_private_names_cross_modules():
    """A helper two modules need has a public name where it lives; nobody imports `_x` from, or
    reads `mod._x` of, another sbfast module."""
    bad = []
    for path in _sources():
        me = _module_name(path)
        for module, names, line in _imports(path):
            if not module.startswith("sbfast") or module == me:
                continue
            names = [n for n in names if not (module == "sbfast" and n == "_C")]  # the compiled extension
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports private {module}.{n}")
        tree = ast.parse(path.read_text())
        aliases = _sbfast_module_aliases(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != me
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads private {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def _links(markdown: Path) -> list[str]:
    text = markdown.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(doc):
    bad = []
    for link in _links(doc):
        if re.match(r"[a-z]+://|mailto:|#", link):
            continue
        target = (doc.parent / link.split("#")[0]).resolve()
        if not target.is_relative_to(ROOT) or not target.exists():
            bad.append(link)
    assert not bad, f"{doc.name}: links that do not resolve inside the repository: {bad}"


def _tracked_text_files() -> list[Path]:
    suffixes = {".py", ".md", ".cpp", ".cu", ".h", ".sh", ".toml", ".txt", ".cfg"}
    skip = {"build", "cmake-build", ".git", ".venv", "runs", ".hypothesis", ".pytest_cache"}
    return sorted(
        p
        for p in ROOT.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not skip.intersection(p.relative_to(ROOT).parts)
        and "egg-info" not in str(p)
    )


def test_nothing_points_outside_the_repository_or_cites_a_tracker():
    """Docs and comments give reasons, not tracker numbers, and nothing relies on files that a
    clone does not have."""
    bad = []
    this = Path(__file__).resolve()
    for path in _tracked_text_files():
        if path == this:
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "../shared" in line or "ALGORITHM.md" in line or "DESIGN.md" in line:
                bad.append(f"{path.relative_to(ROOT)}:{i}: points outside the repository")
            if re.search(r"\b[Ii]ssues? #?\d+\b", line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: cites a tracker number")
    assert not bad, "\n".join(bad[:40]) + (f"\n... and {len(bad) - 40} more" if len(bad) > 40 else "")


def test_readme_layout_matches_the_tree():
    """Every path the README's layout names exists, and every package under sbfast/ is named."""
    text = README.read_text()
    block = re.search(r"### Layout\n+```\n(.*?)```", text, flags=re.S)
    assert block, "README has no layout block under '### Layout'"
    named = []
    for line in block.group(1).splitlines():
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if not head or not re.match(r"[\w.]+/", head):
            continue  # a continuation of the previous line's description
        first = head.split("/")[0]
        for part in head.split(", "):
            path = part if "/" in part else f"{first}/{part}"  # "sbfast/data/, models.py" names sbfast/models.py
            named.append(path)
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
    # sbfast/kernels is kernels/ (installed under that name; a link to it in a development tree)
    packages = {
        p.parent.relative_to(ROOT).as_posix() + "/" for p in PACKAGE.glob("*/__init__.py") if not p.parent.is_symlink()
    }
    unnamed = sorted(p for p in packages if p not in named)
    assert not unnamed, f"packages the README's layout does not name: {unnamed}"


def test_measure_imports_nothing_above_it():
    """sbfast.measure sits below the trainer and the command line (train/ and cli/ may call
    it, never the reverse), beside compat/ and distributed/, which it does not use either."""
    above = ("sbfast.train", "sbfast.cli", "sbfast.compat", "sbfast.distributed", "sbfast.theory")
    bad = []
    for path in sorted((PACKAGE / "measure").glob("*.py")):
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{n}" for n in names] if module == "sbfast" else [module]
            bad += [f"{path.relative_to(ROOT)}:{line} imports {t}" for t in targets if t.startswith(above)]
    assert not bad, "\n".join(bad)
