"""Fail before any work when the datatrove executor chosen with ``--executor`` cannot run here.

``slurm`` submits each stage with Slurm's ``sbatch``; ``ray`` needs the ``ray`` extra. Without
them datatrove would fail mid-build with a raw ``FileNotFoundError`` / ``ImportError``.
"""

from __future__ import annotations

import shutil

from moe_cpt.errors import ConfigError
from moe_cpt.extras import require_module


def check_executor(kind: str) -> None:
    """Raise a one-line :class:`~moe_cpt.errors.CptError` if executor ``kind`` cannot start here."""
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm submits with Slurm's `sbatch`, which is not on PATH: "
                          "run the build on a Slurm login node, or use --executor local")
    if kind == "ray":
        require_module("ray", "cpt corpus build --executor ray")
