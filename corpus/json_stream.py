"""Streaming one huge JSONL record without holding it: scan its structure, decode its text field
piece by piece.

A line longer than the reader's limit is never joined. :func:`scan_record` walks it once,
validating it as one JSON object (strings and escapes decoded and thrown away, nesting and
numbers checked) and keeping only what is small: where the text field's string starts, the id
value, the key names. If the line is valid, a second read of the file (:func:`string_pieces` from
that offset) decodes the text's string in pieces of about ``piece`` bytes, so nothing is emitted
for a line that turns out malformed. Memory: two chunks of the byte stream plus one piece.

A piece of raw string content is decoded with ``orjson.loads(b'"' + piece + b'"')``. It is cut
before a literal space (0x20 is never inside an escape or a UTF-8 sequence), else at a place
that keeps UTF-8 sequences, escapes and ``\\uD83D\\uDE00`` surrogate pairs whole; the decoded
pieces are re-cut into blocks on the text itself (:func:`moe_cpt.corpus.blocks.text_blocks`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

PIECE_BYTES = 1 << 20
MAX_DEPTH = 1024  # as orjson
MAX_KEY_CHARS = 4096  # longer keys are checked but not kept (they match no field we read)
_BACKSLASH, _QUOTE, _NL = 0x5C, 0x22, 0x0A
_WS = b" \t\r"
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")


class Malformed(Exception):
    """The line is not valid JSON: ``reason`` and the absolute stream ``offset`` where it was seen."""

    def __init__(self, reason: str, offset: int):
        super().__init__(reason)
        self.reason, self.offset = reason, offset


class ByteSource:
    """Pull-style reader over a chunked byte stream, with the absolute offset of every byte."""

    def __init__(self, chunks: Iterator[bytes], base: int = 0):
        self.chunks = chunks
        self.buf = b""
        self.pos = 0  # next byte to read, in buf
        self.base = base  # absolute offset of buf[0] (of the first chunk)

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def fill(self) -> bool:
        """Append the next chunk (dropping what was read); False at the end of the stream."""
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        self.buf = self.buf[self.pos :] + chunk
        self.base += self.pos
        self.pos = 0
        return True

    def peek(self) -> int | None:
        while self.pos >= len(self.buf):
            if not self.fill():
                return None
        return self.buf[self.pos]

    def skip_ws(self) -> int | None:
        """Skip spaces/tabs/CRs (not a newline: it ends the line); the next byte or None."""
        while True:
            c = self.peek()
            if c is None or c not in _WS:
                return c
            self.pos += 1

    def take_line(self, limit: int) -> bytes | None:
        """The next line (newline included) if it has at most ``limit`` bytes; ``b""`` at the end
        of the stream; None for a longer line (nothing consumed: the source is at its start)."""
        searched = self.pos
        while True:
            nl = self.buf.find(b"\n", searched)
            if nl != -1 and nl - self.pos < limit:
                line = self.buf[self.pos : nl + 1]
                self.pos = nl + 1
                return line
            if nl != -1 or len(self.buf) - self.pos >= limit:
                return None
            done = len(self.buf) - self.pos
            if not self.fill():
                line = self.buf[self.pos :]
                self.pos = len(self.buf)
                return line
            searched = self.pos + done

    def skip_line(self) -> None:
        """Consume up to and including the next newline (or to the end of the stream)."""
        while (nl := self.buf.find(b"\n", self.pos)) == -1:
            self.pos = len(self.buf)
            if not self.fill():
                return
        self.pos = nl + 1

    def seek(self, offset: int) -> None:
        """Move forward to absolute ``offset`` (reading and dropping what lies before it)."""
        while self.base + len(self.buf) <= offset:
            self.pos = len(self.buf)
            if not self.fill():
                raise Malformed("the file ended before a record seen in the first pass", offset)
        self.pos = offset - self.base


def _escape_at(buf: bytes, start: int, q: int) -> bool:
    """Whether the backslash run ending at ``q - 1`` (not before ``start``) has odd length."""
    r = q
    while r > start and buf[r - 1] == _BACKSLASH:
        r -= 1
    return (q - r) % 2 == 1


def _is_surrogate(hex4: bytes, high: bool) -> bool:
    return hex4[:2].upper() in ((b"D8", b"D9", b"DA", b"DB") if high else (b"DC", b"DD", b"DE", b"DF"))


def safe_cut(buf: bytes, start: int, hard: int) -> int:
    """A place in ``buf[start:hard]`` (raw string content starting at a character boundary) to
    cut before: the last literal space, else the last place that splits no UTF-8 sequence,
    escape or surrogate pair."""
    sp = buf.rfind(b" ", start + 1, hard + 1)
    if sp != -1:
        return sp
    p = hard
    while p > start and 0x80 <= buf[p] < 0xC0:  # back to the first byte of a UTF-8 sequence
        p -= 1
    q = buf.rfind(b"\\", max(start, p - 6), p)
    if q != -1 and _escape_at(buf, start, q + 1) and p < q + (6 if buf[q + 1 : q + 2] == b"u" else 2):
        p = q  # p was inside the escape starting at q
    if (p - 6 >= start and buf[p - 6 : p - 4] == b"\\u" and _escape_at(buf, start, p - 5)
            and _is_surrogate(buf[p - 4 : p], high=True)):
        p -= 6  # never end a piece between the halves of a surrogate pair
    return p if p > start else hard


def _decode(src: ByteSource, a: int, b: int) -> str:
    raw = src.buf[a:b]
    try:
        return orjson.loads(b'"' + raw + b'"')
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise Malformed("invalid UTF-8", src.base + a + uexc.start) from None
        raise Malformed(f"bad string content ({exc})", src.base + a) from None


def string_pieces(src: ByteSource, piece: int = PIECE_BYTES) -> Iterator[str]:
    """Decoded pieces of the JSON string whose content starts at the source's position (just
    after the opening quote); consumes the closing quote."""
    if piece < 16:
        raise ValueError("piece must be at least 16 bytes")
    searched = src.pos  # no closing quote and no newline in buf[src.pos:searched]
    while True:
        buf, pos = src.buf, src.pos
        nl = buf.find(b"\n", searched)
        region = nl if nl != -1 else len(buf)
        q = buf.find(b'"', searched, region)
        while q != -1 and _escape_at(buf, pos, q):
            q = buf.find(b'"', q + 1, region)
        if q != -1 and q - pos <= piece:
            text = _decode(src, pos, q)
            src.pos = q + 1
            yield text
            return
        if (q if q != -1 else region) - pos > piece:
            cut = safe_cut(buf, pos, pos + piece)
            text = _decode(src, pos, cut)
            src.pos = searched = cut
            yield text
            continue
        if nl != -1:
            raise Malformed("unterminated string", src.base + nl)
        done = len(buf) - pos
        if not src.fill():
            raise Malformed("unterminated string (the line is truncated)", src.base + len(src.buf))
        searched = src.pos + done


def _expect(src: ByteSource, byte: bytes, what: str) -> None:
    c = src.skip_ws()
    if c != byte[0]:
        got = "end of line" if c in (None, _NL) else repr(chr(c))
        raise Malformed(f"expected {what}, got {got}", src.offset)
    src.pos += 1


def _scalar(src: ByteSource) -> tuple[str, bytes]:
    """Consume a number, ``true``, ``false`` or ``null``: its Python type name and bytes."""
    while True:
        m = _SCALAR.match(src.buf, src.pos)
        if len(src.buf) - src.pos >= 64 and (m is None or m.end() < len(src.buf)):
            break  # enough lookahead to see the whole scalar
        if not src.fill():
            m = _SCALAR.match(src.buf, src.pos)
            break
    if m is None:
        raise Malformed("expected a JSON value", src.offset)
    src.pos = m.end()
    s = m.group()
    kind = "bool" if s in (b"true", b"false") else "NoneType" if s == b"null" else \
        "float" if any(c in s for c in b".eE") else "int"
    return kind, s


def skip_value(src: ByteSource, depth: int = 0) -> str:
    """Consume and validate one JSON value; its Python type name."""
    if depth > MAX_DEPTH:
        raise Malformed("nested too deeply", src.offset)
    c = src.skip_ws()
    if c == _QUOTE:
        src.pos += 1
        for _ in string_pieces(src):
            pass
        return "str"
    if c == ord("{"):
        src.pos += 1
        for _key in members(src):
            skip_value(src, depth + 1)
        return "dict"
    if c == ord("["):
        src.pos += 1
        if src.skip_ws() == ord("]"):
            src.pos += 1
            return "list"
        while True:
            skip_value(src, depth + 1)
            c = src.skip_ws()
            src.pos += 1
            if c == ord("]"):
                return "list"
            if c != ord(","):
                raise Malformed("expected ',' or ']' in an array", src.offset - 1)
    return _scalar(src)[0]


def members(src: ByteSource) -> Iterator[str | None]:
    """The keys of the object whose ``{`` was just consumed; the caller consumes each value
    before asking for the next key. A key longer than ``MAX_KEY_CHARS`` is given as None."""
    if src.skip_ws() == ord("}"):
        src.pos += 1
        return
    while True:
        _expect(src, b'"', "a string key")
        parts, n = [], 0
        for part in string_pieces(src):
            n += len(part)
            if n <= MAX_KEY_CHARS:
                parts.append(part)
        _expect(src, b":", "':' after a key")
        yield "".join(parts) if n <= MAX_KEY_CHARS else None
        c = src.skip_ws()
        src.pos += 1
        if c == ord("}"):
            return
        if c != ord(","):
            raise Malformed("expected ',' or '}' in an object", src.offset - 1)


_MISSING = object()


def _small_value(src: ByteSource, key: str, max_chars: int) -> object:
    """A string or scalar value (an id), decoded; an object or array is refused."""
    c = src.skip_ws()
    if c == _QUOTE:
        src.pos += 1
        parts = string_pieces(src, max(16, max_chars))
        value = next(parts)
        if next(parts, None) is not None:
            raise Malformed(f"the {key!r} field is longer than {max_chars} bytes", src.offset)
        return value
    if c in (ord("{"), ord("[")):
        raise Malformed(f"the {key!r} field is an object or array (not supported in a streamed line)", src.offset)
    return orjson.loads(_scalar(src)[1])


@dataclass
class RecordScan:
    """What :func:`scan_record` keeps of one valid line."""

    kind: str  # Python type name of the top-level value ("dict" for an object)
    keys: list[str] = field(default_factory=list)  # the first keys, for messages
    text_offset: int | None = None  # absolute offset of the text string's content
    text_kind: str | None = None  # type of the text value, None if the key is missing
    doc_id: object = _MISSING

    @property
    def has_id(self) -> bool:
        return self.doc_id is not _MISSING


def scan_record(src: ByteSource, text_key: str, id_key: str, max_id_chars: int = 1 << 16) -> RecordScan:
    """Validate one line (the source at its start) holding one JSON value, keeping the text
    field's offset and the id; consumes the line and its newline. Raises :class:`Malformed`."""
    c = src.skip_ws()
    if c != ord("{"):
        out = RecordScan(skip_value(src))
    else:
        src.pos += 1
        out = RecordScan("dict")
        for key in members(src):
            if key is not None and len(out.keys) < 50:
                out.keys.append(key)
            c = src.skip_ws()
            if key == text_key:  # (a repeated key: the last one counts, as for orjson)
                out.text_offset = src.offset + 1 if c == _QUOTE else None
                out.text_kind = skip_value(src, 1)
            elif key == id_key:
                out.doc_id = _small_value(src, id_key, max_id_chars)
            else:
                skip_value(src, 1)
    c = src.skip_ws()
    if c not in (None, _NL):
        raise Malformed("unexpected data after the JSON value", src.offset)
    if c == _NL:
        src.pos += 1
    return out
