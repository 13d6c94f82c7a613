"""Console progress for builds: one bar per stage, datatrove's own logs sent to a file."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from corpus.build import BuildPlan, Stage


@contextmanager
def stderr_to_file(path: str) -> Iterator[TextIO]:
    """Send file descriptor 2 (datatrove/loguru logs, worker tracebacks) to ``path``.

    Yields a text stream on the original stderr for the progress display.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    console_stream = os.fdopen(os.dup(saved), "w", buffering=1)
    saved_stream = sys.stderr
    sys.stderr = open(path, "a", buffering=1)  # Python-level writers (loguru adds sys.stderr late)
    try:
        yield console_stream
    finally:
        sys.stderr.close()
        sys.stderr = saved_stream
        os.dup2(saved, 2)
        os.close(saved)
        console_stream.close()


def _read_progress(folder: str | None) -> int:
    if not folder or not os.path.isdir(folder):
        return 0
    total = 0
    for name in os.listdir(folder):
        try:
            with open(os.path.join(folder, name)) as f:
                total += int(f.read() or 0)
        except (OSError, ValueError):
            continue
    return total


class StageProgress:
    """A :data:`corpus.build.StageRunner` that draws a bar per stage while it runs."""

    def __init__(self, console: Console, total_input_bytes: int):
        self.console = console
        self.total = total_input_bytes

    def __call__(self, stage: Stage, plan: BuildPlan, run: Callable[[], None]) -> None:
        folder = plan.progress_dir(stage.name) if stage.reads_input else None
        columns = [SpinnerColumn(), TextColumn(f"[bold]{stage.name:<20}"), BarColumn()]
        columns += [DownloadColumn()] if folder else [TextColumn(f"{stage.tasks} task(s)")]
        columns += [TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(stage.name, total=self.total if folder else None)
            stop = threading.Event()

            def poll() -> None:
                while not stop.wait(0.3):
                    if folder:
                        progress.update(task, completed=_read_progress(folder))

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            try:
                run()
            finally:
                stop.set()
                thread.join()
            progress.update(task, completed=self.total if folder else 1, total=self.total if folder else 1)
