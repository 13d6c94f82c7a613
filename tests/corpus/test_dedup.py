"""Exact and MinHash near-duplicate removal on constructed duplicates, counted per stage."""

from __future__ import annotations

import random
from pathlib import Path

from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from tests.corpus.helpers import read_back, write_config, write_jsonl


def test_exact_and_near_duplicates_removed(tmp_path: Path, texts: list[str], tokenizer_path: Path) -> None:
    # Originals: seeded random word sequences, so none are near-duplicates of each other by chance.
    rng = random.Random(0)
    vocab = sorted({w for t in texts for w in t.split()})
    long_texts = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(30)]
    records = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(long_texts)]
    exact = [{"id": f"exact-{i}", "text": long_texts[i]} for i in range(4)]  # byte-identical copies
    near = []
    for i in range(4, 9):  # one word changed near the end: near duplicates, not exact
        words = long_texts[i].split(" ")
        words[-2] = words[-2] + "X"
        near.append({"id": f"near-{i}", "text": " ".join(words)})
    write_jsonl(tmp_path / "in" / "a.jsonl", records[:15] + exact)
    write_jsonl(tmp_path / "in" / "b.jsonl", near + records[15:])  # duplicates across files and tasks
    cfg = load_config(write_config(tmp_path / "c.yaml", name="d", inputs=["in"], tokenizer=str(tokenizer_path),
                                   dedup={"exact": True, "minhash": {"enabled": True}}))
    result = build_dataset(cfg, str(tmp_path / "store"), ExecutorConfig(workers=2))
    stages = {s["stage"]: s for s in result.manifest.stats["stages"]}
    assert stages["dedup: exact"]["dropped"] == 4
    assert stages["dedup: minhash"]["dropped"] == 5
    kept = read_back(str(tmp_path / "store"), "d")
    assert len(kept) == len(records)
    for i in range(9):  # exactly one of each duplicate pair survives
        assert (f"orig-{i}" in kept) + (f"exact-{i}" in kept) + (f"near-{i}" in kept) == 1
