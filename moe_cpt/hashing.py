"""Checksums used across the data path: xxh3-128 for bulk data, sha256 for identities."""

from __future__ import annotations

import hashlib

import xxhash


def fast_checksum(*chunks: bytes) -> str:
    """xxh3-128 hex digest of the concatenated chunks (shards and blocks)."""
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
