"""``cpt train CONFIG [key=value ...]`` and ``cpt train --example NAME [key=value ...]``
(registered into the ``cpt`` command)."""

from __future__ import annotations

import argparse

from moe_cpt.errors import ConfigError
from moe_cpt.trainer.configs import EXAMPLES, example_config


def _config_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``CONFIG [overrides]`` or ``--example NAME [overrides]`` (then every word is an override)."""
    words = list(args.overrides)
    if args.example:
        return str(example_config(args.example)), ([args.config] if args.config else []) + words
    if not args.config:
        raise ConfigError(f"give a config file or --example NAME ({', '.join(EXAMPLES)})")
    return args.config, words


def _train(args: argparse.Namespace) -> int:
    flags = {"--dry-run", "--print-model"}
    config, words = _config_and_overrides(args)
    overrides = [o for o in words if o not in flags]
    dry_run = args.dry_run or "--dry-run" in words
    if args.print_model or "--print-model" in words:
        from moe_cpt.trainer.config import load_config
        from moe_cpt.trainer.model_card import model_table

        print(model_table(load_config(config, overrides)))
        if not dry_run:
            return 0
    from moe_cpt.trainer.launcher import launch

    return launch(config, overrides, dry_run=dry_run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense/MoE model (torchrun wrapper)",
        description="Train with torchtitan: starts `torchrun` with parallel.nproc processes. "
        "Overrides are dotted keys, e.g. training.steps=100 model.router=sinkhorn. "
        "--example NAME runs a config shipped with the package (synthetic data, 2 CPU processes), "
        "e.g. `cpt train --example tiny_moe training.steps=4 run.output_dir=/tmp/run`.",
    )
    p.add_argument("config", nargs="?", help="YAML run config (see docs/trainer.md)")
    p.add_argument("--example", choices=EXAMPLES, metavar="NAME",
                   help=f"train a packaged example config instead of CONFIG: {', '.join(EXAMPLES)}")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted.key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    p.add_argument("--print-model", action="store_true",
                   help="print the model's shape and total/active parameter counts (next to the "
                        "paper's) and exit")
    p.set_defaults(func=_train, needs=("torch", "torchtitan"))
