"""Whole documents of a version: the per-document index with provenance, and their tokens.

The index (``index/*.parquet``, one row per document, see :mod:`moe_cpt.corpus.shard_writer`) says where
each document starts: shard, block, entry of the block's document table, and how many blocks
it spans. Sorted by (block position in manifest order, entry), the rows are in *storage order*;
a block entry that starts no row is the next piece of the document cut across blocks before it.
:func:`iter_documents` walks every block once in that order and yields each document whole;
:func:`read_document` reads one document's blocks only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from moe_cpt.errors import IntegrityError, NotFoundError
from moe_cpt.store.reader import BlockRef, DatasetVersion

_ENTRY_BITS = 32  # sort key of a document start: block position << 32 | entry


@dataclass(frozen=True)
class DocInfo:
    """One document's index row: its provenance and where it is stored."""

    row: int  # position in storage order (0 = the version's first document)
    doc_id: str
    source: str  # the input file (path or URL) it was read from
    content_hash: str
    n_tokens: int  # EOS included
    shard: str  # shard path relative to the version folder
    block: int  # block of that shard where it starts
    doc_in_block: int  # entry of that block's document table
    n_blocks: int  # blocks it spans

    def to_json(self) -> dict:
        return dict(self.__dict__)


def read_index_table(ds: DatasetVersion) -> pa.Table:
    """All index rows of a version (one table; sizes/checksums checked where the manifest has them)."""
    meta = {m["path"]: m for m in ds.manifest.index_meta or []}
    tables = []
    for rel in ds.manifest.index_files:
        try:
            data = ds.fs.cat_file(ds.store.version_path(ds.name, ds.version, rel))
        except FileNotFoundError as exc:
            raise IntegrityError(f"{ds.spec}: index file {rel} is missing") from exc
        m = meta.get(rel)
        if m and (len(data) != m["nbytes"] or xxhash.xxh3_128(data).hexdigest() != m["checksum"]):
            raise IntegrityError(f"{ds.spec}: index file {rel} does not match its checksum in the manifest")
        try:
            tables.append(pq.read_table(pa.BufferReader(data)))
        except (pa.ArrowException, OSError) as exc:
            raise IntegrityError(f"{ds.spec}: index file {rel} is not readable Parquet: {exc}") from exc
    if not tables:
        return pa.table({"doc_id": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")


class DocumentIndex:
    """The index rows of a version in storage order, with lookups by document id and by block entry."""

    def __init__(self, ds: DatasetVersion, table: pa.Table | None = None):
        self.ds = ds
        table = read_index_table(ds) if table is None else table
        shards = ds.manifest.shards
        first_block = np.cumsum([0] + [len(s.blocks) for s in shards])
        n = table.num_rows
        if n != ds.manifest.n_docs:
            raise IntegrityError(f"{ds.spec}: index has {n} rows, manifest counts {ds.manifest.n_docs} documents")
        found = pc.index_in(table.column("shard"), value_set=pa.array([s.path for s in shards], pa.string())) \
            if n else pa.array([], pa.int32())
        if found.null_count:
            bad = table.column("shard").filter(pc.is_null(found))[0].as_py()
            raise IntegrityError(f"{ds.spec}: index names shard {bad!r}, which is not in the manifest")
        shard_idx = found.to_numpy().astype(np.int64) if n else np.empty(0, np.int64)
        block = table.column("block").to_numpy().astype(np.int64) if n else np.empty(0, np.int64)
        entry = table.column("doc_in_block").to_numpy().astype(np.int64) if n else np.empty(0, np.int64)
        pos = first_block[shard_idx] + block if n else np.empty(0, np.int64)
        keys = (pos << _ENTRY_BITS) | entry
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.block_pos = pos[order]
        self.first_block = first_block
        self._cols = {name: np.asarray(table.column(name).to_pylist() if n else [], dtype=object)[order]
                      for name in ("doc_id", "source", "content_hash", "shard")}
        self._ints = {name: (table.column(name).to_numpy().astype(np.int64)[order] if n else np.empty(0, np.int64))
                      for name in ("n_tokens", "block", "doc_in_block")}
        nb = table.column("n_blocks").to_numpy() if n and "n_blocks" in table.column_names else np.ones(n)
        self._ints["n_blocks"] = np.maximum(nb.astype(np.int64), 1)[order] if n else np.empty(0, np.int64)
        self.refs = list(ds.block_refs())

    def __len__(self) -> int:
        return len(self.keys)

    def info(self, row: int) -> DocInfo:
        c, i = self._cols, self._ints
        return DocInfo(row=int(row), doc_id=str(c["doc_id"][row]), source=str(c["source"][row]),
                       content_hash=str(c["content_hash"][row]), n_tokens=int(i["n_tokens"][row]),
                       shard=str(c["shard"][row]), block=int(i["block"][row]),
                       doc_in_block=int(i["doc_in_block"][row]), n_blocks=int(i["n_blocks"][row]))

    def column(self, name: str) -> np.ndarray:
        """One index column (doc_id, source, content_hash, shard, n_tokens, block, doc_in_block,
        n_blocks) in storage order."""
        return self._cols[name] if name in self._cols else self._ints[name]

    @property
    def n_tokens(self) -> np.ndarray:
        """Tokens of every document (EOS included), in storage order."""
        return self._ints["n_tokens"]

    def find(self, doc_id: str) -> list[int]:
        """Rows whose document id is ``doc_id`` (ids come from the inputs and need not be unique)."""
        rows = np.flatnonzero(self._cols["doc_id"] == doc_id).tolist()
        if not rows:
            raise NotFoundError(f"no document with id {doc_id!r} in {self.ds.spec}")
        return rows

    def owner(self, block_pos: int, entry: int) -> int:
        """The row of the document that entry ``entry`` of block ``block_pos`` (manifest order)
        belongs to: the last document starting at or before it."""
        at = int(np.searchsorted(self.keys, (block_pos << _ENTRY_BITS) | entry, side="right")) - 1
        if at < 0:
            raise IntegrityError(f"{self.ds.spec}: block {block_pos} entry {entry} belongs to no indexed document")
        return at

    def block_position(self, ref: BlockRef) -> int:
        return int(self.first_block[ref.shard]) + ref.block


def read_document(index: DocumentIndex, row: int) -> np.ndarray:
    """The tokens of one document (EOS included), reading only the blocks it spans."""
    info = index.info(row)
    pos = int(index.block_pos[row])
    pieces = [index.ds.read_block(index.refs[pos]).documents()[info.doc_in_block]]
    pieces += [index.ds.read_block(index.refs[pos + k]).documents()[0] for k in range(1, info.n_blocks)]
    tokens = np.concatenate(pieces)
    if len(tokens) != info.n_tokens:
        raise IntegrityError(f"{index.ds.spec}: document {info.doc_id!r} has {len(tokens)} tokens in its blocks, "
                             f"the index says {info.n_tokens}")
    return tokens


def iter_documents(index: DocumentIndex, on_block: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """``(row, tokens)`` of every document in storage order, each block read once (a cut
    document's pieces are joined). ``on_block(n_tokens)`` is called after each block."""
    ds = index.ds
    nxt = 0  # next row to start
    open_row, pieces, have = -1, [], 0
    for pos, ref in enumerate(index.refs):
        block = ds.read_block(ref)
        for entry, piece in enumerate(block.documents()):
            if nxt < len(index) and index.keys[nxt] == (pos << _ENTRY_BITS) | entry:
                if open_row >= 0:
                    raise IntegrityError(f"{ds.describe(ref)}: document row {open_row} is incomplete "
                                         f"({have} of {index.n_tokens[open_row]} tokens)")
                open_row, pieces, have, nxt = nxt, [], 0, nxt + 1
            elif open_row < 0 or entry != 0:
                raise IntegrityError(f"{ds.describe(ref)}: entry {entry} starts no indexed document")
            pieces.append(piece)
            have += len(piece)
            if have >= index.n_tokens[open_row]:
                if have != index.n_tokens[open_row]:
                    raise IntegrityError(f"{ds.describe(ref)}: document row {open_row} has {have} tokens, "
                                         f"the index says {index.n_tokens[open_row]}")
                yield open_row, pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                open_row, pieces, have = -1, [], 0
        if on_block is not None:
            on_block(len(block.tokens))
    if open_row >= 0 or nxt != len(index):
        raise IntegrityError(f"{ds.spec}: {len(index) - nxt + (open_row >= 0)} indexed document(s) not found "
                             "in the blocks")
