"""Deduplication stages: exact (content hash) and near-duplicate (MinHash LSH), on datatrove.

Signatures for both are taken in ONE pass over the documents (:mod:`moe_cpt.corpus.minhash_sigs`,
vectorized one-permutation MinHash, datatrove's file formats); datatrove's ``ExactFindDedups``
and :mod:`moe_cpt.corpus.minhash_buckets` (datatrove's ``MinhashDedupBuckets``, vectorized) find the
duplicates; :mod:`moe_cpt.corpus.minhash_cluster` clusters the MinHash pairs with the exact removals in
view and writes removals that datatrove's filters read:

    front -> DedupSignatures | ExactFindDedups | FastMinhashBuckets | DedupCluster
    front -> ExactBlockFilter -> MinhashBlockFilter -> ...

where ``front`` is readers + cleaning (deterministic, re-run by the final stage). Both filters
(:mod:`moe_cpt.corpus.dedup_filter`, reading datatrove's files) address documents by their index
within a task's stream, counting a huge document's blocks as one; ``DedupCluster`` writes the
MinHash removals in the index space after the exact filter.
"""

import re

from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashConfig
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactFindDedups
from datatrove.utils.word_tokenizers import WordTokenizer

from moe_cpt.corpus.config import DedupConfig
from moe_cpt.corpus.dedup_filter import ExactBlockFilter, MinhashBlockFilter
from moe_cpt.corpus.minhash_buckets import FastMinhashBuckets
from moe_cpt.corpus.minhash_cluster import DedupCluster
from moe_cpt.corpus.minhash_sigs import DedupSignatures
from moe_cpt.fs import join

_WORD = re.compile(r"\w+", re.UNICODE)


class RegexWordTokenizer(WordTokenizer):
    """Language-agnostic word splitter for datatrove's ``MinhashDedupSignature`` (no NLP model).

    Builds used it before :mod:`moe_cpt.corpus.minhash_sigs`; ``bench/minhash_runs.py`` runs datatrove's
    MinHash with it as the baseline that ours is measured against."""

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD.finditer(text)]


def document_text(doc: Document) -> str:
    # datatrove picks the hash function from this annotation: keep it a real type (no
    # `from __future__ import annotations` in this module).
    return doc.text


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_text)


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    m = cfg.minhash
    return MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket, seed=m.seed)


class DedupPlan:
    """Creates the dedup steps for one build, rooted at ``work`` (a URL)."""

    def __init__(self, cfg: DedupConfig, work: str):
        self.cfg = cfg
        self.exact_sigs = join(work, "exact", "sigs")
        self.exact_dups = join(work, "exact", "dups")
        # "minhash-oph", not the "minhash" of builds before one-pass signatures: their document
        # indices counted the stream after the exact filter, so a work folder they left must
        # not be resumed into these steps
        self.mh_sigs = join(work, "minhash-oph", "sigs")
        self.mh_buckets = join(work, "minhash-oph", "buckets")
        self.mh_remove = join(work, "minhash-oph", "remove")

    @property
    def exact(self) -> bool:
        return self.cfg.exact

    @property
    def minhash(self) -> bool:
        return self.cfg.minhash.enabled

    def exact_find(self) -> ExactFindDedups:
        return ExactFindDedups(self.exact_sigs, self.exact_dups, exact_config())

    def exact_filter(self) -> list:
        return [ExactBlockFilter(self.exact_dups)] if self.exact else []

    def signatures(self) -> DedupSignatures:
        """Exact and MinHash signatures in one pass (whichever are enabled)."""
        return DedupSignatures(self.exact_sigs if self.exact else None, exact_config(),
                               self.mh_sigs if self.minhash else None, self.cfg.minhash)

    def cluster(self) -> DedupCluster:
        """Clusters from :meth:`signatures`' MinHash pairs, aware of the exact removals."""
        return DedupCluster(self.mh_buckets, self.mh_remove, self.exact_dups if self.exact else None)

    def minhash_buckets(self) -> FastMinhashBuckets:
        return FastMinhashBuckets(self.mh_sigs, self.mh_buckets, config=minhash_config(self.cfg))

    def minhash_filter(self) -> list:
        return [MinhashBlockFilter(self.mh_remove)] if self.minhash else []
