"""The mixed sample stream of one data-parallel rank (no torch here): the in-process dataset
(mixer/dataset.py) and the mixer service (mixer/service/) both wrap it.

Global sample order: with global batch ``G`` and ``W`` ranks (``b = G // W``), step ``s`` of rank
``r`` is global samples ``s*G + r*b ... s*G + r*b + b - 1``. A rank's *local position* ``p``
counts its own samples: ``p = s*b + i``. A stream may further be split among ``nw`` loader
workers in chunks of ``lb`` consecutive local positions, dealt round-robin, which is exactly the
order in which ``torch.utils.data.DataLoader(batch_size=lb)`` hands batches back.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.blocks import BlockLoader, CacheConfig
from moe_cpt.mixer.packing import SourcePacking
from moe_cpt.mixer.replay import SeenPacking, source_packing
from moe_cpt.mixer.sample import Sample, make_sample
from moe_cpt.mixer.schedule import MixPoint, StepPlan, WeightSchedule, plan_step
from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.state import MixState, Worker, check_rank, check_state
from moe_cpt.store.reader import BlockRef, DatasetVersion


@dataclass
class StreamStats:
    samples: int = 0
    samples_per_source: list[int] = field(default_factory=list)
    bytes_consumed: float = 0.0  # stored (compressed) bytes of the token ranges delivered


Pieces = tuple[tuple[int, int, int], ...]  # (block, start, stop) token ranges of one window


@dataclass
class _Chunk:
    """``lb`` consecutive local positions of one worker, assigned to sources and located."""

    pos: list[int]
    gidx: list[int]
    src: list[int]
    idx: list[int]
    epoch: list[int]
    pieces: dict[int, Pieces]  # (block, start, stop) ranges of the windows spanning blocks, by row
    keys: list[tuple[int, int]]  # (source, block) needed, in first-use order (read-ahead)
    src_a: np.ndarray  # the same as arrays: source, first block, start in it, and
    block_a: np.ndarray
    start_a: np.ndarray
    single_a: np.ndarray  # whether the window lies inside that block (else: see ``pieces``)


@dataclass(slots=True)
class _Filled:
    """A chunk with its windows written: ``tokens``/``positions`` ``[n, seq_len + 1]``, where
    each window's first token lives, the stored bytes each window accounts for, the position
    after the chunk, the step points its states refer to and the states' ``worker``."""

    chunk: _Chunk
    tokens: np.ndarray
    positions: np.ndarray
    shard: np.ndarray
    block: np.ndarray
    offset: np.ndarray
    consumed: list[float]
    after: int
    points: dict[int, MixPoint]
    worker: Worker | None


class _Planner:
    """Plans one worker's positions chunk by chunk: the steps' source assignment (sequential,
    from the state's :class:`MixPoint`), then where each sample lives (vectorized per source)."""

    def __init__(self, stream: MixStream, state: MixState, worker: Worker):
        self.s = stream
        wid, self.nw, self.lb = worker
        own = state.worker == worker
        self.next_start = state.next if own else state.next + wid * self.lb
        self.point = state.point
        self.plan: StepPlan | None = None
        self.points: dict[int, MixPoint] = {self.point.step: self.point}
        self._memo: dict = {}  # plan_step's: steps with the same weights and deficits choose alike

    def forget_before(self, step: int) -> None:
        for k in [k for k in self.points if k < step]:
            del self.points[k]

    def _plan(self, step: int) -> StepPlan:
        s = self.s
        while self.plan is None or self.plan.step != step:
            if self.point.step > step:
                raise ConfigError(f"mixer state at step {self.point.step} is past the requested step {step}")
            self.plan = plan_step(self.point, s.schedule, s.global_batch, self._memo)
            self.point = self.plan.end
            self.points[self.point.step] = self.point
        return self.plan

    def next_chunk(self) -> _Chunk:
        s, lb = self.s, self.lb
        b, g = s.local_batch, s.global_batch
        c = self.next_start
        self.next_start += self.nw * lb
        pos = np.arange(c, c + lb, dtype=np.int64)
        steps = pos // b
        src = np.empty(lb, dtype=np.int64)
        idx = np.empty(lb, dtype=np.int64)
        gidx = np.empty(lb, dtype=np.int64)
        for step in range(int(steps[0]), int(steps[-1]) + 1):
            m = steps == step
            plan = self._plan(step)
            k = s.rank * b + pos[m] - step * b
            src[m] = plan.sources[k]
            idx[m] = plan.indices[k]
            gidx[m] = step * g + k
        epoch = np.empty(lb, dtype=np.int64)
        block_a = np.empty(lb, dtype=np.int64)
        start_a = np.empty(lb, dtype=np.int64)
        single_a = np.empty(lb, dtype=bool)
        pieces: dict[int, Pieces] = {}  # windows spanning blocks only
        for k_src in np.unique(src).tolist():
            sel = np.flatnonzero(src == k_src)
            pk = s.packings[k_src]
            e, _, blk, start, single = pk.locate_many(idx[sel])
            epoch[sel], block_a[sel], start_a[sel], single_a[sel] = e, blk, start, single
            for i in sel[~single].tolist():
                pieces[i] = tuple((p.block, p.start, p.stop) for p in pk.locate(int(idx[i])).pieces)
        src_l = src.tolist()
        if pieces:
            pairs = [((sk, bl),) if i not in pieces else tuple((sk, p[0]) for p in pieces[i])
                     for i, (sk, bl) in enumerate(zip(src_l, block_a.tolist(), strict=True))]
            keys = list(dict.fromkeys(k for ks in pairs for k in ks))
        else:
            keys = list(dict.fromkeys(zip(src_l, block_a.tolist(), strict=True)))
        return _Chunk(pos.tolist(), gidx.tolist(), src_l, idx.tolist(), epoch.tolist(), pieces, keys,
                      src, block_a, start_a, single_a)


_SPARES = 3  # batch buffers a stream keeps for reuse
_KEY = 1 << 40  # (source, block) -> source * _KEY + block; also the shift between blocks' document ends


def _batch_buffer(spares: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """An int64 array of ``shape`` for the next batch's tokens and positions: one handed out
    before that nobody refers to any more (the consumer dropped that batch: its reference count
    is down to this list's), else a new one. Reusing it saves the kernel mapping and zeroing
    fresh pages for every batch; a batch still held anywhere is never written again."""
    for x in spares:
        if x.shape == shape and sys.getrefcount(x) == 3:  # `spares`, `x`, the argument
            return x
    x = np.empty(shape, dtype=np.int64)
    spares.append(x)
    if len(spares) > _SPARES:
        del spares[0]
    return x


class MixStream:
    """Samples of one rank (optionally one loader worker of it), from a state."""

    def __init__(self, blend: ResolvedBlend, datasets: list[DatasetVersion], rank: int, world_size: int,
                 cache: CacheConfig | None = None, loader: BlockLoader | None = None):
        """``loader``: a :class:`BlockLoader` shared with other streams of the same blend (the
        service shares one between its clients); by default the stream makes its own."""
        g = blend.spec.global_batch_size
        check_rank(rank, world_size, g)
        self.blend = blend
        self.fingerprint = blend.fingerprint  # hashed once: it is in every state
        self.rank = rank
        self.world_size = world_size
        self.global_batch = g
        self.local_batch = g // world_size
        self.seq_len = blend.spec.seq_len
        self._ramp = np.arange(self.seq_len + 1, dtype=np.int64)  # shared by window_positions
        self._ramp_long = self._ramp  # 0, 1, ...: grown to the longest first position + seq_len + 1 seen
        self.schedule: WeightSchedule = blend.spec.weight_schedule()
        self.block_tokens = [ds.block_tokens() for ds in datasets]
        self.packings: list[SourcePacking | SeenPacking] = [  # seen replay: the parent's windows
            source_packing(bt, s.holdout, s.replay, self.seq_len, blend.spec.seed, f"{s.name}:{s.version}",
                           blend.spec.shuffle_blocks)
            for s, bt in zip(blend.sources, self.block_tokens, strict=True)
        ]
        self.refs = [list(ds.block_refs()) for ds in datasets]
        self.cache = cache or CacheConfig()
        self.loader = loader or BlockLoader(datasets, self.cache)
        self._own_loader = loader is None
        self.stats = StreamStats(samples_per_source=[0] * len(datasets))

    # ---- state ---------------------------------------------------------------------------
    def initial_state(self) -> MixState:
        return MixState(self.fingerprint, self.world_size, MixPoint.start(len(self.packings)), 0)

    def check_state(self, state: MixState, worker: Worker | None = None) -> MixState:
        """``state`` checked against this stream's blend and rescaled to its world size
        (:func:`check_state`)."""
        return check_state(state, self.fingerprint, len(self.packings), self.world_size, self.global_batch, worker)

    # ---- iteration ---------------------------------------------------------------------
    def _filled(self, state: MixState, worker: Worker | tuple[int, int, int]) -> Iterator[_Filled]:
        """This worker's chunks from ``state`` (checked), planned (the blocks of the next
        ``prefetch_samples`` samples are being fetched meanwhile) and filled: the one path under
        :meth:`samples` and :meth:`batches`. A chunk's tokens/positions are rows of one array,
        reused only once nothing refers to it (so the consumer drops each :class:`_Filled`
        before it asks for the next)."""
        worker = Worker(*worker)
        worker = worker._replace(batch=worker.batch or self.local_batch)
        state = self.check_state(state, worker)
        wstate = worker if worker.n_workers > 1 else None
        planner = _Planner(self, state, worker)
        ahead: deque[_Chunk] = deque()
        planned = 0
        depth = max(1, self.cache.prefetch_samples)
        spares: list[np.ndarray] = []  # chunk buffers already handed out, reused once dropped
        length = self.seq_len + 1
        while True:
            while len(ahead) < 2 or planned <= depth:
                ch = planner.next_chunk()
                ahead.append(ch)
                planned += len(ch.pos)
                self.loader.prefetch(ch.keys)
            ch = ahead.popleft()
            planned -= len(ch.pos)
            planner.forget_before(ch.pos[0] // self.local_batch)
            tokens, positions = _batch_buffer(spares, (2, len(ch.pos), length))
            shard, block, offset, consumed = self._fill_chunk(ch, tokens, positions)
            filled = _Filled(ch, tokens, positions, shard, block, offset, consumed, ahead[0].pos[0], planner.points,
                             wstate)
            del tokens, positions
            yield filled
            del filled

    def samples(self, state: MixState, worker: Worker | tuple[int, int, int] = (0, 1, 0)
                ) -> Iterator[tuple[Sample, MixState]]:
        """Yield ``(sample, state after it)`` forever, starting at ``state``. A sample's
        ``tokens``/``positions`` are rows of one array holding its loader batch (filled at once,
        as in :meth:`batches`); that array is reused only once no sample of it is referenced.
        ``worker``: this loader worker's share (a ``batch`` of 0: the local batch)."""
        b, fp, ws = self.local_batch, self.fingerprint, self.world_size
        stats = self.stats
        for f in self._filled(state, worker):
            ch, points, wstate, consumed = f.chunk, f.points, f.worker, f.consumed
            tokens, positions = f.tokens, f.positions
            shard, block, offset = f.shard.tolist(), f.block.tolist(), f.offset.tolist()
            n = len(ch.pos)
            for i in range(n):
                src = ch.src[i]
                stats.samples += 1
                stats.samples_per_source[src] += 1
                stats.bytes_consumed += consumed[i]
                sample = make_sample(tokens[i], positions[i], src, ch.gidx[i], ch.idx[i], ch.epoch[i], shard[i],
                                     block[i], offset[i])
                nxt = ch.pos[i + 1] if i + 1 < n else f.after
                yield sample, MixState(fp, ws, points[nxt // b], nxt, wstate)
                del sample
            del f, tokens, positions

    def batches(self, state: MixState, worker: Worker | tuple[int, int, int] = (0, 1, 0)
                ) -> Iterator[tuple[dict[str, np.ndarray], MixState]]:
        """The fast path: yield ``(batch, state after it)`` forever, a batch being the worker's
        next ``lb`` samples (``lb`` = loader batch, default the local batch) collated: the same
        keys as a sample, each an array with a leading batch dimension (``tokens`` and
        ``positions`` int64 ``[lb, seq_len + 1]``). Same samples and states as :meth:`samples`.
        The tokens/positions buffer of a batch is reused only once nothing refers to it."""
        b, fp, ws = self.local_batch, self.fingerprint, self.world_size
        stats = self.stats
        for f in self._filled(state, worker):
            ch = f.chunk
            for src in ch.src:
                stats.samples_per_source[src] += 1
            stats.bytes_consumed += sum(f.consumed)
            stats.samples += len(ch.pos)
            batch = {"tokens": f.tokens, "positions": f.positions, "source": np.asarray(ch.src, dtype=np.int64),
                     "sample": np.asarray(ch.gidx, dtype=np.int64), "index": np.asarray(ch.idx, dtype=np.int64),
                     "epoch": np.asarray(ch.epoch, dtype=np.int64), "shard": f.shard, "block": f.block,
                     "offset": f.offset}
            after = MixState(fp, ws, f.points[f.after // b], f.after, f.worker)
            del f
            yield batch, after
            del batch

    def _fill_chunk(self, ch: _Chunk, tokens: np.ndarray, positions: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
        """Write the chunk's windows into ``tokens``/``positions`` (``[n, seq_len + 1]``): one
        lookup per block, one document search for the whole chunk; ``(shard, block, offset)`` of
        each window's first token and the stored bytes each window accounts for."""
        n = len(ch.pos)
        length = self.seq_len + 1
        offset = ch.start_a.copy()
        shard = np.empty(n, dtype=np.int64)
        block = np.empty(n, dtype=np.int64)
        consumed = np.empty(n, dtype=np.float64)
        rows = np.flatnonzero(ch.single_a)
        if len(rows):
            keys = ch.src_a[rows] * _KEY + ch.block_a[rows]
            uniq, inv = np.unique(keys, return_inverse=True)
            blks, refs = [], []
            for k in uniq.tolist():
                src, bi = divmod(k, _KEY)
                blks.append(self.loader.get(src, bi))
                refs.append(self.refs[src][bi])
            sa = ch.start_a[rows]
            btoks = [b.tokens for b in blks]
            for i, g, st in zip(rows.tolist(), inv.tolist(), sa.tolist(), strict=True):
                tokens[i] = btoks[g][st:st + length]
            # every block's document ends in one sorted array: block g's shifted by g * _KEY
            ends = np.concatenate([b.doc_ends + g * _KEY for g, b in enumerate(blks)])
            first = np.cumsum([0] + [len(b.doc_ends) for b in blks])[:-1]  # where each block's ends start
            q = sa + inv * _KEY
            lo = ends.searchsorted(q, "right")
            hi = ends.searchsorted(q + (length - 1), "right")
            prev = np.where(lo > first[inv], ends[lo - 1] - inv * _KEY, 0)  # start of the first document
            # positions, written once: from the window's first position up to the first document
            # start inside it, then 0, 1, ... per document; each segment a slice of one long ramp,
            # copied between flat int64 memoryviews (a plain copy, far cheaper than a numpy
            # call per segment; there are about as many segments as windows)
            bases = (sa - prev).tolist()
            need = max(bases) + length
            if len(self._ramp_long) < need:
                self._ramp_long = np.arange(max(need, 2 * len(self._ramp_long)), dtype=np.int64)
            pm = memoryview(positions).cast("B").cast("q")
            rm = memoryview(self._ramp_long).cast("B").cast("q")
            cnt = hi - lo  # documents starting inside each window
            has = np.flatnonzero(cnt)
            offs: list[int] = []
            if len(has):
                c = cnt[has]
                idx = np.repeat(lo[has] - np.cumsum(np.concatenate([[0], c[:-1]])), c) + np.arange(int(c.sum()))
                offs = (ends[idx] - np.repeat(q[has], c)).tolist()  # each in [1, length - 1]
            at = 0
            for i, bse, k in zip(rows.tolist(), bases, cnt.tolist(), strict=True):
                r0 = i * length
                if not k:
                    pm[r0:r0 + length] = rm[bse:bse + length]
                    continue
                o = offs[at]
                pm[r0:r0 + o] = rm[bse:bse + o]
                for o_next in offs[at + 1:at + k]:
                    pm[r0 + o:r0 + o_next] = rm[:o_next - o]
                    o = o_next
                pm[r0 + o:r0 + length] = rm[:length - o]
                at += k
            shard[rows] = np.asarray([r.shard for r in refs], dtype=np.int64)[inv]
            block[rows] = np.asarray([r.block for r in refs], dtype=np.int64)[inv]
            consumed[rows] = np.asarray([length / len(b.tokens) * b.nbytes_stored for b in blks])[inv]
        out = consumed.tolist()
        for i in np.flatnonzero(~ch.single_a).tolist():
            ref, out[i] = self._fill(ch.src[i], ch.pieces[i], tokens[i], positions[i])
            shard[i], block[i] = ref.shard, ref.block
        return shard, block, offset, out

    def _fill(self, src: int, pieces: Pieces, tokens: np.ndarray, positions: np.ndarray) -> tuple[BlockRef, float]:
        """Copy one window into ``tokens``/``positions``; the ref of its first block and the
        stored bytes it accounts for."""
        at = 0
        consumed = 0.0
        for block, start, stop in pieces:
            blk = self.loader.get(src, block)
            tokens[at:at + stop - start] = blk.tokens[start:stop]
            blk.window_positions(start, stop, positions[at:at + stop - start], self._ramp)
            at += stop - start
            consumed += (stop - start) / len(blk.tokens) * blk.nbytes_stored
        return self.refs[src][pieces[0][0]], consumed

    # ---- held-out split ------------------------------------------------------------------
    def validation_samples(self, src: int, count: int) -> list[Sample]:
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
            poss.append(blk.window_positions(start, stop))
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
            out.append(make_sample(tokens[a:a + self.seq_len + 1], positions[a:a + self.seq_len + 1], src, -1, i, 0,
                                   ref.shard, ref.block, start + a - origin[k][0]))
        return out

    def epochs(self, counts: tuple[int, ...] | list[int]) -> list[float]:
        """Epochs per source after serving ``counts`` samples of each (for a seen-replay source:
        passes over the parent's consumed windows)."""
        return [pk.epochs_for(int(c)) for pk, c in zip(self.packings, counts, strict=True)]

    def close(self, wait: bool = False) -> None:
        """Stop this stream's read-ahead (``wait``: until running reads have finished)."""
        if self._own_loader:
            self.loader.close(wait)
