"""Process lifetime helpers shared by every command that starts children (the trainer's
launcher and workers, the local S3 server, the study runner): a child dies with its parent
(Linux ``prctl(PR_SET_PDEATHSIG)``), and a process tree can be listed and signalled from
``/proc``."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits; exit at once if the
    parent is not ``expected_parent`` any more (it died before the call). No-op off Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != expected_parent:
        os._exit(128 + int(sig))


def child_preexec(parent: int, ignore: tuple[int, ...] = ()) -> Callable[[], None]:
    """A ``Popen(preexec_fn=...)`` that ties the child to ``parent`` (SIGTERM on its death, so
    e.g. torchrun still stops its own workers) and ignores ``ignore`` (inherited across exec)."""
    def preexec() -> None:
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        die_with_parent(parent, signal.SIGTERM)
    return preexec


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (-1 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(pid: int) -> list[int]:
    """The pids of all living descendants of ``pid`` (from ``/proc``), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def forward_signal(sig: int, root: int) -> None:
    """Send ``sig`` to every descendant of ``root`` (the launcher's torchrun and its workers)."""
    for pid in descendants(root):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
