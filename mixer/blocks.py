"""Getting decoded blocks to the mixer: ranged reads with retries, a bounded disk cache shared by
the processes of a node, a bounded in-memory cache, and read-ahead in threads.

Order of lookup for a block: memory LRU -> disk cache (checksum re-verified) -> object store (one
ranged GET, retried with exponential backoff on transient errors). Disk-cache fills take a
per-block ``flock`` so that the ranks of a node download each block once, not once per rank.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import random
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import xxhash

from moe_cpt.errors import ConfigError, CptError, IntegrityError
from moe_cpt.fs import atomic_write_file
from moe_cpt.store.reader import BlockRef, DatasetVersion
from moe_cpt.store.shard_format import decode_block_into

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class CacheConfig:
    """Where and how much to cache; see docs/mixer.md."""

    disk_dir: str | None = None  # None: no disk cache (memory only)
    disk_bytes: int = 8 << 30  # hard bound of the disk cache (LRU eviction)
    memory_bytes: int = 1 << 30  # bound on decoded blocks held in memory (+ read-ahead)
    prefetch_threads: int = 4
    prefetch_samples: int = 256  # how far ahead (in this worker's samples) blocks are fetched
    prefetch_disk_hits: bool = False  # read ahead blocks already in the disk cache too (spare cores)
    retries: int = 5  # attempts per block before giving up (the only retry layer: moe_cpt.fs.open_fs)
    backoff_s: float = 0.2  # retry delay ceiling: doubles each attempt (capped at 5 s), full jitter
    verify: bool = True


@dataclass
class IOStats:
    bytes_fetched: int = 0  # from the object store / source filesystem
    bytes_disk_hits: int = 0
    blocks_fetched: int = 0
    blocks_disk_hits: int = 0
    blocks_memory_hits: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


@dataclass
class Block:
    tokens: np.ndarray  # as stored (uint16/uint32)
    doc_ends: np.ndarray  # int64: end offset of each document in the block (last == len(tokens))
    nbytes_stored: int  # compressed size (the ranged read)

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.doc_ends.nbytes

    def window_positions(self, start: int, stop: int, out: np.ndarray | None = None,
                         ramp: np.ndarray | None = None) -> np.ndarray:
        """``positions[start:stop]`` as int64 without materializing the block's positions
        (written into ``out`` if given; ``ramp``: an ``arange`` at least that long, reused)."""
        d = self.doc_ends
        lo = int(np.searchsorted(d, start, side="right"))  # document holding token `start`
        hi = int(np.searchsorted(d, stop - 1, side="right"))  # document holding token `stop - 1`
        first = int(d[lo - 1]) if lo else 0
        n = stop - start
        r = ramp[:n] if ramp is not None and len(ramp) >= n else np.arange(n, dtype=np.int64)
        out = np.add(r, start - first, out=out)
        for x in d[lo:hi].tolist():  # documents starting inside the window: restart at 0
            out[x - start:] -= out[x - start]
        return out


_TRANSIENT_NAMES = ("Timeout", "Connect", "Connection", "EndpointConnection", "ServerDisconnected",
                    "ClientPayload", "ReadTimeout", "ResponseStreamingError", "IncompleteRead",
                    "ProtocolError", "ClientOSError", "ServiceUnavailable", "SlowDown", "InternalError")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IntegrityError):
        return False
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    names = [t.__name__ for t in type(exc).__mro__]
    return any(any(n in name for n in _TRANSIENT_NAMES) for name in names)


_TOK_MAGIC = b"CPTTOK1\0"
_TOK_HEAD = struct.Struct("<8sQQQ")  # magic, n_tokens, n_docs, token itemsize
_TOK_DIGEST = 16  # xxh3-128 of everything before it


@dataclass(frozen=True)
class _TokFile:
    parts: tuple[bytes | memoryview, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


def encode_tok(tokens: np.ndarray, doc_ends: np.ndarray) -> _TokFile:
    """A decoded block as one local file: header, tokens (little-endian, padded to 8 bytes),
    int64 document ends, and the xxh3-128 digest of all that (written once per block; readers
    map it and never decompress it again)."""
    tok = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))
    ends = np.ascontiguousarray(doc_ends, dtype="<i8")
    head = _TOK_HEAD.pack(_TOK_MAGIC, len(tok), len(ends), tok.dtype.itemsize)
    pad = b"\0" * (-tok.nbytes % 8)
    parts = [head, memoryview(tok).cast("B"), pad, memoryview(ends).cast("B")]
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return _TokFile((*parts, h.digest()))


def decode_tok(buf: mmap.mmap | bytes, dtype: np.dtype, verify: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """``(tokens, doc_ends)`` viewing ``buf`` (an :func:`encode_tok` file), or None if it is not
    one, holds another dtype, or (``verify``) fails its digest."""
    size = len(buf)
    magic, n_tok, n_docs, itemsize = _TOK_HEAD.unpack_from(buf, 0)
    dt = np.dtype(dtype).newbyteorder("<")
    tok_bytes = n_tok * itemsize
    ends_at = _TOK_HEAD.size + tok_bytes + (-tok_bytes % 8)
    if magic != _TOK_MAGIC or itemsize != dt.itemsize or ends_at + 8 * n_docs + _TOK_DIGEST != size:
        return None
    if verify:
        mv = memoryview(buf)
        ok = xxhash.xxh3_128(mv[:size - _TOK_DIGEST]).digest() == bytes(mv[size - _TOK_DIGEST:])
        mv.release()
        if not ok:
            return None
    tokens = np.frombuffer(buf, dtype=dt, count=n_tok, offset=_TOK_HEAD.size)
    doc_ends = np.frombuffer(buf, dtype="<i8", count=n_docs, offset=ends_at)
    return tokens, doc_ends


def check_private_dir(path: Path) -> None:
    """Refuse a cache folder that another user could write to (decoded copies carry only their
    own digest, which a writer can recompute): it must be ours and not group/world-writable."""
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"mixer cache folder {path} can be written by other users (owner uid {st.st_uid}, "
                          f"mode {stat.filemode(st.st_mode)}); use a private folder (chmod 700)")


class DiskCache:
    """Raw (compressed) block bytes under ``dir``, bounded by ``max_bytes`` (LRU by mtime)."""

    def __init__(self, directory: str, max_bytes: int):
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(self.dir)
        self.max_bytes = max_bytes
        self._approx = self._scan_total()
        self._lock = threading.Lock()

    def _files(self) -> list[Path]:
        return [*self.dir.glob("*/*.blk"), *self.dir.glob("*/*.tok")]

    def _scan_total(self) -> int:
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def path(self, version: str, ref: BlockRef) -> Path:
        return self.dir / version / f"{ref.shard:05d}-{ref.block:06d}.blk"

    def get_into(self, version: str, ref: BlockRef, buf: bytearray) -> memoryview | None:
        """The cached raw block read into ``buf`` (grown if too small): a view of the bytes read,
        valid until ``buf`` is reused; None if the block is not cached."""
        p = self.path(version, ref)
        try:
            f = open(p, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if len(buf) < size:
                buf.extend(bytes(size - len(buf)))
            mv = memoryview(buf)
            n = f.readinto(mv[:size])
        try:
            os.utime(p)
        except OSError:
            pass
        return mv[:n]

    def drop(self, version: str, ref: BlockRef) -> None:
        self.path(version, ref).unlink(missing_ok=True)
        self.decoded_path(version, ref).unlink(missing_ok=True)

    # ---- decoded copies (``.tok``): what a warm reader maps instead of decompressing -------
    def decoded_path(self, version: str, ref: BlockRef) -> Path:
        return self.path(version, ref).with_suffix(".tok")

    def get_decoded(self, version: str, ref: BlockRef, dtype: np.dtype, verify: bool
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(tokens, doc_ends)`` of the decoded copy, memory-mapped read-only (page-cache pages,
        nothing decompressed or copied); None if there is none or it is damaged (then removed)."""
        p = self.decoded_path(version, ref)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < _TOK_HEAD.size + _TOK_DIGEST:
                raise ValueError("too short")
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            os.close(fd)
            p.unlink(missing_ok=True)
            return None
        os.close(fd)
        got = decode_tok(m, dtype, verify)
        if got is None:
            m.close()
            log.warning("dropping damaged decoded copy %s", p)
            p.unlink(missing_ok=True)
            return None
        try:
            os.utime(p)
        except OSError:
            pass
        return got

    def put_decoded(self, version: str, ref: BlockRef, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        data = encode_tok(tokens, doc_ends)
        if len(data) > self.max_bytes:
            return
        self._write(self.decoded_path(version, ref), data.parts, len(data))

    def put(self, version: str, ref: BlockRef, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        p = self.path(version, ref)
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write(p, (data,), len(data))

    def _write(self, p: Path, parts: Iterable[bytes | memoryview], nbytes: int) -> None:
        """Write ``parts`` to ``p`` atomically (a cache: no fsync), then account the bytes and
        evict past the bound."""
        atomic_write_file(p, parts, durable=False)
        with self._lock:
            self._approx += nbytes
            if self._approx > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        files = []
        for f in self._files():
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, f))
        total = sum(s for _, s, _ in files)
        target = int(self.max_bytes * 0.9)
        for _, size, f in sorted(files):
            if total <= target:
                break
            f.unlink(missing_ok=True)
            total -= size
        self._approx = total

    def lock(self, version: str, ref: BlockRef) -> _FileLock:
        p = self.path(version, ref)
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _FileLock(p.with_suffix(".lock"))

    def usage(self) -> int:
        return self._scan_total()


class _FileLock:
    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class BlockLoader:
    """Decoded blocks of the blend's sources, with caches, retries and read-ahead."""

    def __init__(self, sources: list[DatasetVersion], config: CacheConfig | None = None):
        self.sources = sources
        self.config = config or CacheConfig()
        self.stats = IOStats()
        self.disk = DiskCache(self.config.disk_dir, self.config.disk_bytes) if self.config.disk_dir else None
        self._refs = [list(ds.block_refs()) for ds in sources]
        self._mem: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self._mem_bytes = 0
        self._inflight: dict[tuple[int, int], Future] = {}
        self._lock = threading.RLock()  # re-entered when a done-callback runs inline
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._raw_bufs: list[bytearray] = []  # reused read buffers for disk-cache hits, one per concurrent load

    # ---- public --------------------------------------------------------------------------
    def block_nbytes(self, src: int, block: int) -> int:
        ref = self._refs[src][block]
        a, b = self.sources[src].block_record(ref).byte_range
        return b - a

    def get(self, src: int, block: int) -> Block:
        key = (src, block)
        with self._lock:
            blk = self._mem.get(key)
            if blk is not None:
                self._mem.move_to_end(key)
                with self.stats.lock:  # the hot path: no keyword-argument round trip
                    self.stats.blocks_memory_hits += 1
                return blk
            fut = self._inflight.get(key)
        if fut is not None:
            blk = fut.result()
        else:
            blk = self._load(src, block)
        self._remember(key, blk)
        return blk

    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        """Start loading these blocks in the background (bounded by the memory budget)."""
        if self.config.prefetch_threads <= 0:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.prefetch_threads, thread_name_prefix="mixer-fetch")
            self._closed = False
        budget = self.config.memory_bytes // 2
        with self._lock:
            inflight_bytes = sum(self._estimate(k) for k in self._inflight)
            for key in keys:
                if key in self._mem or key in self._inflight:
                    continue
                if self.disk is not None and not self.config.prefetch_disk_hits and self._on_disk(key):
                    continue  # a local read: cheaper inline than handed to a thread on a busy core
                est = self._estimate(key)
                if inflight_bytes + est > budget:
                    break
                inflight_bytes += est
                fut = self._pool.submit(self._load, *key)
                self._inflight[key] = fut
                fut.add_done_callback(lambda f, k=key: self._done(k, f))

    def close(self, wait: bool = False) -> None:
        """Stop read-ahead: queued fetches are cancelled, running ones stop at their next retry
        (``wait``: return once they have, so that the counters are final)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    # ---- internals -----------------------------------------------------------------------
    def _on_disk(self, key: tuple[int, int]) -> bool:
        src, block = key
        return self.disk.path(self.sources[src].version, self._refs[src][block]).exists()

    def _estimate(self, key: tuple[int, int]) -> int:
        src, block = key
        rec = self.sources[src].block_record(self._refs[src][block])
        return rec.n_tokens * self.sources[src].dtype.itemsize + rec.n_docs * 8

    def _done(self, key: tuple[int, int], fut: Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._remember(key, fut.result())

    def _remember(self, key: tuple[int, int], blk: Block) -> None:
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return
            self._mem[key] = blk
            self._mem_bytes += blk.nbytes
            while self._mem_bytes > self.config.memory_bytes // 2 and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= old.nbytes

    def _load(self, src: int, block: int) -> Block:
        ds = self.sources[src]
        ref = self._refs[src][block]
        if self.disk is None:
            return self._fetch_decoded(ds, ref)[1]
        blk = self._decoded_hit(ds, ref)  # no lock: decoded copies are replaced atomically, never changed
        if blk is not None:
            return blk
        with self.disk.lock(ds.version, ref):
            with self._lock:
                buf = self._raw_bufs.pop() if self._raw_bufs else bytearray()
            try:
                raw = self.disk.get_into(ds.version, ref, buf)
                if raw is not None:
                    try:
                        blk = self._decode(ds, ref, raw)
                        self.stats.add(blocks_disk_hits=1, bytes_disk_hits=len(raw))
                        self._put_decoded(ds, ref, blk)
                        return blk
                    except IntegrityError:
                        log.warning("dropping corrupt cached copy of %s", ds.describe(ref))
                        self.disk.drop(ds.version, ref)
                    finally:
                        raw.release()
            finally:
                with self._lock:
                    self._raw_bufs.append(buf)
            raw, blk = self._fetch_decoded(ds, ref)
            self.disk.put(ds.version, ref, raw)
            self._put_decoded(ds, ref, blk)
            return blk

    def _decoded_hit(self, ds: DatasetVersion, ref: BlockRef) -> Block | None:
        got = self.disk.get_decoded(ds.version, ref, ds.dtype, self.config.verify)
        if got is None:
            return None
        tokens, doc_ends = got
        rec = ds.block_record(ref)
        if len(tokens) != rec.n_tokens or len(doc_ends) != rec.n_docs:  # not this block's copy
            self.disk.drop(ds.version, ref)
            return None
        stored = rec.byte_range[1] - rec.byte_range[0]
        self.stats.add(blocks_disk_hits=1, bytes_disk_hits=stored)
        return Block(tokens, doc_ends, stored)

    def _put_decoded(self, ds: DatasetVersion, ref: BlockRef, blk: Block) -> None:
        if not self.config.verify:  # only checked blocks get a decoded copy (later readers trust its digest)
            return
        try:
            self.disk.put_decoded(ds.version, ref, blk.tokens, blk.doc_ends)
        except OSError as exc:  # a full or read-only disk costs speed, not correctness
            log.warning("cannot write the decoded copy of %s: %s", ds.describe(ref), exc)

    def _decode(self, ds: DatasetVersion, ref: BlockRef, raw: bytes | memoryview) -> Block:
        """Decode without intermediate copies (``raw`` may be a reused buffer: nothing kept
        refers to it)."""
        tb = decode_block_into(raw, ds.block_record(ref), ds.dtype, ds.describe(ref), self.config.verify)
        return Block(tb.tokens, np.asarray(tb.doc_ends, dtype=np.int64), len(raw))

    def _fetch_decoded(self, ds: DatasetVersion, ref: BlockRef) -> tuple[bytes, Block]:
        """Fetch and decode; a block failing its checksum is read once more (a torn read), and
        if it fails again the :class:`IntegrityError` naming it goes to the consumer."""
        raw = self._fetch(ds, ref)
        try:
            return raw, self._decode(ds, ref, raw)
        except IntegrityError:
            self.stats.add(retries=1)
            raw = self._fetch(ds, ref)
            return raw, self._decode(ds, ref, raw)

    def _fetch(self, ds: DatasetVersion, ref: BlockRef) -> bytes:
        """One ranged read; transient errors are retried with exponential backoff."""
        def on_retry() -> None:
            if self._closed:
                raise CptError(f"block loader closed while reading {ds.describe(ref)}")
            self.stats.add(retries=1)

        raw = retry_call(lambda: ds.fetch_block_bytes(ref), f"read {ds.describe(ref)} from {ds.store.url}",
                         self.config.retries, self.config.backoff_s, on_retry)
        self.stats.add(bytes_fetched=len(raw), blocks_fetched=1)
        return raw


MAX_BACKOFF_S = 5.0


def jittered(ceiling: float, rng: random.Random | None = None) -> float:
    """A "full jitter" delay, uniform in [0, ``ceiling``] (AWS's recommended backoff: retrying
    clients spread out instead of hitting a recovering server in lockstep)."""
    return (rng or random).uniform(0.0, ceiling)


def retry_call(fn: Callable[[], T], what: str, retries: int = 5, backoff_s: float = 0.2,
               on_retry: Callable[[], None] | None = None) -> T:
    """``fn()``, retrying transient errors (exponential backoff with full jitter: the n-th wait is
    uniform in [0, min(5 s, backoff_s x 2^(n-1))]); after ``retries`` attempts, or on a permanent
    error, a :class:`CptError` saying what could not be done."""
    delay = backoff_s
    attempts = max(1, retries)
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except CptError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise CptError(f"cannot {what}: {type(exc).__name__}: {exc}") from exc
            last = exc
            if attempt < attempts:
                if on_retry:
                    on_retry()
                wait = jittered(delay)
                log.warning("cannot %s (%s), retry %d/%d in %.1fs", what, type(exc).__name__,
                            attempt, attempts - 1, wait)
                time.sleep(wait)
                delay = min(delay * 2, MAX_BACKOFF_S)
    raise CptError(f"cannot {what} after {attempts} attempts: {type(last).__name__}: {last}")
