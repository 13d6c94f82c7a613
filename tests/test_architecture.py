"""The layering of docs/architecture.md, checked on the source: imports point down, never up.

Layers, lowest first (a package may import its own modules and any lower layer):

    kernel      moe_cpt.{errors, fs, hashing, codeversion, processes}
    store       moe_cpt.store        the version format and its read side
    provenance  moe_cpt.provenance   run records, catalog, recorder, lineage
    stages      moe_cpt.corpus | moe_cpt.mixer   (siblings: neither imports the other)
    trainer     moe_cpt.trainer
    tools       moe_cpt.bench, moe_cpt.infra, moe_cpt.cli (the `cpt` root)

Every import counts, also the ones inside functions. The module graph must have no cycle
either (a cycle of function-level imports is a layering knot waiting to happen).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package prefix -> (rank, name); the longest matching prefix decides
LAYERS: dict[str, tuple[int, str]] = {
    "moe_cpt.errors": (0, "kernel"),
    "moe_cpt.fs": (0, "kernel"),
    "moe_cpt.hashing": (0, "kernel"),
    "moe_cpt.codeversion": (0, "kernel"),
    "moe_cpt.processes": (0, "kernel"),
    "moe_cpt.store": (1, "store"),
    "moe_cpt.provenance": (2, "provenance"),
    "moe_cpt.corpus": (3, "corpus"),
    "moe_cpt.mixer": (3, "mixer"),
    "moe_cpt.trainer": (4, "trainer"),
    "moe_cpt.bench": (5, "tools"),
    "moe_cpt.infra": (5, "tools"),
    "moe_cpt.cli": (5, "tools"),
    "moe_cpt": (0, "kernel"),  # the package's own __init__
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or module.attribute for `from m import name`)
    line: int


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """The installed package name -> folder mapping of pyproject.toml."""
    cfg = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: repo / folder for pkg, folder in cfg["package-dir"].items()}


def modules(dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Every module of the mapped packages: dotted name -> file (the folders do not nest)."""
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "__pycache__" in rel.parts:
                continue
            out[".".join([pkg, *(p for p in rel.parts if p != "__init__")])] = path
    return out


def imports(name: str, path: Path, known: set[str], prefix: str) -> Iterator[Import]:
    """The imports of one module that name a module of ours (absolute and relative)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            if t == prefix or t.startswith(prefix + "."):
                yield Import(name, t, node.lineno)


def owning_module(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def layer(module: str, layers: Mapping[str, tuple[int, str]]) -> tuple[int, str]:
    best = max((p for p in layers if module == p or module.startswith(p + ".")), key=len)
    return layers[best]


def violations(mods: Mapping[str, Path], layers: Mapping[str, tuple[int, str]], prefix: str) -> list[str]:
    known = set(mods)
    out = []
    for name, path in sorted(mods.items()):
        src_rank, src_layer = layer(name, layers)
        for imp in imports(name, path, known, prefix):
            target = owning_module(imp.target, known)
            dst_rank, dst_layer = layer(target, layers)
            upward = dst_rank > src_rank
            sideways = dst_rank == src_rank and dst_layer != src_layer
            if upward or sideways:
                out.append(f"{path.relative_to(REPO)}:{imp.line}: {src_layer} imports "
                           f"{'upward' if upward else 'sideways'} from {dst_layer} ({target})")
    return out


def cycles(mods: Mapping[str, Path], prefix: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    known = set(mods)
    graph = {n: sorted({owning_module(i.target, known) for i in imports(n, p, known, prefix)} - {n})
             for n, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---- the checks -------------------------------------------------------------------------------

def test_every_package_folder_is_installed() -> None:
    """Each folder with an __init__.py under a mapped folder is listed in pyproject's packages,
    so the wheel holds what the repository holds."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = package_dirs()
    expected = set()
    for pkg, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            expected.add(".".join([pkg, *rel.parts]))
    assert expected - listed == set(), "package folders missing from [tool.setuptools] packages"


def test_no_import_goes_up_or_sideways() -> None:
    found = violations(modules(package_dirs()), LAYERS, "moe_cpt")
    assert found == [], "layering violations:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    found = cycles(modules(package_dirs()), "moe_cpt")
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_code_imports_only_the_moe_cpt_namespace() -> None:
    """Bare folder names (`import corpus`, `from trainer import ...`) would load a second copy of
    a module (or another distribution's package of that name)."""
    bare = ("corpus", "mixer", "trainer", "infra", "store", "provenance", "bench", "cpt")
    found = []
    for path in [*REPO.glob("*/**/*.py")]:
        if any(part in {".venv", ".venv-bench", "data", "build"} for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in bare]
    assert found == [], "imports outside the moe_cpt namespace:\n" + "\n".join(found)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a store module importing the trainer, and a two-module cycle."""
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "low" / "__init__.py").write_text("")
    (tmp_path / "high" / "__init__.py").write_text("")
    (tmp_path / "low" / "a.py").write_text("def f():\n    from pkg.high import b\n")
    (tmp_path / "high" / "b.py").write_text("from pkg.low.a import f\n")
    mods = {"pkg.low": tmp_path / "low" / "__init__.py", "pkg.low.a": tmp_path / "low" / "a.py",
            "pkg.high": tmp_path / "high" / "__init__.py", "pkg.high.b": tmp_path / "high" / "b.py"}
    layers = {"pkg.low": (0, "low"), "pkg.high": (1, "high"), "pkg": (0, "low")}
    known = set(mods)
    ups = [i for n, p in mods.items() for i in imports(n, p, known, "pkg")
           if layer(owning_module(i.target, known), layers)[0] > layer(n, layers)[0]]
    assert [(i.source, i.target) for i in ups] == [("pkg.low.a", "pkg.high.b")]
    assert cycles(mods, "pkg") == [["pkg.high.b", "pkg.low.a"]]
