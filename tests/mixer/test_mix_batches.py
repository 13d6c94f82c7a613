"""The fast paths: per-window positions, collated batches (``MixStream.batches`` and
``MixedDataset(batched=True)``) must give exactly the per-sample stream and its states."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_cpt.mixer.blocks import Block, CacheConfig
from moe_cpt.mixer.dataset import MixedDataset, open_blend
from moe_cpt.mixer.stream import MixStream
from tests.support.mixer_store import spec

W3 = {"new": 0.6, "replay": 0.25, "code": 0.15}
def doc_positions(n_tokens: int, doc_ends: np.ndarray) -> np.ndarray:
    """Reference: position of every token inside its document, for the whole block at once."""
    starts = np.concatenate([[0], np.asarray(doc_ends[:-1], dtype=np.int64)])
    lengths = np.asarray(doc_ends, dtype=np.int64) - starts
    return (np.arange(n_tokens, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)


KEYS = ["tokens", "positions", "source", "sample", "index", "epoch", "shard", "block", "offset"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.data())
def test_window_positions_equal_the_block_positions(lengths: list[int], data: st.DataObject) -> None:
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))  # empty documents included
    n = int(ends[-1])
    if n < 1:
        return
    blk = Block(np.zeros(n, dtype=np.uint16), ends, 0)
    full = doc_positions(n, ends)
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    ramp = np.arange(data.draw(st.sampled_from([0, stop - start, n + 3])), dtype=np.int64)
    got = blk.window_positions(start, stop, None, ramp)
    assert got.dtype == np.int64 and got.tolist() == full[start:stop].tolist()
    out = np.full(stop - start + 2, -1, dtype=np.int64)
    blk.window_positions(start, stop, out[1:-1])
    assert out[1:-1].tolist() == full[start:stop].tolist() and out[0] == out[-1] == -1


def _stream(store: str, rank: int, world: int, **kw) -> MixStream:
    blend, dss = open_blend(spec(store, W3, **kw))
    return MixStream(blend, dss, rank, world, CacheConfig(prefetch_samples=16, prefetch_threads=2))


@pytest.mark.parametrize(("rank", "world", "worker"), [(0, 1, (0, 1, 0)), (1, 2, (0, 1, 0)),
                                                      (2, 3, (1, 2, 4)), (0, 4, (0, 3, 2))])
def test_batches_are_the_samples_collated_with_the_same_states(mix_store: str, rank: int, world: int,
                                                               worker: tuple[int, int, int]) -> None:
    # code blocks of 800 tokens and seq_len 100: many windows span two blocks
    a, b = _stream(mix_store, rank, world, seq_len=100), _stream(mix_store, rank, world, seq_len=100)
    lb = worker[2] or a.local_batch
    samples = a.samples(a.initial_state(), worker)
    n_spanning = 0
    for _, (batch, state) in zip(range(40), b.batches(b.initial_state(), worker), strict=False):
        got = [next(samples) for _ in range(lb)]
        assert batch["tokens"].shape == batch["positions"].shape == (lb, 101)
        for k in KEYS:
            want = np.stack([np.asarray(s[k]) for s, _ in got])
            assert batch[k].dtype == np.int64 and np.array_equal(batch[k], want), k
        assert state == got[-1][1]
        n_spanning += int(sum(s["offset"] + 101 > 800 for s, _ in got if s["source"] == 2))
    assert n_spanning > 0  # the multi-block path was exercised
    assert a.stats.samples_per_source == b.stats.samples_per_source
    assert a.stats.bytes_consumed == pytest.approx(b.stats.bytes_consumed)
    # resuming batches from a state taken after a batch continues the same sequence
    c = _stream(mix_store, rank, world, seq_len=100)
    nxt, _ = next(c.batches(state, worker))
    got = [next(samples)[0] for _ in range(lb)]
    assert nxt["sample"].tolist() == [s["sample"] for s in got]
    for s in (a, b, c):
        s.close()


def test_batched_dataset_with_stateful_loader_and_resume(mix_store: str) -> None:
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    sp = spec(mix_store, W3)
    ref = MixedDataset(sp, rank=1, world_size=2)
    it = iter(ref)
    want = [next(it) for _ in range(12 * 6)]
    ds = MixedDataset(sp, rank=1, world_size=2, batched=True)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=2)
    li = iter(loader)
    got = [next(li) for _ in range(3)]
    saved = loader.state_dict()
    del li, loader
    loader2 = StatefulDataLoader(MixedDataset(sp, rank=1, world_size=2, batched=True), batch_size=None, num_workers=2)
    loader2.load_state_dict(saved)
    li2 = iter(loader2)
    got += [next(li2) for _ in range(3)]
    del li2, loader2
    assert all(isinstance(g["tokens"], torch.Tensor) and g["tokens"].shape == (12, 65) for g in got)
    assert torch.equal(torch.cat([g["tokens"] for g in got]), torch.from_numpy(np.stack([w["tokens"] for w in want])))
    assert torch.cat([g["positions"] for g in got]).numpy().tolist() == [w["positions"].tolist() for w in want]
    assert torch.cat([g["sample"] for g in got]).tolist() == [w["sample"] for w in want]
