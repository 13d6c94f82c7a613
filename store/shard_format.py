"""The shard format: webdataset-compatible tar files of zstd-compressed token blocks.

A shard is a plain (USTAR) tar file. Each *block* is one webdataset sample with two members:

``<key>.tokens.zst``
    a zstd frame holding the block's tokens, the concatenated documents of the block, each
    followed by EOS, as little-endian ``uint16`` or ``uint32`` (the manifest says which);
``<key>.docs.npy``
    a NumPy ``.npy`` array (int64) of the cumulative document ends inside the block: document
    ``i`` is ``tokens[ends[i-1]:ends[i]]`` (``ends[-1] == len(tokens)``).

So ``webdataset.WebDataset(url)`` iterates a shard as samples ``{"__key__", "tokens.zst",
"docs.npy"}``. The manifest records for every block the byte offsets of both members' data; the
two are adjacent in the tar, so one ranged GET of ``[tokens_offset, docs_offset + docs_nbytes)``
fetches a block without reading the rest of the shard. A document longer than the configured
block size is cut across consecutive blocks (see :mod:`moe_cpt.corpus.shard_writer`): each piece is one
entry of its block's table, so a reader that treats entries as documents sees it as several.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np
import xxhash
import zstandard

from moe_cpt.errors import IntegrityError

TOKENS_EXT = "tokens.zst"
DOCS_EXT = "docs.npy"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class BlockRecord:
    """Where one block lives inside its shard, and what it holds."""

    key: str
    tokens_offset: int
    tokens_nbytes: int
    docs_offset: int
    docs_nbytes: int
    n_tokens: int
    n_docs: int
    checksum: str  # xxh3-128 of the tokens member's bytes followed by the docs member's bytes

    @property
    def byte_range(self) -> tuple[int, int]:
        """``[start, end)`` of the single ranged read that covers the whole block."""
        return self.tokens_offset, self.docs_offset + self.docs_nbytes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> BlockRecord:
        return cls(**d)


@dataclass(frozen=True)
class ShardRecord:
    """One shard file of a dataset version."""

    path: str  # relative to the version folder
    nbytes: int
    checksum: str  # xxh3-128 of the whole file
    n_tokens: int
    n_docs: int
    blocks: tuple[BlockRecord, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["blocks"] = [b.to_json() for b in self.blocks]
        return d

    @classmethod
    def from_json(cls, d: dict) -> ShardRecord:
        d = dict(d)
        d["blocks"] = tuple(BlockRecord.from_json(b) for b in d["blocks"])
        return cls(**d)


@dataclass
class TokenBlock:
    """A decoded block: its tokens and the cumulative document ends."""

    tokens: np.ndarray
    doc_ends: np.ndarray

    def documents(self) -> list[np.ndarray]:
        starts = np.concatenate([[0], self.doc_ends[:-1]])
        return [self.tokens[s:e] for s, e in zip(starts, self.doc_ends, strict=True)]


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that counts bytes and hashes everything written through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._pos = 0
        self._hash = xxhash.xxh3_128()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        b = bytes(b)
        self._raw.write(b)
        self._hash.update(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # deterministic bytes: same tokens -> same shard -> same checksum
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def encode_docs(doc_ends: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(doc_ends, dtype="<i8"), allow_pickle=False)
    return buf.getvalue()


class ShardFileWriter:
    """Appends blocks to one shard file opened for writing (local or object store)."""

    def __init__(self, fileobj: BinaryIO, path: str, dtype: np.dtype, zstd_level: int = ZSTD_LEVEL):
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._out = _HashingWriter(fileobj)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self._zstd = zstandard.ZstdCompressor(level=zstd_level)
        self.blocks: list[BlockRecord] = []
        self.n_tokens = 0
        self.n_docs = 0

    @property
    def nbytes(self) -> int:
        return self._out.tell()

    def _add_member(self, name: str, payload: bytes) -> int:
        info = _tarinfo(name, len(payload))
        header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
        data_offset = self._tar.offset + len(header)
        self._tar.addfile(info, io.BytesIO(payload))
        return data_offset

    def add_block(self, tokens: np.ndarray, doc_ends: np.ndarray, continued: bool = False) -> BlockRecord:
        """Append one block. ``continued``: its first document-table entry is the rest of a
        document that started in an earlier block (the shard's ``n_docs`` counts documents, each
        once, where it starts; a block's ``n_docs`` counts its table entries)."""
        key = f"block-{len(self.blocks):06d}"
        tok_payload = self._zstd.compress(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        docs_payload = encode_docs(doc_ends)
        tok_off = self._add_member(f"{key}.{TOKENS_EXT}", tok_payload)
        docs_off = self._add_member(f"{key}.{DOCS_EXT}", docs_payload)
        record = BlockRecord(
            key=key,
            tokens_offset=tok_off,
            tokens_nbytes=len(tok_payload),
            docs_offset=docs_off,
            docs_nbytes=len(docs_payload),
            n_tokens=int(len(tokens)),
            n_docs=int(len(doc_ends)),
            checksum=xxhash.xxh3_128(tok_payload + docs_payload).hexdigest(),
        )
        self.blocks.append(record)
        self.n_tokens += record.n_tokens
        self.n_docs += record.n_docs - (1 if continued and record.n_docs else 0)
        return record

    def close(self) -> ShardRecord:
        self._tar.close()
        return ShardRecord(
            path=self.path,
            nbytes=self._out.tell(),
            checksum=self._out.hexdigest(),
            n_tokens=self.n_tokens,
            n_docs=self.n_docs,
            blocks=tuple(self.blocks),
        )


def split_block_bytes(raw: bytes, block: BlockRecord) -> tuple[bytes, bytes]:
    """Cut the bytes of one ranged read (``block.byte_range``) into the two member payloads."""
    start = block.tokens_offset
    tok = raw[: block.tokens_nbytes]
    d0 = block.docs_offset - start
    docs = raw[d0 : d0 + block.docs_nbytes]
    return tok, docs


def decode_block(raw: bytes, block: BlockRecord, dtype: np.dtype, where: str, verify: bool = True) -> TokenBlock:
    """Decode the bytes of a block's ranged read; ``where`` names it in error messages."""
    expected = block.byte_range[1] - block.byte_range[0]
    if len(raw) != expected:
        raise IntegrityError(f"{where}: expected {expected} bytes, got {len(raw)} (truncated shard?)")
    tok, docs = split_block_bytes(raw, block)
    if verify and xxhash.xxh3_128(tok + docs).hexdigest() != block.checksum:
        raise IntegrityError(f"{where}: checksum mismatch (corrupted block)")
    try:
        tokens_bytes = zstandard.ZstdDecompressor().decompress(tok)
        doc_ends = np.load(io.BytesIO(docs), allow_pickle=False)
    except (zstandard.ZstdError, ValueError) as exc:
        raise IntegrityError(f"{where}: cannot decode block: {exc}") from exc
    tokens = np.frombuffer(tokens_bytes, dtype=np.dtype(dtype).newbyteorder("<"))
    if len(tokens) != block.n_tokens or len(doc_ends) != block.n_docs:
        raise IntegrityError(f"{where}: block holds {len(tokens)} tokens/{len(doc_ends)} docs, manifest says {block.n_tokens}/{block.n_docs}")
    return TokenBlock(tokens=tokens, doc_ends=doc_ends)


def decode_block_into(raw: bytes | bytearray | memoryview, block: BlockRecord, dtype: np.dtype, where: str,
                      verify: bool = True, out: np.ndarray | None = None) -> TokenBlock:
    """:func:`decode_block` without intermediate copies: ``raw`` may be a view of a reused
    buffer (nothing returned refers to it), the checksum is computed over the two members in
    place, and the tokens are decompressed straight into ``out`` (a 1-D array of ``dtype``
    holding at least ``block.n_tokens``; the tokens returned are its first ``n_tokens``) or, if
    ``out`` is None, into a new array. Same checks and errors as :func:`decode_block`."""
    expected = block.byte_range[1] - block.byte_range[0]
    if len(raw) != expected:
        raise IntegrityError(f"{where}: expected {expected} bytes, got {len(raw)} (truncated shard?)")
    mv = memoryview(raw)
    tok = mv[: block.tokens_nbytes]
    d0 = block.docs_offset - block.tokens_offset
    docs = mv[d0 : d0 + block.docs_nbytes]
    if verify:
        h = xxhash.xxh3_128()
        h.update(tok)
        h.update(docs)
        if h.hexdigest() != block.checksum:
            raise IntegrityError(f"{where}: checksum mismatch (corrupted block)")
    dt = np.dtype(dtype).newbyteorder("<")
    if out is None:
        out = np.empty(block.n_tokens, dtype=dt)
    elif out.dtype != dt or out.ndim != 1 or len(out) < block.n_tokens or not out.flags.c_contiguous:
        raise ValueError(f"decode buffer of {out.dtype} x {out.shape} cannot hold {block.n_tokens} {dt} tokens")
    tokens = out[: block.n_tokens]
    want = tokens.nbytes
    try:
        with zstandard.ZstdDecompressor().stream_reader(tok, read_across_frames=False) as r:
            got = r.readinto(memoryview(tokens).cast("B"))
            extra = r.read(1) if got == want else b""
        doc_ends = np.load(io.BytesIO(docs), allow_pickle=False)
    except (zstandard.ZstdError, ValueError) as exc:
        raise IntegrityError(f"{where}: cannot decode block: {exc}") from exc
    n_tok = got // dt.itemsize + len(extra)
    if got != want or extra or len(doc_ends) != block.n_docs:
        raise IntegrityError(f"{where}: block holds {n_tok}{'+' if extra else ''} tokens/{len(doc_ends)} docs, "
                             f"manifest says {block.n_tokens}/{block.n_docs}")
    return TokenBlock(tokens=tokens, doc_ends=doc_ends)
