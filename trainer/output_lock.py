"""One writer per output folder: the training holds ``OUTPUT/.cpt-train.lock``.

Global rank 0 takes an exclusive ``flock`` on the lock file before anything is written to the
output folder and holds it until the process exits (the kernel drops it when the process dies,
however it dies: no stale locks after ``kill -9``). The file names the holder (pid, host, start
time). ``cpt train`` probes the lock before starting ``torchrun`` and refuses with one line
naming the holder; a run started some other way (``torchrun -m trainer``) is refused by its rank 0.
``flock`` is advisory and, on network filesystems, only as good as their lock support (NFSv4
and Lustre with ``flock`` mounts honour it across hosts).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from moe_cpt.errors import CptError
from moe_cpt.fs import try_flock, write_holder

LOCK_FILE = ".cpt-train.lock"


class OutputInUseError(CptError):
    """Another training run holds the output folder."""


@dataclass
class OutputLock:
    """An acquired lock (keep the object alive: closing its descriptor releases it)."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        return _who(os.pread(fd, 4096, 0))
    except OSError:
        return _who(b"")


def _who(text: bytes) -> str:
    return text.decode("utf-8", "replace").strip() or "an unknown process"


def _in_use(folder: str | Path, who: str) -> OutputInUseError:
    return OutputInUseError(f"output dir {folder} is in use by another training run ({who}); "
                            "stop it first or pick another run.output_dir")


def acquire(output_dir: str | Path) -> OutputLock:
    """Take the lock of ``output_dir`` (created if missing) and write the holder into it, or
    raise :class:`OutputInUseError` naming the holder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd, holder = try_flock(path)
    if fd is None:
        raise _in_use(folder, _who(holder))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    write_holder(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
    return OutputLock(path, fd)


def check_free(output_dir: str | Path) -> None:
    """Raise :class:`OutputInUseError` if a run holds ``output_dir``'s lock (creates nothing)."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(output_dir, _holder(fd)) from None
    finally:
        os.close(fd)
