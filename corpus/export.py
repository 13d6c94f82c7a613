"""Export a version's documents to other trainers' formats (``cpt corpus export``).

Both formats hold every document whole (a document cut across blocks is joined), EOS included
as stored, in storage order (manifest block order; the order of :class:`moe_cpt.store.documents.DocumentIndex`).
``OUT`` is a folder, local or on an object store (any fsspec URL)::

    megatron   OUT/<name>.bin, OUT/<name>.idx   Megatron-LM ``IndexedDataset`` (``--data-path OUT/<name>``)
               OUT/documents.parquet            doc_id, source, n_tokens of sequence i, row i
    hf         OUT/data/train-NNNNN.parquet     columns input_ids (list<int32>), doc_id, source;
                                                ``datasets.load_dataset("parquet", data_dir=OUT)``
    both       OUT/tokenizer.json               the version's tokenizer
               OUT/export.json                  what was exported (written last: present = complete)

The Megatron ``.idx`` layout (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``):
``b"MMIDIDX\\x00\\x00"``, version ``<Q`` 1, dtype code ``<B`` (8 = uint16, 4 = int32), sequence
count ``<Q``, document count ``<Q`` (= sequences + 1), then int32 sequence lengths, int64 byte
pointers into ``.bin``, int64 document indices ``[0, 1, ..., n]`` (one sequence per document).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_cpt.codeversion import code_version
from moe_cpt.errors import ConfigError
from moe_cpt.fs import join, open_fs, unstrip_protocol
from moe_cpt.store.documents import DocumentIndex, iter_documents
from moe_cpt.store.reader import DatasetVersion

FORMATS = ("megatron", "hf")
MEGATRON_HEADER = b"MMIDIDX\x00\x00"
MEGATRON_DTYPE_CODES = {"uint16": 8, "int32": 4}  # Megatron's DType enum
HF_FILE_TOKENS = 256 << 20  # a new Parquet file after this many tokens (about 1 GiB of int32)
HF_BATCH_DOCS = 1024  # documents per record batch (Parquet row group) at most ...
HF_BATCH_TOKENS = 16 << 20  # ... and tokens (int32 list offsets stay far from overflowing)
HF_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc_id", pa.string()), ("source", pa.string())])
DOCS_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("n_tokens", pa.int64())])


@dataclass
class ExportResult:
    out: str  # URL of the export folder
    format: str
    n_docs: int = 0
    n_tokens: int = 0
    files: list[str] = field(default_factory=list)  # relative to ``out``

    def to_json(self) -> dict:
        return {"format": self.format, "documents": self.n_docs, "tokens": self.n_tokens, "files": self.files}


def megatron_dtype(ds: DatasetVersion) -> np.dtype:
    """uint16 when the vocabulary fits (as Megatron's own ``optimal_dtype``), else int32."""
    return np.dtype("<u2") if ds.manifest.tokenizer.dtype == "uint16" else np.dtype("<i4")


def megatron_index(lengths: np.ndarray, dtype: np.dtype) -> bytes:
    """The bytes of a Megatron ``.idx`` for one sequence per document of these lengths."""
    lengths = np.asarray(lengths, dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * dtype.itemsize if len(lengths) \
        else np.empty(0, np.int64)
    doc_idx = np.arange(len(lengths) + 1, dtype="<i8")
    code = MEGATRON_DTYPE_CODES[dtype.name]
    return b"".join([MEGATRON_HEADER, struct.pack("<Q", 1), struct.pack("<B", code),
                     struct.pack("<Q", len(lengths)), struct.pack("<Q", len(doc_idx)),
                     lengths.tobytes(), pointers.astype("<i8").tobytes(), doc_idx.tobytes()])


def _targets(fs: fsspec.AbstractFileSystem, out: str, fmt: str, name: str) -> list[str]:
    """Files of an earlier export of this format in ``out`` (what --overwrite replaces)."""
    fixed = ["export.json", "tokenizer.json"]
    fixed += [f"{name}.bin", f"{name}.idx", "documents.parquet"] if fmt == "megatron" else []
    found = [rel for rel in fixed if fs.exists(join(out, rel))]
    if fmt == "hf":
        found += sorted(p[len(out) + 1:] for p in fs.glob(join(out, "data", "train-*.parquet")))
    return found


def export_version(ds: DatasetVersion, fmt: str, out_url: str, overwrite: bool = False,
                   on_tokens: Callable[[int], None] | None = None, hf_file_tokens: int = HF_FILE_TOKENS,
                   index: DocumentIndex | None = None) -> ExportResult:
    """Write every document of ``ds`` to ``out_url`` in format ``fmt`` (see the module doc).
    ``on_tokens(n)`` reports progress as blocks are read. An earlier export there is an error
    unless ``overwrite`` (then its files are replaced)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (one of: {', '.join(FORMATS)})")
    fs, out = open_fs(out_url)
    if fs.isfile(out):
        raise ConfigError(f"export folder {out_url} is a file")
    existing = _targets(fs, out, fmt, ds.name)
    if existing and not overwrite:
        raise ConfigError(f"{out_url} already holds an export ({', '.join(existing[:3])}"
                          f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace it")
    for rel in existing:
        fs.rm(join(out, rel))
    fs.makedirs(out, exist_ok=True)
    index = index or DocumentIndex(ds)
    result = ExportResult(unstrip_protocol(fs, out), fmt)
    if fmt == "megatron":
        _export_megatron(ds, index, fs, out, result, on_tokens)
    else:
        _export_hf(ds, index, fs, out, result, on_tokens, hf_file_tokens)
    with fs.open(join(out, "tokenizer.json"), "wb") as f:
        f.write(ds.tokenizer_json())
    result.files.append("tokenizer.json")
    tok = ds.manifest.tokenizer
    record = {"dataset": ds.name, "version": ds.version, "store": ds.store.url, **result.to_json(),
              "eos_included": True, "order": "storage order (manifest block order)",
              "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_token": tok.eos_token,
                            "eos_id": tok.eos_id},
              "code": code_version()}
    with fs.open(join(out, "export.json"), "w") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    result.files.append("export.json")
    return result


def _export_megatron(ds: DatasetVersion, index: DocumentIndex, fs: fsspec.AbstractFileSystem, out: str,
                     result: ExportResult, on_tokens: Callable[[int], None] | None) -> None:
    dtype = megatron_dtype(ds)
    lengths = np.empty(len(index), dtype=np.int64)
    k = 0
    with fs.open(join(out, f"{ds.name}.bin"), "wb") as f:
        for row, tokens in iter_documents(index, on_tokens):
            f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())
            lengths[k] = len(tokens)
            k += 1
            result.n_tokens += len(tokens)
            if len(tokens) > np.iinfo(np.int32).max:
                raise ConfigError(f"document row {row} of {ds.spec} is too long for Megatron's int32 lengths")
    result.n_docs = k
    with fs.open(join(out, f"{ds.name}.idx"), "wb") as f:
        f.write(megatron_index(lengths[:k], dtype))
    docs = pa.table({"doc_id": index.column("doc_id").tolist(), "source": index.column("source").tolist(),
                     "n_tokens": lengths[:k]}, schema=DOCS_SCHEMA)
    with fs.open(join(out, "documents.parquet"), "wb") as f:
        pq.write_table(docs, f)
    result.files += [f"{ds.name}.bin", f"{ds.name}.idx", "documents.parquet"]


class _HfWriter:
    """Parquet files of ``HF_SCHEMA``, a new one once ``file_tokens`` tokens are in the open one."""

    def __init__(self, fs: fsspec.AbstractFileSystem, out: str, file_tokens: int):
        self.fs, self.out, self.file_tokens = fs, out, max(1, file_tokens)
        self.files: list[str] = []
        self._file = self._writer = None
        self._tokens = 0  # in the open file
        self._batch_tokens = 0
        self._batch: dict[str, list] = {"input_ids": [], "doc_id": [], "source": []}

    def add(self, tokens: np.ndarray, doc_id: str, source: str) -> None:
        b = self._batch
        b["input_ids"].append(tokens)
        b["doc_id"].append(doc_id)
        b["source"].append(source)
        self._tokens += len(tokens)
        self._batch_tokens += len(tokens)
        if len(b["doc_id"]) >= HF_BATCH_DOCS or self._batch_tokens >= HF_BATCH_TOKENS or self._tokens >= self.file_tokens:
            self._flush()
        if self._tokens >= self.file_tokens:
            self._close_file()

    def _open_file(self) -> None:
        rel = f"data/train-{len(self.files):05d}.parquet"
        self.fs.makedirs(join(self.out, "data"), exist_ok=True)
        self._file = self.fs.open(join(self.out, rel), "wb")
        self._writer = pq.ParquetWriter(self._file, HF_SCHEMA)
        self.files.append(rel)

    def _flush(self) -> None:
        b = self._batch
        if not b["doc_id"]:
            return
        if self._writer is None:
            self._open_file()
        lens = np.array([len(t) for t in b["input_ids"]], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        values = pa.array(np.concatenate(b["input_ids"]).astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, values, type=HF_SCHEMA.field("input_ids").type)
        self._writer.write_table(pa.table({"input_ids": ids, "doc_id": pa.array(b["doc_id"], pa.string()),
                                           "source": pa.array(b["source"], pa.string())}, schema=HF_SCHEMA))
        self._batch = {"input_ids": [], "doc_id": [], "source": []}
        self._batch_tokens = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._file = self._writer = None
        self._tokens = 0

    def close(self) -> list[str]:
        self._flush()
        if not self.files:  # an empty version: one file with the schema and no rows
            self._open_file()
        self._close_file()
        return self.files


def _export_hf(ds: DatasetVersion, index: DocumentIndex, fs: fsspec.AbstractFileSystem, out: str,
               result: ExportResult, on_tokens: Callable[[int], None] | None, file_tokens: int) -> None:
    writer = _HfWriter(fs, out, file_tokens)
    for row, tokens in iter_documents(index, on_tokens):
        info = index.info(row)
        writer.add(tokens, info.doc_id, info.source)
        result.n_docs += 1
        result.n_tokens += len(tokens)
    result.files += writer.close()
