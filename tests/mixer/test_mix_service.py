"""The mixer service (`cpt mix serve`) and its client: byte-identical to the in-process stream,
across server kills and restarts, with concurrent clients; auth; malformed requests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.mixer.blocks import CacheConfig
from moe_cpt.mixer.dataset import MixedDataset, open_blend
from moe_cpt.mixer.service import wire
from moe_cpt.mixer.service.client import ClientConfig, ServiceMixedDataset
from moe_cpt.mixer.service.server import MixService, ServiceConfig
from moe_cpt.mixer.state import MixState
from moe_cpt.mixer.stream import MixStream
from moe_cpt.provenance.catalog import RunCatalog
from tests.support.mixer_store import TcpProxy, publish, spec

W3 = {"new": 0.7, "replay": 0.2, "code": 0.1}
FAST = ClientConfig(retry_s=60.0, backoff_s=0.05, max_backoff_s=0.5)  # generous: a restart imports torch


def key(s: dict) -> tuple:
    assert s["tokens"].dtype == np.int64 and s["positions"].dtype == np.int64
    return (s["tokens"].tobytes(), s["positions"].tobytes(), s["source"], s["sample"], s["index"],
            s["epoch"], s["shard"], s["block"], s["offset"])


@pytest.fixture(scope="module")
def blend_dss(mix_store: str):
    return open_blend(spec(mix_store, W3))


@pytest.fixture(scope="module")
def service(blend_dss):
    blend, dss = blend_dss
    svc = MixService(blend, dss, ServiceConfig(port=0), CacheConfig(prefetch_threads=2))
    with svc:
        yield svc


def inproc(blend_dss, rank: int, world: int, n: int, state: MixState | None = None,
           worker=(0, 1, 0)) -> tuple[list[dict], MixState]:
    blend, dss = blend_dss
    ms = MixStream(blend, dss, rank, world, CacheConfig(prefetch_threads=0))
    it = ms.samples(state or ms.initial_state(), worker)
    out = []
    for _ in range(n):
        s, last = next(it)
        out.append(s)
    return out, last


def take(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(4096)
    finally:
        conn.close()


@pytest.mark.parametrize(("rank", "world", "n"), [(0, 1, 150), (1, 3, 90), (5, 8, 60), (3, 4, 70)])
def test_client_stream_and_state_are_identical_to_in_process(service, blend_dss, rank, world, n) -> None:
    want, last = inproc(blend_dss, rank, world, n + 40)
    ds = ServiceMixedDataset(service.url, rank, world, spec=blend_dss[0], config=FAST)
    assert (ds.source_names, ds.source_versions, ds.seq_len, ds.global_batch_size, ds.local_batch_size) == \
        (["new", "replay", "code"], [s.spec for s in blend_dss[0].sources], 64, 24, 24 // world)
    got = take(ds, n)
    assert [key(s) for s in got] == [key(s) for s in want[:n]]
    _, state_n = inproc(blend_dss, rank, world, n)
    assert ds.state_dict() == state_n.to_dict()
    # windows that start mid-document and windows holding document starts both occur
    assert any(s["positions"][0] > 0 for s in got) and any((s["positions"][1:] == 0).any() for s in got)
    # a fresh client resumes from the state (JSON round trip) where the first one stopped
    ds2 = ServiceMixedDataset(service.url, rank, world, config=FAST)
    ds2.load_state_dict(json.loads(json.dumps(ds.state_dict())))
    assert [key(s) for s in take(ds2, 40)] == [key(s) for s in want[n:]]
    # the in-process dataset takes the client's state and vice versa (one state format)
    md = MixedDataset(blend_dss[0], rank, world)
    md.load_state_dict(ds.state_dict())
    assert key(next(iter(md))) == key(want[n])


def test_batched_client_equals_batched_in_process(service, blend_dss) -> None:
    md = MixedDataset(blend_dss[0], rank=1, world_size=2, loader_batch_size=5, batched=True)
    ds = ServiceMixedDataset(service.url, 1, 2, loader_batch_size=5, batched=True, config=FAST)
    want, got = take(md, 7), take(ds, 7)
    assert ds.state_dict() == md.state_dict()
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for k in w:
            assert w[k].dtype == g[k].dtype and w[k].shape == g[k].shape and bool((w[k] == g[k]).all()), k


def test_validation_epochs_describe_and_metrics(service, blend_dss) -> None:
    blend, dss = blend_dss
    ds = ServiceMixedDataset(service.url, config=FAST)
    ms = MixStream(blend, dss, 0, 1)
    for src in range(3):
        assert [key(s) for s in ds.validation_samples(src, 4)] == [key(s) for s in ms.validation_samples(src, 4)]
    take(ds, 48)
    md = MixedDataset(blend)
    md.load_state_dict(ds.state_dict())
    assert ds.epochs() == md.epochs() and ds.state_counts() == md.state_counts()
    assert ds.describe() | {"service": None} == md.describe() | {"service": None}
    st = ds.stats()
    assert sum(st["samples_per_source"].values()) == 48 and st["bytes_received"] > 48 * 65 * 2
    conn = http.client.HTTPConnection("127.0.0.1", int(service.url.rsplit(":", 1)[1]), timeout=20)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    text = resp.read().decode()
    conn.close()
    vals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert vals['mixer_source_samples_served_total{source="new"}'] >= st["samples_per_source"]["new"]
    assert vals["mixer_tokens_served_total"] == 64 * vals["mixer_samples_served_total"] > 0
    assert 0 < vals["mixer_cache_hit_ratio"] <= 1
    assert vals['mixer_requests_total{endpoint="/v1/validation",code="200"}'] >= 3
    assert "mixer_active_clients" in vals
    assert request(service.url, "GET", "/healthz") == (200, f"ok {blend.fingerprint}\n".encode())


def test_eight_concurrent_clients_are_the_global_stream(service, blend_dss) -> None:
    world, steps = 8, 12
    b = 24 // world
    ref, _ = inproc(blend_dss, 0, 1, steps * 24)
    out: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            out[rank] = take(ServiceMixedDataset(service.url, rank, world, config=FAST), steps * b)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    merged = [out[r][s * b + i] for s in range(steps) for r in range(world) for i in range(b)]
    assert [key(s) for s in merged] == [key(s) for s in ref]


def test_a_replacement_server_behind_the_same_address_continues_the_stream(service, blend_dss) -> None:
    blend, dss = blend_dss
    port = free_port()
    proxy = TcpProxy(int(service.url.rsplit(":", 1)[1]), port).start()
    with MixService(blend, dss, ServiceConfig(port=0), CacheConfig(prefetch_threads=1)) as replica:
        try:
            it = iter(ServiceMixedDataset(f"http://127.0.0.1:{port}", 2, 3, config=FAST))
            got = [next(it) for _ in range(100)]
            proxy.kill()  # the address now leads to another replica (with a cold cache)
            proxy = TcpProxy(int(replica.url.rsplit(":", 1)[1]), port).start()
            # samples already buffered from the first server come first; go on until the
            # replica has served some
            while replica.metrics.samples == [0] * len(blend.names) and len(got) < 50_000:
                got.append(next(it))
            got += [next(it) for _ in range(100)]
        finally:
            proxy.kill()
        assert replica.metrics.streams >= 1
    want, _ = inproc(blend_dss, 2, 3, len(got))
    assert [key(s) for s in got] == [key(s) for s in want]


def test_stateful_dataloader_workers_and_resume(service, blend_dss) -> None:
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    want = take(MixedDataset(blend_dss[0], rank=1, world_size=2), 12 * 5)
    ds = ServiceMixedDataset(service.url, 1, 2, config=FAST)
    loader = StatefulDataLoader(ds, batch_size=ds.loader_batch_size, num_workers=2)
    li = iter(loader)
    got = [next(li) for _ in range(3)]
    saved = loader.state_dict()
    del li, loader
    loader2 = StatefulDataLoader(ServiceMixedDataset(service.url, 1, 2, config=FAST), batch_size=12, num_workers=2)
    loader2.load_state_dict(saved)
    li2 = iter(loader2)
    got += [next(li2) for _ in range(2)]
    del li2, loader2
    assert np.array_equal(torch.cat([g["tokens"] for g in got]).numpy(), np.stack([w["tokens"] for w in want]))
    assert np.array_equal(torch.cat([g["positions"] for g in got]).numpy(), np.stack([w["positions"] for w in want]))
    assert torch.cat([g["sample"] for g in got]).tolist() == [w["sample"] for w in want]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(service, blend_dss) -> None:
    fp = service.blend.fingerprint
    other = inproc(blend_dss, 0, 1, 1)[1].to_dict() | {"blend": "0123456789abcdef"}

    def post(obj, **kw):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return request(service.url, "POST", "/v1/samples", body, kw.get("headers"))[0]

    ok = {"fingerprint": fp, "rank": 0, "world_size": 1}
    assert post(b"{not json") == 400
    assert post(b"\xff\xfe") == 400
    assert post([1, 2]) == 400
    assert post(b"[" * 15000) == 400
    assert post(b'{"rank": 1' + b"0" * 5000 + b"}") == 400
    assert post(ok | {"bogus": 1}) == 400
    assert post({"rank": 0}) == 400
    assert post(ok | {"fingerprint": "feedfacefeedface"}) == 409
    assert post(ok | {"rank": 3, "world_size": 3}) == 400
    assert post(ok | {"world_size": 5}) == 400
    assert post(ok | {"rank": "0"}) == 400
    assert post(ok | {"sources": ["new", "nope"]}) == 404
    assert post(ok | {"sources": ["code", "new", "replay"]}) == 409
    assert post(ok | {"state": other}) == 409
    assert post(ok | {"state": {"mixer_state": 1}}) == 400
    assert post(ok | {"state": "x"}) == 400
    good = inproc(blend_dss, 0, 1, 30)[1].to_dict()
    assert post(ok | {"state": good | {"counts": [1, 2, 3]}}) == 400
    assert post(ok | {"state": good | {"next": 10**15}}) == 400
    assert post(ok | {"state": good | {"step": -1}}) == 400
    assert post(ok | {"worker": [2, 2, 3]}) == 400
    assert post(ok | {"max_samples": 0}) == 400
    assert post(b"x" * 100, headers={"Content-Length": str(1 << 20)}) == 413
    assert request(service.url, "GET", "/v1/validation?source=nope&count=2")[0] == 404
    assert request(service.url, "GET", "/v1/validation?source=new&count=abc")[0] == 400
    assert request(service.url, "GET", "/v1/validation?source=new&count=1000000000")[0] == 400
    assert request(service.url, "GET", "/v1/validation?source=new&count=%C2%B2")[0] == 400
    assert request(service.url, "GET", "/v1/validation?source=%C2%B2&count=" + "9" * 5000)[0] == 404
    assert request(service.url, "GET", "/v1/validation?source=new&count=" + "9" * 5000)[0] == 400
    assert post(b"{}", headers={"Content-Length": "\u00b2"}) == 400
    assert request(service.url, "GET", "/nope")[0] == 404
    assert request(service.url, "PUT", "/v1/samples", b"{}")[0] == 405
    assert request(service.url, "GET", "/v1/samples")[0] == 405
    # no Content-Length; raw garbage instead of HTTP; a connection that sends half a body and leaves
    port = int(service.url.rsplit(":", 1)[1])
    for raw in (b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x01\x02 garbage\r\n\r\n",
                b"\x00\x01 /x HTTP/1.1\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET / FOO/1\r\n\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(raw)
            reply = s.recv(200)
        assert reply.split(b" ")[1][:1] == b"4", reply
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /v1/samples HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"fing")
    # max_samples ends the stream cleanly; the server still serves identical streams
    ds = ServiceMixedDataset(service.url, 0, 1, config=FAST)
    want, _ = inproc(blend_dss, 0, 1, 10)
    assert [key(s) for s in take(ds, 10)] == [key(s) for s in want]
    assert request(service.url, "GET", "/healthz")[0] == 200


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_sample_requests_are_answered_never_crash(service, blend_dss, data) -> None:
    fp = service.blend.fingerprint
    good = inproc(blend_dss, 1, 2, 30)[1].to_dict()
    state = data.draw(st.one_of(_json, st.fixed_dictionaries({k: st.one_of(st.just(v), _json) for k, v in good.items()})))
    req = data.draw(st.fixed_dictionaries({}, optional={
        "fingerprint": st.one_of(st.just(fp), _json), "rank": st.one_of(st.integers(-2, 30), _json),
        "world_size": st.one_of(st.sampled_from([1, 2, 3, 8, 24]), _json), "state": st.just(state),
        "worker": st.one_of(st.lists(st.integers(-1, 5), min_size=3, max_size=3), _json),
        "max_samples": st.one_of(st.just(2), _json), "sources": st.one_of(st.just(["new", "replay", "code"]), _json)}))
    status, body = request(service.url, "POST", "/v1/samples", json.dumps(req).encode())
    assert status == 200 or 400 <= status < 500, (status, body[:200])
    assert request(service.url, "GET", "/healthz")[0] == 200


def test_client_refuses_another_blend_and_fails_clearly_without_server(service, mix_store) -> None:
    other, _ = open_blend(spec(mix_store, {"new": 0.5, "code": 0.5}))
    with pytest.raises(ConfigError, match="serves blend .* but the expected blend is"):
        ServiceMixedDataset(service.url, spec=other, config=FAST)
    with pytest.raises(ConfigError, match="but the expected blend is"):
        ServiceMixedDataset(service.url, spec=other.to_json(), config=FAST)
    # an unresolved spec is checked without the store: the same spec passes, any change is refused
    served = service.blend
    ServiceMixedDataset(service.url, spec=spec("/nonexistent/store", W3), config=FAST)
    pinned = spec("/x", W3)
    pinned["sources"]["new"]["dataset"] = f"new@{served.sources[0].version[:8]}"
    ServiceMixedDataset(service.url, spec=pinned, config=FAST)
    pinned["sources"]["new"]["dataset"] = "new@abcdef0123"
    for bad, what in [(pinned, "source new"), (spec("/x", W3, seed=8), "seed 8 != 7"),
                      (spec("/x", W3 | {"code": 0.2}), "weights"), (spec("/x", W3, seq_len=32), "seq_len"),
                      (spec("/x", {"new": 0.7, "replay": 0.3}), "sources")]:
        with pytest.raises(ConfigError, match=f"differs from the expected spec: .*{what}"):
            ServiceMixedDataset(service.url, spec=bad, config=FAST)
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(CptError, match=f"mixer service {url} is unreachable: gave up after") as ei:
        ServiceMixedDataset(url, config=ClientConfig(retry_s=1.0, backoff_s=0.05))
    assert time.monotonic() - t0 < 10 and "\n" not in str(ei.value)


def test_binding_off_loopback_needs_a_token(blend_dss, mix_store, tmp_path: Path) -> None:
    blend, dss = blend_dss
    with pytest.raises(ConfigError, match="needs a shared token"):
        MixService(blend, dss, ServiceConfig(host="0.0.0.0", port=0))
    with MixService(blend, dss, ServiceConfig(port=0)) as first:  # a port in use: one clear error
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:.*in use"):
            MixService(blend, dss, ServiceConfig(port=first.server.server_address[1]))
    p = tmp_path / "blend.json"
    p.write_text(json.dumps(blend.to_json()))
    env = {k: v for k, v in os.environ.items() if k != "CPT_MIX_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "moe_cpt.cli", "mix", "serve", str(p), "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "needs a shared token" in out.stderr


def test_data_that_becomes_unreadable_mid_stream_is_one_clear_client_error(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    publish(store, "new", 1, 300)
    blend, dss = open_blend(spec(store, {"new": 1.0}))
    # no memory to speak of and no read-ahead: every block is read from the store when needed
    with MixService(blend, dss, ServiceConfig(port=0), CacheConfig(memory_bytes=1, prefetch_threads=0)) as svc:
        it = iter(ServiceMixedDataset(svc.url, config=FAST))
        for _ in range(5):
            next(it)
        for shard in Path(store).rglob("*.tar"):
            shard.unlink()
        with pytest.raises(CptError, match=f"mixer service {svc.url}: .*shard file is missing") as ei:
            for _ in range(10_000):
                next(it)
        assert "\n" not in str(ei.value)
        assert svc.metrics.requests[("/v1/samples", 200)] == 1  # not retried: the data is gone


def _start_server(resolved: Path, port: int, token: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moe_cpt.cli", "mix", "serve", str(resolved), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True, env=os.environ | {"CPT_MIX_TOKEN": token})
    line = proc.stdout.readline()
    assert f"on http://127.0.0.1:{port} (bearer token required)" in line, line
    return proc


def test_kill_9_restart_token_and_server_gone_for_good(blend_dss, tmp_path: Path) -> None:
    blend, _ = blend_dss
    resolved = tmp_path / "resolved.json"
    resolved.write_text(json.dumps(blend.to_json()))
    port, token = free_port(), "s3cret-token"
    url = f"http://127.0.0.1:{port}"
    want, _ = inproc(blend_dss, 1, 2, 900)
    proc = _start_server(resolved, port, token)
    try:
        # unauthorized requests
        assert request(url, "GET", "/v1/blend")[0] == 401
        assert request(url, "GET", "/v1/blend", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(url, "GET", "/metrics", headers={"Authorization": token})[0] == 401
        assert request(url, "POST", "/v1/samples", b"{}")[0] == 401
        assert request(url, "GET", "/healthz")[0] == 200
        with pytest.raises(ConfigError, match="unauthorized"):
            ServiceMixedDataset(url, 1, 2, token="wrong", config=FAST)
        ds = ServiceMixedDataset(url, 1, 2, token=token, spec=blend, config=FAST)
        it = iter(ds)
        got = [next(it) for _ in range(300)]
        proc.send_signal(signal.SIGKILL)  # mid-stream: the client holds an open stream
        proc.wait()
        proc = _start_server(resolved, port, token)
        got += [next(it) for _ in range(300)]
        first_reconnects = ds.stats()["reconnects"]
        assert first_reconnects >= 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)
        # the restart happens while the client is already retrying
        restarter = threading.Timer(1.0, lambda: restarted.append(_start_server(resolved, port, token)))
        restarted: list[subprocess.Popen] = []
        restarter.start()
        got += [next(it) for _ in range(300)]
        restarter.join()
        proc = restarted[0]
        assert ds.stats()["reconnects"] > first_reconnects
        assert [key(s) for s in got] == [key(s) for s in want]
        # SIGTERM stops it cleanly; a client then gives up after its bounded retries, one line
        short = iter(ServiceMixedDataset(url, 1, 2, token=token, config=ClientConfig(retry_s=1.5, backoff_s=0.05)))
        assert key(next(short)) == key(want[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        t0 = time.monotonic()
        with pytest.raises(CptError, match=f"mixer service {url} is unreachable") as ei:
            for _ in range(100_000):
                next(short)
        assert time.monotonic() - t0 < 15 and "\n" not in str(ei.value)
        # each serving session left a run record in the store's catalog; the SIGKILLed ones stay
        # readable ("running"), the SIGTERMed one is finished with the tokens it served
        runs = [r.record for r in RunCatalog(blend.sources[0].store).list()
                if r.record.get("phase") == "mix" and r.record["data"]["blend"]["fingerprint"] == blend.fingerprint]
        assert len(runs) == 3
        assert sorted(r["status"] for r in runs) == ["finished", "running", "running"]
        finished = next(r for r in runs if r["status"] == "finished")
        assert set(finished["tokens_per_source"]) == set(blend.names)
        assert sum(finished["tokens_per_source"].values()) > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wire_positions_round_trip_compact_or_full() -> None:
    """The compact positions (first + document starts) are exact; anything else goes in full."""
    class Src:
        def __init__(self, data: bytes):
            self.data = data

        def read1(self, n: int) -> bytes:
            out, self.data = self.data[:n], self.data[n:]
            return out

    rng = np.random.default_rng(0)
    for trial in range(200):
        m = int(rng.integers(2, 300))
        starts = np.unique(rng.integers(1, m, size=int(rng.integers(0, 80))))
        p0 = int(rng.integers(0, 10_000))
        seg = np.concatenate([[0], starts, [m]])
        pos = np.arange(m) - np.repeat(seg[:-1], np.diff(seg))
        pos[: seg[1]] += p0
        doc_positions = trial % 3 != 0
        if not doc_positions:  # not document positions: must still arrive exactly
            i = int(rng.integers(1, m))
            pos[i] = pos[i - 1] + 3
        u16 = trial % 2 == 0
        tokens = rng.integers(0, 1 << 16 if u16 else 1 << 31, size=m)
        s = {"tokens": tokens, "positions": pos, "source": 1, "epoch": 3, "sample": -1, "index": 7,
             "shard": 2, "block": 9, "offset": 11}
        frame = wire.sample_frame(s, 42, u16)
        body = m * (2 if u16 else 4) + (4 * len(starts) if doc_positions else 4 * m)
        assert len(frame) == 1 + wire.SAMPLE_HEAD.size + body
        r = wire.FrameReader(Src(wire.stream_header("0123456789abcdef", m - 1, 2) + frame), chunk=7)
        head = r.head()
        kind, (got, nxt) = r.frame(head)
        assert kind == "S" and nxt == 42 and key(got) == key(s)
        with pytest.raises(EOFError):  # a cut stream is not a clean end
            r.frame(head)
