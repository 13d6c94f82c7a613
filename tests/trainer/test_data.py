"""Synthetic source: determinism, the global sample-order contract, tiny resumable state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import moe_cpt.trainer  # noqa: F401
from moe_cpt.errors import ConfigError
from moe_cpt.trainer.attention import document_causal_mask
from moe_cpt.trainer.data import CptDataLoader, build_source, rebase_positions
from moe_cpt.trainer.synthetic_data import EOS, SyntheticSource, sample


def _take(src: SyntheticSource, n: int) -> list[dict]:
    return list(itertools.islice(iter(src), n))


def _src(rank: int = 0, world: int = 1, g: int = 4) -> SyntheticSource:
    return SyntheticSource(seq_len=32, vocab_size=256, global_batch_size=g, rank=rank,
                           world_size=world, seed=3)


def test_sample_is_pure_and_well_formed() -> None:
    a = sample(3, 17, seq_len=32, vocab_size=256)
    b = sample(3, 17, seq_len=32, vocab_size=256)
    assert np.array_equal(a["tokens"], b["tokens"]) and a["source"] == b["source"]
    assert a["tokens"].dtype == np.int64 and a["tokens"].shape == (33,)
    assert a["positions"].shape == (33,) and a["positions"][0] == 0
    starts = np.flatnonzero(a["positions"] == 0)
    assert np.all(a["tokens"][starts] == EOS)  # each document starts with EOS
    assert not np.array_equal(a["tokens"], sample(4, 17, seq_len=32, vocab_size=256)["tokens"])


def test_global_order_same_for_any_dp_size() -> None:
    single = _take(_src(), 12)  # 3 steps of G=4 on one rank
    ranks = [_take(_src(r, 2), 6) for r in range(2)]  # b = 2 per rank per step
    merged = []
    for step in range(3):
        for r in range(2):
            merged += ranks[r][2 * step : 2 * step + 2]
    assert [s["tokens"].tolist() for s in merged] == [s["tokens"].tolist() for s in single]


def test_state_resumes_on_other_dp_size() -> None:
    src = _src(1, 2)
    _take(src, 4)  # two full steps on rank 1
    state = src.state_dict()
    assert state == {"step": 2, "offset": 0}
    resumed = _src(0, 1)
    resumed.load_state_dict(state)
    expected = _take(_src(), 12)[8:12]
    assert [s["tokens"].tolist() for s in _take(resumed, 4)] == [
        s["tokens"].tolist() for s in expected]


def test_two_sources_mixed_and_validation_per_source() -> None:
    sources = {s["source"] for s in _take(_src(), 64)}
    assert sources == {0, 1}
    val = _src().validation_samples(1, 3)
    assert [s["source"] for s in val] == [1, 1, 1]


def test_loader_batches_and_counts_tokens() -> None:
    cfg = CptDataLoader.Config(vocab_size=256, seed=3, global_batch_size=4)
    loader = CptDataLoader(cfg, dp_world_size=2, dp_rank=0, seq_len=32, local_batch_size=2)
    inputs, labels = next(iter(loader))
    assert inputs["input"].shape == (2, 32) and labels.shape == (2, 32)
    assert torch.equal(inputs["input"][:, 1:], labels[:, :-1])
    assert loader.tokens_per_source.sum() == 64
    assert loader.state_dict() == {"source": {"step": 1, "offset": 0}}


def test_mixer_kind_without_mixer_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "moe_cpt.mixer.dataset", None)  # import fails
    cfg = CptDataLoader.Config(kind="mixer", blend="blend.yaml")
    with pytest.raises(ConfigError, match="mixer not available"):
        build_source(cfg, seq_len=8, global_batch_size=2, rank=0, world_size=1)


def test_rebase_positions_starts_continued_document_at_zero() -> None:
    positions = torch.tensor([[70, 71, 72, 0, 1], [0, 1, 2, 3, 4]])
    assert rebase_positions(positions).tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    mask = document_causal_mask(rebase_positions(positions))[0, 0]
    assert mask[2, :3].all() and not mask[3, :3].any()  # fragment and next doc stay apart


def test_document_causal_mask() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    mask = document_causal_mask(positions)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
