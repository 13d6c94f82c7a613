"""Peers for `cpt bench mixer --peers`: MosaicML Streaming and LitData on the same tokens.

Runs in .venv-bench (their pins stay out of the project venv). ``prepare`` writes the very
windows our mixer delivered (``windows.npy``: one uint16 row of seq_len + 1 tokens per sample,
saved by bench/mixer_bench.py) in each peer's format on local disk, zstd-compressed like our blocks.
``read SYSTEM`` then times, in this process pinned to one core, the same consumer as ours: each
sample arrives as an array of seq_len + 1 tokens, every 64 are collated into one int64 torch
tensor ``[64, seq_len + 1]``; one untimed pass warms the cache, the median of the timed passes
is printed (tokens per wall second and per CPU second of the process, all threads), one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np


def _row(row: np.ndarray) -> Iterator[np.ndarray]:
    yield row  # litdata.optimize: one item per window


def prepare(windows: Path, work: Path) -> None:
    from litdata import optimize
    from streaming import MDSWriter

    data = np.load(windows, mmap_mode="r")
    with MDSWriter(out=str(work / "mds"), columns={"tokens": "ndarray:uint16"}, compression="zstd") as w:
        for row in data:
            w.write({"tokens": np.ascontiguousarray(row)})
    optimize(fn=_row, inputs=[np.ascontiguousarray(r) for r in data], output_dir=str(work / "litdata"),
             chunk_bytes="64MB", num_workers=1, compression="zstd")


def _mosaic(work: Path, batch: int) -> tuple[Iterable, Callable]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(work / "mds"), shuffle=True, shuffle_seed=1, batch_size=batch)
    return ds, lambda s: s["tokens"]


def _litdata(work: Path, batch: int) -> tuple[Iterable, Callable]:
    import litdata as ld

    ds = ld.StreamingDataset(str(work / "litdata"), shuffle=True, seed=1)
    return ds, lambda s: s


def consume(ds: Iterable, tokens_of: Callable, batch: int) -> tuple[float, float, int]:
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    n, buf = 0, []
    for s in ds:
        buf.append(tokens_of(s))
        if len(buf) == batch:
            n += torch.from_numpy(np.stack(buf, dtype=np.int64)).numel()
            buf = []
    if buf:
        n += torch.from_numpy(np.stack(buf, dtype=np.int64)).numel()
    return time.perf_counter() - t0, time.process_time() - c0, n


def read(system: str, work: Path, passes: int, batch: int) -> dict:
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    make = {"mosaic": _mosaic, "litdata": _litdata}[system]
    ds, tokens_of = make(work, batch)
    consume(ds, tokens_of, batch)  # warm-up pass: the local cache is populated
    walls, cpus = [], []
    for _ in range(passes):
        del ds
        gc.collect()
        ds, tokens_of = make(work, batch)  # a fresh reader each pass, like ours: only disk is warm
        wall, cpu, n = consume(ds, tokens_of, batch)
        walls.append(n / wall)
        cpus.append(n / cpu)
    name = {"mosaic": "MosaicML Streaming", "litdata": "LitData"}[system]
    return {"system": name, "source": "warm local cache", "tok_s": statistics.median(walls),
            "tok_cpu_s": statistics.median(cpus), "tokens_per_pass": n,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--windows", required=True)
    p.add_argument("--work", required=True)
    r = sub.add_parser("read")
    r.add_argument("system", choices=["mosaic", "litdata"])
    r.add_argument("--work", required=True)
    r.add_argument("--passes", type=int, default=3)
    r.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(Path(a.windows), Path(a.work))
        return
    try:
        print(json.dumps(read(a.system, Path(a.work), a.passes, a.batch)), flush=True)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other peer
        print(json.dumps({"system": a.system, "source": f"failed: {type(exc).__name__}: {exc}"[:60],
                          "tok_s": 0.0}), flush=True)


if __name__ == "__main__":
    main()
