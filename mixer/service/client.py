"""Client of the mixer service: the same ``IterableDataset`` and state API as
:class:`moe_cpt.mixer.dataset.MixedDataset`, with the samples streamed from ``cpt mix serve``.

    ds = ServiceMixedDataset("http://mixer:8470", rank=r, world_size=w, token=..., spec=blend)
    loader = StatefulDataLoader(ds, batch_size=ds.loader_batch_size, num_workers=2)

The client keeps its :class:`~moe_cpt.mixer.stream.MixState` itself (the server is stateless): every
sample frame carries the state after it, and a dropped connection is reopened, with exponential
backoff, from the state after the last sample handed out, so the stream continues byte-identical
(on the same server after a restart, or on any other replica of the same blend). If no server
answers for ``retry_s`` seconds, iteration fails with one :class:`~moe_cpt.errors.CptError` line naming
the URL. See docs/service.md.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import torch
from torch.utils.data import get_worker_info

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.mixer.blocks import jittered
from moe_cpt.mixer.contract import BlendDataset
from moe_cpt.mixer.sample import Sample
from moe_cpt.mixer.schedule import MixPoint
from moe_cpt.mixer.service import wire
from moe_cpt.mixer.service.protocol import SamplesRequest
from moe_cpt.mixer.spec import BlendSpec, ResolvedBlend, blend_from_json, load_spec_file, parse_spec
from moe_cpt.mixer.state import MixState, Worker, check_rank, check_state
from moe_cpt.store.object_store import parse_ref


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts and the reconnect policy of :class:`ServiceMixedDataset`."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0  # no byte for this long: the connection is treated as dropped
    retry_s: float = 120.0  # give up when no server answered for this long
    backoff_s: float = 0.1  # first reconnect delay ceiling; doubles, capped at max_backoff_s; full jitter
    max_backoff_s: float = 5.0


class _Transient(Exception):
    """A failure worth reconnecting for (refused/reset/cut connection, 5xx)."""


_RETRYABLE = (_Transient, OSError, EOFError, http.client.HTTPException)


def check_blend(spec: str | Path | dict[str, Any] | ResolvedBlend, served: ResolvedBlend, url: str) -> None:
    """Refuse a server whose blend is not the one ``spec`` stands for. A resolved blend (object,
    dict or JSON/YAML file) or a bare 16-hex-digit fingerprint must match the fingerprint exactly.
    An unresolved spec is compared without reading the store (trainer hosts of a service setup
    need no store access): source names, datasets, version-id refs, weights/schedule, seq_len,
    batch, seed, shuffle window and replay mode (and ``seen_step`` where given) must match; a tag
    ref (``@latest``) matches any version."""
    if isinstance(spec, ResolvedBlend):
        want = spec.fingerprint
    elif isinstance(spec, str) and len(spec) == 16 and all(c in "0123456789abcdef" for c in spec):
        want = spec
    else:
        data = spec if isinstance(spec, dict) else load_spec_file(spec)
        if not data.get("resolved"):
            diffs = _spec_differences(parse_spec(data), served)
            if diffs:
                raise ConfigError(f"mixer service {url} serves blend {served.fingerprint}, which differs from the "
                                  f"expected spec: {'; '.join(diffs)}")
            return
        want = blend_from_json(data).fingerprint
    if want != served.fingerprint:
        raise ConfigError(f"mixer service {url} serves blend {served.fingerprint}, but the expected blend is {want}")


def _spec_differences(bs: BlendSpec, served: ResolvedBlend) -> list[str]:
    ss = served.spec
    if bs.names != ss.names:
        return [f"sources {bs.names} != {ss.names}"]
    diffs = [f"{f} {getattr(bs, f)} != {getattr(ss, f)}"
             for f in ("seq_len", "global_batch_size", "seed", "shuffle_blocks") if getattr(bs, f) != getattr(ss, f)]
    mine, theirs = bs.weight_schedule(), ss.weight_schedule()
    if (mine.steps, mine.knot_weights) != (theirs.steps, theirs.knot_weights):
        diffs.append("weights/schedule differ")
    for s, r in zip(bs.sources, served.sources, strict=True):
        name, ref = parse_ref(s.dataset)
        is_version = len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref)
        if name != r.dataset or (is_version and not r.version.startswith(ref)):
            diffs.append(f"source {s.name}: {s.dataset} != {r.spec}")
        if s.replay != r.replay_mode:
            diffs.append(f"source {s.name}: replay {s.replay} != {r.replay_mode}")
        elif r.replay and s.seen_step is not None and s.seen_step != r.replay.seen_step:
            diffs.append(f"source {s.name}: seen_step {s.seen_step} != {r.replay.seen_step}")
    return diffs


class ServiceMixedDataset(BlendDataset):
    """The mixer's stream for ``(rank, world_size)``, served by a mixer service at ``url``."""

    def __init__(
        self,
        url: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        token: str | None = None,
        spec: str | Path | dict[str, Any] | ResolvedBlend | None = None,
        loader_batch_size: int | None = None,
        batched: bool = False,
        config: ClientConfig | None = None,
    ):
        """``batched``: as in MixedDataset, iterate whole loader batches (dicts of int64 torch
        tensors with a leading dimension of ``loader_batch_size``); use ``batch_size=None``."""
        super().__init__()
        self.batched = batched
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"mixer service URL must be http(s)://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._token = token if token is not None else os.environ.get(wire.TOKEN_ENV) or None
        self.config = config or ClientConfig()
        info = json.loads(self._get("/v1/blend"))
        if info.get("wire") != wire.WIRE_VERSION:
            raise ConfigError(f"mixer service {self.url} speaks wire version {info.get('wire')}, "
                              f"this client {wire.WIRE_VERSION}")
        self.blend = blend_from_json(info["blend"])
        self.fingerprint = self.blend.fingerprint  # hashed once: it is in every state
        if info.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"mixer service {self.url} sent an inconsistent blend")
        if spec is not None:
            check_blend(spec, self.blend, self.url)
        self._windows = [int(w) for w in info["windows_per_epoch"]]
        g = self.blend.spec.global_batch_size
        check_rank(rank, world_size, g)
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = g // world_size
        self.loader_batch_size = loader_batch_size or self.local_batch_size
        self._state = MixState(self.fingerprint, world_size, MixPoint.start(len(self.blend.names)), 0)
        self._received = [0] * len(self.blend.names)
        self._bytes = 0
        self._reconnects = 0

    # ---- contract (as MixedDataset; properties and state_dict: mixer/contract.py) ----------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state of this dataset or of a MixedDataset of the same blend (any world size at a
        step boundary), or a whole ``StatefulDataLoader`` state (worker states are merged)."""
        self._state = check_state(self.incoming_state(state), self.fingerprint, len(self.blend.names),
                                  self.world_size, self.global_batch_size)

    def epochs(self) -> dict[str, float]:
        """Epochs per source consumed up to the step of the current state (all ranks)."""
        return {n: c / w for n, c, w in zip(self.source_names, self._state.point.counts, self._windows, strict=True)}

    def describe(self) -> dict[str, Any]:
        """As :meth:`BlendDataset.describe`, and where it was served from."""
        return {**super().describe(), "service": self.url}

    def stats(self) -> dict[str, Any]:
        """Samples/tokens per source received by this process, bytes received, reconnects."""
        return {
            "samples_per_source": dict(zip(self.source_names, self._received, strict=True)),
            "tokens_per_source": {n: c * self.seq_len for n, c in zip(self.source_names, self._received, strict=True)},
            "bytes_received": self._bytes,
            "reconnects": self._reconnects,
        }

    def validation_samples(self, source: int, count: int) -> list[Sample]:
        """``count`` fixed windows of source ``source``'s held-out split (as MixedDataset's)."""
        if not 0 <= source < len(self.source_names):
            raise ConfigError(f"no source {source} (the blend has {len(self.source_names)})")
        if count < 1:
            return []
        query = urlencode({"source": self.source_names[source], "count": count})
        body = self._get(f"/v1/validation?{query}", binary=True)
        reader = wire.FrameReader(io.BytesIO(body))
        head = reader.head()
        out = []
        while True:
            kind, val = reader.frame(head)
            if kind == "S":
                out.append(val[0])
            elif kind == "E":
                return out
            elif kind == "X":
                raise CptError(f"mixer service {self.url}: {val}")

    # ---- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = Worker(info.id, info.num_workers, self.loader_batch_size) if info else \
            Worker(0, 1, self.loader_batch_size)
        samples = self._sample_stream(worker)
        if not self.batched:
            return samples
        return self._batches(samples)

    def _batches(self, samples: Iterator[Sample]) -> Iterator[dict[str, Any]]:
        """Chunks of ``loader_batch_size`` samples collated (the server sends a worker's chunk as
        consecutive samples); the state is the one after the chunk's last sample."""
        try:
            while True:
                chunk = [next(samples) for _ in range(self.loader_batch_size)]
                yield {k: torch.from_numpy(np.stack([c[k] for c in chunk]) if k in ("tokens", "positions")
                                           else np.array([c[k] for c in chunk], dtype=np.int64))
                       for k in chunk[0]}
        finally:
            samples.close()

    def _sample_stream(self, worker: Worker) -> Iterator[Sample]:
        retry = _Backoff(self.config, self.url)
        retryable = _RETRYABLE  # a local: still bound if the generator is finalized at interpreter exit
        while True:
            conn = None
            try:
                conn, resp = self._open_samples(worker)
                reader = wire.FrameReader(resp)
                head = reader.head()
                self._check_head(head)
                point = self._state.point
                while True:
                    try:
                        kind, val = reader.frame(head)
                    finally:
                        self._bytes += reader.bytes_read
                        reader.bytes_read = 0
                    if kind == "S":
                        sample, nxt = val
                        self._state = MixState(self.fingerprint, self.world_size, point, nxt,
                                               worker if worker.n_workers > 1 else None)
                        self._received[sample["source"]] += 1
                        retry.reset()
                        yield sample
                    elif kind == "P":
                        point = MixPoint(*val)
                    elif kind == "X":
                        raise CptError(f"mixer service {self.url}: {val}")
                    else:  # "E": the server ended the stream; continue on a new request
                        break
            except retryable as exc:
                self._reconnects += 1
                retry.wait(exc)
            finally:
                if conn is not None:
                    conn.close()

    # ---- HTTP ------------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.config.connect_timeout_s)
        conn.connect()
        conn.sock.settimeout(self.config.read_timeout_s)
        return conn

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _check_status(self, resp: http.client.HTTPResponse, what: str) -> None:
        if resp.status == 200:
            return
        text = resp.read(2000).decode("utf-8", "replace").strip().splitlines()
        msg = text[0] if text else resp.reason
        if resp.status >= 500 or resp.status == 429:
            raise _Transient(f"HTTP {resp.status} {msg}")
        if resp.status == 401:
            raise ConfigError(f"mixer service {self.url} refused {what}: unauthorized (HTTP 401; "
                              f"pass token= or set {wire.TOKEN_ENV})")
        err = ConfigError if resp.status in (400, 409, 413) else CptError
        raise err(f"mixer service {self.url} refused {what}: HTTP {resp.status}: {msg}")

    def _get(self, path: str, binary: bool = False) -> bytes:
        retry = _Backoff(self.config, self.url)
        while True:
            conn = None
            try:
                conn = self._connect()
                conn.request("GET", path, headers=self._headers())
                resp = conn.getresponse()
                self._check_status(resp, f"GET {path}")
                return resp.read()
            except (_Transient, OSError, http.client.HTTPException) as exc:
                retry.wait(exc)
            finally:
                if conn is not None:
                    conn.close()

    def _open_samples(self, worker: Worker) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        body = SamplesRequest(self.fingerprint, self.rank, self.world_size, self._state, worker,
                              sources=self.source_names).to_json()
        conn = self._connect()
        try:
            conn.request("POST", "/v1/samples", body=body,
                         headers={"Content-Type": "application/json", **self._headers()})
            resp = conn.getresponse()
            self._check_status(resp, "the sample stream")
        except BaseException:
            conn.close()
            raise
        return conn, resp

    def _check_head(self, head: wire.StreamHead) -> None:
        if head.fingerprint != self.fingerprint or head.seq_len != self.seq_len \
                or head.n_sources != len(self.source_names):
            raise ConfigError(f"mixer service {self.url} now serves blend {head.fingerprint}, "
                              f"not {self.fingerprint}")


class _Backoff:
    """Exponential backoff with full jitter (each wait uniform in [0, the doubling ceiling]),
    bounded in total time; the clock starts at the first failure."""

    def __init__(self, config: ClientConfig, url: str):
        self.config, self.url = config, url
        self.reset()

    def reset(self) -> None:
        self.delay = self.config.backoff_s
        self.since: float | None = None
        self.attempts = 0

    def wait(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        self.attempts += 1
        if now - self.since + self.delay > self.config.retry_s:
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise CptError(f"mixer service {self.url} is unreachable: gave up after {now - self.since:.1f}s and "
                           f"{self.attempts} attempts ({type(exc).__name__}: {detail})") from None
        time.sleep(jittered(self.delay))
        self.delay = min(self.delay * 2, self.config.max_backoff_s)

