"""``python -m moe_cpt.infra.local_s3`` takes its moto child with it (issue 11.10): on SIGTERM (it used to
leave the child listening) and when killed with SIGKILL (parent-death signal)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moe_cpt.infra.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_local_s3_stops_its_moto_child(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moe_cpt.infra.local_s3", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: _answers(port), 60), "local S3 did not start"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _wait(lambda: not _listening(port), 30), f"moto still listens on {port} after {sig.name}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
