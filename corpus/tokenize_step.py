"""The datatrove step that tokenizes documents and writes them as shards (last build stage)."""

from __future__ import annotations

import json
import os

import numpy as np
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from corpus.manifest import TokenizerInfo
from corpus.shard_set import PackingConfig, ShardSetWriter
from corpus.tokenizer import batched
from cpt.fs import join, open_fs

ENCODE_BATCH = 256


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
                encodings = tok.encode_batch_fast([d.text for d in batch], add_special_tokens=False)
                n_tokens = 0
                for doc, enc in zip(batch, encodings, strict=True):
                    ids = enc.ids
                    ids.append(eos)
                    n_tokens += len(ids)
                    writer.add(np.array(ids, dtype=dtype), doc.id, doc.metadata.get("file_path", ""),
                               content_hash(doc.text))
                self.stat_update("documents", value=len(batch), unit="batch")
                self.stat_update("tokens", value=n_tokens, unit="batch")
        shards, index_rel = writer.close()
        result = {"rank": rank, "shards": [s.to_json() for s in shards], "index": index_rel}
        fs.makedirs(join(root, "results"), exist_ok=True)
        with fs.open(join(root, "results", f"{rank:05d}.json"), "w") as f:
            json.dump(result, f)
        return
        yield  # a generator step that consumes its input

