"""A deterministic synthetic token source with the mixer's data-source interface.

Sample ``i`` of the global sequence is a pure function of ``(seed, i)``: a window of
``seq_len + 1`` tokens packed from short documents of one of two "sources", each with a
learnable structure (so loss falls quickly):

* ``counting``: arithmetic progressions ``a, a+d, a+2d, ...`` over the lower half of the vocab;
* ``motifs``: a random 3-6 token motif repeated, over the upper half.

Documents are separated by ``EOS = 0`` at their start; ``positions`` restart at 0 at each
document start. The global sample order follows the data contract: at step ``s`` DP rank ``r``
of ``W`` consumes samples ``s*G + r*b ... s*G + r*b + b - 1`` (``b = G // W``), so the tiny state
(``step``, ``offset``) resumes on any DP size dividing ``G``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

EOS = 0
SOURCE_NAMES: list[str] = ["counting", "motifs"]
_SPLITS = {"train": 0, "val": 1}


def _rng(seed: int, index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _document(rng: np.random.Generator, source: int, vocab_size: int, length: int) -> np.ndarray:
    half = vocab_size // 2
    if source == 0:
        start = rng.integers(1, half)
        step = rng.integers(1, 4)
        body = 1 + (start + step * np.arange(length - 1)) % (half - 1)
    else:
        motif = rng.integers(half, vocab_size, size=rng.integers(3, 7))
        body = np.resize(motif, length - 1)
    return np.concatenate([[EOS], body]).astype(np.int64)


def sample(
    seed: int,
    index: int,
    *,
    seq_len: int,
    vocab_size: int,
    weights: tuple[float, ...] = (0.5, 0.5),
    split: str = "train",
    source: int | None = None,
) -> dict[str, Any]:
    """Global sample ``index``: ``tokens``/``positions`` of length ``seq_len + 1`` and its
    ``source``. ``source`` forces the source (held-out per-source validation batches)."""
    rng = _rng(seed, index, split)
    if source is None:
        source = int(rng.choice(len(weights), p=np.asarray(weights) / sum(weights)))
    n = seq_len + 1
    tokens = np.empty(n, dtype=np.int64)
    positions = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        length = int(rng.integers(8, max(9, seq_len // 2)))
        doc = _document(rng, source, vocab_size, length)
        take = min(length, n - filled)
        tokens[filled : filled + take] = doc[:take]
        positions[filled : filled + take] = np.arange(take)
        filled += take
    return {"tokens": tokens, "positions": positions, "source": source}


class SyntheticSource(IterableDataset):
    """The synthetic data source for DP rank ``rank`` of ``world_size``."""

    def __init__(
        self,
        *,
        seq_len: int,
        vocab_size: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        weights: tuple[float, ...] = (0.5, 0.5),
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not a multiple of DP size {world_size}"
            )
        if len(weights) != len(SOURCE_NAMES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(SOURCE_NAMES)} non-negative numbers")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.weights = tuple(float(w) for w in weights)
        self.source_names = list(SOURCE_NAMES)
        self._step = 0
        self._offset = 0  # samples of the current step this rank has consumed

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    def global_index(self, step: int, offset: int) -> int:
        return step * self.global_batch_size + self.rank * self.per_rank + offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            index = self.global_index(self._step, self._offset)
            item = sample(self.seed, index, seq_len=self.seq_len, vocab_size=self.vocab_size,
                          weights=self.weights)
            self._offset += 1
            if self._offset == self.per_rank:
                self._step += 1
                self._offset = 0
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"step": self._step, "offset": self._offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self._offset = int(state["offset"])
        if self._offset:
            raise ValueError("can only resume at a step boundary (offset must be 0)")

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "seed": self.seed, "weights": list(self.weights),
                "source_names": self.source_names, "vocab_size": self.vocab_size,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size}

    def validation_samples(self, source: int, count: int) -> list[dict[str, Any]]:
        """A fixed held-out batch of ``count`` samples of one source."""
        return [sample(self.seed, i, seq_len=self.seq_len, vocab_size=self.vocab_size,
                       split="val", source=source) for i in range(count)]
