"""Block-aware dedup filters: drop the documents that exact / MinHash dedup removes.

datatrove's ``ExactDedupFilter`` and ``MinhashDedupFilter`` address documents by their position
in a task's stream, which would count each block of a huge document (:mod:`moe_cpt.corpus.blocks`)
as a document. These steps read the same files (the exact ``<task>.c4_dup`` files of
``ExactFindDedups`` in every sub-folder, and ``<task:06d>.remove`` of
:class:`~moe_cpt.corpus.minhash_cluster.DedupCluster`, both sorted ``<u4`` document indices) and
count documents, not blocks: all blocks of a removed document are dropped, and the stats
(``forwarded`` / ``dropped``) count each document once, as datatrove's filters do.
"""

from __future__ import annotations

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

from moe_cpt.corpus.blocks import starts_document
from moe_cpt.corpus.minhash_cluster import exact_removals, read_u4
from moe_cpt.errors import CptError


class BlockDedupFilter(PipelineStep):
    """Forward the documents whose index (counting documents) is not in :meth:`removed`."""

    type = "🫂 - DEDUP"

    def __init__(self, folder: DataFolderLike):
        super().__init__()
        self.folder = get_datafolder(folder)

    def removed(self, rank: int) -> np.ndarray:
        """Sorted indices of the documents of task ``rank`` to drop."""
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        remove = self.removed(rank)
        idx, nxt, drop = -1, 0, False
        for doc in data:
            with self.track_time():
                if starts_document(doc):
                    idx += 1
                    while nxt < len(remove) and remove[nxt] < idx:
                        nxt += 1
                    drop = nxt < len(remove) and remove[nxt] == idx
                    self.stat_update(StatHints.total)
                    self.stat_update(StatHints.dropped if drop else StatHints.forwarded)
            if not drop:
                yield doc
        if len(remove) and int(remove[-1]) > idx:  # as datatrove's filters, which assert it
            raise CptError(f"{self.name}: task {rank} has {idx + 1} documents but its removals name "
                           f"document {int(remove[-1])}; the input changed since the dedup stages ran "
                           "(delete the build's work folder and rebuild)")


class ExactBlockFilter(BlockDedupFilter):
    """Reads ``ExactFindDedups``' output folder (``*/RRRRR.c4_dup``)."""

    name = "💥 exact-dedup filter (block-aware)"

    def removed(self, rank: int) -> np.ndarray:
        return exact_removals(self.folder, rank).get(rank, np.empty(0, np.int64))


class MinhashBlockFilter(BlockDedupFilter):
    """Reads :class:`~moe_cpt.corpus.minhash_cluster.DedupCluster`'s ``RRRRRR.remove`` (indices
    in the stream after the exact filter, which is where this step runs)."""

    name = "🎯 MinHash filter (block-aware)"

    def removed(self, rank: int) -> np.ndarray:
        path = f"{rank:06d}.remove"
        return read_u4(self.folder, path) if self.folder.isfile(path) else np.empty(0, "<u4")
