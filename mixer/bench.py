"""``cpt mix bench`` / ``python -m mixer.bench``: mixer throughput, resume time, memory, I/O.

Builds a synthetic two-source store (new corpus + replay) in a temporary folder and on a local S3
endpoint (moto on 127.0.0.1), then prints one table. With ``--peers`` and a ``.venv-bench`` that
has mosaicml-streaming and litdata, the same tokens go through those too
(``bench/mixer_peers.py``) and their rows are added.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mixer.blocks import CacheConfig
from mixer.dataset import MixedDataset


def _tokenizer():
    from tokenizers import Tokenizer, models

    from corpus.tokenizer import tokenizer_info

    words = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, 50000)}
    tj = Tokenizer(models.WordLevel(words, unk_token="[UNK]")).to_str().encode()
    return tokenizer_info(tj, "bench-wordlevel"), tj


def build_store(store: str, tokens: int, seed: int = 0) -> dict[str, int]:
    from corpus.publish import publish_documents
    from corpus.shard_set import PackingConfig

    info, tj = _tokenizer()
    rng = np.random.default_rng(seed)
    sizes = {"new": int(tokens * 0.8), "replay": tokens - int(tokens * 0.8)}
    for i, (name, n) in enumerate(sizes.items()):
        lens = rng.integers(200, 4000, size=max(1, n // 2100))
        docs = [(f"{name}{j}", rng.integers(2, 50000, size=int(m), dtype=np.uint16)) for j, m in enumerate(lens)]
        publish_documents(store, name, docs, info, tj, PackingConfig(block_tokens=1 << 20, shard_bytes=64 << 20))
        del docs
        _ = i
    return sizes


def blend_spec(store: str, seq_len: int, gbs: int) -> dict:
    return {"store": store, "seq_len": seq_len, "global_batch_size": gbs, "seed": 1,
            "sources": {"new": {"dataset": "new@latest", "weight": 0.75},
                        "replay": {"dataset": "replay@latest", "weight": 0.25}}}


def consume(ds: MixedDataset, samples: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    it = iter(ds)
    for _ in range(samples):
        n += len(next(it)["tokens"])
    return time.perf_counter() - t0, n


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resume_seconds(spec: dict, step: int) -> float:
    """Time from a checkpointed state at ``step`` to the first sample (O(1) by construction: the
    3:1 blend with G % 4 == 0 returns to zero deficits every step, so its state is exact)."""
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


def run_peers(work: Path, store: str, seq_len: int, samples: int) -> list[dict]:
    py = Path(".venv-bench/bin/python")
    script = Path("bench/mixer_peers.py")
    if not py.exists() or not script.exists():
        print(f"(peers skipped: {py} or {script} missing)", file=sys.stderr)
        return []
    out = subprocess.run([str(py), str(script), "--store", store, "--work", str(work),
                          "--seq-len", str(seq_len), "--samples", str(samples)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if out.returncode:
        print(f"(peers failed: {out.stderr[-2000:]})", file=sys.stderr)
        return []
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=40_000_000, help="tokens in the synthetic store")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--peers", action="store_true", help="also run MosaicML Streaming / LitData (.venv-bench)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixer.bench")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mixbench-") as tmp:
        work = Path(tmp)
        store = str(work / "store")
        t0 = time.perf_counter()
        build_store(store, args.tokens)
        print(f"built synthetic store ({args.tokens / 1e6:.0f}M tokens) in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        spec = blend_spec(store, args.seq_len, 64)
        cache = CacheConfig(disk_dir=str(work / "cache"), prefetch_samples=64)
        # cold pass fills the disk cache; the warm pass reads only from it
        cold = MixedDataset(spec, cache=cache)
        consume(cold, args.samples)
        warm = MixedDataset(spec, cache=cache)
        dt, ntok = consume(warm, args.samples)
        st = warm.stats()
        rows.append({"system": "moe-cpt mixer", "source": "local store, warm disk cache", "tok_s": ntok / dt,
                     "fetched_over_consumed": st["bytes_fetched"] / max(1, st["bytes_consumed"])})
        # local S3
        from infra.local_s3 import LocalS3

        with LocalS3() as s3:
            os.environ.update(s3.env())
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir("bench")
            sstore = "s3://bench/store"
            fs = s3fs.S3FileSystem()
            fs.put(store + "/", sstore + "/", recursive=True)
            sds = MixedDataset(blend_spec(sstore, args.seq_len, 64),
                               cache=CacheConfig(disk_dir=str(work / "s3cache"), prefetch_samples=64))
            dt, ntok = consume(sds, args.samples)
            st = sds.stats()
            rows.append({"system": "moe-cpt mixer", "source": "local S3 (moto), cold cache", "tok_s": ntok / dt,
                         "fetched_over_consumed": st["bytes_fetched"] / max(1, st["bytes_consumed"])})
        r10, r1m = resume_seconds(spec, 10), resume_seconds(spec, 10**6)
        if args.peers:
            rows += run_peers(work, store, args.seq_len, args.samples)
    print(f"\nmixer bench: seq_len {args.seq_len}, {args.samples} samples per run, 1 process "
          f"({os.cpu_count()} cores on the machine)\n")
    print(f"| {'system':<22} | {'source':<32} | {'tokens/s':>12} | {'fetched/consumed':>16} |")
    print(f"|{'-' * 24}|{'-' * 34}|{'-' * 14}|{'-' * 18}|")
    for r in rows:
        fc = r.get("fetched_over_consumed")
        print(f"| {r['system']:<22} | {r['source']:<32} | {r['tok_s'] / 1e6:>10.1f}M | "
              f"{(f'{fc:.2f}' if fc is not None else 'n/a'):>16} |")
    print(f"\nresume (state -> first sample): step 10: {r10 * 1e3:.1f} ms, step 10^6: {r1m * 1e3:.1f} ms")
    print(f"peak RSS of this process: {rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
