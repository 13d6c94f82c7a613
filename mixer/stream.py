"""The mixed sample stream of one data-parallel rank (no torch here; the dataset and a future
network service both wrap this).

Global sample order: with global batch ``G`` and ``W`` ranks (``b = G // W``), step ``s`` of rank
``r`` is global samples ``s*G + r*b ... s*G + r*b + b - 1``. A rank's *local position* ``p``
counts its own samples: ``p = s*b + i``. A stream may further be split among ``nw`` loader
workers in chunks of ``lb`` consecutive local positions, dealt round-robin, which is exactly the
order in which ``torch.utils.data.DataLoader(batch_size=lb)`` hands batches back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corpus.reader import DatasetVersion
from cpt.errors import ConfigError
from mixer.blocks import BlockLoader, CacheConfig
from mixer.packing import SampleLoc, SourcePacking
from mixer.schedule import MixPoint, StepPlan, WeightSchedule, plan_step
from mixer.spec import ResolvedBlend

STATE_VERSION = 1


@dataclass(frozen=True)
class MixState:
    """Where a stream continues: tiny, JSON-able, independent of the number of workers.

    ``point`` is the assignment state (samples served and deficits per source) at the start of
    step ``point.step``; ``next`` is the next local position of this rank (>= point.step * b).
    """

    blend: str
    world_size: int
    point: MixPoint
    next: int
    worker: tuple[int, int, int] | None = None  # (worker id, num workers, loader batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mixer_state": STATE_VERSION,
            "blend": self.blend,
            "world_size": self.world_size,
            "step": self.point.step,
            "counts": list(self.point.counts),
            "deficit": list(self.point.deficit),
            "next": self.next,
            "worker": list(self.worker) if self.worker else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixState:
        if not isinstance(d, dict) or d.get("mixer_state") != STATE_VERSION:
            raise ConfigError(f"not a mixer state (version {STATE_VERSION}): {str(d)[:200]}")
        return cls(
            blend=d["blend"], world_size=int(d["world_size"]),
            point=MixPoint(int(d["step"]), tuple(map(int, d["counts"])), tuple(map(int, d["deficit"]))),
            next=int(d["next"]), worker=tuple(d["worker"]) if d.get("worker") else None,
        )

    def global_step(self, global_batch: int) -> int:
        b = global_batch // self.world_size
        return self.next // b

    def rescaled(self, world_size: int, global_batch: int) -> MixState:
        """The same global position for a different world size (must be at a step boundary)."""
        if world_size == self.world_size:
            return self
        b_old = global_batch // self.world_size
        if self.next % b_old:
            raise ConfigError(
                f"cannot resume a mixer state taken mid-step ({self.next % b_old} of {b_old} samples "
                f"into step {self.next // b_old}) with a different world size "
                f"({self.world_size} -> {world_size}); checkpoint at step boundaries"
            )
        b_new = global_batch // world_size
        return MixState(self.blend, world_size, self.point, (self.next // b_old) * b_new, None)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One global state from per-worker states: the earliest unconsumed position wins."""
    parsed = [MixState.from_dict(s) for s in states]
    if not parsed:
        raise ConfigError("no mixer states to merge")
    best = min(parsed, key=lambda s: s.next)
    return MixState(best.blend, best.world_size, best.point, best.next, None).to_dict()


def find_states(obj: Any) -> list[dict[str, Any]]:
    """All mixer states nested anywhere in ``obj`` (e.g. a StatefulDataLoader state dict)."""
    found: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        if obj.get("mixer_state") == STATE_VERSION:
            return [obj]
        for v in obj.values():
            found += find_states(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += find_states(v)
    return found


@dataclass
class StreamStats:
    samples: int = 0
    samples_per_source: list[int] = field(default_factory=list)
    bytes_consumed: float = 0.0  # stored (compressed) bytes of the token ranges delivered


@dataclass
class _Planned:
    pos: int
    gidx: int
    src: int
    index: int
    loc: SampleLoc


class MixStream:
    """Samples of one rank (optionally one loader worker of it), from a state."""

    def __init__(self, blend: ResolvedBlend, datasets: list[DatasetVersion], rank: int, world_size: int,
                 cache: CacheConfig | None = None, loader: BlockLoader | None = None):
        """``loader``: a :class:`BlockLoader` shared with other streams of the same blend (the
        service shares one between its clients); by default the stream makes its own."""
        g = blend.spec.global_batch_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} of world size {world_size}")
        if g % world_size:
            raise ConfigError(f"global_batch_size {g} is not divisible by the data-parallel world size {world_size}")
        self.blend = blend
        self.rank = rank
        self.world_size = world_size
        self.global_batch = g
        self.local_batch = g // world_size
        self.seq_len = blend.spec.seq_len
        self.schedule: WeightSchedule = blend.spec.weight_schedule()
        self.block_tokens = [ds.block_tokens() for ds in datasets]
        self.packings = [
            SourcePacking(s.holdout.train_block_tokens(bt), self.seq_len, blend.spec.seed,
                          f"{s.name}:{s.version}", blend.spec.shuffle_blocks)
            for s, bt in zip(blend.sources, self.block_tokens, strict=True)
        ]
        self.refs = [list(ds.block_refs()) for ds in datasets]
        self.cache = cache or CacheConfig()
        self.loader = loader or BlockLoader(datasets, self.cache)
        self._own_loader = loader is None
        self.stats = StreamStats(samples_per_source=[0] * len(datasets))

    # ---- state ---------------------------------------------------------------------------
    def initial_state(self) -> MixState:
        return MixState(self.blend.fingerprint, self.world_size, MixPoint.start(len(self.packings)), 0)

    def check_state(self, state: MixState) -> MixState:
        if state.blend != self.blend.fingerprint:
            raise ConfigError(f"mixer state belongs to blend {state.blend}, not to this blend {self.blend.fingerprint}")
        if len(state.point.counts) != len(self.packings):
            raise ConfigError("mixer state has a different number of sources than the blend")
        return state.rescaled(self.world_size, self.global_batch)

    # ---- planning ------------------------------------------------------------------------
    def _positions(self, state: MixState, worker: tuple[int, int, int]) -> Iterator[int]:
        wid, nw, lb = worker
        if state.worker is not None and tuple(state.worker) == worker:
            start = state.next  # this worker's own saved position
        else:
            start = state.next + wid * lb  # a global position: deal chunks from here
        c = start
        while True:
            yield from range(c, c + lb)
            c += nw * lb

    def samples(self, state: MixState, worker: tuple[int, int, int] = (0, 1, 0)) -> Iterator[tuple[dict, MixState]]:
        """Yield ``(sample, state after it)`` forever, starting at ``state``."""
        state = self.check_state(state)
        wid, nw, lb = worker
        lb = lb or self.local_batch
        worker = (wid, nw, lb)
        b, g = self.local_batch, self.global_batch
        point = state.point
        plan: StepPlan | None = None
        positions = self._positions(state, worker)
        ahead: deque[_Planned] = deque()
        depth = max(1, self.cache.prefetch_samples)
        points: dict[int, MixPoint] = {point.step: point}

        def plan_next() -> None:
            nonlocal point, plan
            p = next(positions)
            step, i = divmod(p, b)
            while plan is None or plan.step != step:
                if point.step > step:
                    raise ConfigError(f"mixer state at step {point.step} is past the requested step {step}")
                plan = plan_step(point, self.schedule, g)
                point = plan.end
                points[point.step] = point
            k = self.rank * b + i
            src, idx = int(plan.sources[k]), int(plan.indices[k])
            loc = self.packings[src].locate(idx)
            ahead.append(_Planned(p, step * g + k, src, idx, loc))
            self.loader.prefetch([(src, pc.block) for pc in loc.pieces])

        while True:
            while len(ahead) < depth + 1:
                plan_next()
            item = ahead.popleft()
            sample = self._assemble(item)
            nxt = ahead[0].pos
            nstep = nxt // b
            for s in [s for s in points if s < nstep]:
                del points[s]
            yield sample, MixState(self.blend.fingerprint, self.world_size, points[nstep], nxt,
                                   worker if nw > 1 else None)

    def _assemble(self, item: _Planned) -> dict[str, Any]:
        parts_t, parts_p = [], []
        for pc in item.loc.pieces:
            blk = self.loader.get(item.src, pc.block)
            parts_t.append(blk.tokens[pc.start:pc.stop])
            parts_p.append(blk.positions[pc.start:pc.stop])
            self.stats.bytes_consumed += (pc.stop - pc.start) / len(blk.tokens) * blk.nbytes_stored
        tokens = np.concatenate(parts_t).astype(np.int64) if len(parts_t) > 1 else parts_t[0].astype(np.int64)
        positions = np.concatenate(parts_p).astype(np.int64) if len(parts_p) > 1 else parts_p[0].astype(np.int64)
        first = item.loc.pieces[0]
        ref = self.refs[item.src][first.block]
        self.stats.samples += 1
        self.stats.samples_per_source[item.src] += 1
        return {
            "tokens": tokens,
            "positions": positions,
            "source": item.src,
            "sample": item.gidx,
            "index": item.index,
            "epoch": item.loc.epoch,
            "shard": ref.shard,
            "block": ref.block,
            "offset": first.start,
        }

    # ---- held-out split ------------------------------------------------------------------
    def validation_samples(self, src: int, count: int) -> list[dict[str, Any]]:
        """The first ``count`` windows (``seq_len + 1`` tokens, stride ``seq_len``) of source
        ``src``'s held-out split, the same in every run that holds out the same split (fewer if
        the split is shorter; none without a split)."""
        holdout = self.blend.sources[src].holdout
        want = count * self.seq_len + 1
        toks, poss, origin = [], [], []
        have = 0
        for block, start, stop in holdout.ranges(self.block_tokens[src]):
            if have >= want:
                break
            blk = self.loader.get(src, block)
            stop = min(stop, start + want - have)
            toks.append(blk.tokens[start:stop])
            poss.append(blk.positions[start:stop])
            origin.append((have, block, start))
            have += stop - start
        if have < self.seq_len + 1:
            return []
        tokens = np.concatenate(toks).astype(np.int64)
        positions = np.concatenate(poss).astype(np.int64)
        out = []
        for i in range(min(count, (have - 1) // self.seq_len)):
            a = i * self.seq_len
            k = max(j for j, o in enumerate(origin) if o[0] <= a)
            _, block, start = origin[k]
            ref = self.refs[src][block]
            out.append({"tokens": tokens[a:a + self.seq_len + 1], "positions": positions[a:a + self.seq_len + 1],
                        "source": src, "sample": -1, "index": i, "epoch": 0, "shard": ref.shard,
                        "block": ref.block, "offset": start + a - origin[k][0]})
        return out

    def epochs(self, counts: tuple[int, ...] | list[int]) -> list[float]:
        """Epochs per source after serving ``counts`` samples of each."""
        return [pk.epochs_for(int(c)) for pk, c in zip(self.packings, counts, strict=True)]

    def close(self) -> None:
        if self._own_loader:
            self.loader.close()
