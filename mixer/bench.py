"""``cpt mix bench`` / ``python -m mixer.bench``: mixer throughput, resume time, memory, I/O.

Builds a synthetic two-source store (new corpus + replay) in a temporary folder and on a local S3
endpoint (moto on 127.0.0.1), then prints one table. Every throughput figure is measured in a
fresh process pinned to one core (``os.sched_setaffinity``), over the same number of samples,
with the same consumer: samples are collated into int64 ``[64, seq_len + 1]`` torch tensors.
``tok/CPU-s`` divides by the process's CPU time (all its threads: read-ahead and decoding
included), which is the per-core figure and does not move when other programs share the core;
``tok/s`` is wall-clock. With ``--peers`` and a ``.venv-bench`` that has mosaicml-streaming and
litdata, the very windows our mixer delivered go through those too (``bench/mixer_peers.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixer.blocks import CacheConfig

if TYPE_CHECKING:  # torch comes with the train extra: imported where a bench runs, not by `cpt --help`
    from mixer.dataset import MixedDataset

BATCH = 64  # samples per collated batch, for every system


def _tokenizer():
    from tokenizers import Tokenizer, models

    from corpus.tokenizer import tokenizer_info

    words = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, 50000)}
    tj = Tokenizer(models.WordLevel(words, unk_token="[UNK]")).to_str().encode()
    return tokenizer_info(tj, "bench-wordlevel"), tj


def build_store(store: str, tokens: int, seed: int = 0) -> dict[str, int]:
    """Publish the synthetic 2-source store (80% ``new``, 20% ``replay``); reports its build time
    on stderr."""
    from corpus.publish import publish_documents
    from corpus.shard_set import PackingConfig

    t0 = time.perf_counter()
    info, tj = _tokenizer()
    rng = np.random.default_rng(seed)
    sizes = {"new": int(tokens * 0.8), "replay": tokens - int(tokens * 0.8)}
    for name, n in sizes.items():
        lens = rng.integers(200, 4000, size=max(1, n // 2100))
        docs = [(f"{name}{j}", rng.integers(2, 50000, size=int(m), dtype=np.uint16)) for j, m in enumerate(lens)]
        publish_documents(store, name, docs, info, tj, PackingConfig(block_tokens=1 << 20, shard_bytes=64 << 20))
        del docs
    print(f"built synthetic store ({tokens / 1e6:.0f}M tokens) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return sizes


def blend_spec(store: str, seq_len: int, gbs: int) -> dict:
    return {"store": store, "seq_len": seq_len, "global_batch_size": gbs, "seed": 1,
            "sources": {"new": {"dataset": "new@latest", "weight": 0.75},
                        "replay": {"dataset": "replay@latest", "weight": 0.25}}}


def collate(tokens: list[np.ndarray]) -> Any:
    """The consumer every system gets: one int64 torch tensor ``[len(tokens), seq_len + 1]``."""
    import torch

    return torch.from_numpy(np.stack(tokens, dtype=np.int64))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_to_one_core() -> int:
    """Pin this process (and the threads it starts) to one core: the last one it may use."""
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def consume(ds: MixedDataset, samples: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens to deliver ``samples`` samples in batches of 64."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    it = iter(ds)
    if ds.batched:  # already collated int64 tensors
        while n < samples * (ds.seq_len + 1):
            n += next(it)["tokens"].numel()
    else:
        buf: list[np.ndarray] = []
        for _ in range(samples):
            buf.append(next(it)["tokens"])
            if len(buf) == BATCH:
                n += collate(buf).numel()
                buf = []
    it.close()
    return time.perf_counter() - t0, time.process_time() - c0, n


def measure(spec: dict, cache: CacheConfig, samples: int, batched: bool, passes: int,
            rank: int = 0, world: int = 1, pin: bool = True) -> dict[str, Any]:
    """In a child process: ``passes`` runs of a fresh dataset; median rates, I/O of the last."""
    from mixer.dataset import MixedDataset

    if pin:
        pin_to_one_core()
    walls, cpus = [], []
    for _ in range(passes):
        ds = MixedDataset(spec, rank, world, cache=cache, batched=batched)
        wall, cpu, n = consume(ds, samples // world)
        walls.append(n / wall)
        cpus.append(n / cpu)
        ds.close(wait=True)  # read-ahead still running is counted too
        stats = ds.stats()
    return {"tok_s": statistics.median(walls), "tok_cpu_s": statistics.median(cpus), "rss_mib": rss_mib(),
            "bytes_fetched": stats["bytes_fetched"], "bytes_consumed": stats["bytes_consumed"],
            "blocks_fetched": stats["blocks_fetched"]}


def in_children(calls: list[tuple]) -> list[dict[str, Any]]:
    """``measure(*args)`` for each of ``calls``, all at once, each in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(calls)) as pool:
        return pool.starmap(measure, calls)


def resume_seconds(spec: dict, step: int) -> float:
    """Time from a checkpointed state at ``step`` to the first sample (O(1) by construction: the
    3:1 blend with G % 4 == 0 returns to zero deficits every step, so its state is exact)."""
    from mixer.dataset import MixedDataset

    ds = MixedDataset(spec, cache=CacheConfig(prefetch_samples=1, prefetch_threads=0))
    g = spec["global_batch_size"]
    st = ds.state_dict() | {"step": step, "next": step * g, "counts": [step * g * 3 // 4, step * g // 4],
                            "deficit": [0, 0]}
    t0 = time.perf_counter()
    ds2 = MixedDataset(spec, cache=CacheConfig(prefetch_samples=1, prefetch_threads=0))
    ds2.load_state_dict(st)
    s = next(iter(ds2))
    assert s["sample"] == step * g
    return time.perf_counter() - t0


def delivered_windows(spec: dict, cache: CacheConfig, samples: int, out: Path) -> None:
    """One cold pass: fills the disk cache and saves the windows delivered (for the peers)."""
    from mixer.dataset import MixedDataset

    ds = MixedDataset(spec, cache=cache)
    it = iter(ds)
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint16, shape=(samples, ds.seq_len + 1))
    for i in range(samples):
        arr[i] = next(it)["tokens"]
    arr.flush()
    it.close()


def run_peers(work: Path, windows: Path, passes: int) -> list[dict]:
    py = Path(".venv-bench/bin/python")
    script = Path("bench/mixer_peers.py")
    if not py.exists() or not script.exists():
        print(f"(peers skipped: {py} or {script} missing; `make bench-mixer` creates them)", file=sys.stderr)
        return []
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def call(*args: str) -> list[dict]:
        out = subprocess.run([str(py), str(script), *args], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"(peers failed: {' '.join(args)}: {out.stderr[-2000:]})", file=sys.stderr)
            return []
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    call("prepare", "--windows", str(windows), "--work", str(work))
    rows = []
    for system in ("mosaic", "litdata"):  # each in a fresh process, pinned to one core
        rows += call("read", system, "--work", str(work), "--passes", str(passes), "--batch", str(BATCH))
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=40_000_000, help="tokens in the synthetic store")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per system (the median is shown)")
    ap.add_argument("--peers", action="store_true", help="also run MosaicML Streaming / LitData (.venv-bench)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixer.bench")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def _row(system: str, path: str, m: dict[str, Any]) -> dict[str, Any]:
    fc = m["bytes_fetched"] / m["bytes_consumed"] if m.get("bytes_consumed") else None
    return {"system": system, "source": path, "tok_s": m["tok_s"], "tok_cpu_s": m.get("tok_cpu_s"),
            "rss_mib": m.get("rss_mib"), "fetched_over_consumed": fc}


def run(args: argparse.Namespace) -> int:
    rows: list[dict] = []
    passes = getattr(args, "passes", 3)
    with tempfile.TemporaryDirectory(prefix="mixbench-") as tmp:
        work = Path(tmp)
        store = str(work / "store")
        build_store(store, args.tokens)
        spec = blend_spec(store, args.seq_len, BATCH)
        cache = CacheConfig(disk_dir=str(work / "cache"), prefetch_samples=BATCH)
        windows = work / "windows.npy"
        delivered_windows(spec, cache, args.samples, windows)  # cold pass: fills the disk cache
        unverified = CacheConfig(disk_dir=cache.disk_dir, prefetch_samples=BATCH, verify=False)
        for batched, cfg, path in ((False, cache, "warm disk cache, sample dicts"),
                                   (True, cache, "warm disk cache, batched"),
                                   (True, unverified, "same, batched, verify=False")):
            m = in_children([(spec, cfg, args.samples, batched, passes)])[0]
            rows.append(_row("moe-cpt mixer", path, m))
        from infra.local_s3 import LocalS3

        with LocalS3() as s3:
            os.environ.update(s3.env())
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put(store + "/", "s3://bench/store/", recursive=True)
            sspec = blend_spec("s3://bench/store", args.seq_len, BATCH)
            m = in_children([(sspec, CacheConfig(disk_dir=str(work / "s3cache"), prefetch_samples=BATCH),
                              args.samples, False, 1)])[0]
            rows.append(_row("moe-cpt mixer", "local S3, cold, 1 rank", m))
            # two ranks of one node sharing one disk cache: each block should be fetched once
            node = CacheConfig(disk_dir=str(work / "nodecache"), prefetch_samples=BATCH)
            ms = in_children([(sspec, node, args.samples, False, 1, r, 2, False) for r in range(2)])
            both = {"tok_s": sum(m["tok_s"] for m in ms), "tok_cpu_s": None,
                    "rss_mib": max(m["rss_mib"] for m in ms),
                    "bytes_fetched": sum(m["bytes_fetched"] for m in ms),
                    "bytes_consumed": sum(m["bytes_consumed"] for m in ms)}
            rows.append(_row("moe-cpt mixer", "local S3, cold, 2 ranks/node", both))
            blocks_node = sum(m["blocks_fetched"] for m in ms)
        r10, r1m = resume_seconds(spec, 10), resume_seconds(spec, 10**6)
        if args.peers:
            rows += run_peers(work, windows, passes)
    print(f"\nmixer bench: seq_len {args.seq_len}, {args.samples} samples ({args.samples * (args.seq_len + 1) / 1e6:.0f}M "
          f"tokens) per run, batches of {BATCH} collated to int64 tensors, each system in its own process "
          f"pinned to 1 core, median of {passes} warm passes ({os.cpu_count()} cores on the machine)\n")
    print(f"| {'system':<20} | {'path':<30} | {'tok/CPU-s':>10} | {'tok/s':>9} | {'peak RSS':>9} | {'fetched/consumed':>16} |")
    print(f"|{'-' * 22}|{'-' * 32}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 18}|")
    for r in rows:
        fc, cpu, rss = r.get("fetched_over_consumed"), r.get("tok_cpu_s"), r.get("rss_mib")
        print(f"| {r['system']:<20} | {r['source']:<30} | {(f'{cpu / 1e6:.1f}M' if cpu else 'n/a'):>10} | "
              f"{r['tok_s'] / 1e6:>8.1f}M | {(f'{rss:.0f} MiB' if rss else 'n/a'):>9} | "
              f"{(f'{fc:.2f}' if fc is not None else 'n/a'):>16} |")
    ours = max(r["tok_cpu_s"] for r in rows[:2])
    print(f"\ntarget >= 20M tokens/s per core from warm cache: {'met' if ours >= 20e6 else 'NOT met'} "
          f"(best default path: {ours / 1e6:.1f}M tok/CPU-s)")
    for r in rows:
        if r["system"] != "moe-cpt mixer" and r.get("tok_cpu_s"):
            print(f"  vs {r['system']}: {ours / r['tok_cpu_s']:.2f}x per CPU-second "
                  f"({'ahead' if ours > r['tok_cpu_s'] else 'behind'})")
    print(f"2 ranks sharing a node's disk cache fetched {blocks_node} blocks from S3 in all "
          f"(fetched/consumed above is for the node: both ranks' bytes)")
    print(f"resume (state -> first sample): step 10: {r10 * 1e3:.1f} ms, step 10^6: {r1m * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
