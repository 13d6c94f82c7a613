"""``cpt train``: resolve the config, then start ``torchrun`` with ``parallel.nproc`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from trainer.config import load_config


def torchrun_command(config_path: str | None, overrides: Sequence[str], nproc: int,
                     master_port: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--local-ranks-filter", "0"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{master_port}"]
    cmd += ["-m", "trainer"]
    if config_path:
        cmd.append(str(config_path))
    return cmd + list(overrides)


def launch(config_path: str | None, overrides: Sequence[str], *, dry_run: bool = False) -> int:
    cfg = load_config(config_path, list(overrides))  # fail fast, before starting processes
    nproc = int(cfg["parallel"]["nproc"])
    cmd = torchrun_command(config_path, overrides, nproc)
    if dry_run:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
