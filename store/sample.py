"""Documents of a version decoded back to text, with their provenance (``cpt corpus sample``).

The text comes from the version's own tokenizer (the ``tokenizer.json`` the store keeps under
``_tokenizers/<sha256>.json``, checked against the manifest's sha256), so what is shown is what
a model trained on the version reads, after cleaning and normalization, not the raw input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from moe_cpt.errors import ConfigError, IntegrityError
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.documents import DocInfo, DocumentIndex, read_document
from moe_cpt.store.reader import DatasetVersion
from moe_cpt.store.tokenizer import tokenizer_from_bytes


def version_tokenizer(ds: DatasetVersion) -> Tokenizer:
    """The tokenizer a version was built with, read from the store and checked by its sha256."""
    info = ds.manifest.tokenizer
    try:
        data = ds.tokenizer_json()
    except FileNotFoundError as exc:
        raise IntegrityError(f"{ds.spec}: its tokenizer {info.store_path} is missing from {ds.store.url}") from exc
    if sha256_hex(data) != info.sha256:
        raise IntegrityError(f"{ds.spec}: stored tokenizer {info.store_path} does not match the manifest's sha256")
    return tokenizer_from_bytes(data, f"{ds.store.url}/{info.store_path}")


def decode_document(tok: Tokenizer, tokens: np.ndarray, eos_id: int) -> str:
    """A stored document's text: its tokens without the EOS the build appended, decoded."""
    ids = tokens.tolist()
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class SampledDocument:
    """One decoded document with where it came from and where it is stored."""

    spec: str  # name@version
    info: DocInfo
    block_key: str  # the tar member prefix of its first block inside the shard
    text: str

    def to_json(self) -> dict:
        return {"dataset": self.spec, **self.info.to_json(), "block_key": self.block_key, "text": self.text}


def pick_rows(index: DocumentIndex, n: int, seed: int = 0, doc_id: str | None = None) -> list[int]:
    """Rows to show: every document with id ``doc_id``, or ``n`` drawn uniformly without
    replacement with ``seed`` (the same rows every time), in storage order."""
    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    if doc_id is not None:
        return index.find(doc_id)[:n]
    if not len(index):
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(index), size=min(n, len(index)), replace=False).tolist())


def sample_documents(ds: DatasetVersion, n: int = 3, seed: int = 0, doc_id: str | None = None,
                     index: DocumentIndex | None = None) -> list[SampledDocument]:
    """``n`` documents of ``ds`` (or those with id ``doc_id``) decoded to text; only their
    blocks are read."""
    index = index or DocumentIndex(ds)
    rows = pick_rows(index, n, seed, doc_id)
    tok = version_tokenizer(ds)
    eos = ds.manifest.tokenizer.eos_id
    shard_of = {s.path: s for s in ds.manifest.shards}
    out = []
    for row in rows:
        info = index.info(row)
        key = shard_of[info.shard].blocks[info.block].key
        out.append(SampledDocument(ds.spec, info, key, decode_document(tok, read_document(index, row), eos)))
    return out


def format_document(doc: SampledDocument, max_chars: int = 0) -> str:
    """A human-readable block: provenance header lines, then the text (cut at ``max_chars``
    characters if > 0, saying how much was left out)."""
    i = doc.info
    text = doc.text
    if max_chars > 0 and len(text) > max_chars:
        text = f"{text[:max_chars]}\n[... {len(doc.text) - max_chars:,} more characters; --max-chars 0 shows all]"
    spans = f" (spans {i.n_blocks} blocks)" if i.n_blocks > 1 else ""
    return (f"=== {doc.spec} document {i.row} id {i.doc_id!r}\n"
            f"source: {i.source or '?'}\n"
            f"stored: {i.shard} block {i.block} ({doc.block_key}) entry {i.doc_in_block}{spans}; "
            f"{i.n_tokens:,} tokens incl. EOS; content hash {i.content_hash}\n"
            f"---\n{text}\n")
