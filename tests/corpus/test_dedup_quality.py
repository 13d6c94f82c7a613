"""Near-dup dedup quality: ours vs datatrove's MinHash at equal parameters on planted duplicates."""

from __future__ import annotations

import math
from pathlib import Path

from moe_cpt.bench.minhash_runs import run_minhash
from moe_cpt.bench.planted_dups import PlantedSpec, make_planted, score
from tests.corpus.helpers import write_jsonl

# 400 planted pairs at edit rates where LSH (14 bands x 8) finds about 100%, 99%, 80% and 45%
SPEC = PlantedSpec(originals=600, words=(100, 300), edit_rates=(0.0, 0.01, 0.03, 0.05), clusters_per_rate=100,
                   copies=1, seed=3)


def test_recall_and_precision_match_datatrove(tmp_path: Path, texts: list[str]) -> None:
    planted = make_planted(texts, SPEC)
    write_jsonl(tmp_path / "in" / "docs.jsonl", planted.records)
    scores = {}
    for method in ("datatrove", "ours"):
        run = run_minhash(method, tmp_path / "in", tmp_path / method)
        removed = {planted.records[i]["id"] for i in run.removed.get(0, [])}
        scores[method] = score(planted, removed)
    ours, theirs = scores["ours"], scores["datatrove"]
    n = ours["all"]["should"]
    assert n == 400
    # Both are random hash families: equal quality means recall within the sampling noise of
    # 400 pairs (2 standard errors of a difference of two proportions), never lower beyond it.
    p = theirs["all"]["recall"]
    assert ours["all"]["recall"] >= p - 2 * math.sqrt(2 * p * (1 - p) / n)
    assert ours["all"]["precision"] >= theirs["all"]["precision"] == 1.0
    assert ours["rate=0"]["recall"] == 1.0 and ours["rate=0.01"]["recall"] >= 0.97
    assert ours["non-dups"]["removed"] == 0
