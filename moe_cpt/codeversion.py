"""Which code produced an artifact: git commit + dirty flag, or the package version."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path


def code_version() -> dict[str, object]:
    repo = Path(__file__).resolve().parent.parent
    info: dict[str, object] = {"package": _package_version()}
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        info.update(git_commit=commit, dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        info.update(git_commit=None, dirty=None)
    return info


def _package_version() -> str:
    try:
        return metadata.version("moe-cpt")
    except metadata.PackageNotFoundError:
        return "unknown"
