"""The `cpt` command: one entry point, one subcommand group per stage of the data path.

Each stage package exposes ``register(subparsers)`` in its ``cli`` module; this file only wires
them together and turns :class:`moe_cpt.errors.CptError` into a one-line message and exit code 2.
The CLI loads with the base install: a command that needs an optional extra (torch for
training, s3fs for S3) imports it when it runs and declares its modules with
``set_defaults(needs=(...))``; a missing one is one line naming the extra (:mod:`moe_cpt.extras`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from moe_cpt.codeversion import code_version
from moe_cpt.errors import CptError
from moe_cpt.extras import missing_extra, missing_extra_error, require_module

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
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_CLI_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _VersionAction(argparse.Action):
    """``cpt --version``; the version is looked up only when asked for (it runs git)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"cpt (moe-cpt) {version_text()}")
        parser.exit()


def version_text() -> str:
    """The installed package's version, and the git commit when run from a checkout."""
    info = code_version()
    commit = info.get("git_commit")
    if not commit:
        return str(info["package"])
    return f"{info['package']} (git {str(commit)[:12]}{', dirty' if info.get('dirty') else ''})"


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The subcommand that ``args`` chose, as typed: ``cpt train``, ``cpt bench mixer``, ..."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen is None:
            return parser.prog
        parser = actions[0].choices[chosen]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        for module in getattr(args, "needs", ()):  # modules of extras, declared with set_defaults
            require_module(module, command_name(parser, args))
        return int(args.func(args) or 0)
    except CptError as exc:
        print(f"cpt: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a module of an extra that is not installed: name the extra
        extra = missing_extra(exc)
        if extra is None:
            raise
        print(f"cpt: error: {missing_extra_error(command_name(parser, args), extra)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
