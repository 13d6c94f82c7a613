"""The datatrove step that tokenizes documents and writes them as shards (last build stage)."""

from __future__ import annotations

import json
import os

import numpy as np
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from moe_cpt.corpus.shard_writer import PackingConfig, ShardSetWriter
from moe_cpt.corpus.tokenizer import batched
from moe_cpt.fs import join, open_fs
from moe_cpt.store.manifest import TokenizerInfo

ENCODE_BATCH = 256
LONG_DOC_CHARS = 1 << 20  # longer texts are tokenized in pieces of about this many characters
CUT_WINDOW = 4096  # how far back from the limit a piece boundary is looked for


def piece_bounds(text: str, limit: int = LONG_DOC_CHARS, window: int = CUT_WINDOW) -> list[int]:
    """Where to cut a long text for tokenizing it piece by piece: offsets of pieces of at most
    ``limit`` characters, each cut just before a whitespace character that follows a non-space
    and precedes a non-space ("word| word"). Byte-level BPE pre-tokenizers (GPT-2, Llama 3 and
    the ones :func:`moe_cpt.corpus.tokenizer.train_bpe` makes) split there anyway, so the pieces' tokens
    are the whole text's. Only a stretch of ``window`` characters without such a place is cut
    at the limit itself (tokens may then differ at that cut)."""
    bounds = [0]
    n = len(text)
    while n - bounds[-1] > limit:
        hard = bounds[-1] + limit
        cut = hard
        for i in range(hard, max(bounds[-1] + 1, hard - window), -1):
            if text[i].isspace() and not text[i - 1].isspace() and i + 1 < n and not text[i + 1].isspace():
                cut = i
                break
        bounds.append(cut)
    bounds.append(n)
    return bounds


def content_hash(text: str) -> str:
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))


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
        for batch in batched(data, ENCODE_BATCH):
            with self.track_time("batch"):
                short = [d for d in batch if len(d.text) <= LONG_DOC_CHARS]
                encodings = iter(tok.encode_batch_fast([d.text for d in short], add_special_tokens=False))
                n_tokens = 0
                for doc in batch:
                    writer.begin_document(doc.id, doc.metadata.get("file_path", ""), content_hash(doc.text))
                    if len(doc.text) <= LONG_DOC_CHARS:
                        n_tokens += self._add(writer, next(encodings).ids, dtype)
                    else:  # one piece at a time: memory bounded by the piece, not the document
                        bounds = piece_bounds(doc.text)
                        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                            ids = tok.encode_batch_fast([doc.text[a:b]], add_special_tokens=False)[0].ids
                            n_tokens += self._add(writer, ids, dtype)
                    writer.add_tokens(np.array([eos], dtype=dtype))
                    writer.end_document()
                    n_tokens += 1
                self.stat_update("documents", value=len(batch), unit="batch")
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

