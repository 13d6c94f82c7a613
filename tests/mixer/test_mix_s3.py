"""The mixer against a real local S3 endpoint (moto server over HTTP): same bytes as a local
store, a server killed and restarted mid-stream, a corrupted block, an unreachable endpoint.

moto keeps objects in memory and a restarted moto starts empty, so the kill/restart test puts a
small TCP forwarder process in front of the server and SIGKILLs/restarts *that*: the endpoint
the mixer talks to really dies (connections reset, then refused) while the objects survive.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from moe_cpt.errors import CptError, IntegrityError
from moe_cpt.infra.local_s3 import LocalS3, free_port
from moe_cpt.mixer.blocks import CacheConfig
from moe_cpt.mixer.dataset import MixedDataset
from tests.support.mixer_store import TcpProxy, publish, spec

W = {"new": 0.8, "replay": 0.2}


def _clear_fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxied_s3(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The session's S3 server behind a kill-able forwarder, exported through AWS_* variables."""
    proxy = TcpProxy(s3_server.port, free_port()).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # retries are the mixer's job here
    _clear_fs_cache()
    try:
        yield proxy
    finally:
        proxy.kill()
        _clear_fs_cache()


def _fill(store: str) -> None:
    publish(store, "new", 1, 300)
    publish(store, "replay", 2, 100)


def _take(ds: MixedDataset, n: int) -> list[bytes]:
    it = iter(ds)
    return [next(it)["tokens"].tobytes() for _ in range(n)]


def test_s3_stream_equals_local_stream(s3_bucket: str, tmp_path) -> None:
    _clear_fs_cache()
    local = str(tmp_path / "store")
    remote = f"{s3_bucket}/store"
    _fill(local)
    _fill(remote)
    a = MixedDataset(spec(local, W), rank=1, world_size=2)
    b = MixedDataset(spec(remote, W), rank=1, world_size=2,
                     cache=CacheConfig(disk_dir=str(tmp_path / "cache"), prefetch_samples=64))
    assert a.blend.fingerprint == b.blend.fingerprint  # the store is not part of the stream
    assert _take(a, 200) == _take(b, 200)
    b.close(wait=True)  # read-ahead still in flight would move the counters and the files
    st = b.stats()
    assert st["bytes_fetched"] > 0 and st["blocks_fetched"] == len(list((tmp_path / "cache").glob("*/*.blk")))


def test_server_killed_and_restarted_mid_stream(proxied_s3: TcpProxy, s3_bucket: str, tmp_path) -> None:
    local = str(tmp_path / "store")
    _fill(local)
    want = _take(MixedDataset(spec(local, W)), 400)
    store = f"{s3_bucket}/store"
    _fill(store)
    # tiny memory budget, no disk cache: the stream must go back to S3 for nearly every block
    cfg = CacheConfig(memory_bytes=64 << 10, prefetch_samples=4, prefetch_threads=2, retries=10, backoff_s=0.1)
    ds = MixedDataset(spec(store, W), cache=cfg)
    it = iter(ds)
    got = [next(it)["tokens"].tobytes() for _ in range(100)]
    proxied_s3.kill()
    restart = threading.Timer(1.5, proxied_s3.start)
    restart.start()
    got += [next(it)["tokens"].tobytes() for _ in range(300)]
    restart.join()
    assert got == want
    assert ds.stats()["retries"] > 0  # it really went through the outage


def test_corrupted_block_fails_naming_it(s3_bucket: str, tmp_path) -> None:
    import s3fs

    _clear_fs_cache()
    store = f"{s3_bucket}/store"
    publish(store, "new", 5, 200)
    ds = MixedDataset(spec(store, {"new": 1.0}, seq_len=32, gbs=8), cache=CacheConfig(prefetch_threads=0))
    src = ds._datasets[0]
    shard = src.manifest.shards[0]
    rec = shard.blocks[1]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    path = src.shard_path(0)
    data = bytearray(fs.cat_file(path))
    data[rec.tokens_offset + 5] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError) as err:
        for _ in ds:
            pass
    msg = str(err.value)
    assert shard.path in msg and rec.key in msg and "checksum" in msg


def test_unreachable_endpoint_fails_after_bounded_retries(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_fs_cache()
    store = f"{s3_bucket}/store"
    publish(store, "new", 6, 50)
    resolved = MixedDataset(spec(store, {"new": 1.0})).blend.to_json()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _clear_fs_cache()
    t0 = time.monotonic()
    try:
        with pytest.raises(CptError, match=r"cannot open new@.* after 4 attempts") as err:
            MixedDataset(resolved)
    finally:
        _clear_fs_cache()
    assert time.monotonic() - t0 < 60
    assert "127.0.0.1" in str(err.value) or "Connect" in str(err.value)
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert np.isfinite(time.monotonic() - t0)
