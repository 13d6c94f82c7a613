"""The trainer's data loader: turns a data source (synthetic or the mixer) into batches.

A data source is an ``IterableDataset`` for one DP rank yielding ``tokens``/``positions``
(``seq_len + 1``) and ``source``, with a tiny global ``state_dict()`` (see
``trainer/synthetic_data.py`` and the mixer issue). :func:`build_source` is the single place the
mixer is plugged in (``data.kind = "mixer"``).

The loader keeps no prefetch of its own, so the source's state after a step is exactly "the
next global step", identical on every rank: checkpoints resume on any DP size dividing the
global batch size (torchtitan's stock loader asserts the DP size is unchanged).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer

from cpt.errors import ConfigError
from trainer.synthetic_data import SyntheticSource


class NullTokenizer(BaseTokenizer):
    """Token ids come pre-tokenized from the data source; torchtitan still builds a tokenizer."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = 0

    def __init__(self, config: Config, tokenizer_path: str | None = None) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        raise NotImplementedError("data arrives tokenized")

    def decode(self, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError("data arrives tokenized")

    def get_vocab_size(self) -> int:
        return self.vocab_size


def build_source(
    cfg: CptDataLoader.Config, *, seq_len: int, global_batch_size: int, rank: int, world_size: int
) -> Any:
    """The data source for one DP rank. The mixer plugs in here."""
    if cfg.kind == "synthetic":
        return SyntheticSource(
            seq_len=seq_len, vocab_size=cfg.vocab_size, global_batch_size=global_batch_size,
            rank=rank, world_size=world_size, seed=cfg.seed, weights=tuple(cfg.weights),
        )
    if cfg.kind == "mixer":
        try:
            import mixer.dataset as mixer_dataset
        except ImportError as exc:
            raise ConfigError(
                f"data.kind=mixer: mixer not available (import mixer.dataset failed: {exc})"
            ) from exc
        if not cfg.blend:
            raise ConfigError("data.kind=mixer needs data.blend (a blend spec file)")
        source = mixer_dataset.MixedDataset(cfg.blend, rank=rank, world_size=world_size)
        if source.seq_len != seq_len:
            raise ConfigError(f"blend {cfg.blend} has seq_len {source.seq_len} but "
                              f"training.seq_len is {seq_len}")
        if source.global_batch_size != global_batch_size:
            raise ConfigError(f"blend {cfg.blend} has global batch size "
                              f"{source.global_batch_size}; set training.global_batch_size="
                              f"{source.global_batch_size}")
        return source
    raise ConfigError(f"data.kind must be 'synthetic' or 'mixer', not {cfg.kind!r}")


def rebase_positions(positions: torch.Tensor) -> torch.Tensor:
    """Make each window's leading document fragment start at position 0.

    A document continuing from the previous window arrives with positions that do not start at
    0 (they may exceed the model's RoPE table, sized to ``seq_len``). RoPE is relative, so
    shifting the fragment to start at 0 changes nothing else; later documents already do.
    """
    starts = torch.cumsum((positions == 0).to(torch.int32), dim=-1)
    return positions - torch.where(starts == 0, positions[..., :1], torch.zeros_like(positions))


def sample_hash(tokens: torch.Tensor) -> int:
    """Sum over samples of a per-sample hash (< 2**31), for checking data continuity."""
    weights = torch.arange(1, tokens.shape[-1] + 1, dtype=torch.int64)
    return int(((tokens * weights).sum(-1) % 2_147_483_629).sum())


class CptDataLoader(BaseDataLoader):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        kind: str = "synthetic"
        blend: str = ""
        seed: int = 0
        vocab_size: int = 256
        weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
        global_batch_size: int = -1  # set by the trainer from training.global_batch_size

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any = None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = None,
    ) -> None:
        global_batch = config.global_batch_size
        if global_batch <= 0:
            global_batch = local_batch_size * dp_world_size
        self.source = build_source(config, seq_len=seq_len, global_batch_size=global_batch,
                                   rank=dp_rank, world_size=dp_world_size)
        self.local_batch_size = local_batch_size
        self.seq_len = seq_len
        self.num_sources = len(self.source.source_names)
        self.tokens_per_source = np.zeros(self.num_sources, dtype=np.int64)
        self.last_sources: np.ndarray = np.zeros(0, dtype=np.int64)
        self.fingerprint = 0  # sum of per-sample hashes; independent of the DP layout
        self.wait_seconds = 0.0
        self._iter: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        self._iter = iter(self.source)
        while True:
            start = time.perf_counter()
            items = [next(self._iter) for _ in range(self.local_batch_size)]
            tokens = torch.from_numpy(np.stack([it["tokens"] for it in items]))
            positions = rebase_positions(
                torch.from_numpy(np.stack([it["positions"] for it in items])))
            sources = np.array([it["source"] for it in items], dtype=np.int64)
            np.add.at(self.tokens_per_source, sources, self.seq_len)
            self.last_sources = sources
            self.fingerprint += sample_hash(tokens)
            self.wait_seconds += time.perf_counter() - start
            yield {"input": tokens[:, :-1], "positions": positions[:, :-1]}, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"source": dict(self.source.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and "source" in state_dict:
            self.source.load_state_dict(state_dict["source"])

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.source, "describe", None)
        if describe is not None:
            info = describe()
        else:
            info = {"kind": type(self.source).__name__, "source_names": self.source.source_names,
                    "seq_len": self.source.seq_len}
            for attr in ("source_versions", "global_batch_size"):
                if hasattr(self.source, attr):
                    info[attr] = getattr(self.source, attr)
        return {**info, "state": self.state_dict()["source"]}
