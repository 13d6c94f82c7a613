"""PyTorch integration: a stateful ``IterableDataset`` over one data-parallel rank's samples.

    ds = MixedDataset("blend.yaml", rank=r, world_size=w)
    loader = torchdata.stateful_dataloader.StatefulDataLoader(
        ds, batch_size=ds.loader_batch_size, num_workers=2)

Each sample is a :class:`~moe_cpt.mixer.sample.Sample` dict: ``tokens`` and ``positions`` (int64
arrays of ``seq_len + 1``), ``source`` (index into :attr:`MixedDataset.source_names`) and
provenance (``sample``: global sample index, ``index``: the source's sample index, ``epoch``,
``shard``, ``block``, ``offset``).
The stream is the same whatever the number of loader workers, as long as the loader's
``batch_size`` equals :attr:`loader_batch_size` (the workers deal chunks of that many samples).
With ``batched=True`` the dataset yields those chunks already collated (``batch_size=None``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import get_worker_info

from moe_cpt.mixer.blocks import CacheConfig
from moe_cpt.mixer.contract import BlendDataset
from moe_cpt.mixer.spec import ResolvedBlend, blend_from_json, open_sources, resolve
from moe_cpt.mixer.state import Worker
from moe_cpt.mixer.stream import MixStream
from moe_cpt.store.reader import DatasetVersion


def open_blend(spec: str | Path | dict[str, Any] | ResolvedBlend) -> tuple[ResolvedBlend, list[DatasetVersion]]:
    """A resolved blend and its opened sources, from a spec file, a spec/resolved dict or a blend."""
    if isinstance(spec, ResolvedBlend):
        return spec, open_sources(spec)
    if isinstance(spec, dict) and spec.get("resolved"):
        blend = blend_from_json(spec)
        return blend, open_sources(blend)
    return resolve(spec)


class MixedDataset(BlendDataset):
    """The mixer's stream for ``(rank, world_size)`` as a torch ``IterableDataset``."""

    def __init__(
        self,
        spec: str | Path | dict[str, Any] | ResolvedBlend,
        rank: int = 0,
        world_size: int = 1,
        *,
        cache: CacheConfig | None = None,
        loader_batch_size: int | None = None,
        batched: bool = False,
    ):
        """``batched``: iterate whole loader batches (dicts of torch tensors with a leading
        dimension of ``loader_batch_size``, built without per-sample dicts: the fast path); use
        it with ``StatefulDataLoader(ds, batch_size=None, ...)``."""
        super().__init__()
        self.batched = batched
        self.blend, self._datasets = open_blend(spec)
        self.rank = rank
        self.world_size = world_size
        self.cache = cache or CacheConfig()
        self._stream: MixStream | None = None
        probe = MixStream(self.blend, self._datasets, rank, world_size, CacheConfig(prefetch_threads=0))
        self.local_batch_size = probe.local_batch
        self.loader_batch_size = loader_batch_size or probe.local_batch
        self._state = probe.initial_state()

    # ---- contract (properties and state_dict: mixer/contract.py) -----------------------------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts a state of this dataset (any world size when taken at a step boundary), or a
        whole ``StatefulDataLoader`` state, whose per-worker states are merged."""
        self._state = self._get_stream().check_state(self.incoming_state(state))

    # ---- iteration -------------------------------------------------------------------------
    def _get_stream(self) -> MixStream:
        if self._stream is None:
            self._stream = MixStream(self.blend, self._datasets, self.rank, self.world_size, self.cache)
        return self._stream

    def __iter__(self):
        info = get_worker_info()
        worker = Worker(info.id, info.num_workers, self.loader_batch_size) if info else \
            Worker(0, 1, self.loader_batch_size)
        stream = self._get_stream()
        try:
            if self.batched:
                for batch, state in stream.batches(self._state, worker):
                    self._state = state
                    yield {k: torch.from_numpy(v) for k, v in batch.items()}
            else:
                for sample, state in stream.samples(self._state, worker):
                    self._state = state
                    yield sample
        finally:  # iterator closed or garbage collected: stop read-ahead threads
            stream.close()

    def close(self, wait: bool = False) -> None:
        """Stop this process's read-ahead (``wait``: until running reads have finished, so that
        :meth:`stats` is final)."""
        if self._stream is not None:
            self._stream.close(wait)

    def validation_samples(self, source: int, count: int) -> list[dict[str, Any]]:
        """``count`` fixed windows of source ``source``'s held-out split (see mixer/holdout.py)."""
        return self._get_stream().validation_samples(source, count)

    def epochs(self) -> dict[str, float]:
        """Epochs per source consumed up to the step of the current state (all ranks)."""
        return dict(zip(self.source_names, self._get_stream().epochs(self._state.point.counts), strict=True))

    def stats(self) -> dict[str, Any]:
        """Samples/tokens per source delivered by this process, and I/O counters."""
        s = self._get_stream()
        return {
            "samples_per_source": dict(zip(self.source_names, s.stats.samples_per_source, strict=True)),
            "tokens_per_source": {n: c * self.seq_len for n, c in zip(self.source_names, s.stats.samples_per_source, strict=True)},
            "bytes_consumed": int(s.stats.bytes_consumed),
            **s.loader.stats.as_dict(),
        }

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_stream"] = None  # threads and caches are rebuilt in each worker
        return d
