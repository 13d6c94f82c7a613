"""Console side of a build: one progress bar per stage, datatrove's own logs sent to a file, and
the summary table of a version (:func:`run_build`, used by `cpt corpus build` and the demo)."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from moe_cpt.corpus.build import BuildPlan, Stage, build_dataset, plan_inputs
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.errors import BusyError


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
    """A :data:`moe_cpt.corpus.build.StageRunner` that draws a bar per stage while it runs."""

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


def run_build(cfg_path: str, store_url: str, workers: int, executor: ExecutorConfig, keep_work: bool,
              console: Console | None = None, create_bucket: bool = False) -> Any:
    """Build one config with progress bars; datatrove's logs go to a file named on failure."""
    cfg = load_config(cfg_path)
    log_path = os.path.join(tempfile.gettempdir(), f"cpt-build-{cfg.name}-{os.getpid()}.log")
    console = console or Console(stderr=True)
    console.print(f"building [bold]{cfg.name}[/] from {len(cfg.inputs)} input(s) into {store_url}")
    total = sum(f.size for p in plan_inputs(cfg) for f in p.files)
    try:
        with stderr_to_file(log_path) as stream:
            runner = StageProgress(Console(file=stream, force_terminal=console.is_terminal), total)
            result = build_dataset(cfg, store_url, executor, runner=runner, keep_work=keep_work,
                                   create_bucket=create_bucket)
    except BusyError:
        os.unlink(log_path)
        raise
    except Exception as exc:
        if hasattr(exc, "args") and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (datatrove log: {log_path})",) + exc.args[1:]
        raise
    os.unlink(log_path)
    if result.skipped:
        console.print(f"{cfg.name}@{result.version}: already built from these inputs and config; nothing to do")
    else:
        console.print(f"published [bold]{cfg.name}@{result.version}[/] in {result.seconds:.1f}s")
    print_stats(console, result.name, result.version, result.manifest)
    return result


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def print_stats(console: Console, name: str, version: str, manifest: Any) -> None:
    table = Table(title=f"{name}@{version}")
    table.add_column("stage")
    table.add_column("docs in", justify="right")
    table.add_column("docs out", justify="right")
    table.add_column("removed", justify="right")
    for row in manifest.stats.get("stages", []):
        removed = row["docs_in"] - row["docs_out"]
        reasons = ", ".join(f"{k}: {v}" for k, v in row.get("reasons", {}).items())
        table.add_row(row["stage"], str(row["docs_in"]), str(row["docs_out"]),
                      f"{removed}" + (f" ({reasons})" if reasons else ""))
    bad = manifest.stats.get("bad_records_skipped", 0)
    if bad:
        table.add_row("bad records skipped", "", "", str(bad))
    console.print(table)
    console.print(f"documents {manifest.n_docs:,}  tokens {manifest.n_tokens:,}  shards {len(manifest.shards)}  "
                  f"blocks {manifest.n_blocks}  bytes {manifest.nbytes:,}  tokenizer {manifest.tokenizer.sha256[:12]} "
                  f"({manifest.tokenizer.dtype})")
