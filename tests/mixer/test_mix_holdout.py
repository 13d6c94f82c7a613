"""Held-out (validation) split: never trained on, the same in every blend of a version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.dataset import MixedDataset, open_blend
from moe_cpt.mixer.holdout import auto_tokens
from moe_cpt.mixer.spec import blend_from_json
from moe_cpt.mixer.stream import MixStream
from moe_cpt.store import open_dataset
from tests.support.mixer_store import spec


def _held_ranges(ms: MixStream, src: int) -> list[tuple[int, int, int]]:
    return ms.blend.sources[src].holdout.ranges(ms.block_tokens[src])


def test_training_never_reads_held_out_tokens(mix_store: str) -> None:
    blend, dss = open_blend(spec(mix_store, {"replay": 1.0}, seq_len=32, holdout_tokens=1000))
    ms = MixStream(blend, dss, 0, 1)
    ho = blend.sources[0].holdout
    assert ho.tokens >= 1000
    held = _held_ranges(ms, 0)
    pk = ms.packings[0]
    covered = 0
    for j in range(2 * pk.windows_per_epoch):  # two epochs: every training window, twice
        for pc in pk.locate(j).pieces:
            covered += pc.stop - pc.start
            for b, a, z in held:
                assert pc.block != b or pc.stop <= a or pc.start >= z, (j, pc, (b, a, z))
    assert covered == 2 * pk.windows_per_epoch * 33
    # and the training windows use all the rest (less than one window left over per epoch)
    train_tokens = int(ho.train_block_tokens(ms.block_tokens[0]).sum())
    assert train_tokens == dss[0].manifest.n_tokens - ho.tokens
    assert train_tokens - 1 - pk.windows_per_epoch * 32 < 32


def test_split_is_a_property_of_the_version_not_the_blend(mix_store: str) -> None:
    pre, _ = open_blend(spec(mix_store, {"replay": 1.0}, seq_len=64, seed=1))
    cpt, _ = open_blend(spec(mix_store, {"new": 0.95, "replay": 0.05}, seq_len=32, gbs=8, seed=99))
    a, b = pre.sources[0].holdout, cpt.sources[1].holdout
    assert a == b and a.tokens >= auto_tokens(pre.sources[0].n_tokens) > 0
    va = MixStream(pre, open_blend(pre)[1], 0, 1).validation_samples(0, 3)
    vb = MixStream(cpt, open_blend(cpt)[1], 0, 1).validation_samples(1, 3)
    # same held-out tokens; the windows differ only by seq_len
    assert np.array_equal(va[0]["tokens"][:33], vb[0]["tokens"])


def test_validation_samples_are_stored_tokens_starting_at_a_document(mix_store: str) -> None:
    ds = MixedDataset(spec(mix_store, {"new": 0.5, "code": 0.5}, seq_len=40, holdout_tokens=2000))
    for src in range(2):
        samples = ds.validation_samples(src, 5)
        assert len(samples) == 5
        assert samples[0]["positions"][0] == 0  # the split starts at a document start
        opened = open_dataset(mix_store, f"{ds.source_names[src]}@latest")
        for s in samples:
            assert len(s["tokens"]) == 41 and s["source"] == src
            block = opened.read_block(type(next(opened.block_refs()))(s["shard"], s["block"]))
            n = min(41, len(block.tokens) - s["offset"])
            assert np.array_equal(block.tokens[s["offset"]:s["offset"] + n], s["tokens"][:n])
        # consecutive windows overlap by one token (stride seq_len), like training windows
        assert all(a["tokens"][-1] == b["tokens"][0] for a, b in zip(samples, samples[1:], strict=False))
    # asking again gives the same bytes
    again = ds.validation_samples(1, 5)
    assert [s["tokens"].tobytes() for s in again] == [s["tokens"].tobytes() for s in ds.validation_samples(1, 5)]


def test_holdout_zero_trains_on_everything(mix_store: str) -> None:
    ds = MixedDataset(spec(mix_store, {"replay": 1.0}, seq_len=64, holdout_tokens=0))
    assert ds.validation_samples(0, 4) == []
    ms = ds._get_stream()
    assert ms.packings[0].windows_per_epoch == (ds.blend.sources[0].n_tokens - 1) // 64


def test_split_is_pinned_in_the_resolved_blend(mix_store: str) -> None:
    s = spec(mix_store, {"new": 0.9, "replay": 0.1})
    s["sources"]["replay"]["holdout_tokens"] = 500
    blend, _ = open_blend(s)
    d = json.loads(json.dumps(blend.to_json()))
    assert d["sources"][1]["holdout"]["tokens"] >= 500
    again = blend_from_json(d)
    assert again.sources == blend.sources and again.fingerprint == blend.fingerprint
    d["sources"][1]["holdout"]["cut_offset"] += 1
    with pytest.raises(ConfigError, match="modified"):
        blend_from_json(d)


@pytest.mark.parametrize("value, msg", [(-1, "holdout_tokens"), ("most", "holdout_tokens"),
                                        (10**9, "leaves 0 training tokens")])
def test_bad_holdout_fails_up_front(mix_store: str, value, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        open_blend(spec(mix_store, {"replay": 1.0}, holdout_tokens=value))
