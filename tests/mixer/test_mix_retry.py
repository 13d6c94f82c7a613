"""Retries happen in one layer, with jittered exponential backoff (issue 11.17): botocore and
s3fs make one attempt per request, the mixer's ``retry_call`` and the service client's
reconnects wait a uniformly random time under a doubling ceiling."""

from __future__ import annotations

import pytest

import moe_cpt.mixer.blocks as blocks
import moe_cpt.mixer.service.client as client
from moe_cpt.errors import CptError
from moe_cpt.fs import open_fs, s3_retry_options
from moe_cpt.mixer.service.client import ClientConfig


def test_s3_filesystems_leave_retrying_to_the_caller() -> None:
    fs, _ = open_fs("s3://some-bucket/store")
    assert fs.retries == 1
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 1}
    assert s3_retry_options({"AWS_MAX_ATTEMPTS": "3"}) == {}  # an explicit setting wins


def test_retry_call_backs_off_exponentially_with_full_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(blocks.time, "sleep", waits.append)
    calls = []

    def flaky() -> int:
        calls.append(1)
        raise ConnectionResetError("reset")

    for _ in range(20):
        with pytest.raises(CptError, match="after 6 attempts"):
            blocks.retry_call(flaky, "read it", retries=6, backoff_s=1.0)
    assert len(calls) == 20 * 6 and len(waits) == 20 * 5
    ceilings = [1.0, 2.0, 4.0, 5.0, 5.0] * 20
    assert all(0.0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len({round(w, 6) for w in waits}) > 90  # jittered, not a fixed schedule
    assert sum(waits[3::5]) > 20 * 5.0 * 0.25  # and spread over the whole range


def test_client_reconnects_back_off_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waits.append)
    backoff = client._Backoff(ClientConfig(retry_s=1e9, backoff_s=0.5, max_backoff_s=4.0), "http://x")
    for _ in range(200):
        backoff.wait(ConnectionRefusedError("refused"))
    ceilings = [0.5, 1.0, 2.0] + [4.0] * 197
    assert all(0.0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len(set(waits)) == len(waits) and max(waits) > 3.0 and min(waits[3:]) < 1.0
