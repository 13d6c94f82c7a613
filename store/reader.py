"""Reading a published dataset version: manifest, tokenizer and individual blocks.

This is the library API the mixer builds on::

    ds = moe_cpt.store.open_dataset("s3://bucket/store", "prose@latest")
    for ref in ds.block_refs():
        block = ds.read_block(ref)          # one ranged GET, checksum verified
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np

from moe_cpt.errors import IntegrityError
from moe_cpt.store.manifest import Manifest
from moe_cpt.store.object_store import Store
from moe_cpt.store.shard_format import BlockRecord, TokenBlock, decode_block


@dataclass(frozen=True)
class BlockRef:
    """Address of one block inside a version: (shard index, block index)."""

    shard: int
    block: int


class DatasetVersion:
    """One immutable dataset version, opened for reading."""

    def __init__(self, store: Store, name: str, version: str, manifest: Manifest):
        self.store = store
        self.name = name
        self.version = version
        self.manifest = manifest

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.store.fs

    @property
    def dtype(self) -> np.dtype:
        return self.manifest.tokenizer.np_dtype

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def shard_path(self, shard: int) -> str:
        return self.store.version_path(self.name, self.version, self.manifest.shards[shard].path)

    def block_record(self, ref: BlockRef) -> BlockRecord:
        return self.manifest.shards[ref.shard].blocks[ref.block]

    def block_refs(self) -> Iterator[BlockRef]:
        for si, shard in enumerate(self.manifest.shards):
            for bi in range(len(shard.blocks)):
                yield BlockRef(si, bi)

    def block_tokens(self) -> np.ndarray:
        """Token count of every block, in :meth:`block_refs` order."""
        return np.array([b.n_tokens for s in self.manifest.shards for b in s.blocks], dtype=np.int64)

    def describe(self, ref: BlockRef) -> str:
        shard = self.manifest.shards[ref.shard]
        return f"{self.spec} shard {shard.path} block {shard.blocks[ref.block].key}"

    def fetch_block_bytes(self, ref: BlockRef) -> bytes:
        """The raw bytes of one block (a single ranged read of the shard)."""
        start, end = self.block_record(ref).byte_range
        try:
            return self.fs.cat_file(self.shard_path(ref.shard), start=start, end=end)
        except FileNotFoundError as exc:
            raise IntegrityError(f"{self.describe(ref)}: shard file is missing") from exc

    def decode_block(self, ref: BlockRef, raw: bytes, verify: bool = True) -> TokenBlock:
        return decode_block(raw, self.block_record(ref), self.dtype, self.describe(ref), verify)

    def read_block(self, ref: BlockRef, verify: bool = True) -> TokenBlock:
        return self.decode_block(ref, self.fetch_block_bytes(ref), verify)

    def tokenizer_json(self) -> bytes:
        return self.fs.cat_file(self.store.path(self.manifest.tokenizer.store_path))


def open_dataset(store_url: str, spec: str) -> DatasetVersion:
    """Open ``name@ref`` (ref: tag such as ``latest``/``v3``, or a version id) in a store."""
    store = Store(store_url)
    name, version = store.resolve(spec)
    return DatasetVersion(store, name, version, store.load_manifest(name, version))
