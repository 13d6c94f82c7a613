"""A blend's first samples decoded to text, with where each came from (``cpt mix inspect --decode``).

The samples are the blend's global order (rank 0 of a world of 1 sees every sample, in the order
the ranks of a run split them). Each window is ``seq_len + 1`` tokens of one source; it may span
several blocks (its pieces) and documents; each document is named by its index row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_cpt.mixer.spec import ResolvedBlend
from moe_cpt.mixer.stream import MixStream
from moe_cpt.store.documents import DocumentIndex
from moe_cpt.store.reader import BlockRef, DatasetVersion
from moe_cpt.store.sample import version_tokenizer


@dataclass(frozen=True)
class DecodedSample:
    sample: int  # global sample number
    source: str  # blend source name
    spec: str  # dataset@version
    epoch: int
    pieces: tuple[tuple[str, int, int, int], ...]  # (shard path, block in shard, start, stop)
    documents: tuple[tuple[str, str], ...]  # (doc_id, source file) of every document the window touches
    tokens: np.ndarray
    text: str  # EOS shown as the EOS token's text


def _documents(index: DocumentIndex, ds: DatasetVersion, pieces: list[tuple[int, int, int]]) -> list[int]:
    """Index rows of the documents a window's pieces ``(block position, start, stop)`` overlap."""
    rows: list[int] = []
    for pos, start, stop in pieces:
        ends = ds.read_block(index.refs[pos]).doc_ends
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop - 1, side="right"))
        for entry in range(first, last + 1):
            row = index.owner(pos, entry)
            if not rows or rows[-1] != row:
                rows.append(row)
    return rows


def decode_first_samples(blend: ResolvedBlend, dss: list[DatasetVersion], n: int) -> list[DecodedSample]:
    """The first ``n`` samples of the blend, decoded with each source's own tokenizer."""
    ms = MixStream(blend, dss, 0, 1)
    indexes: dict[int, DocumentIndex] = {}
    tokenizers: dict[int, object] = {}
    out: list[DecodedSample] = []
    try:
        for sample, _ in ms.samples(ms.initial_state()):
            if len(out) >= n:
                break
            src = int(sample["source"])
            ds = dss[src]
            if src not in indexes:
                indexes[src] = DocumentIndex(ds)
                tokenizers[src] = version_tokenizer(ds)
            loc = ms.packings[src].locate(int(sample["index"]))
            pieces = [(p.block, p.start, p.stop) for p in loc.pieces]
            rows = _documents(indexes[src], ds, pieces)
            infos = [indexes[src].info(r) for r in rows]
            refs = [indexes[src].refs[p] for p, _, _ in pieces]
            tokens = np.array(sample["tokens"], copy=True)
            out.append(DecodedSample(
                sample=int(sample["sample"]), source=blend.sources[src].name, spec=ds.spec, epoch=int(sample["epoch"]),
                pieces=tuple((_shard(ds, r), r.block, s, e) for r, (_, s, e) in zip(refs, pieces, strict=True)),
                documents=tuple((i.doc_id, i.source) for i in infos), tokens=tokens,
                text=tokenizers[src].decode(tokens.tolist(), skip_special_tokens=False)))  # type: ignore[attr-defined]
    finally:
        ms.close()
    return out


def _shard(ds: DatasetVersion, ref: BlockRef) -> str:
    return ds.manifest.shards[ref.shard].path


def format_sample(d: DecodedSample, max_chars: int = 0) -> str:
    text = d.text
    if max_chars > 0 and len(text) > max_chars:
        text = f"{text[:max_chars]}\n[... {len(d.text) - max_chars:,} more characters; --max-chars 0 shows all]"
    where = "; ".join(f"{p} block {b} tokens {s}-{e}" for p, b, s, e in d.pieces)
    docs = ", ".join(f"{i!r} ({s or '?'})" for i, s in d.documents)
    return (f"=== sample {d.sample}: source {d.source} ({d.spec}), epoch {d.epoch}, {len(d.tokens)} tokens\n"
            f"stored: {where}\ndocuments: {docs}\n---\n{text}\n")
