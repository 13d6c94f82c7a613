"""A child process for the race tests: waits for a start signal, then publishes or tags.

    python -m tests.corpus.race_worker publish STORE NAME TOKENIZER SEED BARRIER   (waits just before registering)
    python -m tests.corpus.race_worker lock STORE_WORK_DIR BARRIER       (holds a build lock until killed)
    python -m tests.corpus.race_worker cli corpus tag NAME@REF TAG --store URL

``cli`` is ``cpt corpus ...`` with only the corpus subcommands registered (the same command
functions and one-line error handling as ``cpt``, without importing torch for the trainer's
subcommands: ten of them at once stay fast on a small machine).

``BARRIER`` is a folder (for ``cli``: ``$RACE_BARRIER``): the worker writes ``ready-<pid>`` there
once imported and starts when ``go`` appears, so all workers hit the store at the same moment.
``$RACE_READ_DELAY_S`` makes every read of a local file that much slower (a slow or network
disk), which widens any read-modify-write window the store code may have.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def slow_local_reads() -> None:
    delay = float(os.environ.get("RACE_READ_DELAY_S") or 0)
    if not delay:
        return
    from fsspec.implementations.local import LocalFileSystem

    original = LocalFileSystem._open

    def _open(self, path, mode="rb", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "r" in mode:
            time.sleep(delay)
        return original(self, path, mode, *args, **kwargs)

    LocalFileSystem._open = _open  # type: ignore[method-assign]


def wait_for_go(barrier: Path, deadline_s: float = 300.0) -> None:
    (barrier / f"ready-{os.getpid()}").touch()
    end = time.monotonic() + deadline_s
    while not (barrier / "go").exists():
        if time.monotonic() > end:
            raise SystemExit("no start signal")
        time.sleep(0.005)


def publish(store: str, name: str, tokenizer: str, seed: int, barrier: Path) -> None:
    import numpy as np

    from moe_cpt.corpus.publish import publish_documents
    from moe_cpt.corpus.shard_writer import PackingConfig
    from moe_cpt.store.object_store import Store
    from moe_cpt.store.tokenizer import tokenizer_info

    data = Path(tokenizer).read_bytes()
    info = tokenizer_info(data, tokenizer)
    rng = np.random.default_rng(seed)
    docs = [(f"s{seed}-d{i}", rng.integers(0, 200, size=50)) for i in range(20)]
    register = Store.register_version

    def register_together(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        wait_for_go(barrier)  # every worker has its files in place: all register at once
        return register(self, *args, **kwargs)

    Store.register_version = register_together  # type: ignore[method-assign]
    version = publish_documents(store, name, docs, info, data, PackingConfig(256, 1 << 20))
    print(version)


def hold_lock(work_dir: str, barrier: Path) -> None:
    from moe_cpt.corpus.lock import acquire_build_lock
    from moe_cpt.fs import open_fs

    fs, path = open_fs(work_dir)
    acquire_build_lock(fs, path, "a test build")
    (barrier / "locked").touch()
    time.sleep(3600)


def corpus_cli(argv: list[str]) -> int:
    import argparse

    from moe_cpt.corpus import cli
    from moe_cpt.errors import CptError

    parser = argparse.ArgumentParser(prog="cpt")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    import moe_cpt.fs  # noqa: F401
    import moe_cpt.store.object_store  # noqa: F401 - everything the command needs is imported before the start signal

    if os.environ.get("RACE_BARRIER"):
        wait_for_go(Path(os.environ["RACE_BARRIER"]))
    try:
        return int(args.func(args) or 0)
    except CptError as exc:
        print(f"cpt: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str]) -> None:
    slow_local_reads()
    if argv[0] == "cli":
        raise SystemExit(corpus_cli(argv[1:]))
    if argv[0] == "publish":
        publish(argv[1], argv[2], argv[3], int(argv[4]), Path(argv[5]))
    elif argv[0] == "lock":
        hold_lock(argv[1], Path(argv[2]))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
