"""Packing tokenized documents into blocks and shards, with a per-document index.

:class:`ShardSetWriter` is the single place that decides block and shard boundaries; both the
datatrove tokenize step and :func:`moe_cpt.corpus.publish.publish_documents` use it.

Block rule: a block closes once it holds at least ``block_tokens`` tokens. A document of at most
``block_tokens`` tokens is never cut. A longer one is cut at block boundaries: it fills the open
block to exactly ``block_tokens`` and continues in the next blocks (so no block holds more than
``2 * block_tokens - 1`` tokens, and memory stays bounded however long a document is). Each
piece is one entry of its block's document table; the index row of a cut document points at its
first piece and counts its blocks (``n_blocks``); the other pieces are the first entries of the
following blocks, in manifest order.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_cpt.fs import join
from moe_cpt.hashing import fast_checksum
from moe_cpt.store.shard_format import ShardFileWriter, ShardRecord

INDEX_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("content_hash", pa.string()),
        ("n_tokens", pa.int64()),
        ("shard", pa.string()),
        ("block", pa.int32()),
        ("doc_in_block", pa.int32()),
        ("n_blocks", pa.int32()),  # blocks the document spans (1 unless it is longer than a block)
    ]
)


@dataclass(frozen=True)
class PackingConfig:
    block_tokens: int = 1 << 20  # a block closes once it holds at least this many tokens (see module doc)
    shard_bytes: int = 128 << 20  # a shard closes once it reaches this size


@dataclass
class _OpenDoc:
    """The document being added: its index row and the tokens not yet placed in a block."""

    row: int  # its row in the index
    pending: list[np.ndarray]
    pending_len: int = 0
    total: int = 0
    cut: bool = False  # longer than a block: placed piecewise as its tokens arrive
    placed: bool = False  # its first piece is in a block (shard/block of its row known)


@dataclass(frozen=True)
class IndexFile:
    """The per-document index file one writer wrote, with its size and checksum."""

    path: str  # relative to the version folder
    nbytes: int
    checksum: str  # xxh3-128 of the file

    def to_json(self) -> dict:
        return {"path": self.path, "nbytes": self.nbytes, "checksum": self.checksum}


class ShardSetWriter:
    """Writes ``<folder>/shards/<prefix>-NNNNN.tar`` and ``<folder>/index/<prefix>.parquet``."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        folder: str,
        prefix: str,
        dtype: np.dtype,
        packing: PackingConfig,
    ):
        self.fs = fs
        self.folder = folder
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.packing = packing
        self.shards: list[ShardRecord] = []
        self._index: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
        self._shard: ShardFileWriter | None = None
        self._shard_file = None
        self._parts: list[np.ndarray] = []  # token arrays of the open block
        self._ends: list[int] = []  # closed document-table entries of the open block
        self._starts: list[tuple[int, int]] = []  # (index row, entry) of documents starting in it
        self._block_len = 0
        self._entry_open = False  # the open document has a piece in the open block
        self._continued = False  # the open block's first entry continues a document of an earlier block
        self._doc: _OpenDoc | None = None
        self.index_file: IndexFile | None = None
        fs.makedirs(join(folder, "shards"), exist_ok=True)
        fs.makedirs(join(folder, "index"), exist_ok=True)

    # ---- documents -------------------------------------------------------------------------
    def add(self, tokens: np.ndarray, doc_id: str, source: str, content_hash: str) -> None:
        """Add one document's tokens (EOS already appended)."""
        self.begin_document(doc_id, source, content_hash)
        self.add_tokens(tokens)
        self.end_document()

    def begin_document(self, doc_id: str, source: str, content_hash: str) -> None:
        """Start a document whose tokens follow in one or more :meth:`add_tokens` calls."""
        if self._doc is not None:
            raise RuntimeError("begin_document while a document is open")
        row = len(self._index["doc_id"])
        for key, value in (("doc_id", doc_id), ("source", source), ("content_hash", content_hash),
                           ("n_tokens", 0), ("shard", ""), ("block", -1), ("doc_in_block", -1), ("n_blocks", 0)):
            self._index[key].append(value)
        self._doc = _OpenDoc(row=row, pending=[])

    def add_tokens(self, tokens: np.ndarray) -> None:
        """Append tokens to the open document (memory: at most about one block is held)."""
        doc = self._doc
        if doc is None:
            raise RuntimeError("add_tokens without begin_document")
        tokens = np.asarray(tokens, dtype=self.dtype)
        doc.total += len(tokens)
        if not doc.cut:
            doc.pending.append(tokens)
            doc.pending_len += len(tokens)
            if doc.pending_len <= self.packing.block_tokens:
                return
            doc.cut = True  # longer than a block: place what we have, piecewise from now on
            tokens = np.concatenate(doc.pending)
            doc.pending, doc.pending_len = [], 0
        self._place(tokens, cut=True)

    def end_document(self, content_hash: str | None = None) -> None:
        """Close the open document; ``content_hash``, if given, replaces the one given to
        :meth:`begin_document` (for a document hashed while its blocks stream by)."""
        doc = self._doc
        if doc is None:
            raise RuntimeError("end_document without begin_document")
        if content_hash is not None:
            self._index["content_hash"][doc.row] = content_hash
        if not doc.cut:
            self._place(np.concatenate(doc.pending) if doc.pending else np.empty(0, self.dtype), cut=False)
        self._index["n_tokens"][doc.row] = doc.total
        self._close_entry()
        self._doc = None
        if self._block_len >= self.packing.block_tokens:
            self._flush_block()

    # ---- blocks ----------------------------------------------------------------------------
    def _place(self, tokens: np.ndarray, cut: bool) -> None:
        """Put tokens of the open document into blocks; a cut document fills each block to
        exactly ``block_tokens`` (an uncut one goes in whole)."""
        while True:
            take = len(tokens) if not cut else min(len(tokens), self.packing.block_tokens - self._block_len)
            self._append(tokens[:take])
            tokens = tokens[take:]
            if not cut or self._block_len < self.packing.block_tokens:
                return
            self._close_entry()
            self._flush_block()
            if not len(tokens):
                return

    def _append(self, tokens: np.ndarray) -> None:
        doc = self._doc
        assert doc is not None
        if not self._entry_open:  # the document's first piece in this block
            if doc.placed:
                self._continued = True  # this block starts with the rest of a cut document
            else:
                self._starts.append((doc.row, len(self._ends)))
                doc.placed = True
            self._index["n_blocks"][doc.row] += 1
            self._entry_open = True
        if len(tokens):
            self._parts.append(tokens)
            self._block_len += len(tokens)

    def _close_entry(self) -> None:
        if self._entry_open:
            self._ends.append(self._block_len)
            self._entry_open = False

    def _open_shard(self) -> ShardFileWriter:
        rel = f"shards/{self.prefix}-{len(self.shards):05d}.tar"
        self._shard_file = self.fs.open(join(self.folder, rel), "wb")
        return ShardFileWriter(self._shard_file, rel, self.dtype)

    def _flush_block(self) -> None:
        if not self._ends:
            return
        if self._shard is None:
            self._shard = self._open_shard()
        tokens = np.concatenate(self._parts) if self._parts else np.empty(0, self.dtype)
        self._shard.add_block(tokens, np.asarray(self._ends, dtype=np.int64), continued=self._continued)
        self._continued = False
        block_idx = len(self._shard.blocks) - 1
        for row, entry in self._starts:
            self._index["shard"][row] = self._shard.path
            self._index["block"][row] = block_idx
            self._index["doc_in_block"][row] = entry
        self._parts, self._ends, self._starts, self._block_len = [], [], [], 0
        if self._shard.nbytes >= self.packing.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard_file.close()
            self._shard, self._shard_file = None, None

    def close(self) -> tuple[list[ShardRecord], str]:
        """Flush everything; returns the shard records and the index file's relative path
        (its size and checksum are in :attr:`index_file`)."""
        if self._doc is not None:
            raise RuntimeError("close while a document is open")
        self._flush_block()
        self._close_shard()
        index_rel = f"index/{self.prefix}.parquet"
        table = pa.table(self._index, schema=INDEX_SCHEMA)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        with self.fs.open(join(self.folder, index_rel), "wb") as f:
            f.write(data)
        self.index_file = IndexFile(index_rel, len(data), fast_checksum(data))
        return self.shards, index_rel
