"""Two tiny synthetic "languages" published as real dataset versions for mixer-fed training.

* ``lang_a``: sentences counting up from a random word in steps of 1-3 over words 8..127,
  each ended by the period word 3;
* ``lang_b``: a random 3-6 word motif over words 128..255 repeated, separated by word 4.

Both are learnable in a few steps of a tiny model, and the two vocabularies are disjoint, so
training on one leaves the other's loss to drift (forgetting is visible). Published with a
word-level tokenizer of 256 words (id 0 = end of text), the model's vocabulary size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_cpt.corpus.publish import publish_documents
from moe_cpt.corpus.shard_writer import PackingConfig
from tests.support.mixer_store import make_tokenizer

VOCAB = 256
PERIOD, SEPARATOR = 3, 4


def lang_a(rng: np.random.Generator) -> np.ndarray:
    out: list[int] = []
    for _ in range(int(rng.integers(3, 8))):
        start, step, n = int(rng.integers(8, 100)), int(rng.integers(1, 4)), int(rng.integers(4, 10))
        out += [8 + (start - 8 + step * i) % 120 for i in range(n)] + [PERIOD]
    return np.asarray(out, dtype=np.int64)


def lang_b(rng: np.random.Generator) -> np.ndarray:
    motif = rng.integers(128, VOCAB, size=int(rng.integers(3, 7)))
    reps = int(rng.integers(4, 12))
    return np.asarray(np.concatenate([np.append(motif, SEPARATOR)] * reps), dtype=np.int64)


def publish_language(store: str, name: str, make, n_docs: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    docs = [(f"{name}-{i}", make(rng)) for i in range(n_docs)]
    info, tj = make_tokenizer(VOCAB, "w")
    return publish_documents(store, name, docs, info, tj,
                             PackingConfig(block_tokens=1000, shard_bytes=8000))


def write_blend(path: Path, store: str, weights: dict[str, float], *, seq_len: int = 64,
                global_batch_size: int = 4, holdout_tokens: int = 600, seed: int = 5) -> Path:
    import yaml

    spec = {"store": store, "seq_len": seq_len, "global_batch_size": global_batch_size,
            "seed": seed, "holdout_tokens": holdout_tokens,
            "sources": {n: {"dataset": f"{n}@latest", "weight": w} for n, w in weights.items()}}
    path.write_text(yaml.safe_dump(spec))
    return path
