"""The mixer service's binary wire format (see docs/service.md): a stream header, then frames.

All integers are little-endian. A response body is::

    header  : magic b"CPTMIX01", fingerprint (16 ASCII bytes), seq_len u32, n_sources u16
    frames  : one type byte, then
      b"P"  point:  step i64, counts K x i64, deficits K x i64   (the assignment state that the
                    following samples' states refer to; sent whenever it changes)
      b"S"  sample: SAMPLE_HEAD fields, then the tokens (n = seq_len + 1 of uint16, or uint32 when
                    flag TOKENS_U32), then either n_starts uint32 document-start indices or, with
                    flag FULL_POSITIONS, n int32 positions
      b"E"  end:    samples sent u64 (a clean end; a body that stops without it was cut)
      b"X"  error:  length u32 + UTF-8 message (the server failed to produce the next sample)

Positions are sent compactly: the first token's position ``p0`` and the indices ``i > 0`` where a
document starts (``positions[i] == 0``); everything else is ``previous + 1``. The encoder checks
that the rebuilt positions equal the real ones and falls back to the full array otherwise, so the
client always gets exactly the in-process bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_cpt.errors import CptError
from moe_cpt.mixer.sample import Sample, make_sample

WIRE_VERSION = 1  # of the service protocol (GET /v1/blend says which one a server speaks)
TOKEN_ENV = "CPT_MIX_TOKEN"  # the shared bearer token, for server and clients
MAGIC = b"CPTMIX01"
STREAM_HEAD = struct.Struct("<8s16sIH")
# flags u8, source u16, epoch u32, sample i64, index i64, next i64, shard u32, block u32,
# offset u32, p0 u32, n_starts u32
SAMPLE_HEAD = struct.Struct("<BHIqqqIIIII")
TOKENS_U32 = 1
FULL_POSITIONS = 2
I64 = struct.Struct("<q")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
MAX_ERROR_BYTES = 4096


class WireError(CptError):
    """The byte stream does not follow the wire format (a cut stream is not a WireError)."""


def stream_header(fingerprint: str, seq_len: int, n_sources: int) -> bytes:
    return STREAM_HEAD.pack(MAGIC, fingerprint.encode("ascii")[:16].ljust(16, b"\0"), seq_len, n_sources)


def point_frame(step: int, counts: tuple[int, ...], deficit: tuple[int, ...]) -> bytes:
    k = len(counts)
    return b"P" + struct.pack(f"<q{k}q{k}q", step, *counts, *deficit)


def end_frame(n: int) -> bytes:
    return b"E" + U64.pack(n)


def error_frame(message: str) -> bytes:
    data = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return b"X" + U32.pack(len(data)) + data


def rebuild_positions(n: int, p0: int, starts: np.ndarray) -> np.ndarray:
    """Positions of ``n`` tokens whose first token is at ``p0`` and whose documents start at
    ``starts`` (sorted indices > 0)."""
    if len(starts) <= 32:  # the usual case: a few documents per window
        pos = np.arange(p0, p0 + n, dtype=np.int64)
        for i in starts.tolist():
            pos[i:] -= pos[i]
        return pos
    seg = np.concatenate([[0], starts.astype(np.int64), [n]])
    pos = np.arange(n, dtype=np.int64) - np.repeat(seg[:-1], np.diff(seg))
    pos[: seg[1]] += p0
    return pos


def append_sample(buf: bytearray, sample: Sample, next_pos: int, u16: bool) -> None:
    """Append one sample (``tokens``/``positions`` int64 arrays and provenance) as a frame to
    ``buf``. ``u16``: the source's tokens are stored as uint16 (so they fit)."""
    tokens: np.ndarray = sample["tokens"]
    positions: np.ndarray = sample["positions"]
    flags = 0 if u16 else TOKENS_U32
    p0 = int(positions[0])
    # compact iff every position that is not previous + 1 is 0 (a document start)
    steps = positions[1:] - positions[:-1]
    breaks = np.flatnonzero(steps != 1)
    compact = 0 <= p0 < 1 << 32 and not positions[1:][breaks].any()
    if not compact:
        flags |= FULL_POSITIONS
    buf += b"S"
    buf += SAMPLE_HEAD.pack(flags, sample["source"], sample["epoch"], sample["sample"], sample["index"],
                            next_pos, sample["shard"], sample["block"], sample["offset"],
                            p0 if compact else 0, len(breaks) if compact else 0)
    # (a memoryview: `bytearray += ndarray` would be numpy's broadcasting add)
    buf += memoryview(tokens.astype(np.uint16 if u16 else np.uint32))
    buf += memoryview((breaks + 1).astype(np.uint32) if compact else positions.astype(np.int32))


def sample_frame(sample: Sample, next_pos: int, u16: bool) -> bytes:
    """One sample as a frame (see :func:`append_sample`)."""
    buf = bytearray()
    append_sample(buf, sample, next_pos, u16)
    return bytes(buf)


@dataclass
class StreamHead:
    fingerprint: str
    seq_len: int
    n_sources: int


class FrameReader:
    """Decodes frames from a byte source with ``read1(n)`` (e.g. an ``http.client`` response)
    into ``("P", (step, counts, deficit))``, ``("S", (sample, next))``, ``("E", n)`` and
    ``("X", message)``. Raises :class:`EOFError` when the stream stops mid-way (a cut connection)."""

    def __init__(self, src: Any, chunk: int = 1 << 20):
        self.src = src
        self.chunk = chunk
        self.buf = bytearray()
        self.pos = 0
        self.bytes_read = 0

    def _need(self, n: int) -> bytearray:
        while len(self.buf) - self.pos < n:
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            data = self.src.read1(max(self.chunk, n - len(self.buf)))
            if not data:
                raise EOFError("stream cut")
            self.bytes_read += len(data)
            self.buf += data
        out = self.buf[self.pos: self.pos + n]  # a copy: the buffer is compacted later
        self.pos += n
        return out

    def head(self) -> StreamHead:
        magic, fp, seq_len, k = STREAM_HEAD.unpack(self._need(STREAM_HEAD.size))
        if magic != MAGIC:
            raise WireError(f"not a mixer service stream (magic {bytes(magic)!r})")
        return StreamHead(fp.rstrip(b"\0").decode("ascii", "replace"), seq_len, k)

    def frame(self, head: StreamHead) -> tuple[str, Any]:
        kind = bytes(self._need(1))
        k, n = head.n_sources, head.seq_len + 1
        if kind == b"S":
            flags, src, epoch, gidx, index, nxt, shard, block, offset, p0, n_starts = \
                SAMPLE_HEAD.unpack(self._need(SAMPLE_HEAD.size))
            if src >= k or n_starts >= n:
                raise WireError(f"bad sample frame (source {src}, {n_starts} document starts)")
            tdt = np.uint32 if flags & TOKENS_U32 else np.uint16
            tokens = np.frombuffer(self._need(n * tdt().itemsize), dtype=tdt).astype(np.int64)
            if flags & FULL_POSITIONS:
                positions = np.frombuffer(self._need(4 * n), dtype=np.int32).astype(np.int64)
            else:
                starts = np.frombuffer(self._need(4 * n_starts), dtype=np.uint32)
                positions = rebuild_positions(n, p0, starts)
            return "S", (make_sample(tokens, positions, src, gidx, index, epoch, shard, block, offset), nxt)
        if kind == b"P":
            vals = struct.unpack(f"<q{k}q{k}q", self._need(8 * (1 + 2 * k)))
            return "P", (vals[0], tuple(vals[1: 1 + k]), tuple(vals[1 + k:]))
        if kind == b"E":
            return "E", U64.unpack(self._need(8))[0]
        if kind == b"X":
            (ln,) = U32.unpack(self._need(4))
            if ln > MAX_ERROR_BYTES:
                raise WireError("bad error frame")
            return "X", bytes(self._need(ln)).decode("utf-8", "replace")
        raise WireError(f"unknown frame type {kind!r}")
