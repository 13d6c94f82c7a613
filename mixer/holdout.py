"""The held-out (validation) split of a dataset version, and the validation windows cut from it.

A source's held-out split is a property of the *version* and the requested size alone (not of
the blend, its seed or seq_len), so a pre-training blend of corpus A and a CPT blend replaying A
hold out exactly the same tokens of A: the validation loss on A measured in both runs is
comparable (forgetting), and neither run ever trains on them.

Rule: blocks are ordered by a permutation seeded by the version id; walking that order from its
end, whole blocks are held out until at least ``tokens`` are; if the last block needed is only
partly needed, it is cut at the last document start before the cut point, so the split holds at
least ``tokens`` (documents never span blocks, so a block start is always a document start). The training side keeps the other
blocks whole and the cut block's head; the split is pinned in the resolved blend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moe_cpt.errors import ConfigError
from moe_cpt.hashing import sha256_hex

AUTO_FRACTION = 100  # auto: 1% of the version's tokens ...
AUTO_MAX_TOKENS = 1 << 20  # ... at most 1 Mi tokens


@dataclass(frozen=True)
class Holdout:
    """Held-out part of one source: whole ``blocks`` plus, if ``cut_block >= 0``, the tokens of
    ``cut_block`` from ``cut_offset`` on (flat block indices in manifest order)."""

    tokens: int = 0
    blocks: tuple[int, ...] = ()
    cut_block: int = -1
    cut_offset: int = 0

    def to_json(self) -> dict[str, object]:
        return {"tokens": self.tokens, "blocks": list(self.blocks),
                "cut_block": self.cut_block, "cut_offset": self.cut_offset}

    @classmethod
    def from_json(cls, d: dict[str, object] | None) -> Holdout:
        if not d:
            return cls()
        return cls(int(d["tokens"]), tuple(int(b) for b in d["blocks"]),  # type: ignore[union-attr]
                   int(d["cut_block"]), int(d["cut_offset"]))  # type: ignore[arg-type]

    def train_block_tokens(self, block_tokens: np.ndarray) -> np.ndarray:
        """Tokens of each block that training may use (0 for held-out blocks)."""
        out = np.array(block_tokens, dtype=np.int64, copy=True)
        if self.blocks:
            out[list(self.blocks)] = 0
        if self.cut_block >= 0:
            out[self.cut_block] = self.cut_offset
        return out

    def ranges(self, block_tokens: np.ndarray) -> list[tuple[int, int, int]]:
        """The held-out token stream as ``(block, start, stop)`` ranges, in a fixed order."""
        out = []
        if self.cut_block >= 0:
            out.append((self.cut_block, self.cut_offset, int(block_tokens[self.cut_block])))
        out += [(b, 0, int(block_tokens[b])) for b in self.blocks]
        return out


def auto_tokens(n_tokens: int) -> int:
    return min(n_tokens // AUTO_FRACTION, AUTO_MAX_TOKENS)


def block_order(version: str, n_blocks: int) -> np.ndarray:
    """The version-seeded block order whose tail is held out."""
    seed = int(sha256_hex(f"holdout:{version}".encode())[:16], 16)
    return np.random.default_rng(seed).permutation(n_blocks)


def choose_holdout(version: str, block_tokens: np.ndarray, tokens: int,
                   doc_starts: Callable[[int], np.ndarray], min_train_tokens: int) -> Holdout:
    """The held-out split of at least ``tokens`` tokens, ending in whole documents.

    ``doc_starts(block)`` gives the document start offsets of one block (read only for the one
    block that is cut). The training part must keep ``min_train_tokens``.
    """
    if tokens <= 0:
        return Holdout()
    block_tokens = np.asarray(block_tokens, dtype=np.int64)
    total = int(block_tokens.sum())
    order = block_order(version, len(block_tokens))
    held: list[int] = []
    acc = 0
    cut_block, cut_offset = -1, 0
    for b in order[::-1]:
        n = int(block_tokens[b])
        if acc + n <= tokens:
            held.append(int(b))
            acc += n
            if acc == tokens:
                break
            continue
        need = tokens - acc
        starts = np.asarray(doc_starts(int(b)), dtype=np.int64)
        offset = int(starts[starts <= n - need][-1])  # the last document start before the cut
        if offset == 0:  # the cut falls inside the block's first document: hold out the block
            held.append(int(b))
            acc += n
        else:  # 0 < offset <= n - need < n
            cut_block, cut_offset = int(b), offset
            acc += n - offset
        break
    if total - acc < min_train_tokens:
        raise ConfigError(
            f"held-out split of {acc} tokens leaves {total - acc} training tokens, fewer than "
            f"one sample of {min_train_tokens}; lower holdout_tokens"
        )
    return Holdout(acc, tuple(sorted(held)), cut_block, cut_offset)
