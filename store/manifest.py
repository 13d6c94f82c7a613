"""The manifest of a dataset version, and how its version id is derived from it.

``content`` holds everything that defines the data (shards with checksums, tokenizer identity,
config, input files, per-stage counts); the version id is the sha256 of its canonical JSON, so the
same inputs + config + tokenizer always give the same id. ``build`` holds what describes one
particular build (code version, creation time, build key) and is not hashed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_cpt.fs import dumps_canonical
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.shard_format import ShardRecord

FORMAT = "moe-cpt/shards-v1"
VERSION_ID_LEN = 16


@dataclass(frozen=True)
class TokenizerInfo:
    name: str  # where it came from (path/URL as configured)
    sha256: str  # of the tokenizer.json bytes
    vocab_size: int
    eos_token: str
    eos_id: int
    dtype: str  # "uint16" | "uint32"
    store_path: str  # relative to the store root: _tokenizers/<sha256>.json

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass
class Manifest:
    dataset: str
    tokenizer: TokenizerInfo
    config: dict[str, Any]
    inputs: list[dict[str, Any]]
    shards: list[ShardRecord]
    stats: dict[str, Any]
    index_files: list[str]
    build: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    # size + xxh3-128 of each index file ({"path", "nbytes", "checksum"}); None in manifests
    # written before they were recorded (their version ids stay as they were)
    index_meta: list[dict[str, Any]] | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def n_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.shards)

    def content(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset": self.dataset,
            "tokenizer": dict(self.tokenizer.__dict__),
            "config": self.config,
            "inputs": self.inputs,
            "shards": [s.to_json() for s in self.shards],
            "stats": self.stats,
            "index_files": self.index_files,
            "totals": {"docs": self.n_docs, "tokens": self.n_tokens, "bytes": self.nbytes},
            **({"index_meta": self.index_meta} if self.index_meta is not None else {}),
        }

    def version_id(self) -> str:
        return sha256_hex(dumps_canonical(self.content()))[:VERSION_ID_LEN]

    def to_json_bytes(self) -> bytes:
        return dumps_canonical({"version": self.version_id(), **self.content(), "build": self.build})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        m = cls(
            dataset=d["dataset"],
            tokenizer=TokenizerInfo(**d["tokenizer"]),
            config=d["config"],
            inputs=d["inputs"],
            shards=[ShardRecord.from_json(s) for s in d["shards"]],
            stats=d["stats"],
            index_files=d["index_files"],
            build=d.get("build", {}),
            format=d.get("format", FORMAT),
            index_meta=d.get("index_meta"),
        )
        if m.format != FORMAT:
            raise ValueError(f"unsupported manifest format {m.format!r} (this code reads {FORMAT!r})")
        return m
