"""Small synthetic datasets for mixer tests (published through the real corpus API)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models

from corpus.manifest import TokenizerInfo
from corpus.publish import publish_documents
from corpus.shard_set import PackingConfig
from corpus.tokenizer import tokenizer_info

VOCAB = 512


def make_tokenizer(vocab: int = VOCAB, tag: str = "a") -> tuple[TokenizerInfo, bytes]:
    words = {"<|endoftext|>": 0, "[UNK]": 1} | {f"{tag}{i}": i for i in range(2, vocab)}
    tj = Tokenizer(models.WordLevel(words, unk_token="[UNK]")).to_str().encode()
    return tokenizer_info(tj, f"test-{tag}"), tj


def make_docs(seed: int, n_docs: int, mean_len: int, vocab: int = VOCAB) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, mean_len // 4), mean_len * 2, size=n_docs)
    return [(f"s{seed}-d{i}", rng.integers(2, vocab, size=int(n), dtype=np.int64)) for i, n in enumerate(lens)]


def publish(store: str, name: str, seed: int, n_docs: int, mean_len: int = 120, block_tokens: int = 1500,
            shard_bytes: int = 6000, tok: tuple[TokenizerInfo, bytes] | None = None) -> str:
    info, tj = tok or make_tokenizer()
    return publish_documents(store, name, make_docs(seed, n_docs, mean_len), info, tj,
                             PackingConfig(block_tokens=block_tokens, shard_bytes=shard_bytes))


def spec(store: str, weights: dict[str, float], seq_len: int = 64, gbs: int = 24, seed: int = 7,
         **extra) -> dict:
    return {"store": store, "seq_len": seq_len, "global_batch_size": gbs, "seed": seed,
            "sources": {n: {"dataset": f"{n}@latest", "weight": w} for n, w in weights.items()}, **extra}
