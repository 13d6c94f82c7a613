"""Input readers: datatrove readers with strict, file-and-line-precise handling of bad records.

datatrove's own readers log a warning and move on when a line is malformed; a dataset build
must instead either stop with a message naming the file and line (``on_bad_record: fail``) or
count the record as skipped (``on_bad_record: skip``, counted in the build stats).
"""

from __future__ import annotations

import codecs
import itertools
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
import zstandard
from datatrove.data import Document
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader

from moe_cpt.corpus import blocks
from moe_cpt.corpus.json_stream import ByteSource, Malformed, scan_record, string_pieces
from moe_cpt.errors import InputDataError

READ_CHUNK = 1 << 20


def compression_of(filepath: str) -> str | None:
    """``"gzip"``, ``"zstd"`` or None, from the file name (as datatrove's ``compression="infer"``)."""
    name = filepath.lower()
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _raw_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(READ_CHUNK):
        yield chunk


@dataclass(frozen=True)
class _Codec:
    name: str  # as in messages: "gzip", "zstd"
    unit: str  # a gzip "member", a zstd "frame"
    decoder: Callable[[], Any]  # a fresh decompressobj for the next member/frame
    error: type[Exception]


_GZIP = _Codec("gzip", "compressed member", lambda: zlib.decompressobj(wbits=31), zlib.error)
_ZSTD = _Codec("zstd", "frame", lambda: zstandard.ZstdDecompressor().decompressobj(),
               zstandard.ZstdError)


def _decode_all(chunks: Iterable[bytes], codec: _Codec) -> Iterator[bytes]:
    """Every member/frame of the stream, decompressed; ValueError if it is not ``codec`` or
    ends inside a member/frame (a truncated file)."""
    d = codec.decoder()
    started = False
    for chunk in chunks:
        while chunk:
            started = True
            try:
                out = d.decompress(chunk)
            except codec.error as exc:
                raise ValueError(f"not a valid {codec.name} stream ({exc})") from exc
            if out:
                yield out
            if d.eof:
                chunk = d.unused_data
                d = codec.decoder()
                started = False
            else:
                chunk = b""
    if started:
        raise ValueError(f"truncated {codec.name} stream (it ends inside a {codec.unit})")


def decompressed(f: BinaryIO, compression: str | None) -> Iterator[bytes]:
    """The decompressed bytes of ``f`` in chunks, strict about truncation and corruption."""
    chunks = _raw_chunks(f)
    if compression == "gzip":
        return _decode_all(chunks, _GZIP)
    if compression == "zstd":
        return _decode_all(chunks, _ZSTD)
    return chunks


class _StrictMixin:
    """Shared bad-record policy and progress reporting for our readers."""

    on_bad_record: str
    progress_path: str | None
    _progress_bytes: int
    _progress_last: float

    def _setup_strict(self, on_bad_record: str, progress_path: str | None, block_chars: int | None) -> None:
        self.on_bad_record = on_bad_record
        self.progress_path = progress_path
        self.block_chars = block_chars or blocks.BLOCK_CHARS
        self._progress_bytes = 0
        self._progress_last = 0.0

    def bad_record(self, filepath: str, line: int | None, reason: str) -> None:
        where = self.data_folder.resolve_paths(filepath)  # type: ignore[attr-defined]
        where = f"{where}:{line}" if line is not None else where
        if self.on_bad_record == "fail":
            raise InputDataError(f"{where}: {reason} (set on_bad_record: skip to count and skip such records)")
        self.stat_update("bad_records_skipped")  # type: ignore[attr-defined]

    def report_progress(self, nbytes: int, rank: int, force: bool = False) -> None:
        """Accumulate input bytes read; write them to ``progress_path/<rank>`` about once a second."""
        self._progress_bytes += nbytes
        now = time.monotonic()
        if self.progress_path and (force or now - self._progress_last > 0.5):
            self._progress_last = now
            try:
                with open(f"{self.progress_path}/{rank:05d}", "w") as f:
                    f.write(str(self._progress_bytes))
            except OSError:
                pass  # progress is best effort; the build does not depend on it

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self._rank = rank
        yield from super().run(data, rank, world_size)  # type: ignore[misc]
        self.report_progress(0, rank, force=True)

    def bad_file(self, filepath: str, reason: str) -> InputDataError:
        """A whole input file is unreadable (truncated, corrupt): always an error naming it,
        whatever ``on_bad_record`` says (it is a bad file, not a bad record)."""
        where = self.data_folder.resolve_paths(filepath)  # type: ignore[attr-defined]
        return InputDataError(f"{where}: {reason}; the file is damaged (re-create or remove it)")

    def make_documents(self, text: object, doc_id: object, filepath: str, line: int | None) -> Iterator[Document]:
        """The document (as blocks if it is longer than a block), or a bad record."""
        if not isinstance(text, str):
            self.bad_record(filepath, line, f"field {self.text_key!r} is {type(text).__name__}, not a string")  # type: ignore[attr-defined]
            return iter(())
        return self.document_blocks([text], doc_id, filepath)

    def document_blocks(self, segments: Iterable[str], doc_id: object, filepath: str) -> Iterator[Document]:
        meta = {"file_path": self.data_folder.resolve_paths(filepath)}  # type: ignore[attr-defined]
        return blocks.block_documents(segments, str(doc_id), meta, self.block_chars)

    def read_files_shard(self, shard: list[str]) -> Iterator[Document]:
        """As datatrove's, but the ``documents`` stat counts a blocked document once."""
        for filepath in shard:
            self.stat_update("input_files")  # type: ignore[attr-defined]
            ndocs = 0
            for doc in self.read_file(filepath):  # type: ignore[attr-defined]
                ndocs += blocks.starts_document(doc)
                yield doc
            self.stat_update("documents", value=ndocs, unit="input_file")  # type: ignore[attr-defined]


class _RecordReaderMixin(_StrictMixin):
    """Constructor shared by the record-oriented readers (JSONL, Parquet)."""

    def __init__(self, data_folder, glob_pattern: str | None, text_key: str, id_key: str,
                 on_bad_record: str, progress_path: str | None = None, block_chars: int | None = None):
        super().__init__(data_folder, glob_pattern=glob_pattern, text_key=text_key, id_key=id_key)
        self._setup_strict(on_bad_record, progress_path, block_chars)


class StrictJsonlReader(_RecordReaderMixin, JsonlReader):
    """JSONL, one record a line. A line of more than ``4 * block_chars`` bytes is not held: it is
    validated in a first scan and its text field decoded in a second read of the file, block
    by block (:mod:`moe_cpt.corpus.json_stream`)."""

    name = "🐿 Jsonl (strict)"

    def read_file(self, filepath: str) -> Iterator[Document]:
        rank = getattr(self, "_rank", 0)
        limit = 4 * self.block_chars  # a block of N characters has at most 4N UTF-8 bytes
        with self.data_folder.open(filepath, "rb") as f:
            src = ByteSource(decompressed(f, compression_of(filepath)))
            li = 0
            while True:
                li += 1
                start = src.offset
                try:
                    raw = src.take_line(limit)
                    if raw is None:
                        yield from self._long_line(src, filepath, li)
                        self.report_progress(src.offset - start, rank)
                        continue
                except (ValueError, EOFError, OSError) as exc:
                    raise self.bad_file(filepath, str(exc)) from exc
                if not raw:
                    break
                self.report_progress(len(raw), rank)
                if raw.strip():
                    yield from self._line(raw, filepath, li)

    def _line(self, raw: bytes, filepath: str, li: int) -> Iterator[Document]:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
                reason = f"malformed JSON ({exc})"
            except UnicodeDecodeError as uexc:
                reason = f"invalid UTF-8 at byte {uexc.start} of the line"
            self.bad_record(filepath, li, reason)
            return
        if not isinstance(record, dict):
            self.bad_record(filepath, li, f"expected a JSON object, got {type(record).__name__}")
            return
        if self.text_key not in record:
            self.bad_record(filepath, li, f"missing text field {self.text_key!r} (keys: {', '.join(record)[:200]})")
            return
        yield from self.make_documents(record[self.text_key], record.get(self.id_key, f"{filepath}:{li}"), filepath, li)

    def _long_line(self, src: ByteSource, filepath: str, li: int) -> Iterator[Document]:
        """A line too long to hold: scan it whole first, then stream its text from a second read."""
        line_start = src.offset
        try:
            scan = scan_record(src, self.text_key, self.id_key)
        except Malformed as exc:
            src.skip_line()
            where = f"at byte {exc.offset - line_start} of the line"
            self.bad_record(filepath, li, f"invalid UTF-8 {where}" if exc.reason == "invalid UTF-8"
                            else f"malformed JSON ({exc.reason} {where})")
            return
        if scan.kind != "dict":
            self.bad_record(filepath, li, f"expected a JSON object, got {scan.kind}")
            return
        if scan.text_kind is None:
            self.bad_record(filepath, li, f"missing text field {self.text_key!r} (keys: {', '.join(scan.keys)[:200]})")
            return
        if scan.text_offset is None:
            self.bad_record(filepath, li, f"field {self.text_key!r} is {scan.text_kind}, not a string")
            return
        doc_id = scan.doc_id if scan.has_id else f"{filepath}:{li}"
        compression = compression_of(filepath)
        with self.data_folder.open(filepath, "rb") as f:
            if compression is None:  # jump there (a compressed stream is decompressed from its start)
                f.seek(scan.text_offset)
            again = ByteSource(decompressed(f, compression), base=f.tell() if compression is None else 0)
            try:
                again.seek(scan.text_offset)
                yield from self.document_blocks(string_pieces(again), doc_id, filepath)
            except Malformed as exc:  # valid in the first read: the file changed in between
                raise self.bad_file(filepath, f"line {li} changed while it was read ({exc.reason})") from exc


class StrictParquetReader(_RecordReaderMixin, ParquetReader):
    name = "📒 Parquet (strict)"

    def read_file(self, filepath: str) -> Iterator[Document]:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException

        rank = getattr(self, "_rank", 0)
        with self.data_folder.open(filepath, "rb") as f:
            try:
                pqf = pq.ParquetFile(f)
            except (ArrowException, OSError) as exc:
                self.bad_record(filepath, None, f"not a readable Parquet file ({exc})")
                return
            names = pqf.schema_arrow.names
            if self.text_key not in names:
                self.bad_record(filepath, None, f"missing text column {self.text_key!r} (columns: {', '.join(names)})")
                return
            columns = [self.text_key] + ([self.id_key] if self.id_key in names else [])
            row = 0
            for batch in pqf.iter_batches(batch_size=self.batch_size, columns=columns):
                texts = batch.column(self.text_key).to_pylist()
                ids = batch.column(self.id_key).to_pylist() if self.id_key in names else [None] * len(texts)
                self.report_progress(batch.nbytes, rank)
                for text, doc_id in zip(texts, ids, strict=True):
                    row += 1
                    if text is None:
                        self.bad_record(filepath, row, f"null in text column {self.text_key!r}")
                        continue
                    yield from self.make_documents(text, doc_id if doc_id is not None else f"{filepath}:{row}",
                                                   filepath, row)


class TextFileReader(_StrictMixin, BaseDiskReader):
    """One document per file (source code, plain text); the id is the path relative to the input.
    A file of more than ``4 * block_chars`` bytes is not held: its UTF-8 is checked in a first
    read, then it is decoded incrementally into blocks in a second."""

    name = "📄 Text files"

    def __init__(self, data_folder, glob_pattern: str | None, on_bad_record: str, progress_path: str | None = None,
                 block_chars: int | None = None):
        super().__init__(data_folder, glob_pattern=glob_pattern)
        self._setup_strict(on_bad_record, progress_path, block_chars)

    def read_file(self, filepath: str) -> Iterator[Document]:
        limit = 4 * self.block_chars
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read(limit + 1)
            if len(raw) > limit:
                bad = self._check_utf8(f, raw)
                if bad is not None:
                    self.bad_record(filepath, *bad)
                    return
        if len(raw) > limit:
            with self.data_folder.open(filepath, "rb") as f:
                yield from self.document_blocks(_utf8_pieces(f), filepath, filepath)
            return
        self.report_progress(len(raw), getattr(self, "_rank", 0))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            self.bad_record(filepath, line, f"invalid UTF-8 at byte {exc.start}")
            return
        yield from self.make_documents(text, filepath, filepath, None)

    def _check_utf8(self, f: BinaryIO, head: bytes) -> tuple[int, str] | None:
        """(line, reason) of the first invalid UTF-8 of the file ``head`` + ``f``, or None."""
        dec = codecs.getincrementaldecoder("utf-8")()
        offset = lines = 0
        for chunk in itertools.chain([head], _raw_chunks(f)):
            pending = dec.getstate()[0]
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                return lines + data[: exc.start].count(b"\n") + 1, f"invalid UTF-8 at byte {offset - len(pending) + exc.start}"
            offset += len(chunk)
            lines += chunk.count(b"\n")
            self.report_progress(len(chunk), getattr(self, "_rank", 0))
        pending = dec.getstate()[0]
        if pending:
            return lines + 1, f"invalid UTF-8 at byte {offset - len(pending)} (the file ends inside a character)"
        return None


def _utf8_pieces(f: BinaryIO) -> Iterator[str]:
    dec = codecs.getincrementaldecoder("utf-8")()
    for chunk in _raw_chunks(f):
        yield dec.decode(chunk)
    yield dec.decode(b"", final=True)
