"""``cpt mix serve``: the mixer as an HTTP service that trainer ranks stream their samples from
(HTTP plumbing and the serve loop; requests: protocol.py, frames: wire.py, metrics: metrics.py).

The service holds one resolved blend and one :class:`~moe_cpt.mixer.blocks.BlockLoader` (disk + memory
cache, read-ahead) shared by all clients. It keeps no per-client state: every ``POST /v1/samples``
carries the client's :class:`~moe_cpt.mixer.stream.MixState`, and since the stream is a pure function of
(blend, rank, world size, state), any replica serving the same blend continues any client
exactly. Endpoints, wire format, security and metrics: docs/service.md.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from moe_cpt.errors import ConfigError, CptError
from moe_cpt.mixer.blocks import BlockLoader, CacheConfig
from moe_cpt.mixer.sample import Sample
from moe_cpt.mixer.service import wire
from moe_cpt.mixer.service.metrics import ServiceMetrics
from moe_cpt.mixer.service.protocol import (
    CONTENT_TYPE,
    ENDPOINTS,
    HttpError,
    SamplesRequest,
    blend_info,
    parse_samples_request,
    parse_uint,
    parse_validation_query,
)
from moe_cpt.mixer.service.record import ServeRecord
from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.state import MixState
from moe_cpt.mixer.stream import MixStream
from moe_cpt.store.reader import DatasetVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """How the service listens and what it accepts (see docs/service.md)."""

    host: str = "127.0.0.1"
    port: int = 8470  # 0: any free port
    token: str | None = None  # shared secret (Authorization: Bearer ...); required off loopback
    max_body_bytes: int = 16 << 10  # POST bodies larger than this get 413
    max_clients: int = 256  # concurrent sample streams; more get 503
    max_connections: int | None = None  # open connections = handler threads (None: max_clients + 64)
    request_timeout_s: float = 10.0  # deadline to receive a whole request (line, headers, body)
    evict_after_s: float = 1.0  # at the bound, the oldest connection still sending its request
    #                             for longer than this is dropped for a new one (else 503)
    send_timeout_s: float = 300.0  # a client that reads nothing for this long is dropped
    flush_bytes: int = 256 << 10  # frames are sent in writes of about this size ...
    flush_interval_s: float = 0.01  # ... or after this long, whichever comes first
    max_validation_windows: int = 4096


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MixService:
    """The HTTP service for one resolved blend: ``start()`` serves in a background thread,
    ``close()`` stops it (open streams end without an end frame; clients reconnect elsewhere)."""

    def __init__(self, blend: ResolvedBlend, datasets: list[DatasetVersion],
                 config: ServiceConfig | None = None, cache: CacheConfig | None = None):
        self.config = config or ServiceConfig()
        if not is_loopback(self.config.host) and not self.config.token:
            raise ConfigError(f"binding the mixer service to {self.config.host} (not loopback) needs a shared "
                              f"token: --token-file FILE or the {wire.TOKEN_ENV} environment variable")
        if self.config.token is not None and not self.config.token.strip():
            raise ConfigError("the mixer service token is empty")
        self.blend = blend
        self.fingerprint = blend.fingerprint  # hashed once
        self.datasets = datasets
        self.cache = cache or CacheConfig()
        self.loader = BlockLoader(datasets, self.cache)
        self.probe = MixStream(blend, datasets, 0, 1, self.cache, loader=self.loader)
        self.names = blend.names
        self.u16 = [ds.dtype.itemsize == 2 for ds in datasets]
        self.metrics = ServiceMetrics(self.names)
        self.stopping = threading.Event()
        self.blend_json = blend_info(blend, self.fingerprint, [pk.windows_per_epoch for pk in self.probe.packings],
                                     self.u16)
        handler = type("MixHandler", (_Handler,), {"service": self, "timeout": self.config.request_timeout_s})
        limit = self.config.max_connections or self.config.max_clients + 64
        try:
            server_cls = _Server6 if ":" in self.config.host else _Server
            self.server = server_cls((self.config.host, self.config.port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}") from exc
        self.server.connections = _Connections(limit, self.config.evict_after_s, self.metrics)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> MixService:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="mixer-service", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()
        self.loader.close()

    def __enter__(self) -> MixService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- request handling (called from handler threads) ----------------------------------
    def authorized(self, header: str | None) -> bool:
        if not self.config.token:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.config.token}".encode())

    def tokens_served(self) -> list[int]:
        """Training tokens sent so far, per source (for the run record)."""
        return self.metrics.tokens_served()


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 34\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
         b"too many connections; retry later\n")


class _Connections:
    """The open connections, one handler thread each, at most ``limit``. A connection still
    sending its request is evictable once it is ``evict_after_s`` old: at the bound, a new
    connection takes the place of the oldest such one (a slow client cannot crowd out the
    fast); if there is none, the new one gets a 503 from the accept thread, without a thread."""

    def __init__(self, limit: int, evict_after_s: float, metrics: ServiceMetrics):
        self.limit, self.evict_after_s, self.metrics = limit, evict_after_s, metrics
        self.lock = threading.Lock()
        self.open: set[Any] = set()
        self.reading: dict[Any, float] = {}  # connection -> accepted at (monotonic), until read

    def admit(self, conn: Any) -> bool:
        victim = None
        with self.lock:
            if len(self.open) >= self.limit:
                now = time.monotonic()
                oldest = min(self.reading.items(), key=lambda kv: kv[1], default=None)
                if oldest is None or now - oldest[1] < self.evict_after_s:
                    return False
                victim = oldest[0]
                self.open.discard(victim)
                self.reading.pop(victim)
            self.open.add(conn)
            self.reading[conn] = time.monotonic()
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its thread's read ends; it closes and exits
            except OSError:
                pass
        return True

    def request_read(self, conn: Any) -> None:
        with self.lock:
            self.reading.pop(conn, None)

    def release(self, conn: Any) -> None:
        with self.lock:
            self.open.discard(conn)
            self.reading.pop(conn, None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: bursts of connects wait for accept, not SYN retries
    connections: _Connections

    def handle_error(self, request: Any, client_address: Any) -> None:  # no traceback soup
        log.exception("mixer service: unhandled error for %s", client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.admit(request):
            self.connections.metrics.request("other", 503)
            try:
                request.setblocking(False)  # the accept thread never waits on a client
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _ClientGone(Exception):
    pass


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket that fail once ``deadline`` (monotonic) has passed: the time limit is
    for the whole request, not for each read (a client sending a byte a second is cut off)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _Handler(BaseHTTPRequestHandler):
    service: MixService
    server_version = "cpt-mixer/1"
    default_request_version = "HTTP/1.0"  # error replies to broken request lines get a status line

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + self.service.config.request_timeout_s
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def _request_read(self) -> None:
        """The whole request is in: this connection is no longer evictable."""
        self.server.connections.request_read(self.request)

    # ---- plumbing ----------------------------------------------------------------------------
    def _endpoint(self) -> str:
        return urlsplit(self.path).path if getattr(self, "path", None) else "other"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Also used by the stdlib for malformed request lines/headers: a short text body. The
        stdlib's 501 (unknown method) and 505 (HTTP version) are the client's fault: 400."""
        if code >= 500:
            code, message = 400, f"bad request: {message or code}"
        self._reply(code, (message or self.responses.get(code, ("error",))[0]) + "\n")

    def _reply(self, status: int, body: str | bytes, ctype: str = "text/plain; charset=utf-8",
               headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.service.metrics.request(self._endpoint(), status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass
        self.close_connection = True

    def _dispatch(self, fn: Any) -> None:
        try:
            if self.command != "POST":
                self._request_read()
            fn()
        except HttpError as exc:
            self._reply(exc.status, exc.message + "\n",
                        headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        except (_ClientGone, TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a request must never take the server down
            log.exception("mixer service: error handling %s %s", self.command, self.path[:200])
            self._reply(500, f"internal error: {type(exc).__name__}\n")

    def _check_auth(self) -> None:
        if not self.service.authorized(self.headers.get("Authorization")):
            raise HttpError(401, "missing or wrong bearer token")

    # ---- methods -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _not_allowed(self) -> None:
        self._dispatch(self._refuse_method)

    def _refuse_method(self) -> None:
        raise HttpError(405, f"method {self.command} not allowed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _get(self) -> None:
        svc = self.service
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._reply(200, f"ok {svc.fingerprint}\n")
            return
        self._check_auth()
        if url.path == "/metrics":
            self._reply(200, svc.metrics.render(svc.fingerprint, svc.loader.stats.as_dict()),
                        "text/plain; version=0.0.4; charset=utf-8")
        elif url.path == "/v1/blend":
            self._reply(200, svc.blend_json, "application/json")
        elif url.path == "/v1/validation":
            src, count = parse_validation_query(url.query, svc.names, svc.blend.spec.seq_len,
                                                svc.config.max_validation_windows)
            samples = svc.probe.validation_samples(src, count)
            out = [wire.stream_header(svc.fingerprint, svc.blend.spec.seq_len, len(svc.names))]
            out += [wire.sample_frame(s, 0, svc.u16[src]) for s in samples]
            out.append(wire.end_frame(len(samples)))
            self._reply(200, b"".join(out), CONTENT_TYPE)
        elif url.path == "/v1/samples":
            raise HttpError(405, "use POST for /v1/samples")
        else:
            raise HttpError(404, f"no such endpoint {url.path[:100]}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "send the body with a Content-Length (no transfer encoding)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "Content-Length required")
        n = parse_uint(raw.strip())
        if n is None:
            raise HttpError(400, "bad Content-Length")
        if n > self.service.config.max_body_bytes:
            raise HttpError(413, f"request body of {n} bytes is larger than {self.service.config.max_body_bytes}")
        data = self.rfile.read(n)
        if len(data) != n:
            raise _ClientGone()
        return data

    def _post(self) -> None:
        svc = self.service
        path = urlsplit(self.path).path
        self._check_auth()
        if path != "/v1/samples":
            raise HttpError(404 if path not in ENDPOINTS else 405, f"no POST endpoint {path[:100]}")
        body = self._read_body()
        self._request_read()
        req = parse_samples_request(body, svc.blend, svc.fingerprint)
        if not svc.metrics.open_stream(svc.config.max_clients):
            raise HttpError(503, f"too many clients ({svc.config.max_clients}); retry later")
        try:
            self._stream(req)
        finally:
            svc.metrics.close_stream()

    def _stream(self, req: SamplesRequest) -> None:
        svc = self.service
        cfg = svc.config
        rank, world = req.rank, req.world_size
        ms = MixStream(svc.blend, svc.datasets, rank, world, svc.cache, loader=svc.loader)
        gen = ms.samples(req.state or ms.initial_state(), req.worker)
        try:
            try:  # the first sample before the 200: a bad state is still a 4xx
                first = next(gen)
            except ConfigError as exc:
                raise HttpError(400, str(exc)[:500]) from exc
            except CptError as exc:
                raise HttpError(502, f"cannot read the data: {str(exc)[:500]}") from exc
            svc.metrics.request("/v1/samples", 200)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Mix-Fingerprint", svc.fingerprint)
            self.end_headers()
            self.close_connection = True
            self.connection.settimeout(cfg.send_timeout_s)
            st = first[1]
            log.info("stream for rank %d/%d from sample %d (step %d) to %s", rank, world, first[0]["sample"],
                     st.point.step, self.address_string())
            t0 = time.monotonic()
            sent = 0
            try:
                sent = self._send_frames(first, gen, req.max_samples)
            finally:
                log.info("stream for rank %d/%d to %s ended after %.1fs%s", rank, world, self.address_string(),
                         time.monotonic() - t0, f", {sent} samples" if sent else " (client gone)")
        finally:
            gen.close()
            ms.close()

    def _send_frames(self, first: tuple[Sample, MixState], gen: Iterator[tuple[Sample, MixState]],
                     max_samples: int | None) -> int:
        """Frames until the client goes (raises), the server stops or ``max_samples``; returns
        the number of samples sent."""
        svc = self.service
        cfg = svc.config
        seq_len = svc.blend.spec.seq_len
        buf = bytearray(wire.stream_header(svc.fingerprint, seq_len, len(svc.names)))
        per_source = [0] * len(svc.names)
        last_point = None
        sent = 0
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            try:
                self.wfile.write(buf)
            except OSError as exc:
                raise _ClientGone() from exc
            svc.metrics.add_samples(per_source, seq_len, len(buf))
            per_source[:] = [0] * len(per_source)
            buf.clear()
            last_flush = time.monotonic()

        item: tuple[Sample, MixState] | None = first
        try:
            while item is not None:
                sample, st = item
                if st.point is not last_point and st.point != last_point:
                    buf += wire.point_frame(st.point.step, st.point.counts, st.point.deficit)
                last_point = st.point
                wire.append_sample(buf, sample, st.next, svc.u16[sample["source"]])
                per_source[sample["source"]] += 1
                sent += 1
                if max_samples is not None and sent >= max_samples:
                    buf += wire.end_frame(sent)
                    break
                if svc.stopping.is_set():
                    break
                if len(buf) >= cfg.flush_bytes or time.monotonic() - last_flush >= cfg.flush_interval_s:
                    flush()
                item = next(gen)
        except CptError as exc:  # the data could not be read: tell the client, end the stream
            log.error("mixer service: %s", exc)
            buf += wire.error_frame(str(exc))
        except (_ClientGone, TimeoutError, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("mixer service: error producing samples")
            buf += wire.error_frame(f"internal error in the mixer service: {type(exc).__name__}: {exc}")
        if buf:
            flush()
        return sent


def serve_forever(service: MixService, stop: threading.Event, record: ServeRecord | None = None) -> None:
    """Run ``service`` until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT), keeping its run
    record (if any) up to date."""
    service.start()
    if record is not None:
        record.update(force=True)
    try:
        while not stop.wait(0.5):
            if record is not None:
                record.update()
    finally:
        service.close()
        if record is not None:
            record.update("finished", force=True)
