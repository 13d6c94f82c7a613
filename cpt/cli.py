"""The `cpt` command: one entry point, one subcommand group per stage of the data path.

Each stage package exposes ``register(subparsers)`` in its ``cli`` module; this file only wires
them together and turns :class:`cpt.errors.CptError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cpt.errors import CptError

# Stages whose package or cli module is absent are skipped.
STAGE_CLI_MODULES: tuple[str, ...] = (
    "corpus.cli",
    "mixer.cli",
    "trainer.cli",
    "cpt.runs_cli",
    "cpt.bench_cli",
    "trainer.study.cli",
    "trainer.hf_cli",
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
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            parts = name.split(".")
            if exc.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
                continue  # that stage is not built (yet) in this checkout
            raise
        module.register(sub)
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
