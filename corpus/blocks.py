"""Huge documents as *blocks*: several datatrove Documents that together are one document.

A reader turns a document longer than ``BLOCK_CHARS`` characters into blocks of at most that
many characters, each cut just before a whitespace character between two non-space characters
("word| word", see :func:`piece_bounds`). The blocks carry the document's id and metadata plus
``metadata["block"] = i`` (0, 1, ...) and ``metadata["last_block"]``; a document that fits in one
block carries no marks, so it flows exactly as before. Every step after the readers handles a
blocked document as the one document it is (see docs/corpus.md, "Huge documents"), so memory
per worker is bounded by the block, not by the document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from datatrove.data import Document

BLOCK_CHARS = 1 << 20  # a longer document flows as blocks of at most this many characters
CUT_WINDOW = 4096  # how far back from the limit a "word| word" cut is looked for
BLOCK = "block"
LAST = "last_block"


def piece_bounds(text: str, limit: int = BLOCK_CHARS, window: int = CUT_WINDOW) -> list[int]:
    """Where to cut a long text into pieces of at most ``limit`` characters: each cut just
    before a whitespace character that follows a non-space and precedes a non-space ("word|
    word"). Byte-level BPE pre-tokenizers (GPT-2, Llama 3 and the ones
    :func:`moe_cpt.corpus.tokenizer.train_bpe` makes) split there anyway, so the pieces' tokens
    are the whole text's; unicode normalization (NFC/NFKC) never combines across such a place
    (whitespace is a starter that composes with nothing before it). Only a stretch of ``window``
    characters without such a place is cut at the limit itself (tokens may then differ there)."""
    bounds = [0]
    n = len(text)
    while n - bounds[-1] > limit:
        hard = bounds[-1] + limit
        cut = hard
        for i in range(hard, max(bounds[-1] + 1, hard - window), -1):
            if text[i].isspace() and not text[i - 1].isspace() and i + 1 < n and not text[i + 1].isspace():
                cut = i
                break
        bounds.append(cut)
    bounds.append(n)
    return bounds


def text_blocks(segments: Iterable[str], limit: int = BLOCK_CHARS) -> Iterator[str]:
    """The text made of ``segments`` (decoded pieces of any size), re-cut into blocks exactly as
    :func:`piece_bounds` cuts the whole text; holds at most ``limit`` + one segment."""
    buf = ""
    for seg in segments:
        buf += seg
        while len(buf) > limit + 1:  # the character after a cut must be known
            cut = piece_bounds(buf[: limit + 2], limit)[1]
            yield buf[:cut]
            buf = buf[cut:]
    for a, b in _pairs(piece_bounds(buf, limit)):
        yield buf[a:b]


def _pairs(bounds: list[int]) -> Iterator[tuple[int, int]]:
    return zip(bounds[:-1], bounds[1:], strict=True)


def block_documents(segments: Iterable[str], doc_id: str, metadata: dict, limit: int = BLOCK_CHARS) -> Iterator[Document]:
    """One unmarked Document if the text fits in a block, else its marked blocks."""
    blocks = text_blocks(segments, limit)
    cur = next(blocks, "")
    nxt = next(blocks, None)
    if nxt is None:
        yield Document(text=cur, id=doc_id, metadata=metadata)
        return
    i = 0
    for after in blocks:
        yield Document(text=cur, id=doc_id, metadata={**metadata, BLOCK: i, LAST: False})
        i, cur, nxt = i + 1, nxt, after
    yield Document(text=cur, id=doc_id, metadata={**metadata, BLOCK: i, LAST: False})
    yield Document(text=nxt, id=doc_id, metadata={**metadata, BLOCK: i + 1, LAST: True})


def is_block(doc: Document) -> bool:
    return BLOCK in doc.metadata


def starts_document(doc: Document) -> bool:
    """True for a normal document and for the first block of a blocked one."""
    return doc.metadata.get(BLOCK, 0) == 0


def ends_document(doc: Document) -> bool:
    """True for a normal document and for the last block of a blocked one."""
    return doc.metadata.get(LAST, True)
