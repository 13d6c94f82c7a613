"""A local S3-compatible endpoint (moto's standalone server) for development and tests.

``make s3`` runs it in the foreground on 127.0.0.1:9000; tests start their own on a free port
through :class:`LocalS3`. Point any command at it with::

    export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test \\
           AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1

moto keeps objects in memory: a restarted server starts empty (tests re-upload what they need).

``python -m moe_cpt.infra.local_s3`` stops its moto child on SIGTERM, SIGINT and SIGHUP, and the child is
tied to it with ``PR_SET_PDEATHSIG`` (it dies even when the parent is killed with SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from moe_cpt.processes import child_preexec

DEFAULT_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalS3:
    """A moto S3 server in a child process, bound to loopback."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", die_with_parent: bool = False):
        """``die_with_parent``: the server dies when the process (thread) that started it exits."""
        self.host = host
        self.port = port or free_port(host)
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto/s3fs at this server."""
        return {**DEFAULT_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def start(self, timeout: float = 30.0) -> LocalS3:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_preexec(os.getpid()) if self.die_with_parent else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL the server (a crash, not a shutdown)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_on(signals: tuple[int, ...]) -> None:
    """Turn ``signals`` into ``SystemExit``: the ``finally`` of :func:`main` stops the child.
    (Stopping it inside the handler could deadlock: the handler runs on top of the interrupted
    ``Popen.wait``, which holds the process's wait lock.)"""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(0)
    for sig in signals:
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local S3 endpoint (moto) in the foreground.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    server = LocalS3(args.port, args.host, die_with_parent=True)
    _exit_on((signal.SIGTERM, signal.SIGHUP))
    try:
        server.start()
        print(f"S3 endpoint on {server.endpoint_url}; use it with:")
        for k, v in server.env().items():
            print(f"  export {k}={v}")
        print("create a bucket: python -c \"import s3fs; s3fs.S3FileSystem().mkdir('mybucket')\"")
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
