"""The reduce of near-duplicate dedup: MinHash pairs + exact duplicates -> per-task removals.

Replaces datatrove's ``MinhashDedupCluster`` when signatures come from
:class:`moe_cpt.corpus.minhash_sigs.DedupSignatures`, whose MinHash document indices count the stream
*before* the exact filter (exact and MinHash signatures are taken in the same pass). It

* unions the pairs written by datatrove's ``MinhashDedupBuckets`` (``*.dups``, records of
  ``<4I``: task, doc, task, doc) into clusters;
* keeps, per cluster, the first document (lowest task, then index) that exact dedup keeps, and
  removes every other member exact dedup keeps. An exact duplicate has its twin's signature, so it
  links the same documents its kept twin does: clusters over the kept documents are the same as
  MinHash run after the exact filter (the old stage order);
* writes ``RRRRRR.remove`` (sorted ``<u4`` indices) in the index space of the stream *after*
  the exact filter (datatrove's ``MinhashDedupFilter`` format), read by
  :class:`~moe_cpt.corpus.dedup_filter.MinhashBlockFilter` placed after the exact filter.

Memory: the pairs and the exact removals (proportional to the duplicates found, like datatrove's
cluster step, not to the corpus).
"""

from __future__ import annotations

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolder, DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import ExtensionHelperSD


def read_u4(folder: DataFolder, path: str) -> np.ndarray:
    """A file of little-endian uint32 (datatrove's duplicate/removal index files, pair records)."""
    with folder.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype="<u4")


def exact_removals(folder: DataFolder, rank: int | None = None) -> dict[int, np.ndarray]:
    """Task -> sorted document indices removed by datatrove's ``ExactFindDedups`` (every task's
    ``*/RRRRR.c4_dup`` files, or only task ``rank``'s)."""
    name = "*" if rank is None else f"{rank:05d}"
    out: dict[int, list[np.ndarray]] = {}
    for path in folder.list_files(glob_pattern=f"*/{name}{ExtensionHelperSD.stage_2_duplicates}"):
        rank = int(path.rsplit("/", 1)[-1].removesuffix(ExtensionHelperSD.stage_2_duplicates))
        out.setdefault(rank, []).append(read_u4(folder, path))
    return {r: np.unique(np.concatenate(a)).astype(np.int64) for r, a in out.items()}


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges a[i]-b[i] (int64 node keys).

    Returns (nodes, root) where root[i] is the smallest node of nodes[i]'s component."""
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a) :]
    label = np.arange(len(nodes))
    while True:  # min-label propagation with pointer jumping; O(log n) rounds on dup clusters
        m = np.minimum(label[ea], label[eb])
        new = label.copy()
        np.minimum.at(new, ea, m)
        np.minimum.at(new, eb, m)
        new = new[new]
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


class DedupCluster(PipelineStep):
    """Cluster MinHash pairs, keep one document per cluster, write removals (see module doc)."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash clusters (exact-aware)"

    def __init__(self, buckets_folder: DataFolderLike, output_folder: DataFolderLike,
                 exact_dups_folder: DataFolderLike | None = None):
        super().__init__()
        self.buckets_folder = get_datafolder(buckets_folder)
        self.output_folder = get_datafolder(output_folder)
        self.exact_folder = get_datafolder(exact_dups_folder) if exact_dups_folder is not None else None

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        if world_size != 1:
            raise ValueError("DedupCluster runs as a single task")
        with self.track_time():
            pairs = [read_u4(self.buckets_folder, p).reshape(-1, 4)
                     for p in self.buckets_folder.list_files(glob_pattern="*.dups")]
            pairs = np.concatenate(pairs) if pairs else np.empty((0, 4), dtype="<u4")
            exact = exact_removals(self.exact_folder) if self.exact_folder is not None else {}
            key = lambda t, d: (t.astype(np.int64) << 32) | d.astype(np.int64)  # noqa: E731
            nodes, root = components(key(pairs[:, 0], pairs[:, 1]), key(pairs[:, 2], pairs[:, 3]))
            task, doc = nodes >> 32, nodes & 0xFFFFFFFF
            kept_by_exact = np.ones(len(nodes), dtype=bool)
            for t, removed in exact.items():
                sel = task == t
                kept_by_exact[sel] = ~np.isin(doc[sel], removed)
            # survivor per cluster: the first member (node keys sort by task, then doc) exact keeps
            candidates = np.where(kept_by_exact, nodes, np.iinfo(np.int64).max)
            roots, root_idx = np.unique(root, return_inverse=True)
            survivor = np.full(len(roots), np.iinfo(np.int64).max)
            np.minimum.at(survivor, root_idx, candidates)
            remove = kept_by_exact & (nodes != survivor[root_idx])
            self.stat_update("duplicates", value=len(nodes))
            self.stat_update("clusters", value=len(roots))
            self.stat_update("to_remove", value=int(remove.sum()))
            for t in np.unique(task[remove]):
                idx = np.sort(doc[remove & (task == t)])
                shift = np.searchsorted(exact.get(int(t), np.empty(0, np.int64)), idx)  # exact removals before
                with self.output_folder.open(f"{int(t):06d}.remove", "wb") as f:
                    f.write((idx - shift).astype("<u4").tobytes())
