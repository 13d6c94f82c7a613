"""The per-process entry point (what ``torchrun`` runs): ``python -m moe_cpt.trainer CONFIG [k=v ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from moe_cpt import processes
from moe_cpt.errors import CptError
from moe_cpt.trainer import output_lock
from moe_cpt.trainer.config import CptConfig, load_config
from moe_cpt.trainer.titan_config import to_trainer_config


def tie_to_torchrun() -> None:
    """Under torchrun (which starts workers in their own sessions): die when torchrun dies, and
    at once if it (or the ``cpt train`` that started it) is gone already."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    launcher = os.environ.get("CPT_LAUNCHER_PID")
    orphaned = parent == 1 or (launcher is not None and processes.parent_of(parent) != int(launcher))
    if orphaned:
        os._exit(137)
    processes.die_with_parent(parent)


def run_worker(config_path: str | None, overrides: Sequence[str]) -> int:
    from torchtitan.tools.logging import init_logger

    from moe_cpt.trainer import cpu_compat

    tie_to_torchrun()
    cpu_compat.apply()  # before any torchtitan component reads the device type
    init_logger()
    cfg = load_config(config_path, list(overrides))
    lock = output_lock.acquire(cfg.run.output_dir) if os.environ.get("RANK", "0") == "0" else None
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: CptConfig) -> int:
    trainer_config = to_trainer_config(cfg)
    trainer = trainer_config.build()
    finished = False
    try:
        trainer.train()
        finished = True
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            if finished:  # no rank tears gloo down while another still talks to it
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer",
                                     description="one training process (run under torchrun)")
    parser.add_argument("config", nargs="?", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        return run_worker(args.config, args.overrides)
    except CptError as exc:  # bad input / missing data: one line, not a traceback per rank
        print(f"cpt: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
