"""The lock that keeps two identical builds from sharing (and breaking) one work folder.

``<store>/_work/<dataset>/<build key>.lock`` names who holds it (user, host, pid, process start
time, since). A second build of the same key refuses at once with one line naming the holder;
it never touches the work folder.

*Local store*: an ``flock(2)`` on the lock file. The kernel drops it when the holding process
(and every child that inherited it) exits, however it dies, so a dead build never blocks a
later one. After locking, the holder checks that the path still names the file it locked (a
releaser unlinks it), the usual pattern for lock files that are removed.

*Object store*: a lock object created with a conditional PUT (``If-None-Match: *``): one creator
wins. The holder rewrites it every ``HEARTBEAT_S`` seconds. A lock is *stale* if its holder ran
on this host and that process is gone (pid absent, or a different process start time: pid
reuse), or if its heartbeat is older than ``STALE_S`` (a holder on another host that died). A
stale lock is taken over by a conditional overwrite (``If-Match`` its ETag), so of two processes
taking over the same stale lock only one succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moe_cpt.errors import BusyError
from moe_cpt.fs import (
    ObjectExistsError,
    is_local,
    try_flock,
    unstrip_protocol,
    write_holder,
    write_once,
)
from moe_cpt.store.refs import writer_identity

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 600.0


def process_start_time(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_info() -> dict[str, Any]:
    info = writer_identity()
    info["start"] = process_start_time(os.getpid())
    info["heartbeat"] = time.time()
    return info


def describe_holder(info: dict[str, Any]) -> str:
    return (f"by {info.get('user', '?')}@{info.get('host', '?')} pid {info.get('pid', '?')} "
            f"since {info.get('time', '?')}")


def holder_alive(info: dict[str, Any], now: float | None = None) -> bool:
    """Whether the process a lock names may still be running (see the module docstring)."""
    if info.get("host") == socket.gethostname():
        try:
            pid = int(info.get("pid", -1))
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError, OverflowError):
            return False
        except PermissionError:
            pass  # exists, owned by another user
        start = info.get("start") or ""
        return not start or process_start_time(pid) in ("", start)
    beat = info.get("heartbeat")
    return isinstance(beat, int | float) and (now or time.time()) - beat < STALE_S


@dataclass
class BuildLock:
    """An acquired build lock; :meth:`release` (or leaving the ``with`` block) gives it back."""

    fs: Any
    path: str
    what: str
    _fd: int | None = None
    _etag: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- local -------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd, holder = try_flock(self.path)
            if fd is None:
                info = _parse_holder(holder)
                raise BusyError(f"{self.what} is in progress {describe_holder(info)} (lock {self.path}); "
                                "wait for it to finish, then rerun")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and unlinked it meanwhile: lock the new file
        write_holder(fd, json.dumps(holder_info()))
        self._fd = fd

    # ---- object store --------------------------------------------------------------------
    def _acquire_remote(self) -> None:
        data = json.dumps(holder_info()).encode()
        try:
            write_once(self.fs, self.path, data)
        except ObjectExistsError:
            self._take_over_if_stale(data)
        self._etag = self._current_etag()
        self._thread = threading.Thread(target=self._heartbeat, name="build-lock-heartbeat", daemon=True)
        self._thread.start()

    def _current_etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None

    def _take_over_if_stale(self, data: bytes) -> None:
        etag = self._current_etag()
        try:
            holder = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            holder = {}
        if holder and holder_alive(holder):
            raise BusyError(f"{self.what} is in progress {describe_holder(holder)} "
                            f"(lock {unstrip_protocol(self.fs, self.path)}); wait for it to finish, then rerun")
        try:
            if etag is None:
                write_once(self.fs, self.path, data)
            else:
                self.fs.pipe_file(self.path, data, IfMatch=etag)
        except (OSError, ObjectExistsError) as exc:
            raise BusyError(f"{self.what}: another process took over the stale lock "
                            f"{unstrip_protocol(self.fs, self.path)} first ({exc})") from exc
        log.warning("took over the stale lock %s (%s)", unstrip_protocol(self.fs, self.path), describe_holder(holder))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.fs.pipe_file(self.path, json.dumps(holder_info()).encode(), IfMatch=self._etag)
                self._etag = self._current_etag()
            except OSError as exc:
                log.warning("could not refresh the build lock %s: %s", self.path, exc)

    # ---- both ------------------------------------------------------------------------------
    def acquire(self) -> BuildLock:
        if is_local(self.fs):
            self._acquire_local()
        else:
            self._acquire_remote()
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiter re-checks the inode
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass


def _parse_holder(text: bytes) -> dict[str, Any]:
    try:
        info = json.loads(text or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def acquire_build_lock(fs: Any, work_dir: str, what: str) -> BuildLock:
    """Lock ``<work_dir>.lock`` for one build (BusyError naming the holder if it is taken)."""
    return BuildLock(fs, posixpath.normpath(work_dir.rstrip("/")) + ".lock", what).acquire()
