"""Cleaning steps (datatrove formatter + filter): unicode normalization, empty/too-short docs.

Both are block-aware (:mod:`moe_cpt.corpus.blocks`): the normalizer runs per block (blocks are cut
before whitespace, which NFC/NFKC never combine with what precedes it, so the blocks' forms join
to the whole text's form), and the length filter keeps every block of a blocked document (it is
longer than a block, and ``min_chars`` may not exceed :data:`~moe_cpt.corpus.config.MAX_MIN_CHARS`).
"""

from __future__ import annotations

import unicodedata

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

from moe_cpt.corpus.blocks import is_block, starts_document
from moe_cpt.corpus.config import MAX_MIN_CHARS
from moe_cpt.errors import ConfigError


class UnicodeNormalizer(BaseFormatter):
    """Normalize every document's text to a unicode normal form (NFC by default)."""

    name = "🔤 Unicode normalize"

    def __init__(self, form: str = "NFC"):
        super().__init__()
        self.form = form

    def format(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


class MinCharsFilter(BaseFilter):
    """Drop documents that are empty or shorter than ``min_chars`` after stripping whitespace."""

    name = "📏 Min length"

    def __init__(self, min_chars: int = 1):
        super().__init__()
        if min_chars > MAX_MIN_CHARS:
            raise ConfigError(f"clean.min_chars must be at most {MAX_MIN_CHARS}, got {min_chars}")
        self.min_chars = max(1, min_chars)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if is_block(doc):  # longer than a block, so far longer than min_chars: keep all blocks
                if starts_document(doc):
                    self.stat_update(StatHints.total, StatHints.forwarded)
                yield doc
                continue
            self.stat_update(StatHints.total)
            with self.track_time():
                keep, reason = get_filter_result(self.filter(doc))
            if keep:
                self.stat_update(StatHints.forwarded)
                self.update_doc_stats(doc)
                yield doc
            else:
                self.stat_update(StatHints.dropped, f"dropped_{reason}")

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.strip())
        if n == 0:
            return False, "empty"
        if n < self.min_chars:
            return False, "too_short"
        return True
