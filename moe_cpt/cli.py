"""The `cpt` command: one entry point, one subcommand group per stage of the data path.

Each stage package exposes ``register(subparsers)`` in its ``cli`` module; this file only wires
them together and turns :class:`moe_cpt.errors.CptError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from moe_cpt.errors import CptError

# Each layer's command group, in the order `cpt --help` lists them.
STAGE_CLI_MODULES: tuple[str, ...] = (
    "moe_cpt.corpus.cli",
    "moe_cpt.mixer.cli",
    "moe_cpt.trainer.cli",
    "moe_cpt.provenance.cli",
    "moe_cpt.bench.cli",
    "moe_cpt.trainer.study.cli",
    "moe_cpt.trainer.hf_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt",
        description="moe-cpt: build versioned token corpora, blend them with replay, and "
        "continually pre-train MoE models on the blends.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_CLI_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CptError as exc:
        print(f"cpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
