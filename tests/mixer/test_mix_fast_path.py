"""The warm-cache fast path: decoding into a given buffer, the decoded (``.tok``) copies of the
disk cache, and batch buffers reused only once the consumer dropped them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_cpt.errors import IntegrityError
from moe_cpt.mixer.blocks import BlockLoader, CacheConfig, DiskCache
from moe_cpt.mixer.dataset import MixedDataset
from moe_cpt.mixer.schedule import Knot, MixPoint, WeightSchedule, plan_step
from moe_cpt.store.reader import open_dataset
from moe_cpt.store.shard_format import decode_block, decode_block_into
from tests.support.mixer_store import publish, spec

W = {"new": 0.75, "replay": 0.25}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    s = str(tmp_path_factory.mktemp("fast") / "store")
    publish(s, "new", 1, 300)
    publish(s, "replay", 2, 120)
    return s


def _samples(sp: dict, cache: CacheConfig, n: int) -> list[dict]:
    ds = MixedDataset(sp, cache=cache)
    it = iter(ds)
    out = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
    it.close()
    return out


def test_decode_block_into_matches_decode_block_and_rejects_damage(store: str) -> None:
    ds = open_dataset(store, "new@latest")
    refs = list(ds.block_refs())
    buf = np.empty(max(ds.block_record(r).n_tokens for r in refs) + 7, dtype=ds.dtype)
    for ref in refs:
        raw = ds.fetch_block_bytes(ref)
        rec = ds.block_record(ref)
        want = decode_block(raw, rec, ds.dtype, "x")
        for got in (decode_block_into(raw, rec, ds.dtype, "x"),
                    decode_block_into(bytearray(raw), rec, ds.dtype, "x", out=buf)):
            assert got.tokens.dtype == want.tokens.dtype
            assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.doc_ends, want.doc_ends)
    ref = refs[0]
    raw, rec = bytearray(ds.fetch_block_bytes(ref)), ds.block_record(ref)
    raw[5] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        decode_block_into(raw, rec, ds.dtype, "blk0")
    with pytest.raises(IntegrityError, match="cannot decode|holds"):  # unchecked: zstd or the sizes catch it
        decode_block_into(raw, rec, ds.dtype, "blk0", verify=False)
    with pytest.raises(IntegrityError, match="expected"):
        decode_block_into(bytes(raw[:-1]), rec, ds.dtype, "blk0")
    with pytest.raises(ValueError, match="cannot hold"):
        decode_block_into(ds.fetch_block_bytes(ref), rec, ds.dtype, "blk0", out=buf[:10])


def test_warm_reads_map_decoded_copies_and_survive_damaged_ones(store: str, tmp_path: Path) -> None:
    sp = spec(store, W)
    cache = CacheConfig(disk_dir=str(tmp_path / "cache"), prefetch_samples=24)
    cold = _samples(sp, cache, 200)
    toks = sorted((tmp_path / "cache").glob("*/*.tok"))
    blks = sorted((tmp_path / "cache").glob("*/*.blk"))
    assert toks and [p.stem for p in toks] == [p.stem for p in blks]  # a decoded copy of every cached block
    # damage some decoded copies: a flipped token, a truncated file, garbage
    data = bytearray(toks[0].read_bytes())
    data[40] ^= 0x01
    toks[0].write_bytes(bytes(data))
    if len(toks) > 2:
        toks[1].write_bytes(toks[1].read_bytes()[:-3])
        toks[2].write_bytes(b"not a decoded block at all, but long enough to have a header")
    ds = MixedDataset(sp, cache=cache)
    it = iter(ds)
    warm = [{k: np.array(v) for k, v in next(it).items()} for _ in range(200)]
    it.close()
    st = ds.stats()
    assert st["blocks_fetched"] == 0 and st["blocks_disk_hits"] > 0  # all from the disk cache
    assert len(warm) == len(cold)
    for a, b in zip(cold, warm, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    assert toks[0].exists() and toks[0].read_bytes() != bytes(data)  # rebuilt from the compressed copy


def test_disk_bound_counts_decoded_copies(store: str, tmp_path: Path) -> None:
    ds = open_dataset(store, "new@latest")
    loader = BlockLoader([ds], CacheConfig(disk_dir=str(tmp_path / "c"), disk_bytes=60_000, prefetch_threads=0))
    for b in range(len(list(ds.block_refs()))):
        loader.get(0, b)
    usage = DiskCache(str(tmp_path / "c"), 60_000).usage()
    assert 0 < usage <= 60_000
    assert list((tmp_path / "c").glob("*/*.tok"))


def test_a_batch_held_by_the_consumer_is_never_overwritten(store: str, tmp_path: Path) -> None:
    sp = spec(store, W)
    cache = CacheConfig(disk_dir=str(tmp_path / "cache"))
    ds = MixedDataset(sp, cache=cache, batched=True)
    it = iter(ds)
    kept = [next(it) for _ in range(3)]  # held: their buffers must not be reused
    copies = [{k: v.clone() for k, v in b.items()} for b in kept]
    seen_ptrs = set()
    for _ in range(12):  # dropped right away: their buffers may be reused
        b = next(it)
        seen_ptrs.add(b["tokens"].data_ptr())
        del b
    for b, c in zip(kept, copies, strict=True):
        for k in c:
            assert b[k].equal(c[k]), k
    assert not seen_ptrs & {b["tokens"].data_ptr() for b in kept}
    assert len(seen_ptrs) < 12  # dropped batches' buffers were reused
    it.close()
    # samples are rows of a chunk buffer: one kept sample keeps its values too
    ds2 = MixedDataset(sp, cache=cache)
    it2 = iter(ds2)
    first = next(it2)
    ref_tokens, ref_pos = first["tokens"].copy(), first["positions"].copy()
    for _ in range(24 * 6):
        next(it2)
    assert np.array_equal(first["tokens"], ref_tokens) and np.array_equal(first["positions"], ref_pos)
    it2.close()


def test_memoized_step_plans_equal_plain_ones() -> None:
    sched = WeightSchedule([Knot(0, (0.7, 0.2, 0.1)), Knot(40, (0.2, 0.3, 0.5)), Knot(90, (0.5, 0.25, 0.25))],
                           ["a", "b", "c"])
    memo: dict = {}
    plain = fast = MixPoint.start(3)
    for _ in range(160):  # ramps (new weights each step) and constant stretches (memo hits)
        p, f = plan_step(plain, sched, 24), plan_step(fast, sched, 24, memo)
        assert np.array_equal(p.sources, f.sources) and np.array_equal(p.indices, f.indices)
        assert p.end == f.end
        plain, fast = p.end, f.end
    assert 0 < len(memo) < 160  # some steps were planned from the memo


def test_unchecked_reads_write_no_decoded_copies(store: str, tmp_path: Path) -> None:
    cache = CacheConfig(disk_dir=str(tmp_path / "cache"), verify=False)
    got = _samples(spec(store, W), cache, 50)
    assert len(got) == 50 and list((tmp_path / "cache").glob("*/*.blk"))
    assert not list((tmp_path / "cache").glob("*/*.tok"))  # a later checked reader must not trust them
