"""``cpt train CONFIG [key=value ...]`` (registered into the ``cpt`` command)."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from trainer.launcher import launch

    overrides = [o for o in args.overrides if o != "--dry-run"]
    dry_run = args.dry_run or len(overrides) != len(args.overrides)
    return launch(args.config, overrides, dry_run=dry_run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense/MoE model (torchrun wrapper)",
        description="Train with torchtitan: starts `torchrun` with parallel.nproc processes. "
        "Overrides are dotted keys, e.g. training.steps=100 model.router=sinkhorn.",
    )
    p.add_argument("config", help="YAML run config (see docs/trainer.md)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted.key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    p.set_defaults(func=_train)
