"""Planted near-duplicates with known ground truth, and dedup precision/recall against it.

Originals are random passages built from a text's words (natural word frequencies, so two
originals share no 5-word shingle except by rare chance). Each planted cluster is an original
plus copies at one known edit rate: every word of the copy is, with probability ``rate``,
substituted, deleted, or followed by an inserted word (a third each). Exact copies are clusters
at rate 0.

A dedup keeps one document per cluster at best. Per cluster of size ``s`` with ``k`` documents
removed, ``min(k, s - 1)`` removals are correct and the rest are false (removing a singleton,
or every member of a cluster). Recall = correct / sum(s - 1); precision = correct / removed.
Both are given per edit rate and overall.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlantedSpec:
    originals: int = 400  # documents, each its own cluster
    words: tuple[int, int] = (150, 600)  # words per original, uniform in this range
    edit_rates: tuple[float, ...] = (0.0, 0.01, 0.03, 0.05, 0.1, 0.2)
    clusters_per_rate: int = 20  # originals that get copies, per edit rate
    copies: int = 2  # copies per planted cluster
    seed: int = 0


@dataclass
class Planted:
    records: list[dict]  # {"id", "text"}, shuffled
    cluster: dict[str, int] = field(default_factory=dict)  # doc id -> cluster id
    rate: dict[int, float] = field(default_factory=dict)  # cluster id -> edit rate (planted ones)


def word_pool(texts: Iterable[str]) -> list[str]:
    return [w for t in texts for w in t.split()]


def edit(words: list[str], rate: float, pool: list[str], rng: random.Random) -> list[str]:
    out: list[str] = []
    for w in words:
        if rng.random() >= rate:
            out.append(w)
            continue
        op = rng.randrange(3)
        if op == 0:
            out.append(rng.choice(pool))  # substitute
        elif op == 2:
            out += [w, rng.choice(pool)]  # insert after
        # op == 1: delete
    return out


def make_planted(texts: Iterable[str], spec: PlantedSpec = PlantedSpec()) -> Planted:
    rng = random.Random(spec.seed)
    pool = word_pool(texts)
    originals = [[rng.choice(pool) for _ in range(rng.randint(*spec.words))] for _ in range(spec.originals)]
    planted = Planted(records=[])
    for c, words in enumerate(originals):
        planted.records.append({"id": f"o{c}", "text": " ".join(words)})
        planted.cluster[f"o{c}"] = c
    c = 0
    for rate in spec.edit_rates:
        for _ in range(spec.clusters_per_rate):
            planted.rate[c] = rate
            for j in range(spec.copies):
                doc_id = f"o{c}-copy{j}"
                planted.records.append({"id": doc_id, "text": " ".join(edit(originals[c], rate, pool, rng))})
                planted.cluster[doc_id] = c
            c += 1
    if c > spec.originals:
        raise ValueError("more planted clusters than originals")
    rng.shuffle(planted.records)
    return planted


def score(planted: Planted, removed: set[str]) -> dict[str, dict[str, float]]:
    """{"all" | "rate=R" | "non-dups": {"precision", "recall", "removed", "should"}}."""
    sizes: dict[int, int] = {}
    gone: dict[int, int] = {}
    for doc_id, c in planted.cluster.items():
        sizes[c] = sizes.get(c, 0) + 1
        gone[c] = gone.get(c, 0) + (doc_id in removed)
    groups: dict[str, list[int]] = {"all": list(sizes)}
    for c, r in planted.rate.items():
        groups.setdefault(f"rate={r:g}", []).append(c)
    groups["non-dups"] = [c for c in sizes if c not in planted.rate]
    out = {}
    for name, cs in groups.items():
        should = sum(sizes[c] - 1 for c in cs)
        k = sum(gone[c] for c in cs)
        correct = sum(min(gone[c], sizes[c] - 1) for c in cs)
        out[name] = {"precision": correct / k if k else 1.0, "recall": correct / should if should else 1.0,
                     "removed": k, "should": should}
    return out
