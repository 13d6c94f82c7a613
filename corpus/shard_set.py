"""Packing tokenized documents into blocks and shards, with a per-document index.

:class:`ShardSetWriter` is the single place that decides block and shard boundaries; both the
datatrove tokenize step and :func:`corpus.publish.publish_documents` use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.shards import ShardFileWriter, ShardRecord
from cpt.fs import join

INDEX_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("content_hash", pa.string()),
        ("n_tokens", pa.int64()),
        ("shard", pa.string()),
        ("block", pa.int32()),
        ("doc_in_block", pa.int32()),
    ]
)


@dataclass(frozen=True)
class PackingConfig:
    block_tokens: int = 1 << 20  # a block closes once it holds at least this many tokens
    shard_bytes: int = 128 << 20  # a shard closes once it reaches this size


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
        self._block_docs: list[np.ndarray] = []
        self._block_meta: list[tuple[str, str, str]] = []
        self._block_len = 0
        fs.makedirs(join(folder, "shards"), exist_ok=True)
        fs.makedirs(join(folder, "index"), exist_ok=True)

    def add(self, tokens: np.ndarray, doc_id: str, source: str, content_hash: str) -> None:
        """Add one document's tokens (EOS already appended)."""
        self._block_docs.append(tokens)
        self._block_meta.append((doc_id, source, content_hash))
        self._block_len += len(tokens)
        if self._block_len >= self.packing.block_tokens:
            self._flush_block()

    def _open_shard(self) -> ShardFileWriter:
        rel = f"shards/{self.prefix}-{len(self.shards):05d}.tar"
        self._shard_file = self.fs.open(join(self.folder, rel), "wb")
        return ShardFileWriter(self._shard_file, rel, self.dtype)

    def _flush_block(self) -> None:
        if not self._block_docs:
            return
        if self._shard is None:
            self._shard = self._open_shard()
        lengths = np.fromiter((len(d) for d in self._block_docs), dtype=np.int64, count=len(self._block_docs))
        tokens = np.concatenate(self._block_docs)
        self._shard.add_block(tokens, np.cumsum(lengths))
        block_idx = len(self._shard.blocks) - 1
        for i, ((doc_id, source, chash), n) in enumerate(zip(self._block_meta, lengths, strict=True)):
            row = self._index
            row["doc_id"].append(doc_id)
            row["source"].append(source)
            row["content_hash"].append(chash)
            row["n_tokens"].append(int(n))
            row["shard"].append(self._shard.path)
            row["block"].append(block_idx)
            row["doc_in_block"].append(i)
        self._block_docs, self._block_meta, self._block_len = [], [], 0
        if self._shard.nbytes >= self.packing.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard_file.close()
            self._shard, self._shard_file = None, None

    def close(self) -> tuple[list[ShardRecord], str]:
        """Flush everything; returns the shard records and the index file's relative path."""
        self._flush_block()
        self._close_shard()
        index_rel = f"index/{self.prefix}.parquet"
        table = pa.table(self._index, schema=INDEX_SCHEMA)
        with self.fs.open(join(self.folder, index_rel), "wb") as f:
            pq.write_table(table, f)
        return self.shards, index_rel
