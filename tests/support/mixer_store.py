"""Small synthetic datasets for mixer tests (published through the real corpus API)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer, models

from moe_cpt.corpus.publish import publish_documents
from moe_cpt.corpus.shard_writer import PackingConfig
from moe_cpt.store.manifest import TokenizerInfo
from moe_cpt.store.tokenizer import tokenizer_info

VOCAB = 512


def make_tokenizer(vocab: int = VOCAB, tag: str = "a") -> tuple[TokenizerInfo, bytes]:
    words = {"<|endoftext|>": 0, "[UNK]": 1} | {f"{tag}{i}": i for i in range(2, vocab)}
    tj = Tokenizer(models.WordLevel(words, unk_token="[UNK]")).to_str().encode()
    return tokenizer_info(tj, f"test-{tag}"), tj


def make_docs(seed: int, n_docs: int, mean_len: int, vocab: int = VOCAB) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, mean_len // 4), mean_len * 2, size=n_docs)
    return [(f"s{seed}-d{i}", rng.integers(2, vocab, size=int(n), dtype=np.int64)) for i, n in enumerate(lens)]


def publish(store: str, name: str, seed: int, n_docs: int, mean_len: int = 120, block_tokens: int = 1500,
            shard_bytes: int = 6000, tok: tuple[TokenizerInfo, bytes] | None = None) -> str:
    info, tj = tok or make_tokenizer()
    return publish_documents(store, name, make_docs(seed, n_docs, mean_len), info, tj,
                             PackingConfig(block_tokens=block_tokens, shard_bytes=shard_bytes))


def spec(store: str, weights: dict[str, float], seq_len: int = 64, gbs: int = 24, seed: int = 7,
         **extra) -> dict:
    return {"store": store, "seq_len": seq_len, "global_batch_size": gbs, "seed": seed,
            "sources": {n: {"dataset": f"{n}@latest", "weight": w} for n, w in weights.items()}, **extra}


_PROXY = r"""
import asyncio, sys
LISTEN, TARGET = int(sys.argv[1]), int(sys.argv[2])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        sr, sw = await asyncio.open_connection("127.0.0.1", TARGET)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", LISTEN, reuse_address=True)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""


class TcpProxy:
    """A loopback TCP forwarder in its own process: SIGKILL it to make an endpoint vanish (open
    connections reset, new ones refused) while the server behind it keeps its objects."""

    def __init__(self, target_port: int, port: int):
        self.target_port, self.port = target_port, port
        self.proc = None

    def start(self) -> TcpProxy:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROXY, str(self.port), str(self.target_port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout.readline().strip() == b"ready"
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def consume_rank(spec_: dict, rank: int, world: int, cache_dir: str, samples: int) -> dict:
    """One data-parallel rank in its own process (multiprocessing spawn target): consume
    ``samples`` samples through a disk cache at ``cache_dir``; what it used and fetched."""
    # here, not at the top: moe_cpt.mixer.dataset imports torch, and tests/provenance and tests/study use these helpers
    from moe_cpt.mixer.blocks import CacheConfig
    from moe_cpt.mixer.dataset import open_blend
    from moe_cpt.mixer.stream import MixStream

    blend, dss = open_blend(spec_)
    ms = MixStream(blend, dss, rank, world, CacheConfig(disk_dir=cache_dir, prefetch_samples=16))
    it = ms.samples(ms.initial_state())
    used = set()
    for _ in range(samples):
        s, _ = next(it)
        used.add((s["source"], s["shard"], s["block"]))
    it.close()
    ms.close(wait=True)  # reads still running finish first: the counters are final
    st = ms.loader.stats
    return {"used": sorted(used), "blocks_fetched": st.blocks_fetched, "bytes_fetched": st.bytes_fetched,
            "bytes_consumed": ms.stats.bytes_consumed, "disk_hits": st.blocks_disk_hits}
