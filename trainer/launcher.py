"""``cpt train``: resolve the config, then start ``torchrun`` with ``parallel.nproc`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from trainer.config import load_config
from trainer.lineage import check_run_inputs


def torchrun_command(config_path: str | None, overrides: Sequence[str], nproc: int) -> list[str]:
    """Single-node ``torchrun`` (``--standalone`` picks a free rendezvous port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "--local-ranks-filter", "0", "-m", "trainer"]
    if config_path:
        cmd.append(str(config_path))
    return cmd + list(overrides)


def launch(config_path: str | None, overrides: Sequence[str], *, dry_run: bool = False,
           log_path: str | None = None) -> int:
    """Run the training job; returns torchrun's exit code. ``log_path``: also write the
    processes' output there (stdout/stderr otherwise inherited)."""
    cfg = load_config(config_path, list(overrides))  # fail fast, before starting processes
    run = cfg["run"]  # resume / CPT parent: its recorded dataset versions must be readable
    check_run_inputs(run["output_dir"], run["phase"], str(run["parent_run_dir"]))
    nproc = int(cfg["parallel"]["nproc"])
    cmd = torchrun_command(config_path, overrides, nproc)
    if dry_run:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if log_path is None:
        return subprocess.call(cmd, env=env)
    with open(log_path, "w") as log:
        return subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
