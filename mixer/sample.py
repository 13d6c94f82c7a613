"""What the mixer hands out: one :data:`Sample` (a dict of nine keys, the shape the trainer, the
wire format and the JSON/collate paths all rely on), built in one place, :func:`make_sample`.

``tokens`` and ``positions`` are int64 arrays of ``seq_len + 1`` (inputs and labels are the
shifted halves); ``source`` indexes the blend's sources; the rest is provenance: ``sample`` the
global sample index (-1 for a held-out window), ``index`` the source's sample index (the window
number for a held-out window), ``epoch``, and where the first token lives (``shard``, ``block``,
``offset`` in tokens inside that block).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np


class Sample(TypedDict):
    tokens: np.ndarray
    positions: np.ndarray
    source: int
    sample: int
    index: int
    epoch: int
    shard: int
    block: int
    offset: int


def make_sample(tokens: np.ndarray, positions: np.ndarray, source: int, sample: int, index: int, epoch: int,
                shard: int, block: int, offset: int) -> Sample:
    """A :data:`Sample` (a plain dict at run time: the same keys, order and values as ever)."""
    return {"tokens": tokens, "positions": positions, "source": source, "sample": sample, "index": index,
            "epoch": epoch, "shard": shard, "block": block, "offset": offset}
