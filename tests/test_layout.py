"""The tree shows the architecture (issue #17): layers import downwards only, the CLI's wiring
module is imported by nobody, no module borrows another's private names, and the README's
"Layout" section names every module there is, one line each.

Imports are read with `ast`, so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("kedit.model", "kedit.edit", "kedit.eval", "kedit.hub", "kedit.ui", "kedit.cli", "kedit.methods", "methods")


def _module_name(path: Path) -> str:
    """The dotted name a file is imported under (`methods/` is installed as `kedit.methods`)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "methods":
        parts = ["kedit", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import in the file; `import a.b` gives ("a.b", [])."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the file's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[:2] == ["kedit", "methods"]:
        parts = ["methods", *parts[2:]]
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


@pytest.mark.parametrize("path", _sources("kedit/core"), ids=lambda p: p.name)
def test_core_imports_no_layer_above_it(path: Path) -> None:
    bad = [module for module, names in _imports(path)
           for target in [module, *(f"{module}.{n}" for n in names)] if any(_within(target, u) for u in UPPER)]
    assert not bad, f"{path.relative_to(ROOT)} (the engine) imports {sorted(set(bad))}"


# What each layer above the engine must not import (README.md, "Layout").
FORBIDDEN = {
    "kedit.model": ("kedit.edit", "kedit.eval", "kedit.hub", "kedit.ui", "kedit.cli", "kedit.methods"),
    "kedit.edit": ("kedit.hub", "kedit.ui", "kedit.cli"),
    "kedit.eval": ("kedit.hub", "kedit.ui", "kedit.cli"),
    "kedit.hub": ("kedit.edit", "kedit.ui", "kedit.cli"),
    "kedit.ui": ("kedit.edit", "kedit.hub", "kedit.cli"),  # the views read; they never edit or share
    "kedit.methods": ("kedit.edit", "kedit.hub", "kedit.ui", "kedit.cli", "kedit.eval.probes",
                      "kedit.eval.revision"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_downwards(layer: str) -> None:
    bad = []
    for path in _sources("kedit", "methods"):
        if not _within(_module_name(path), layer):
            continue
        for module, names in _imports(path):
            targets = [module, *(f"{module}.{n}" for n in names)]
            hit = sorted({f for t in targets for f in FORBIDDEN[layer] if _within(t, f)})
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {module} ({', '.join(hit)})")
    assert not bad, bad


def test_nothing_imports_the_cli_wiring_back() -> None:
    """Only the CLI's own modules import `kedit.cli.*`, and none of them imports from `kedit.cli`
    itself (the wiring module, as huggingface_hub's `cli/hf.py`); `__main__` runs its `main`."""
    bad = []
    for path in _sources("kedit", "methods"):
        name = _module_name(path)
        for module, names in _imports(path):
            if not _within(module, "kedit.cli") and not any(_within(f"{module}.{n}", "kedit.cli") for n in names):
                continue
            if not _within(name, "kedit.cli"):
                bad.append(f"{name} imports {module}")
            elif name not in ("kedit.cli", "kedit.cli.__main__") and module == "kedit.cli":
                bad.append(f"{name} imports {names} from the wiring module")
    assert not bad, bad


# `methods/` keeps its own internal structure while it is refactored on its own (issue #17 part 2):
# one method module lending a helper to its sibling is left to that work.
METHODS_INTERNAL = "kedit.methods"


@pytest.mark.parametrize("folder", ["kedit", "methods", "tests", "bench"])
def test_no_module_imports_a_private_name_of_another(folder: str) -> None:
    bad = []
    for path in _sources(folder):
        name = _module_name(path)
        for module, names in _imports(path):
            if folder == "methods" and _within(module, METHODS_INTERNAL):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != name:
                bad.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(private)}")
    assert not bad, bad


def _layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def _package_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in _sources("kedit", "methods")}


def test_readme_layout_lists_every_module_once() -> None:
    """Each module of kedit/ and methods/ has its own line (`- `path`: what it is`), and every
    listed path exists: a new module without a line, or a line for a removed one, fails here."""
    listed = re.findall(r"^\s*- `([\w/]+\.py)`", _layout_section(), re.M)
    duplicates = sorted({p for p in listed if listed.count(p) > 1})
    assert not duplicates, f"listed more than once in README's Layout: {duplicates}"
    missing = sorted(_package_files() - set(listed))
    absent = sorted(set(listed) - _package_files())
    assert not missing, f"modules missing from README's Layout section: {missing}"
    assert not absent, f"README's Layout section lists modules that do not exist: {absent}"


def test_the_layering_checks_see_real_imports() -> None:
    """The checks above are not vacuous: the parser finds the imports everybody knows are there."""
    imports = dict(_imports(ROOT / "kedit" / "cli" / "__init__.py"))
    assert "kedit.cli" in imports and "history" in imports["kedit.cli"]
    assert _is_module("kedit.core.repo") and _is_module("kedit.methods.base")
    edit_imports = [m for m, _ in _imports(ROOT / "kedit" / "edit" / "run.py")]
    assert any(_within(m, "kedit.core") for m in edit_imports)


# What running SQL looks like: a statement's keywords, a cursor call, the database helpers that take
# SQL (`dbm.one`, `dbm.rows`), sqlite-utils' tables (`db["metrics"]`) or the raw connection.
SQL_USE = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE TABLE|ALTER TABLE|PRAGMA)\b|\.execute(many)?\(|"
                     r"\bdbm\.(one|rows)\(|\.db\[|\.db\.|\.conn\b|\bsqlite_utils\b")


@pytest.mark.parametrize("folder", ["kedit", "methods"])
def test_only_the_database_layer_runs_sql(folder: str) -> None:
    """Commands, Hub, evaluation, editing and the views ask kedit.core (the repository, `history`,
    `tables`, `db`); no module outside kedit.core writes or reads SQL."""
    bad = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in _sources(folder)
           if not _within(_module_name(path), "kedit.core")
           for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if SQL_USE.search(line)]
    assert not bad, bad


def test_the_sql_check_sees_sql() -> None:
    """Not vacuous: the database layer's own files match the pattern."""
    for name in ("db.py", "tables.py", "history.py"):
        assert SQL_USE.search((ROOT / "kedit" / "core" / name).read_text(encoding="utf-8")), name
