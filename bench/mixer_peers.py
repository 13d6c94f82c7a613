"""Peers for `cpt mix bench --peers`: MosaicML Streaming and LitData on the same tokens.

Runs in .venv-bench (their pins stay out of the project venv). Reads the bench store's blocks
through the corpus API, writes the same seq_len+1 windows (75% new / 25% replay, like the blend)
in each peer's format on local disk, then times a consumer iterating them from the local cache
(shuffled, 1 process). Prints one JSON line per peer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def windows(store: str, name: str, seq_len: int, n: int) -> np.ndarray:
    from corpus import open_dataset

    ds = open_dataset(store, f"{name}@latest")
    toks = np.concatenate([ds.read_block(r).tokens for r in ds.block_refs()])
    m = min(n, (len(toks) - 1) // seq_len)
    idx = np.arange(m)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return toks[idx].astype(np.uint16)


def bench_mosaic(data: np.ndarray, work: Path) -> dict:
    from streaming import MDSWriter, StreamingDataset

    out = work / "mds"
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16"}, compression="zstd") as w:
        for row in data:
            w.write({"tokens": row})
    ds = StreamingDataset(local=str(out), shuffle=True, shuffle_seed=1, batch_size=64)
    for _ in ds:  # warm: decompress once so the cache is populated
        pass
    t0 = time.perf_counter()
    n = sum(len(s["tokens"]) for s in ds)
    return {"system": "MosaicML Streaming", "source": "local MDS, warm", "tok_s": n / (time.perf_counter() - t0)}


def _row(row: np.ndarray):
    yield row


def bench_litdata(data: np.ndarray, work: Path) -> dict:
    import litdata as ld

    out = work / "litdata"

    ld.optimize(fn=_row, inputs=list(data), output_dir=str(out), chunk_bytes="64MB",
                num_workers=1, compression="zstd")
    ds = ld.StreamingDataset(str(out), shuffle=True, seed=1)
    t0 = time.perf_counter()
    n = sum(len(s) for s in ds)
    return {"system": "LitData", "source": "local optimized, warm", "tok_s": n / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8000)
    a = ap.parse_args()
    n_new, n_rep = a.samples * 3 // 4, a.samples - a.samples * 3 // 4
    data = np.concatenate([windows(a.store, "new", a.seq_len, n_new), windows(a.store, "replay", a.seq_len, n_rep)])
    work = Path(a.work)
    for fn in (bench_mosaic, bench_litdata):
        try:
            print(json.dumps(fn(data, work)), flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other peer
            print(json.dumps({"system": fn.__name__, "source": f"failed: {type(exc).__name__}: {exc}"[:60],
                              "tok_s": 0.0}), flush=True)


if __name__ == "__main__":
    main()
