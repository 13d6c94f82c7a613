"""``python -m moe_cpt.bench.service_bench`` (= ``cpt bench service``): tokens/s through the mixer
service on loopback vs the in-process mixer, on the same synthetic store and warm caches.

The server runs as a real ``cpt mix serve`` subprocess on 127.0.0.1; rows: in-process
``MixedDataset`` (warm disk cache), one service client, and N concurrent client processes
(ranks of world N, aggregate tokens/s). Every row consumes the same number of samples per client.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=20_000_000, help="tokens in the synthetic store")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4000, help="samples consumed per client and row")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client processes in the last row")


def _consume(it, samples: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for _ in range(samples):
        n += len(next(it)["tokens"])
    return time.perf_counter() - t0, n


def _client_worker(url: str, rank: int, world: int, samples: int, out: mp.Queue) -> None:
    from moe_cpt.mixer.service.client import ServiceMixedDataset

    ds = ServiceMixedDataset(url, rank=rank, world_size=world)
    out.put(_consume(iter(ds), samples))


def start_server(resolved: str, cache_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "moe_cpt.cli", "mix", "serve", resolved, "--port", "0",
                             "--cache-dir", cache_dir], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise RuntimeError(f"mixer service did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_cpt.bench.service_bench", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from moe_cpt.bench.mixer_bench import blend_spec, build_store
    from moe_cpt.mixer.blocks import CacheConfig
    from moe_cpt.mixer.dataset import MixedDataset
    from moe_cpt.mixer.service.client import ServiceMixedDataset
    from moe_cpt.mixer.spec import resolve

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="mixsvcbench-") as tmp:
        work = Path(tmp)
        store = str(work / "store")
        build_store(store, args.tokens)
        blend, _ = resolve(blend_spec(store, args.seq_len, 64))
        resolved = work / "resolved.json"
        resolved.write_text(json.dumps(blend.to_json()))
        cache = CacheConfig(disk_dir=str(work / "cache"), prefetch_samples=64)
        _consume(iter(MixedDataset(blend, cache=cache)), args.samples)  # fills the disk cache
        dt, n = _consume(iter(MixedDataset(blend, cache=cache)), args.samples)
        rows.append(("in-process MixedDataset, warm disk cache", n / dt))
        proc, url = start_server(str(resolved), str(work / "svc-cache"))
        try:
            _consume(iter(ServiceMixedDataset(url)), args.samples)  # warms the server's caches
            ds = ServiceMixedDataset(url)
            dt, n = _consume(iter(ds), args.samples)
            rows.append(("service, 1 client, loopback", n / dt))
            mbps = ds.stats()["bytes_received"] / dt / 1e6
            ctx = mp.get_context("fork")
            q: mp.Queue = ctx.Queue()
            k = args.clients
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_client_worker, args=(url, r, k, args.samples, q)) for r in range(k)]
            for p in procs:
                p.start()
            results = [q.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            wall = time.perf_counter() - t0
            rows.append((f"service, {k} client processes (aggregate)", sum(r[1] for r in results) / wall))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nmixer service bench: seq_len {args.seq_len}, {args.samples} samples per client, "
          f"{os.cpu_count()} cores\n")
    print(f"| {'path':<44} | {'tokens/s':>10} | {'vs in-process':>13} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 15}|")
    for name, tps in rows:
        print(f"| {name:<44} | {tps / 1e6:>9.1f}M | {tps / rows[0][1]:>12.2f}x |")
    print(f"\nwire bytes per token (1 client): {mbps * 1e6 / rows[1][1]:.2f} "
          f"({mbps:.0f} MB/s on loopback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
