"""Checks of a published version, at two depths.

* :func:`verify_version` (``cpt corpus verify``): re-read every file the version consists of: the
  manifest (its content hashes to the version id, checked when it is opened), every shard file
  and block, every index file, and the stored tokenizer (its sha256).
* :func:`check_present` (cheap, one listing): the manifest opens and every shard is there with its
  recorded size. The run catalog uses it to tell whether a run's inputs are still readable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from moe_cpt.errors import NotFoundError
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.reader import BlockRef, DatasetVersion, open_dataset
from moe_cpt.store.shard_format import split_block_bytes

CHUNK = 8 << 20


@dataclass
class VerifyReport:
    shards_checked: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    files_checked: int = 0  # index files and the tokenizer
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_version(ds: DatasetVersion, on_bytes: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every shard once, checking the whole-file checksum and every block's checksum; then
    the index files and the tokenizer."""
    report = VerifyReport()
    _verify_shards(ds, report, on_bytes)
    _verify_index(ds, report)
    _verify_tokenizer(ds, report)
    return report


def check_present(store_url: str, spec: str) -> DatasetVersion:
    """Open ``spec`` (manifest present and unmodified) and check that every shard file exists
    with its recorded size, with one listing of the version folder; raises a
    :class:`~moe_cpt.errors.CptError` (``NotFoundError`` for missing or resized shards) or
    ``OSError`` (store unreachable). Contents are not re-read: that is :func:`verify_version`."""
    ds = open_dataset(store_url, spec)
    present = {p.rstrip("/"): int(info.get("size") or 0)
               for p, info in ds.fs.find(ds.store.version_path(ds.name, ds.version), detail=True).items()}
    bad = [s.path for i, s in enumerate(ds.manifest.shards)
           if present.get(ds.shard_path(i).rstrip("/")) != s.nbytes]
    if bad:
        raise NotFoundError(f"{len(bad)} shard(s) missing or resized, e.g. {bad[0]}")
    return ds


def _read_all(ds: DatasetVersion, path: str) -> bytes | None:
    try:
        return ds.fs.cat_file(path)
    except FileNotFoundError:
        return None


def _verify_index(ds: DatasetVersion, report: VerifyReport) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {m["path"]: m for m in ds.manifest.index_meta or []}
    rows, before = 0, len(report.problems)
    for rel in ds.manifest.index_files:
        data = _read_all(ds, ds.store.version_path(ds.name, ds.version, rel))
        report.files_checked += 1
        if data is None:
            report.problems.append(f"index {rel}: missing")
            continue
        m = meta.get(rel)
        if m and len(data) != m["nbytes"]:
            report.problems.append(f"index {rel}: size {len(data)} != {m['nbytes']} in manifest")
            continue
        if m and xxhash.xxh3_128(data).hexdigest() != m["checksum"]:
            report.problems.append(f"index {rel}: file checksum mismatch")
            continue
        try:
            rows += pq.read_metadata(pa.BufferReader(data)).num_rows
        except (pa.ArrowException, OSError) as exc:
            report.problems.append(f"index {rel}: not a readable Parquet file ({exc})")
    if len(report.problems) == before and rows != ds.manifest.n_docs:
        report.problems.append(f"index: {rows} rows, manifest counts {ds.manifest.n_docs} documents")


def _verify_tokenizer(ds: DatasetVersion, report: VerifyReport) -> None:
    tok = ds.manifest.tokenizer
    data = _read_all(ds, ds.store.path(tok.store_path))
    report.files_checked += 1
    if data is None:
        report.problems.append(f"tokenizer {tok.store_path}: missing")
    elif sha256_hex(data) != tok.sha256:
        report.problems.append(f"tokenizer {tok.store_path}: sha256 mismatch ({sha256_hex(data)[:16]}..., "
                               f"manifest {tok.sha256[:16]}...)")


def _verify_shards(ds: DatasetVersion, report: VerifyReport, on_bytes: Callable[[int], None] | None) -> None:
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
