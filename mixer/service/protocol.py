"""The mixer service's requests and responses: their shapes, and the validation of what a
client sends, as :class:`HttpError` (status code + one line). No sockets here (see
mixer/service/server.py); endpoints and status codes: docs/service.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moe_cpt.errors import CptError
from moe_cpt.mixer.service import wire
from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.state import MixState, StateOfAnotherBlend, Worker, check_state, is_worker_list

CONTENT_TYPE = "application/x-cpt-mix"  # of the sample streams (frames: mixer/service/wire.py)
ENDPOINTS = ("/healthz", "/metrics", "/v1/blend", "/v1/samples", "/v1/validation")
REQUEST_KEYS = {"fingerprint", "rank", "world_size", "state", "worker", "max_samples", "sources"}
MAX_VALIDATION_TOKENS = 64 << 20  # per request


class HttpError(Exception):
    """An error reply: status code and a short text body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def blend_info(blend: ResolvedBlend, fingerprint: str, windows_per_epoch: list[int], u16: list[bool]) -> bytes:
    """The body of ``GET /v1/blend``: wire version, fingerprint, resolved blend, windows per
    epoch and token width of each source."""
    return json.dumps({
        "wire": wire.WIRE_VERSION, "fingerprint": fingerprint, "blend": blend.to_json(),
        "windows_per_epoch": windows_per_epoch, "token_bits": [16 if u else 32 for u in u16],
    }).encode()


@dataclass(frozen=True)
class SamplesRequest:
    """The body of ``POST /v1/samples``: which rank (and loader worker) of which blend, from
    which state (None: the start), how many samples at most (None: endless)."""

    fingerprint: str
    rank: int = 0
    world_size: int = 1
    state: MixState | None = None
    worker: Worker | None = None
    max_samples: int | None = None
    sources: list[str] | None = None  # the client's source names, in order (a check)

    def to_json(self) -> bytes:
        """The request body as a client sends it."""
        body: dict[str, Any] = {"fingerprint": self.fingerprint, "rank": self.rank, "world_size": self.world_size,
                                "state": self.state.to_dict() if self.state else None,
                                "worker": list(self.worker) if self.worker else None}
        if self.sources is not None:
            body["sources"] = self.sources
        if self.max_samples is not None:
            body["max_samples"] = self.max_samples
        return json.dumps(body).encode()


def parse_samples_request(body: bytes, blend: ResolvedBlend, fingerprint: str) -> SamplesRequest:
    """A request body checked against the served blend (``fingerprint``: its, hashed once): the
    worker resolved (default: the whole rank in one chunk per step), the state checked and
    rescaled to the request's world size. 400/404/409 :class:`HttpError` otherwise."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HttpError(400, f"request body is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(req, dict):
        raise HttpError(400, "request body must be a JSON object")
    unknown = sorted(set(req) - REQUEST_KEYS)
    if unknown:
        raise HttpError(400, f"unknown request field(s): {', '.join(unknown)}")
    fp = req.get("fingerprint")
    if not isinstance(fp, str):
        raise HttpError(400, "request needs the blend 'fingerprint' (GET /v1/blend)")
    if fp != fingerprint:
        raise HttpError(409, f"this server serves blend {fingerprint}, not {fp[:64]}")
    names = blend.names
    sources = req.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise HttpError(400, "'sources' must be a list of source names")
        missing = [s for s in sources if s not in names]
        if missing:
            raise HttpError(404, f"source(s) not in the served blend: {', '.join(s[:64] for s in missing[:8])}")
        if sources != names:
            raise HttpError(409, f"served blend has sources {names}, not {sources}")
    rank, world = _int_field(req, "rank", 0), _int_field(req, "world_size", 1)
    g = blend.spec.global_batch_size
    if world < 1 or world > g or not 0 <= rank < world or g % world:
        raise HttpError(400, f"invalid rank {rank} of world size {world} (global batch {g})")
    worker_raw = req.get("worker")
    if worker_raw is None:
        worker = Worker(0, 1, g // world)
    else:
        if not is_worker_list(worker_raw):
            raise HttpError(400, "'worker' must be [worker id, number of workers, loader batch size]")
        worker = Worker(*worker_raw)
        if not (1 <= worker.n_workers <= 1024 and 0 <= worker.wid < worker.n_workers and 1 <= worker.batch <= 1 << 20):
            raise HttpError(400, f"invalid worker {worker_raw}")
    max_samples = req.get("max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                    or max_samples < 1):
        raise HttpError(400, "'max_samples' must be an integer >= 1")
    state = None
    if req.get("state") is not None:
        try:
            state = check_state(MixState.from_dict(req["state"]), fingerprint, len(names), world, g, worker)
        except StateOfAnotherBlend as exc:
            raise HttpError(409, str(exc)) from exc
        except CptError as exc:
            raise HttpError(400, str(exc)[:300]) from exc
    return SamplesRequest(fp, rank, world, state, worker, max_samples, sources)


def parse_validation_query(query: str, names: list[str], seq_len: int, max_windows: int) -> tuple[int, int]:
    """``(source index, count)`` of ``GET /v1/validation?source=NAME|INDEX&count=N``."""
    q = parse_qs(query, keep_blank_values=True)
    src_raw = (q.get("source") or [""])[0]
    count_raw = (q.get("count") or [""])[0]
    index = parse_uint(src_raw)
    if src_raw in names:
        src = names.index(src_raw)
    elif index is not None and index < len(names):
        src = index
    else:
        raise HttpError(404, f"source {src_raw[:64]!r} is not in the served blend {names}")
    count = parse_uint(count_raw)
    if count is None or not 1 <= count <= max_windows or count * (seq_len + 1) > MAX_VALIDATION_TOKENS:
        raise HttpError(400, f"count must be an integer in 1..{max_windows} "
                             f"(and at most {MAX_VALIDATION_TOKENS} tokens)")
    return src, count


def parse_uint(text: str) -> int | None:
    """A short string of ASCII digits as an int, else None (no unicode digits, no 5000-digit ints)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _int_field(req: dict[str, Any], key: str, default: int) -> int:
    v = req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or abs(v) > 1 << 31:
        raise HttpError(400, f"'{key}' must be an integer")
    return v
