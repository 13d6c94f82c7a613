"""One-pass dedup signatures: exact content hash + vectorized one-permutation MinHash.

datatrove's ``MinhashDedupSignature`` hashes every word n-gram in Python and applies 112
permutations to each (``num_buckets * hashes_per_bucket``); its text simplification removes
diacritics one character at a time. Here the same signature files are produced in one pass over
the documents, with numpy doing the per-shingle work in batches of documents:

1. words: lowercase, diacritics stripped (NFD + ``\\p{Mn}``, only for non-ASCII text), digit
   runs -> ``0`` (datatrove's number pattern), split into ``[^\\W_]+`` words (letters/digits).
2. shingles: every run of ``n_grams`` consecutive words, hashed as a polynomial hash mod 2**64 of
   its UTF-8 bytes (words joined by one space) from prefix sums, then a splitmix64 finalizer
   salted with the seed.
3. signature: one-permutation hashing (Li, Owen & Zhang 2012, "One Permutation Hashing"): the
   high 32 bits of a shingle's hash pick one of the K = num_buckets * hashes_per_bucket bins, the
   low 32 bits are its value, each bin keeps its minimum. Empty bins are filled by optimal
   densification (Shrivastava 2017, "Optimal Densification for Fast and Accurate Minwise
   Hashing"): bin i takes the value of the first non-empty bin in a fixed, seeded sequence of
   bins for i. Two documents agree in a bin with probability ~ their Jaccard similarity, as with
   K independent permutations, at one hash per shingle instead of K.

Outputs are datatrove's formats, so its ``MinhashDedupBuckets`` and ``ExactFindDedups`` run on
them unchanged: per bucket ``bucket_XXX/RRRRR.minhash.sig`` (records of ``hashes_per_bucket``
``<u8`` + ``<u4`` document index, sorted), and the exact ``RRRRR.c4_sig`` files written by
datatrove's own ``ExactDedupSignature.save_hashes``. Document indices count the stream this step
sees (readers + cleaning), for both; :mod:`moe_cpt.corpus.minhash_cluster` reconciles the two.

Memory per task: a batch of at most ``batch_bytes`` of text (long documents are cut at
whitespace into pieces of at most ``piece_chars``, their signatures combined by ``min``), plus
per document one exact record (14 bytes) and the sort of one bucket file at the end (the same
as datatrove's signature step).
"""

import unicodedata
from collections.abc import Iterator

import numpy as np
import regex
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature
from datatrove.utils.typeshelper import StatHints

from moe_cpt.corpus.blocks import ends_document, starts_document
from moe_cpt.corpus.config import MinhashSettings

_MARKS = regex.compile(r"\p{Mn}+")
_NON_WORD = regex.compile(r"[^\p{L}\p{N}.,]+")
_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + bytes(range(0x80, 0x100))
# byte class (bytes.translate tables): 0 separator, 1 letter, 2 digit, 3 "." or ","
_CLASS = bytes(1 if c in _LETTERS else 2 if chr(c).isdigit() and c < 0x80 else 3 if c in b".," else 0
               for c in range(256))
_FOLD = bytes(ord("0") if chr(c).isdigit() and c < 0x80 else ord(chr(c).lower()) if 65 <= c <= 90 else c
              for c in range(256))
_WORD_MULT = np.uint64(0xC2B2AE3D27D4EB4F)
_M64 = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
EMPTY = np.uint64(_M64)  # an empty OPH bin (values are < 2**32)


def _splitmix_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def prepare(text: str) -> bytes:
    """UTF-8 bytes to shingle. ASCII text as is (case is folded later, per byte); other text is
    lowercased, loses diacritics (NFD, then marks removed) and has its non-word characters
    (punctuation, symbols in any script) replaced by spaces."""
    if text.isascii():
        return text.encode("ascii")
    t = _NON_WORD.sub(" ", _MARKS.sub("", unicodedata.normalize("NFD", text.lower())))
    return t.encode("utf-8", "replace")


def text_pieces(text: str, piece_chars: int) -> Iterator[str]:
    """``text`` cut at whitespace into pieces of about ``piece_chars`` (no word is split)."""
    start = 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end
    yield text[start:]


class OnePermutationMinhash:
    """Vectorized one-permutation MinHash signatures (K = num_buckets * hashes_per_bucket)."""

    def __init__(self, settings: MinhashSettings):
        self.n = settings.n_grams
        self.k = settings.num_buckets * settings.hashes_per_bucket
        self.salt = np.uint64(_splitmix_int(settings.seed))
        rng = np.random.Generator(np.random.PCG64(settings.seed))
        # densification: for bin i, the bins to borrow from, in order (a seeded permutation)
        self.borrow = np.stack([rng.permutation(self.k) for _ in range(self.k)])
        self._pow = np.ones(1, dtype=np.uint64)  # _MULT**j
        self._ipow = np.ones(1, dtype=np.uint64)  # _MULT**-j

    def _powers(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """MULT**j and MULT**-j for j < length (mod 2**64), grown by doubling and kept."""
        while len(self._pow) < length:
            k = len(self._pow)
            step, inv = np.uint64(pow(_MULT, k, 1 << 64)), np.uint64(pow(_MULT, -k, 1 << 64))
            self._pow = np.concatenate([self._pow, self._pow * step])
            self._ipow = np.concatenate([self._ipow, self._ipow * inv])
        return self._pow[:length], self._ipow[:length]

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of all ``n``-word shingles of each text, and the text index of each.

        Vectorized over the bytes of the whole batch (see :func:`prepare`): words are runs of
        letters/digits (every byte >= 0x80 counts as a letter), and a number (digits with inner
        ``.``/``,``) is the word ``0``. No shingle spans two texts."""
        parts = [prepare(t) for t in texts]
        joined = b" ".join(parts)
        if not joined:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        data = np.frombuffer(joined.translate(_FOLD), dtype=np.uint8)  # lowercase, digits -> "0"
        cls = np.frombuffer(joined.translate(_CLASS), dtype=np.uint8)
        digit = cls == 2
        inner = ((cls[1:-1] == 3) & digit[:-2]) & digit[2:]  # "." or "," inside a number
        digit[1:-1] |= inner
        word = (cls == 1) | digit
        word[1:] &= ~(digit[1:] & digit[:-1])  # a number is its first byte, "0"; the rest separates
        edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        n = self.n
        if len(starts) < n:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        pw, ipw = self._powers(len(data))
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum(data * ipw, out=prefix[1:])
        words = (prefix[ends] - prefix[starts]) * pw[ends - 1]  # sum_j b[j] * MULT**(end-1-j)
        doc_start = np.cumsum([0] + [len(p) + 1 for p in parts[:-1]])
        doc = np.searchsorted(doc_start, starts, side="right") - 1
        m = len(words) - n + 1
        h = words[:m].copy()
        for j in range(1, n):  # polynomial over the n word hashes
            h *= _WORD_MULT
            h += words[j : j + m]
        ok = doc[:m] == doc[n - 1 :]
        h = h[ok]
        h ^= self.salt
        return _mix(h), doc[:m][ok]

    def bin_minima(self, hashes: np.ndarray, slot: np.ndarray, n_slots: int) -> np.ndarray:
        """(n_slots, K) minima of the shingle values per bin; EMPTY where no shingle fell."""
        out = np.full(n_slots * self.k, EMPTY, dtype=np.uint64)
        if len(hashes):
            group = slot.astype(np.uint64) * np.uint64(self.k) + (((hashes >> np.uint64(32)) * np.uint64(self.k)) >> np.uint64(32))
            key = np.sort((group << np.uint64(32)) | (hashes & np.uint64(0xFFFFFFFF)))
            g = key >> np.uint64(32)
            first = np.concatenate([[True], g[1:] != g[:-1]])
            out[g[first].astype(np.int64)] = key[first] & np.uint64(0xFFFFFFFF)
        return out.reshape(n_slots, self.k)

    def densify(self, sigs: np.ndarray) -> np.ndarray:
        """Fill the empty bins of rows that have at least one value (in place); returns the mask
        of rows that have a signature. Bin i takes the value of the first originally non-empty
        bin in ``borrow[i]``."""
        empty = sigs == EMPTY
        has = ~empty.all(axis=1)
        rows = np.flatnonzero(has & empty.any(axis=1))
        if len(rows):
            e, sr = empty[rows], sigs[rows]
            need = e.copy()
            for j in range(self.k):  # a few rounds unless a document has very few shingles
                src = self.borrow[:, j]
                ok = need & ~e[:, src]
                sr[ok] = sr[:, src][ok]
                need &= ~ok
                if not need.any():
                    break
            sigs[rows] = sr
        return has


class DedupSignatures(PipelineStep):
    """Exact hashes and/or MinHash signatures of every document, in one pass (see module doc)."""

    type = "🫂 - DEDUP"
    name = "🎯 one-pass dedup signatures"

    def __init__(self, exact_folder: DataFolderLike | None, exact_config: ExactDedupConfig | None,
                 minhash_folder: DataFolderLike | None, minhash: MinhashSettings,
                 batch_bytes: int = 1 << 20, piece_chars: int = 1 << 20):
        super().__init__()
        self.exact = ExactDedupSignature(exact_folder, exact_config) if exact_folder is not None else None
        self.minhash_folder = get_datafolder(minhash_folder) if minhash_folder is not None else None
        self.settings = minhash
        self.batch_bytes = batch_bytes
        self.piece_chars = piece_chars
        self.record = np.dtype([(f"field{i + 1}", "<u8") for i in range(minhash.hashes_per_bucket)]
                               + [(f"field{minhash.hashes_per_bucket + 1}", "<u4")])

    def _bucket_path(self, b: int, rank: int) -> str:
        return f"bucket_{b:03d}/{rank:05d}.minhash.sig"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        exact_sigs: list[tuple[int, int, int]] = []
        mh = _MinhashWriter(self, rank) if self.minhash_folder is not None else None
        doc_idx = -1  # counts documents: all blocks of a blocked document are one
        hasher = None  # streaming exact hash of a blocked document
        for doc in data:
            with self.track_time():
                first, last = starts_document(doc), ends_document(doc)
                if first:
                    doc_idx += 1
                    self.stat_update(StatHints.total)
                if self.exact is not None:
                    if first and last:
                        exact_sigs.append((self.exact.hash_fc(doc.text), 1, doc_idx))
                    else:
                        hasher = ExactHasher(self.exact.config) if first else hasher
                        hasher.update(doc.text)
                        if last:
                            exact_sigs.append((hasher.intdigest(), 1, doc_idx))
                if mh is not None:
                    mh.add(doc_idx, doc.text, new_document=first)
        with self.track_time():
            if mh is not None:
                mh.close()
            if self.exact is not None:
                self.exact.save_hashes(rank, exact_sigs)


class ExactHasher:
    """datatrove's exact-dedup hash of a text (xxhash64 or xxhash32 of its UTF-8 bytes), fed
    block by block: the same integer as ``ExactDedupSignature.hash_fc`` of the whole text."""

    def __init__(self, config: ExactDedupConfig):
        hc = config.hash_config
        if hc.hash_fc != "xxhash":
            raise ValueError(f"blocked documents need the xxhash exact-dedup hash, not {hc.hash_fc!r}")
        self.h = xxhash.xxh32() if hc.precision == 32 else xxhash.xxh64()

    def update(self, text: str) -> None:
        self.h.update(text.encode("utf-8"))

    def intdigest(self) -> int:
        return self.h.intdigest()


class _MinhashWriter:
    """Batches documents, writes their OPH signatures as datatrove bucket records, sorts at close."""

    def __init__(self, step: DedupSignatures, rank: int):
        self.step, self.rank = step, rank
        s = step.settings
        self.oph = OnePermutationMinhash(s)
        self.buckets, self.per_bucket = s.num_buckets, s.hashes_per_bucket
        self.files = [step.minhash_folder.open(step._bucket_path(b, rank), mode="wb") for b in range(self.buckets)]
        self.segments: list[str] = []  # texts or pieces of texts
        self.seg_slot: list[int] = []
        self.doc_ids: list[int] = []  # document index per slot
        self.partial: np.ndarray | None = None  # running minima of a document cut over batches
        self.nbytes = 0
        self.n_docs = 0

    def add(self, doc_idx: int, text: str, new_document: bool = True) -> None:
        """Add a document's text, or (``new_document=False``) the next block of the last one:
        its shingles then go into the same slot, combined by ``min`` like pieces."""
        if new_document:
            self.doc_ids.append(doc_idx)
        slot = len(self.doc_ids) - 1
        for piece in text_pieces(text, self.step.piece_chars):
            self.segments.append(piece)
            self.seg_slot.append(slot)
            self.nbytes += len(piece)
            if self.nbytes >= self.step.batch_bytes:
                self._flush(done=False)
                slot = 0

    def _flush(self, done: bool) -> None:
        """Compute the batch; all slots but the last are finished documents unless ``done``."""
        if not self.doc_ids:
            return
        hashes, seg = self.oph.shingle_hashes(self.segments)
        slots = np.asarray(self.seg_slot, dtype=np.int64)[seg]
        sigs = self.oph.bin_minima(hashes, slots, len(self.doc_ids))
        if self.partial is not None:
            np.minimum(sigs[0], self.partial, out=sigs[0])
            self.partial = None
        keep_open = not done
        finished = len(self.doc_ids) - (1 if keep_open else 0)
        if keep_open:
            self.partial = sigs[-1].copy()
        self._write(sigs[:finished], self.doc_ids[:finished])
        self.doc_ids = self.doc_ids[finished:]
        self.segments, self.seg_slot, self.nbytes = [], [], 0

    def _write(self, sigs: np.ndarray, doc_ids: list[int]) -> None:
        has = self.oph.densify(sigs)
        sigs, ids = sigs[has], np.asarray(doc_ids, dtype=np.uint32)[has]
        self.n_docs += len(ids)
        for b, f in enumerate(self.files):
            rec = np.empty(len(ids), dtype=self.step.record)
            for j in range(self.per_bucket):
                rec[f"field{j + 1}"] = sigs[:, b * self.per_bucket + j]
            rec[f"field{self.per_bucket + 1}"] = ids
            f.write(rec.tobytes())

    def close(self) -> None:
        self._flush(done=True)
        for f in self.files:
            f.close()
        folder, dtype = self.step.minhash_folder, self.step.record
        for b in range(self.buckets):  # sort each bucket file, as datatrove's signature step does
            path = self.step._bucket_path(b, self.rank)
            with folder.open(path, mode="rb") as f:
                records = np.frombuffer(f.read(), dtype=dtype).copy()
            if len(records) != self.n_docs:
                raise ValueError(f"minhash signatures of bucket {b} rank {self.rank}: "
                                 f"{len(records)} records, expected {self.n_docs}")
            records.sort(order=dtype.names)
            with folder.open(path, mode="wb") as f:
                f.write(records.tobytes())
