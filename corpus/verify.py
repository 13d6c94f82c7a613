"""Re-check every checksum of a published version: shard files, blocks and the manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from corpus.reader import BlockRef, DatasetVersion
from corpus.shards import split_block_bytes

CHUNK = 8 << 20


@dataclass
class VerifyReport:
    shards_checked: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_version(ds: DatasetVersion, on_bytes: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every shard once, checking the whole-file checksum and every block's checksum."""
    report = VerifyReport()
    for si, shard in enumerate(ds.manifest.shards):
        path = ds.shard_path(si)
        try:
            with ds.fs.open(path, "rb") as f:
                data = bytearray()
                while chunk := f.read(CHUNK):
                    data += chunk
                    if on_bytes:
                        on_bytes(len(chunk))
        except FileNotFoundError:
            report.problems.append(f"shard {shard.path}: missing")
            continue
        report.shards_checked += 1
        report.bytes_checked += len(data)
        if len(data) != shard.nbytes:
            report.problems.append(f"shard {shard.path}: size {len(data)} != {shard.nbytes} in manifest")
        elif xxhash.xxh3_128(bytes(data)).hexdigest() != shard.checksum:
            report.problems.append(f"shard {shard.path}: file checksum mismatch")
        for bi, block in enumerate(shard.blocks):
            start, end = block.byte_range
            tok, docs = split_block_bytes(bytes(data[start:end]), block)
            report.blocks_checked += 1
            if xxhash.xxh3_128(tok + docs).hexdigest() != block.checksum:
                report.problems.append(f"{ds.describe(BlockRef(si, bi))}: block checksum mismatch "
                                       f"(bytes {start}-{end})")
    return report
