"""Packing, determinism across ranks/workers, resume, elastic resume and epochs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.blocks import CacheConfig
from moe_cpt.mixer.dataset import MixedDataset, open_blend
from moe_cpt.mixer.state import MixState, Worker
from moe_cpt.mixer.stream import MixStream
from moe_cpt.store import open_dataset
from tests.support.mixer_store import spec

HC = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_BLENDS: dict[str, tuple] = {}


def blend_of(store: str, weights: dict[str, float], **kw):
    key = json.dumps([store, weights, kw], sort_keys=True)
    if key not in _BLENDS:
        _BLENDS[key] = open_blend(spec(store, weights, **kw))
    return _BLENDS[key]


def stream(store, weights, rank=0, world=1, prefetch=8, **kw) -> MixStream:
    blend, dss = blend_of(store, weights, **kw)
    return MixStream(blend, dss, rank, world, CacheConfig(prefetch_samples=prefetch, prefetch_threads=2))


def take(ms: MixStream, n: int, state: MixState | None = None, worker=(0, 1, 0)):
    out, last = [], None
    it = ms.samples(state or ms.initial_state(), worker)
    for _ in range(n):
        s, last = next(it)
        out.append(s)
    return out, last


def key(s: dict) -> tuple:
    return (s["sample"], s["source"], s["tokens"].tobytes(), s["positions"].tobytes())


W3 = {"new": 0.7, "replay": 0.2, "code": 0.1}


def test_samples_are_packed_windows_with_document_positions(mix_store: str) -> None:
    ms = stream(mix_store, W3, seq_len=64)
    samples, _ = take(ms, 300)
    eos = ms.blend.eos_id
    for s in samples:
        t, p = s["tokens"], s["positions"]
        assert t.dtype == np.int64 and p.dtype == np.int64 and len(t) == len(p) == 65
        # a position restarts at 0 exactly after an EOS, and counts up otherwise
        starts = t[:-1] == eos
        assert np.array_equal(p[1:] == 0, starts)
        assert np.array_equal(p[1:][~starts], p[:-1][~starts] + 1)
    # provenance leads back to the stored tokens
    dss = ms.loader.sources
    for s in samples[:40]:
        ds = dss[s["source"]]
        block = ds.read_block(ms.refs[s["source"]][0].__class__(s["shard"], s["block"]))
        n = min(65, len(block.tokens) - s["offset"])
        assert np.array_equal(block.tokens[s["offset"]:s["offset"] + n], s["tokens"][:n])


def test_every_window_of_an_epoch_is_used_once_then_reshuffled(mix_store: str) -> None:
    blend, dss = blend_of(mix_store, W3, seq_len=64)
    ms = MixStream(blend, dss, 0, 1)
    pk = ms.packings[1]  # replay
    P = pk.windows_per_epoch
    ds = open_dataset(mix_store, "replay@latest")
    held = blend.sources[1].holdout.tokens
    assert held > 0 and P == (ds.manifest.n_tokens - held - 1) // 64
    e0 = [pk.locate(j).window for j in range(P)]
    e1 = [pk.locate(j).window for j in range(P, 2 * P)]
    assert sorted(e0) == list(range(P)) == sorted(e1)
    assert e0 != e1
    for j in range(0, 2 * P, 7):
        loc = pk.locate(j)
        assert sum(pc.stop - pc.start for pc in loc.pieces) == 65 and loc.epoch == j // P


def test_epochs_are_counted_and_replay_repeats(mix_store: str) -> None:
    ms = stream(mix_store, {"new": 0.5, "replay": 0.5}, gbs=20)
    P = ms.packings[1].windows_per_epoch
    samples, state = take(ms, 2 * P + 40)
    rep = [s for s in samples if s["source"] == 1]
    assert max(s["epoch"] for s in rep) >= 1
    assert [s["index"] for s in rep] == list(range(len(rep)))
    assert all(s["epoch"] == s["index"] // P for s in rep)
    # the same window comes back in the next epoch, as the same bytes
    first = {(s["index"] % P): s["tokens"].tobytes() for s in rep if s["epoch"] == 0}
    again = [s for s in rep if s["epoch"] == 1]
    assert again and all(first[s["index"] % P] != b"" for s in again)
    assert sorted(first) == list(range(len(first)))


@settings(max_examples=6, deadline=None, suppress_health_check=HC)
@given(st.sampled_from([1, 2, 3, 4, 6, 12]), st.integers(0, 3))
def test_global_sequence_is_identical_for_any_world_size(mix_store: str, world: int, prefetch: int) -> None:
    steps, gbs = 5, 24
    ref, _ = take(stream(mix_store, W3), steps * gbs)
    b = gbs // world
    per_rank = [take(stream(mix_store, W3, r, world, prefetch=prefetch + 1), steps * b)[0] for r in range(world)]
    merged = [per_rank[r][s * b + i] for s in range(steps) for r in range(world) for i in range(b)]
    assert [key(x) for x in merged] == [key(x) for x in ref]
    assert [x["sample"] for x in merged] == list(range(steps * gbs))


@settings(max_examples=5, deadline=None, suppress_health_check=HC)
@given(st.integers(1, 4), st.sampled_from([1, 2, 3, 6]))
def test_loader_workers_deal_chunks_without_changing_the_stream(mix_store: str, nw: int, lb: int) -> None:
    ms_ref = stream(mix_store, W3, 1, 2)
    ref, _ = take(ms_ref, 60)
    per = [take(stream(mix_store, W3, 1, 2), 60, worker=(w, nw, lb))[0] for w in range(nw)]
    merged, i = [], [0] * nw
    for c in range(60 // lb):  # the DataLoader's round-robin over workers
        w = c % nw
        merged += per[w][i[w]:i[w] + lb]
        i[w] += lb
    assert [key(x) for x in merged] == [key(x) for x in ref[:len(merged)]]


@settings(max_examples=8, deadline=None, suppress_health_check=HC)
@given(st.integers(0, 150), st.integers(1, 40))
def test_resume_from_any_point_equals_the_uninterrupted_stream(mix_store: str, cut: int, more: int) -> None:
    full, _ = take(stream(mix_store, W3, 1, 3), cut + more)
    head, state = take(stream(mix_store, W3, 1, 3), cut) if cut else ([], None)
    if state is not None:
        d = state.to_dict()
        assert len(json.dumps(d)) < 1024
        state = MixState.from_dict(json.loads(json.dumps(d)))
    tail, _ = take(stream(mix_store, W3, 1, 3), more, state)
    assert [key(x) for x in head + tail] == [key(x) for x in full]


@settings(max_examples=6, deadline=None, suppress_health_check=HC)
@given(st.sampled_from([1, 2, 3, 4, 6]), st.sampled_from([1, 2, 4, 8, 12]), st.integers(1, 6))
def test_elastic_resume_continues_the_global_sequence(mix_store: str, w_old: int, w_new: int, steps: int) -> None:
    gbs = 24
    ref, _ = take(stream(mix_store, W3), (steps + 3) * gbs)
    b_old, b_new = gbs // w_old, gbs // w_new
    _, state = take(stream(mix_store, W3, w_old - 1, w_old), steps * b_old)  # last rank's state
    per_rank = [take(stream(mix_store, W3, r, w_new), 3 * b_new, MixState.from_dict(state.to_dict()))[0]
                for r in range(w_new)]
    merged = [per_rank[r][s * b_new + i] for s in range(3) for r in range(w_new) for i in range(b_new)]
    assert [key(x) for x in merged] == [key(x) for x in ref[steps * gbs:]]


def test_elastic_resume_mid_step_is_refused(mix_store: str) -> None:
    _, state = take(stream(mix_store, W3, 0, 2), 5)  # b = 12: 5 samples into step 0
    with pytest.raises(ConfigError, match="mid-step"):
        take(stream(mix_store, W3, 0, 4), 1, state)


def test_state_of_another_blend_is_refused(mix_store: str) -> None:
    _, state = take(stream(mix_store, W3), 3)
    with pytest.raises(ConfigError, match="belongs to blend"):
        take(stream(mix_store, {"new": 0.5, "code": 0.5}), 1, state)


def test_malformed_or_inconsistent_states_are_one_config_error_in_process(mix_store: str) -> None:
    """The state check the service answers 400/409 with (tests/mixer/test_mix_service.py) is the
    one the in-process stream and dataset use: a ConfigError line, never a traceback."""
    ms = stream(mix_store, W3, 0, 2)
    _, state = take(ms, 30)
    good = state.to_dict()
    for bad, match in ((good | {"counts": [1, 2, 3]}, "inconsistent mixer state"),
                       (good | {"step": -1}, "inconsistent mixer state"),
                       (good | {"next": 10**15}, "not in step"),
                       (good | {"world_size": 0}, "invalid world size"),
                       (good | {"worker": [1, 2]}, "malformed mixer state worker"),
                       ({"mixer_state": 1}, "malformed mixer state"),
                       (good | {"counts": ["x", 1, 2]}, "malformed mixer state")):
        with pytest.raises(ConfigError, match=match):
            take(stream(mix_store, W3, 0, 2), 1, MixState.from_dict(bad))
    with pytest.raises(ConfigError, match="malformed mixer state"):
        MixedDataset(spec(mix_store, W3)).load_state_dict({"mixer_state": 1, "blend": "x"})
    # a worker state continues with Worker fields or a plain tuple alike
    w_state = take(stream(mix_store, W3, 0, 2), 7, None, (1, 2, 4))[1]
    assert w_state.worker == Worker(1, 2, 4) and w_state.worker.n_workers == 2
    assert MixState.from_dict(json.loads(json.dumps(w_state.to_dict()))) == w_state


def test_world_size_must_divide_global_batch(mix_store: str) -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        stream(mix_store, W3, 0, 5)


def test_torch_dataset_with_stateful_loader_workers_and_resume(mix_store: str) -> None:
    torch = pytest.importorskip("torch")
    from torchdata.stateful_dataloader import StatefulDataLoader

    sp = spec(mix_store, W3)
    ref = MixedDataset(sp, rank=1, world_size=2)
    assert ref.source_names == ["new", "replay", "code"] and ref.seq_len == 64
    it = iter(ref)
    want = [next(it) for _ in range(12 * 6)]
    ds = MixedDataset(sp, rank=1, world_size=2)
    loader = StatefulDataLoader(ds, batch_size=ds.loader_batch_size, num_workers=2)
    got, li = [], iter(loader)
    for _ in range(3):
        got.append(next(li))
    saved = loader.state_dict()
    del li, loader
    loader2 = StatefulDataLoader(MixedDataset(sp, rank=1, world_size=2), batch_size=12, num_workers=2)
    loader2.load_state_dict(saved)
    li2 = iter(loader2)
    for _ in range(3):
        got.append(next(li2))
    del li2, loader2
    tokens = torch.cat([g["tokens"] for g in got]).numpy()
    assert np.array_equal(tokens, np.stack([w["tokens"] for w in want]))
    assert torch.cat([g["sample"] for g in got]).tolist() == [w["sample"] for w in want]
    # an elastic restart from the loader state: merged to a global state, one rank, no workers
    ds1 = MixedDataset(sp, rank=0, world_size=1)
    ds1.load_state_dict(saved)
    nxt = next(iter(ds1))
    assert nxt["sample"] == 3 * 24  # rank 1 had consumed 3 whole steps
