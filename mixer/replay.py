"""Replay of the data a parent run actually saw (``replay: seen``).

A *fresh* replay source draws from a new shuffle of the whole dataset version. A *seen* replay
source draws only from the windows a parent run consumed: the mixer is deterministic, so the
parent's recorded resolved blend and its step fix how many samples ``n_seen`` of that version it
consumed (``schedule.advance``) and where each of them lives (the parent's ``SourcePacking``).

Mapping of a seen source's ``j``-th sample: epoch ``e = j // n_seen``, position
``t = j % n_seen``, parent sample ``p = pi_e(t)``, then the parent's packing locates ``p``.
``pi_e`` is a two-level seeded shuffle of ``range(n_seen)``: the parent sample positions are cut
into *chunks* at the parent's own shuffle-window boundaries (each chunk is the part of one
parent shuffle window of ``shuffle_blocks`` blocks that the parent consumed), the chunks are put
in a seeded order per epoch, and the positions inside each chunk in a seeded order per (epoch,
chunk). So each replay epoch visits every seen window exactly once, windows are byte-identical
to the parent's, and a rank's working set stays about one parent shuffle window of blocks.
Everything is pinned in :class:`SeenReplay` (part of the resolved blend and its fingerprint);
the stream never reads the parent run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.holdout import Holdout
from moe_cpt.mixer.lru import LruCache
from moe_cpt.mixer.packing import SampleLoc, SourcePacking, _seed_words
from moe_cpt.mixer.schedule import MixPoint, WeightSchedule, plan_step

REPLAY_MODES = ("fresh", "seen")
RUN_RECORD = "run.json"  # the trainer's run record (provenance/record.py) in the parent's folder


@dataclass(frozen=True)
class SeenReplay:
    """What a seen-replay source pins: the parent run and blend, the parent's packing of the
    version (seq_len, seed, key, shuffle window, hold-out) and how much of it the parent saw."""

    parent_run_id: str
    parent_blend: str  # the parent's resolved-blend fingerprint
    parent_source: str  # the parent's source name for the version
    seq_len: int
    seed: int
    key: str  # the parent packing's key (``name:version``)
    shuffle_blocks: int
    holdout: Holdout
    seen_step: int  # the parent step the replay stops at (samples of steps < seen_step)
    n_seen: int  # samples of the version the parent consumed before seen_step
    seen_by: str = ""  # the parent's run folder (where it was found; not part of the fingerprint)

    mode = "seen"

    def to_json(self) -> dict[str, Any]:
        """The pinned part (hashed into the blend's fingerprint; ``seen_by`` is not)."""
        return {"mode": self.mode, "parent_run_id": self.parent_run_id, "parent_blend": self.parent_blend,
                "parent_source": self.parent_source, "seq_len": self.seq_len, "seed": self.seed,
                "key": self.key, "shuffle_blocks": self.shuffle_blocks, "holdout": self.holdout.to_json(),
                "seen_step": self.seen_step, "n_seen": self.n_seen}

    @classmethod
    def from_json(cls, d: dict[str, Any], seen_by: str = "") -> SeenReplay:
        if not isinstance(d, dict) or d.get("mode") != cls.mode:
            raise ConfigError(f"resolved blend: unknown replay record {str(d)[:200]}")
        try:
            return cls(str(d["parent_run_id"]), str(d["parent_blend"]), str(d["parent_source"]),
                       int(d["seq_len"]), int(d["seed"]), str(d["key"]), int(d["shuffle_blocks"]),
                       Holdout.from_json(d["holdout"]), int(d["seen_step"]), int(d["n_seen"]), seen_by)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"resolved blend: incomplete replay record ({exc!r})") from exc

    def parent_packing(self, block_tokens: np.ndarray) -> SourcePacking:
        """The parent's addressing of the version (``block_tokens``: the manifest's, per block)."""
        return SourcePacking(self.holdout.train_block_tokens(block_tokens), self.seq_len, self.seed,
                             self.key, self.shuffle_blocks)


def seen_counts(schedule: WeightSchedule, global_batch: int, n_sources: int, steps: int) -> tuple[int, ...]:
    """Samples per source a blend served in its first ``steps`` steps (= ``schedule.advance``
    from the start, with the step-plan memo, which gives the same plans)."""
    point = MixPoint.start(n_sources)
    memo: dict = {}
    while point.step < steps:
        point = plan_step(point, schedule, global_batch, memo).end
    return point.counts


def chunk_starts(parent: SourcePacking, n_seen: int) -> np.ndarray:
    """First parent sample index of each chunk: the parent's shuffle-window boundaries (over as
    many parent epochs as ``n_seen`` spans) below ``n_seen``, empty windows dropped."""
    wpe = parent.windows_per_epoch
    starts = [e * wpe + parent.epoch(e).chunk_first[:-1] for e in range(-(-n_seen // wpe))]
    flat = np.concatenate(starts).astype(np.int64)
    return np.unique(flat[flat < n_seen])


class SeenPacking:
    """Addressing of a seen-replay source's samples, with :class:`SourcePacking`'s interface
    (``locate``, ``locate_many``, ``epochs_for``, ``windows_per_epoch``); an epoch is one pass
    over the parent's ``n_seen`` samples."""

    def __init__(self, parent: SourcePacking, n_seen: int, seed: int, key: str):
        if n_seen < 1:
            raise ValueError(f"seen replay of {parent.key}: no parent samples")
        self.parent = parent
        self.seq_len = parent.seq_len
        self.seed = seed
        self.key = key
        self.windows_per_epoch = n_seen
        self.starts = chunk_starts(parent, n_seen)
        self.sizes = np.diff(np.append(self.starts, n_seen))
        self._epochs: LruCache[int, tuple[np.ndarray, np.ndarray]] = LruCache(4)
        self._perms: LruCache[tuple[int, int], np.ndarray] = LruCache(64)

    def _rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng(_seed_words(self.seed, self.key, *parts))

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``e``'s chunk order and the cumulative sizes over that order (+ 0 first)."""
        return self._epochs.get(e, lambda: self._layout(e))

    def _layout(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        order = self._rng(e).permutation(len(self.sizes))
        return order, np.concatenate([[0], np.cumsum(self.sizes[order])])

    def _chunk_perm(self, e: int, c: int) -> np.ndarray:
        return self._perms.get((e, c), lambda: self._rng(e, c).permutation(int(self.sizes[c])))

    def parent_indices(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(replay epoch, parent sample index)`` of each of the samples ``js``."""
        js = np.asarray(js, dtype=np.int64)
        epochs, t = np.divmod(js, self.windows_per_epoch)
        out = np.empty_like(js)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            order, cum = self.epoch(e)
            slot = np.searchsorted(cum, t[m], side="right") - 1
            inner = t[m] - cum[slot]
            chunk = order[slot]
            p = np.empty(len(inner), dtype=np.int64)
            for c in np.unique(chunk).tolist():
                mc = chunk == c
                p[mc] = self.starts[c] + self._chunk_perm(e, c)[inner[mc]]
            out[m] = p
        return epochs, out

    def parent_index(self, j: int) -> int:
        return int(self.parent_indices(np.asarray([j]))[1][0])

    def locate(self, j: int) -> SampleLoc:
        loc = self.parent.locate(self.parent_index(j))
        return SampleLoc(int(j) // self.windows_per_epoch, loc.window, loc.pieces)

    def locate_many(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`SourcePacking.locate_many`; the epoch is the replay epoch."""
        epochs, ps = self.parent_indices(js)
        _, win, blk, start, single = self.parent.locate_many(ps)
        return epochs, win, blk, start, single

    def epochs_for(self, n_samples: int) -> float:
        return n_samples / self.windows_per_epoch


def source_packing(block_tokens: np.ndarray, holdout: Holdout, replay: SeenReplay | None, seq_len: int,
                   seed: int, key: str, shuffle_blocks: int) -> SourcePacking | SeenPacking:
    """The packing of one blend source: its own shuffle of the version (fresh), or the replay
    of the parent's consumed windows (seen; seeded by the blend's ``seed`` and ``key``)."""
    if replay is None:
        return SourcePacking(holdout.train_block_tokens(block_tokens), seq_len, seed, key, shuffle_blocks)
    return SeenPacking(replay.parent_packing(block_tokens), replay.n_seen, seed, f"seen:{key}")
