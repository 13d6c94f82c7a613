"""``cpt train CONFIG [key=value ...]`` (registered into the ``cpt`` command)."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    flags = {"--dry-run", "--print-model"}
    overrides = [o for o in args.overrides if o not in flags]
    dry_run = args.dry_run or "--dry-run" in args.overrides
    if args.print_model or "--print-model" in args.overrides:
        from moe_cpt.trainer.config import load_config
        from moe_cpt.trainer.model_card import model_table

        print(model_table(load_config(args.config, overrides)))
        if not dry_run:
            return 0
    from moe_cpt.trainer.launcher import launch

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
    p.add_argument("--print-model", action="store_true",
                   help="print the model's shape and total/active parameter counts (next to the "
                        "paper's) and exit")
    p.set_defaults(func=_train)
