"""Assertions shared by corpus tests."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from tokenizers import Tokenizer

from moe_cpt.store import open_dataset


def read_back(store: str, spec: str) -> dict[str, np.ndarray]:
    """doc_id -> tokens as stored, walking every block and the per-document index (a document
    cut across blocks continues as the first entry of each following block, manifest order)."""
    ds = open_dataset(store, spec)
    refs = list(ds.block_refs())
    position = {(r.shard, r.block): i for i, r in enumerate(refs)}
    shard_idx = {s.path: i for i, s in enumerate(ds.manifest.shards)}
    out: dict[str, np.ndarray] = {}
    for rel in ds.manifest.index_files:
        with ds.fs.open(ds.store.version_path(ds.name, ds.version, rel), "rb") as f:
            index = pq.read_table(f).to_pylist()
        for row in index:
            at = position[(shard_idx[row["shard"]], row["block"])]
            pieces = [ds.read_block(refs[at]).documents()[row["doc_in_block"]]]
            for k in range(1, row.get("n_blocks") or 1):
                pieces.append(ds.read_block(refs[at + k]).documents()[0])
            out[row["doc_id"]] = np.concatenate(pieces)
            assert len(out[row["doc_id"]]) == row["n_tokens"]
    assert len(out) == ds.manifest.n_docs
    return out


def assert_roundtrip(store: str, spec: str, tokenizer_json: bytes, expected: dict[str, str],
                     deduped: bool = False) -> None:
    """Every stored document equals the tokenizer's output for its (NFC-normalized) text + EOS.

    With ``deduped`` the stored documents may be a subset (what dedup removed is in the stats).
    """
    tok = Tokenizer.from_str(tokenizer_json.decode())
    ds = open_dataset(store, spec)
    eos = ds.manifest.tokenizer.eos_id
    got = read_back(store, spec)
    if deduped:
        removed = sum(s.get("dropped", 0) for s in ds.manifest.stats["stages"] if s["stage"].startswith("dedup"))
        assert set(got) <= set(expected) and len(got) == len(expected) - removed
    else:
        assert set(got) == set(expected)
    for doc_id in got:
        text = expected[doc_id]
        want = tok.encode(unicodedata.normalize("NFC", text), add_special_tokens=False).ids + [eos]
        assert got[doc_id].tolist() == want, doc_id


def write_jsonl(path: Path, records: list[dict], compression: str | None = None) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if compression == "gz":
        import gzip

        data = gzip.compress(data)
    elif compression == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_config(path: Path, **fields) -> Path:
    base = {
        "tasks": 2,
        "dedup": {"exact": False, "minhash": {"enabled": False}},
        "packing": {"block_tokens": 2048, "shard_bytes": 16384},
    }
    base.update(fields)
    path.write_text(yaml.safe_dump(base))
    return path
