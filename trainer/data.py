"""The trainer's data loader: turns a data source (synthetic or the mixer) into batches.

A data source is an ``IterableDataset`` for one DP rank yielding ``tokens``/``positions``
(``seq_len + 1``) and ``source``, with a tiny global ``state_dict()`` (see
``trainer/synthetic_data.py`` and docs/mixer.md). :func:`build_source` is the single place the
mixer is plugged in (``data.kind = "mixer"``): in-process ``moe_cpt.mixer.dataset.MixedDataset``, or the
mixer service client ``moe_cpt.mixer.service.client.ServiceMixedDataset`` when ``data.service_url`` is set.

The loader keeps no prefetch of its own, so the source's state after a step is exactly "the
next global step", identical on every rank: checkpoints resume on any DP size dividing the
global batch size (torchtitan's stock loader asserts the DP size is unchanged).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer

from moe_cpt.errors import ConfigError
from moe_cpt.trainer.config import DataSection
from moe_cpt.trainer.data_source import DataSource
from moe_cpt.trainer.synthetic_data import SyntheticSource


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


def _mixer_source(cfg: CptDataLoader.Config, rank: int, world_size: int) -> DataSource:
    """The in-process mixer dataset, or the service client when ``service_url`` is set.

    ``cfg.resolved_blend`` (the resolved blend recorded in a run's ``run.json``) takes precedence
    over ``cfg.blend``: a resumed run keeps the pinned dataset versions even if a ref such as
    ``@latest`` moved since.
    """
    spec: Any = cfg.resolved_blend or cfg.blend
    if cfg.service_url:
        token = None
        if cfg.service_token_env:
            token = os.environ.get(cfg.service_token_env)
            if not token:
                raise ConfigError(f"data.service_token_env: environment variable "
                                  f"{cfg.service_token_env} is not set")
        try:
            from moe_cpt.mixer.service.client import ServiceMixedDataset
        except ImportError as exc:
            raise ConfigError(
                f"data.service_url is set but the mixer service client is not available "
                f"(import moe_cpt.mixer.service.client.ServiceMixedDataset failed: {exc})"
            ) from exc
        return ServiceMixedDataset(cfg.service_url, rank=rank, world_size=world_size,
                                   token=token, spec=spec or None)
    try:
        import moe_cpt.mixer.dataset as mixer_dataset
    except ImportError as exc:
        raise ConfigError(
            f"data.kind=mixer: mixer not available (import moe_cpt.mixer.dataset failed: {exc})"
        ) from exc
    if not spec:
        raise ConfigError("data.kind=mixer needs data.blend (a blend spec file) or "
                          "data.service_url (a mixer service)")
    return mixer_dataset.MixedDataset(spec, rank=rank, world_size=world_size)


def check_source_shape(source: Any, *, what: str, seq_len: int, global_batch_size: int,
                       vocab_size: int) -> None:
    """The source must produce what the model was configured for (one clear error otherwise)."""
    if source.seq_len != seq_len:
        raise ConfigError(f"{what} has seq_len {source.seq_len} but training.seq_len is {seq_len}")
    if source.global_batch_size != global_batch_size:
        raise ConfigError(f"{what} has global batch size {source.global_batch_size}; set "
                          f"training.global_batch_size={source.global_batch_size}")
    data_vocab = getattr(getattr(source, "blend", None), "vocab_size", None)
    if data_vocab is not None and int(data_vocab) > vocab_size:
        raise ConfigError(f"{what} was tokenized with a vocabulary of {data_vocab} tokens, more "
                          f"than the model's {vocab_size}; set model.vocab_size={data_vocab}")


def build_source(
    cfg: CptDataLoader.Config, *, seq_len: int, global_batch_size: int, rank: int, world_size: int
) -> DataSource:
    """The data source for one DP rank. The mixer plugs in here."""
    if cfg.kind == "synthetic":
        return SyntheticSource(
            seq_len=seq_len, vocab_size=cfg.vocab_size, global_batch_size=global_batch_size,
            rank=rank, world_size=world_size, seed=cfg.seed, weights=tuple(cfg.weights),
        )
    if cfg.kind == "mixer":
        source = _mixer_source(cfg, rank, world_size)
        what = f"mixer service {cfg.service_url}" if cfg.service_url else f"blend {cfg.blend}"
        check_source_shape(source, what=what, seq_len=seq_len,
                           global_batch_size=global_batch_size, vocab_size=cfg.vocab_size)
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
        # the user-facing defaults live in moe_cpt.trainer.config.DataSection (written once)
        kind: str = DataSection.kind
        blend: str = DataSection.blend
        seed: int = DataSection.seed
        vocab_size: int = 256
        weights: list[float] = field(default_factory=lambda: DataSection().weights)
        service_url: str = DataSection.service_url  # moe_cpt.mixer.service.client.ServiceMixedDataset
        service_token_env: str = DataSection.service_token_env  # env var: the bearer token
        resolved_blend: dict = field(default_factory=dict)  # set on resume from run.json
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
        self.source: DataSource = build_source(config, seq_len=seq_len, global_batch_size=global_batch,
                                   rank=dp_rank, world_size=dp_world_size)
        self.local_batch_size = local_batch_size
        self.seq_len = seq_len
        self.num_sources = len(self.source.source_names)
        self.tokens_per_source = np.zeros(self.num_sources, dtype=np.int64)
        # each yielded batch's sample sources, in order; the trainer pops one per forward (a
        # step fetches all its microbatches before running them). Bounded for consumers
        # that never pop (torchtitan's stock Trainer in the bench).
        self.pending_sources: deque[np.ndarray] = deque(maxlen=256)
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
            self.fingerprint += sample_hash(tokens)
            self.wait_seconds += time.perf_counter() - start
            self.pending_sources.append(sources)
            yield {"input": tokens[:, :-1], "positions": positions[:, :-1]}, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"source": dict(self.source.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and "source" in state_dict:
            self.source.load_state_dict(state_dict["source"])

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "state": self.state_dict()["source"]}
