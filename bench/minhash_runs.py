"""Run MinHash near-dup dedup two ways on one JSONL folder and return what each removes.

* ``datatrove``: datatrove's own stages, as this project ran them before (the same word splitter):
  ``MinhashDedupSignature`` | ``MinhashDedupBuckets`` | ``MinhashDedupCluster``.
* ``ours``: :class:`moe_cpt.corpus.minhash_sigs.DedupSignatures` (one-permutation MinHash) |
  :class:`moe_cpt.corpus.minhash_buckets.FastMinhashBuckets` | :class:`moe_cpt.corpus.minhash_cluster.DedupCluster`.

Both with the same ``MinhashSettings`` (n-grams, buckets, hashes per bucket, seed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
from datatrove.pipeline.readers import JsonlReader

from moe_cpt.corpus.config import DedupConfig, MinhashSettings
from moe_cpt.corpus.dedup import RegexWordTokenizer, minhash_config
from moe_cpt.corpus.minhash_buckets import FastMinhashBuckets
from moe_cpt.corpus.minhash_cluster import DedupCluster
from moe_cpt.corpus.minhash_sigs import DedupSignatures

METHODS = ("datatrove", "ours")


@dataclass
class MinhashRun:
    removed: dict[int, np.ndarray]  # task -> removed document indices (in the task's stream)
    seconds: float


def run_minhash(method: str, input_dir: Path, work: Path, settings: MinhashSettings = MinhashSettings(),
                tasks: int = 1, workers: int = 1) -> MinhashRun:
    cfg = minhash_config(DedupConfig(exact=False, minhash=settings))
    sigs, buckets, remove = work / "sigs", work / "buckets", work / "remove"
    if method == "datatrove":
        sign = MinhashDedupSignature(str(sigs), cfg, language=RegexWordTokenizer())
        bucket = MinhashDedupBuckets(str(sigs), str(buckets), config=cfg)
        cluster = MinhashDedupCluster(str(buckets), str(remove), config=cfg)
    elif method == "ours":
        sign = DedupSignatures(None, None, str(sigs), settings)
        bucket = FastMinhashBuckets(str(sigs), str(buckets), config=cfg)
        cluster = DedupCluster(str(buckets), str(remove))
    else:
        raise ValueError(f"method must be one of {METHODS}")
    stages = [
        ([JsonlReader(str(input_dir)), sign], tasks),
        ([bucket], settings.num_buckets),
        ([cluster], 1),
    ]
    t0 = time.perf_counter()
    for i, (pipeline, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(workers, n),
                              logging_dir=str(work / f"logs{i}")).run()
    seconds = time.perf_counter() - t0
    removed = {}
    for path in sorted(remove.glob("*.remove")):
        removed[int(path.stem)] = np.frombuffer(path.read_bytes(), dtype="<u4").astype(np.int64)
    return MinhashRun(removed, seconds)
