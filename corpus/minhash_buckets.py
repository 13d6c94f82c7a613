"""MinHash LSH buckets with numpy: datatrove's ``MinhashDedupBuckets`` contract, vectorized.

datatrove's step merges the sorted signature files of one bucket through a Python heap, one
record at a time (a few microseconds each, for every document in every bucket). This step reads
the same files in blocks of ``block_records`` records and merges them a block at a time: all
records whose first hash is below the smallest "last first hash" of the open blocks are complete
(every file is sorted), so they are sorted together with numpy and every record whose signature
equals the previous one's yields the pair (previous, record), as datatrove writes it
(``<4I``: task, doc, task, doc, in ``BBBBB_WW.dups``). Memory: one block per input file.

Hash ranges per worker (``tasks = num_buckets * workers_per_bucket``) are datatrove's own
(``get_worker_hash_range``). Index files (dedup against another dataset) are not supported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets
from datatrove.utils.binaryio import seek_to_start


class _Reader:
    def __init__(self, f, dtype: np.dtype, block: int, hash_max: int):
        self.f, self.dtype, self.block, self.hash_max = f, dtype, block, hash_max
        self.buf = np.empty(0, dtype=dtype)
        self.done = False

    def fill(self) -> None:
        data = self.f.read(self.block * self.dtype.itemsize)
        recs = np.frombuffer(data, dtype=self.dtype)
        if len(recs) < self.block:
            self.done = True
        stop = np.searchsorted(recs["field1"], np.uint64(self.hash_max), side="left")
        if stop < len(recs):
            recs, self.done = recs[:stop], True
        self.buf = np.concatenate([self.buf, recs]) if len(self.buf) else recs


class FastMinhashBuckets(MinhashDedupBuckets):
    """Drop-in for datatrove's ``MinhashDedupBuckets`` (no index support), see module doc."""

    name = "🎯 MinHash buckets (numpy)"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, config: MinhashConfig,
                 block_records: int = 1 << 16):
        super().__init__(input_folder, output_folder, config=config)
        self.block_records = block_records

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        cfg = self.config
        if world_size % cfg.num_buckets:
            raise ValueError("the number of tasks must be a multiple of num_buckets")
        bucket, worker = divmod(rank, world_size // cfg.num_buckets)
        per = cfg.hashes_per_bucket
        hf = cfg.hash_config.struct_format
        dtype = np.dtype([(f"field{i + 1}", f"<{hf}") for i in range(per)] + [(f"field{per + 1}", "<u4")])
        with self.track_time():
            sig_files = self.input_folder.list_files(subdirectory=f"bucket_{bucket:03d}")
            hash_min, hash_max = self.get_worker_hash_range(sig_files, rank, world_size)
            stems = [int(Path(p).name.removesuffix(".minhash.sig")) for p in sig_files]
            readers = []
            for path in sig_files:
                f = self.input_folder.open(path, mode="rb")
                seek_to_start(f, hash_min, f"{per}{hf}I", hf)
                readers.append(_Reader(f, dtype, self.block_records, hash_max))
            with self.output_folder.open(f"{bucket:05d}_{worker:02d}.dups", mode="wb") as out:
                self._merge(readers, stems, dtype, out)
            for r in readers:
                r.f.close()

    def _merge(self, readers: list[_Reader], stems: list[int], dtype: np.dtype, out) -> None:
        sig_names = list(dtype.names[:-1])
        doc_name = dtype.names[-1]
        while True:
            for r in readers:
                if len(r.buf) == 0 and not r.done:
                    r.fill()
            live = [r for r in readers if len(r.buf)]
            if not live:
                return
            open_ends = [r.buf["field1"][-1] for r in live if not r.done]
            limit = min(open_ends) if open_ends else None
            parts, tasks = [], []
            for r, stem in zip(readers, stems, strict=True):
                if not len(r.buf):
                    continue
                n = len(r.buf) if limit is None else int(np.searchsorted(r.buf["field1"], limit, side="left"))
                if n:
                    parts.append(r.buf[:n])
                    tasks.append(np.full(n, stem, dtype=np.uint32))
                    r.buf = r.buf[n:]
            if not parts:  # every open block starts with the limit hash: read more of those
                for r in live:
                    if not r.done and r.buf["field1"][-1] == limit:
                        r.fill()
                continue
            self._pairs(np.concatenate(parts), np.concatenate(tasks), sig_names, doc_name, out)

    def _pairs(self, recs: np.ndarray, tasks: np.ndarray, sig_names: list[str], doc_name: str, out) -> None:
        docs = recs[doc_name]
        order = np.lexsort([docs, tasks] + [recs[k] for k in reversed(sig_names)])
        sig = np.stack([recs[k][order] for k in sig_names], axis=1)
        same = (sig[1:] == sig[:-1]).all(axis=1)
        if not same.any():
            return
        t, d = tasks[order], docs[order]
        i = np.flatnonzero(same)
        pairs = np.stack([t[i], d[i], t[i + 1], d[i + 1]], axis=1).astype("<u4")
        out.write(pairs.tobytes())
        self.stat_update("total_matches", value=len(i))
