"""Where a source's ``j``-th sample lives: epoch, shuffled window, and the block pieces it spans.

Per source and epoch ``e``, blocks are put in a seeded random order and their tokens concatenated
(only the manifest's per-block token counts are needed, no data is read). Sample windows are
``seq_len + 1`` tokens long with a stride of ``seq_len`` (consecutive windows share one token, so
no token is lost to the input/label shift); an epoch holds ``(n_tokens - 1) // seq_len`` windows,
the same number every epoch. The shuffled block order is cut into *shuffle windows* of
``shuffle_blocks`` blocks, and the sample windows starting inside one are visited in a seeded
random order, so a batch mixes documents from many blocks while a rank's working set stays a few
blocks per source. Everything is addressable: sample ``j`` -> (epoch, window) -> token range ->
``(block, start, stop)`` pieces in O(log n_blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_cpt.hashing import sha256_hex
from moe_cpt.mixer.lru import LruCache


def _seed_words(*parts: int | str) -> list[int]:
    """A numpy SeedSequence entropy list from mixed ints/strings (stable across runs)."""
    out = []
    for p in parts:
        out.append(int(sha256_hex(p.encode())[:16], 16) if isinstance(p, str) else int(p))
    return out


@dataclass(frozen=True)
class Piece:
    block: int  # index into the source's block list (manifest order)
    start: int  # token offset inside the block
    stop: int


@dataclass(frozen=True)
class SampleLoc:
    epoch: int
    window: int  # window index inside the epoch's shuffled token stream
    pieces: tuple[Piece, ...]


class _EpochLayout:
    def __init__(self, order: np.ndarray, cum: np.ndarray, chunk_first: np.ndarray):
        self.order = order  # permuted block indices
        self.cum = cum  # cumulative tokens over the permuted order, len n_blocks+1
        self.chunk_first = chunk_first  # first window index of each shuffle chunk, + sentinel


class SourcePacking:
    """Addressing of one source's samples (pure function of the manifest and the seed)."""

    def __init__(self, block_tokens: np.ndarray, seq_len: int, seed: int, key: str, shuffle_blocks: int):
        self.block_tokens = np.asarray(block_tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.key = key
        self.shuffle_blocks = max(1, shuffle_blocks)
        self.n_tokens = int(self.block_tokens.sum())
        self.windows_per_epoch = (self.n_tokens - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise ValueError(f"source {key}: {self.n_tokens} tokens cannot fill one sample of {seq_len + 1}")
        self._epochs: LruCache[int, _EpochLayout] = LruCache(4)
        self._perms: LruCache[tuple[int, int], np.ndarray] = LruCache(64)

    def _rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng(_seed_words(self.seed, self.key, *parts))

    def epoch(self, e: int) -> _EpochLayout:
        return self._epochs.get(e, lambda: self._layout(e))

    def _layout(self, e: int) -> _EpochLayout:
        order = self._rng(e).permutation(len(self.block_tokens))
        cum = np.concatenate([[0], np.cumsum(self.block_tokens[order])])
        starts = cum[:: self.shuffle_blocks][: (len(order) + self.shuffle_blocks - 1) // self.shuffle_blocks]
        first = np.minimum(-(-starts // self.seq_len), self.windows_per_epoch)
        first = np.concatenate([first, [self.windows_per_epoch]])
        return _EpochLayout(order, cum, first)

    def _chunk_perm(self, e: int, c: int, n: int) -> np.ndarray:
        return self._perms.get((e, c), lambda: self._rng(e, c).permutation(n))

    def locate(self, j: int) -> SampleLoc:
        e, q = divmod(int(j), self.windows_per_epoch)
        lay = self.epoch(e)
        c = int(np.searchsorted(lay.chunk_first, q, side="right")) - 1
        first, nxt = int(lay.chunk_first[c]), int(lay.chunk_first[c + 1])
        w = first + int(self._chunk_perm(e, c, nxt - first)[q - first])
        start = w * self.seq_len
        stop = start + self.seq_len + 1
        pieces = []
        b = int(np.searchsorted(lay.cum, start, side="right")) - 1
        pos = start
        while pos < stop:
            b_start, b_stop = int(lay.cum[b]), int(lay.cum[b + 1])
            end = min(stop, b_stop)
            if end > pos:
                pieces.append(Piece(int(lay.order[b]), pos - b_start, end - b_start))
            pos = end
            b += 1
        return SampleLoc(e, w, tuple(pieces))

    def locate_many(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`locate` for many samples at once: ``(epoch, window, block, start, single)``
        arrays, where a window with ``single`` set is ``block[start:start + seq_len + 1]``; the
        others span several blocks (ask :meth:`locate` for their pieces)."""
        js = np.asarray(js, dtype=np.int64)
        epochs, q_all = np.divmod(js, self.windows_per_epoch)
        n = len(js)
        win = np.empty(n, dtype=np.int64)
        blk = np.empty(n, dtype=np.int64)
        start_in = np.empty(n, dtype=np.int64)
        single = np.empty(n, dtype=bool)
        uniq = np.unique(epochs)
        for e in uniq.tolist():
            m = slice(None) if len(uniq) == 1 else epochs == e
            q = q_all[m]
            lay = self.epoch(e)
            c = np.searchsorted(lay.chunk_first, q, side="right") - 1
            w = np.empty_like(q)
            for ci in np.unique(c).tolist():
                mc = c == ci
                first, nxt = int(lay.chunk_first[ci]), int(lay.chunk_first[ci + 1])
                w[mc] = first + self._chunk_perm(e, ci, nxt - first)[q[mc] - first]
            start = w * self.seq_len
            b = np.searchsorted(lay.cum, start, side="right") - 1
            win[m] = w
            blk[m] = lay.order[b]
            start_in[m] = start - lay.cum[b]
            single[m] = start + self.seq_len + 1 <= lay.cum[b + 1]
        return epochs, win, blk, start_in, single

    def epochs_for(self, n_samples: int) -> float:
        return n_samples / self.windows_per_epoch
