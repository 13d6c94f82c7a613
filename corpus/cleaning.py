"""Cleaning steps (datatrove formatter + filter): unicode normalization, empty/too-short docs."""

from __future__ import annotations

import unicodedata

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter


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
        self.min_chars = max(1, min_chars)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.strip())
        if n == 0:
            return False, "empty"
        if n < self.min_chars:
            return False, "too_short"
        return True
