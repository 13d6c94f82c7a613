"""Download once per node: two ranks, each in its own process, streaming from a real local S3
endpoint through one shared disk cache fetch every needed block once between them."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from tests.support.mixer_store import consume_rank, publish, spec

W = {"new": 0.8, "replay": 0.2}


def _two_ranks(sp: dict, cache_dirs: list[str], samples: int) -> list[dict]:
    with mp.get_context("spawn").Pool(2) as pool:  # both ranks run at the same time
        return pool.starmap(consume_rank, [(sp, r, 2, cache_dirs[r], samples) for r in range(2)])


def test_two_ranks_sharing_a_disk_cache_fetch_each_block_once(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    store = f"{s3_bucket}/store"
    publish(store, "new", 1, 300)
    publish(store, "replay", 2, 100)
    sp = spec(store, W, seq_len=64, gbs=24)
    node = tmp_path / "node-cache"
    shared = _two_ranks(sp, [str(node)] * 2, 150)
    fetched = sum(r["blocks_fetched"] for r in shared)
    files = list(node.glob("*/*.blk"))
    assert fetched == len(files) > 0  # no block came from S3 twice
    used = [set(map(tuple, r["used"])) for r in shared]
    both = used[0] & used[1]
    assert both  # the ranks really needed the same blocks ...
    assert sum(r["disk_hits"] for r in shared) >= len(both)  # ... and one of them read each from disk
    ratio = sum(r["bytes_fetched"] for r in shared) / sum(r["bytes_consumed"] for r in shared)
    # the same two ranks with a cache each: the shared blocks are downloaded twice
    alone = _two_ranks(sp, [str(tmp_path / "rank0"), str(tmp_path / "rank1")], 150)
    assert [r["used"] for r in alone] == [r["used"] for r in shared]
    n_alone = sum(r["blocks_fetched"] for r in alone)
    assert n_alone >= len(used[0]) + len(used[1]) and n_alone > fetched
    ratio_alone = sum(r["bytes_fetched"] for r in alone) / sum(r["bytes_consumed"] for r in alone)
    assert ratio < ratio_alone
