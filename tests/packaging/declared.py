"""What pyproject.toml declares: requirement names per group ("" = the base install, then each
extra), and the repository's own import packages (the folders mapped in package-dir)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``huggingface_hub`` and ``huggingface-hub`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return normalize(match.group(1))


def groups() -> dict[str, dict[str, str]]:
    """{group: {normalized name: requirement as written}}; group "" is the base install."""
    project = PYPROJECT["project"]
    out = {"": {requirement_name(r): r for r in project["dependencies"]}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = {requirement_name(r): r for r in reqs}
    return out


def package_dirs() -> dict[str, Path]:
    """Installed package -> repository folder (``[tool.setuptools.package-dir]``)."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    return {pkg: ROOT / folder for pkg, folder in mapping.items()}


def own_packages() -> set[str]:
    """Top-level import packages of this repository (``moe_cpt``)."""
    return {pkg.split(".")[0] for pkg in package_dirs()}


# Scripts of the package folders that run in another venv with requirements of their own: the
# mixer bench's peers (MosaicML Streaming, LitData) run in .venv-bench (Makefile), never in ours.
OTHER_VENV = {ROOT / "bench" / "mixer_peers.py"}


def own_python_files() -> list[Path]:
    return sorted({f for folder in package_dirs().values() for f in folder.rglob("*.py")} - OTHER_VENV)
