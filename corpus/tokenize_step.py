"""The datatrove step that tokenizes documents and writes them as shards (last build stage)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from moe_cpt.corpus.blocks import ends_document, piece_bounds, starts_document
from moe_cpt.corpus.shard_writer import PackingConfig, ShardSetWriter
from moe_cpt.fs import join, open_fs
from moe_cpt.store.manifest import TokenizerInfo

ENCODE_BATCH = 256
LONG_DOC_CHARS = 1 << 18  # longer texts (and blocks) are tokenized in pieces of about this many characters


def content_hash(text: str) -> str:
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))


def _batches(data: DocumentsPipeline, size: int = ENCODE_BATCH, chars: int = LONG_DOC_CHARS) -> Iterator[list[Document]]:
    """Lists of up to ``size`` documents, closed once they hold ``chars`` characters (so a run
    of blocks is encoded about one block at a time)."""
    batch: list[Document] = []
    n = 0
    for doc in data:
        batch.append(doc)
        n += len(doc.text)
        if len(batch) == size or n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


class _ContentHasher:
    """:func:`content_hash` of a document streamed as blocks: streaming xxh3_64 over their bytes."""

    def __init__(self) -> None:
        self.h = xxhash.xxh3_64()

    def update(self, text: str) -> None:
        self.h.update(text.encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class TokenizeToShards(PipelineStep):
    """Tokenize with HF ``tokenizers``, append EOS, pack into blocks and shards.

    Each task writes ``shards/part-<rank>-NNNNN.tar``, ``index/part-<rank>.parquet`` and a small
    ``results/<rank>.json`` (its shard records) under ``staging``.
    """

    name = "🔢 Tokenize + shard"
    type = "✂️ - TOKENIZER"

    def __init__(self, staging: str, tokenizer_json: bytes, tokenizer: TokenizerInfo,
                 packing: PackingConfig, threads: int = 1):
        super().__init__()
        self.staging = staging
        self.tokenizer_json = tokenizer_json
        self.info = tokenizer
        self.packing = packing
        self.threads = threads

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokenizer_json.decode("utf-8"))
        fs, root = open_fs(self.staging)
        dtype = self.info.np_dtype
        writer = ShardSetWriter(fs, root, f"part-{rank:05d}", dtype, self.packing)
        eos = self.info.eos_id
        hasher: _ContentHasher | None = None  # of the blocked document being written
        for batch in _batches(data):
            with self.track_time("batch"):
                short = [d for d in batch if len(d.text) <= LONG_DOC_CHARS]
                encodings = iter(tok.encode_batch_fast([d.text for d in short], add_special_tokens=False))
                n_tokens = n_docs = 0
                for doc in batch:
                    if starts_document(doc):  # a blocked document's hash is known at its last block
                        hasher = None if ends_document(doc) else _ContentHasher()
                        writer.begin_document(doc.id, doc.metadata.get("file_path", ""),
                                              content_hash(doc.text) if hasher is None else "")
                    if hasher is not None:
                        hasher.update(doc.text)
                    if len(doc.text) <= LONG_DOC_CHARS:
                        n_tokens += self._add(writer, next(encodings).ids, dtype)
                    else:  # one piece at a time: memory bounded by the piece, not the document
                        bounds = piece_bounds(doc.text, LONG_DOC_CHARS)
                        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                            ids = tok.encode_batch_fast([doc.text[a:b]], add_special_tokens=False)[0].ids
                            n_tokens += self._add(writer, ids, dtype)
                    if ends_document(doc):
                        writer.add_tokens(np.array([eos], dtype=dtype))
                        writer.end_document(None if hasher is None else hasher.hexdigest())
                        n_tokens += 1
                        n_docs += 1
                self.stat_update("documents", value=n_docs, unit="batch")
                self.stat_update("tokens", value=n_tokens, unit="batch")
        shards, index_rel = writer.close()
        result = {"rank": rank, "shards": [s.to_json() for s in shards], "index": index_rel,
                  "index_file": writer.index_file.to_json() if writer.index_file else None}
        fs.makedirs(join(root, "results"), exist_ok=True)
        with fs.open(join(root, "results", f"{rank:05d}.json"), "w") as f:
            json.dump(result, f)
        return
        yield  # a generator step that consumes its input

    @staticmethod
    def _add(writer: ShardSetWriter, ids: list[int], dtype: np.dtype) -> int:
        writer.add_tokens(np.array(ids, dtype=dtype))
        return len(ids)

