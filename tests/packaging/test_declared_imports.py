"""Every third-party module the shipped code imports is declared in pyproject.toml.

Read with ``ast``, not by importing: each ``import`` of the packages' code (in functions too)
must map (``importlib.metadata.packages_distributions``) to a requirement of the base install
or of an extra; the ``dev`` extra does not count, since it is not installed by users, and a
module that only arrives as a dependency of a dependency (or of ``dev``) is exactly what breaks
a user's install. datatrove declares most of its own imports only under its extras, so the
datatrove modules we import are followed too (their module-level imports, transitively): what
they import must be datatrove's base requirement or ours. That is how ``regex`` (imported by
``datatrove.utils.word_tokenizers``, required only by ``datatrove[processing]``) was found.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.packaging.declared import (
    ROOT,
    groups,
    normalize,
    own_packages,
    own_python_files,
    requirement_name,
)

FOLLOWED = ("datatrove",)  # dependencies whose own imports are checked, transitively


@functools.cache
def _providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distributions(root: str) -> set[str]:
    """Distributions that provide top-level module ``root`` (its own name if not installed)."""
    return {normalize(d) for d in _providers().get(root, [root])}


def _resolve(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def _imports(node: ast.AST, package: str) -> Iterator[str]:
    """Full module names one import statement loads (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        mod = _resolve(node.module, node.level, package)
        yield mod
        yield from (f"{mod}.{a.name}" for a in node.names if a.name != "*")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run on import: not in functions or classes, not under ``if TYPE_CHECKING`` and
    not in ``try`` (an import guarded by ``except ImportError`` is optional)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(stmt.test):
                yield from _module_level(stmt.body)
                yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt


def _third_party(name: str, own: set[str]) -> bool:
    root = name.split(".")[0]
    return bool(root) and root not in sys.stdlib_module_names and root not in own


def _user_requirements() -> set[str]:
    return {name for group, reqs in groups().items() if group != "dev" for name in reqs}


def test_every_import_of_the_code_is_a_declared_requirement() -> None:
    own, declared = own_packages(), _user_requirements()
    missing: dict[str, list[str]] = {}
    for path in own_python_files():
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imports(node, package):
                root = name.split(".")[0]
                if _third_party(name, own) and not _distributions(root) & declared:
                    missing.setdefault(root, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml (dev does not count): {missing}"


def _module_file(name: str) -> Path | None:
    top = find_spec(name.split(".")[0])
    if top is None or top.origin is None:
        return None
    base = Path(top.origin).parent.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module, not a module


def _reached_by_followed(own: set[str]) -> dict[str, set[str]]:
    """{third-party root: datatrove modules importing it at module level} for the closure of
    what our code imports from :data:`FOLLOWED`."""
    todo: list[str] = []
    for path in own_python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "level", 0) == 0:
                todo += [n for n in _imports(node, "") if n.split(".")[0] in FOLLOWED]
    seen: set[str] = set()
    reached: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            mod = ".".join(parts[:i])
            if mod in seen or (path := _module_file(mod)) is None:
                continue
            seen.add(mod)
            package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            for stmt in _module_level(ast.parse(path.read_text()).body):
                for imported in _imports(stmt, package):
                    root = imported.split(".")[0]
                    if root in FOLLOWED:
                        todo.append(imported)
                    elif _third_party(imported, own | set(FOLLOWED)):
                        reached.setdefault(root, set()).add(mod)
    return reached


@pytest.mark.parametrize("dependency", FOLLOWED)
def test_what_the_imported_datatrove_modules_import_is_installed_for_users(dependency: str) -> None:
    base = {requirement_name(r) for r in metadata.requires(dependency) or [] if "extra ==" not in r}
    declared = _user_requirements() | base
    reached = _reached_by_followed(own_packages())
    assert "regex" in reached, "the walk no longer reaches datatrove's word tokenizers"
    missing = {root: sorted(mods) for root, mods in reached.items() if not _distributions(root) & declared}
    assert not missing, (f"{dependency} modules we import need these, which neither {dependency}'s base "
                         f"requirements nor ours declare: {missing}")
