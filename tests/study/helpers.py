"""A tiny store for study tests (the two synthetic languages of tests/support/languages.py,
plus a third dataset with another tokenizer) and study files written from a base mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_cpt.corpus.publish import publish_documents
from moe_cpt.corpus.shard_writer import PackingConfig
from tests.support.languages import VOCAB, lang_a, lang_b, publish_language
from tests.support.mixer_store import make_tokenizer


def make_store(root: Path) -> str:
    url = str(root / "store")
    publish_language(url, "lang_a", lang_a, 300, seed=1)
    publish_language(url, "lang_b", lang_b, 300, seed=2)
    rng = np.random.default_rng(3)
    info, tj = make_tokenizer(VOCAB, "other")
    docs = [(f"o-{i}", rng.integers(2, VOCAB, size=80, dtype=np.int64)) for i in range(100)]
    publish_documents(url, "other_tok", docs, info, tj, PackingConfig(block_tokens=1000, shard_bytes=8000))
    return url


def micro_study(store: str, out: Path, **changes: Any) -> dict[str, Any]:
    """The micro grid: dense + Switch (aux_loss), CPT at 0 and 0.3 replay, re-train at 0.3."""
    study = {
        "name": "micro", "output_dir": str(out), "store": store,
        "a": "lang_a@latest", "b": "lang_b@latest", "holdout_tokens": 600,
        "seq_len": 64, "global_batch_size": 4,
        "models": ["tiny_dense", "tiny_switch"], "routers": ["aux_loss"],
        "replay": [0.0, 0.3], "retrain": [0.3], "seeds": [0],
        "tokens": {"pretrain": 2048, "cpt": 1024},          # 8 + 4 steps
        "optimizer": {"lr": 0.01},
        "eval": {"points": 2, "samples_per_source": 4, "batch_size": 4},
    }
    study.update(changes)
    return study


def write_study(path: Path, study: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path
