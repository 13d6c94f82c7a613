"""Data out: documents decoded back to text (`cpt corpus sample`, `cpt mix inspect --decode`),
exports to Megatron-LM .bin/.idx and HF datasets Parquet, and the dataset card.

One small real build (datatrove, exact dedup, a byte-level BPE) with tiny blocks, so many
documents are cut across blocks and shards. Exports are read back with readers written from the
formats' definitions (Megatron's ``_IndexReader``; ``datasets.load_dataset``) and compared, document
by document, with the shard read-back of :func:`tests.corpus.helpers.read_back`.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from moe_cpt.cli import main
from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.corpus.export import export_version
from moe_cpt.corpus.publish import publish_documents
from moe_cpt.corpus.shard_writer import PackingConfig
from moe_cpt.errors import ConfigError, NotFoundError
from moe_cpt.mixer.decode import decode_first_samples
from moe_cpt.mixer.spec import resolve
from moe_cpt.store import open_dataset
from moe_cpt.store.reader import BlockRef
from moe_cpt.store.sample import sample_documents
from tests.corpus.helpers import read_back, write_config, write_jsonl
from tests.support.mixer_store import make_docs, make_tokenizer
from tests.support.mixer_store import spec as blend_spec

LICENSE = "CC-BY-4.0"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, texts: list[str], tokenizer_path: Path) -> dict:
    """A store with dataset ``prose`` (license set; one exact duplicate removed) and its inputs."""
    root = tmp_path_factory.mktemp("export")
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    write_jsonl(root / "in" / "a.jsonl", records[::2] + [{"id": "dup", "text": records[0]["text"]}])
    write_jsonl(root / "in" / "b.jsonl", records[1::2])
    cfg = write_config(root / "c.yaml", name="prose", inputs=["in"], tokenizer=str(tokenizer_path), license=LICENSE,
                       dedup={"exact": True, "minhash": {"enabled": False}},
                       packing={"block_tokens": 300, "shard_bytes": 6000})
    store = str(root / "store")
    result = build_dataset(load_config(cfg), store, ExecutorConfig(workers=1))
    texts_by_id = {r["id"]: unicodedata.normalize("NFC", r["text"]) for r in records}
    texts_by_id["dup"] = texts_by_id["d0"]
    return {"store": store, "spec": f"prose@{result.version}", "texts": texts_by_id, "root": root,
            "docs": read_back(store, f"prose@{result.version}"), "manifest": result.manifest}


def test_layout_has_cut_documents_and_license_only_when_set(built: dict, tmp_path: Path, tokenizer_path: Path) -> None:
    m = built["manifest"]
    assert len(m.shards) > 1 and any(b.n_tokens > 300 for s in m.shards for b in s.blocks)
    assert max(len(t) for t in built["docs"].values()) > 2 * 300  # some documents span 3+ blocks
    assert m.config["license"] == LICENSE
    plain = load_config(write_config(tmp_path / "p.yaml", name="p", inputs=["in"], tokenizer=str(tokenizer_path)))
    assert "license" not in plain.identity()  # so versions built without one keep their ids
    with pytest.raises(ConfigError, match="license must be"):
        load_config(write_config(tmp_path / "q.yaml", name="p", inputs=["in"], tokenizer=str(tokenizer_path),
                                 license=3))


def test_sample_decodes_documents_with_provenance(built: dict, capsys: pytest.CaptureFixture) -> None:
    ds = open_dataset(built["store"], built["spec"])
    docs = sample_documents(ds, n=6, seed=1)
    assert len({d.info.doc_id for d in docs}) == 6
    shard_paths = {s.path for s in ds.manifest.shards}
    for d in docs:
        assert d.text == built["texts"][d.info.doc_id]
        assert d.info.n_tokens == len(built["docs"][d.info.doc_id])
        assert Path(d.info.source).name in ("a.jsonl", "b.jsonl") and d.info.shard in shard_paths
    # the longest document, cut across several blocks, by id through the CLI
    long_id = max(built["docs"], key=lambda k: len(built["docs"][k]))
    assert main(["corpus", "sample", built["spec"], "--store", built["store"], "--source-doc", long_id,
                 "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert got["doc_id"] == long_id and got["n_blocks"] >= 3 and got["text"] == built["texts"][long_id]
    assert main(["corpus", "sample", built["spec"], "--store", built["store"], "-n", "1", "--max-chars", "20"]) == 0
    out = capsys.readouterr().out
    assert "source: " in out and "stored: shards/" in out and "more characters" in out
    assert main(["corpus", "sample", built["spec"], "--store", built["store"], "--source-doc", "nope"]) == 2
    assert "cpt: error: no document with id 'nope'" in capsys.readouterr().err
    assert main(["corpus", "sample", "prose@v7", "--store", built["store"]]) == 2
    assert "cpt: error: unknown ref 'v7'" in capsys.readouterr().err


def read_megatron(prefix: Path) -> tuple[int, list[np.ndarray], np.ndarray]:
    """A reader written from Megatron-LM's ``_IndexReader``/``IndexedDataset`` (indexed_dataset.py):
    dtype code, the sequences, and the document indices."""
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}
    idx = prefix.with_suffix(".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", idx[9:17])[0] == 1
    code = idx[17]
    n_seq, n_doc = struct.unpack("<QQ", idx[18:34])
    lengths = np.frombuffer(idx, np.int32, n_seq, 34)
    pointers = np.frombuffer(idx, np.int64, n_seq, 34 + lengths.nbytes)
    doc_idx = np.frombuffer(idx, np.int64, n_doc, 34 + lengths.nbytes + pointers.nbytes)
    assert len(idx) == 34 + lengths.nbytes + pointers.nbytes + doc_idx.nbytes
    data = prefix.with_suffix(".bin").read_bytes()
    dt = np.dtype(dtypes[code])
    assert pointers[-1] + lengths[-1] * dt.itemsize == len(data)
    return code, [np.frombuffer(data, dt, n, p) for n, p in zip(lengths, pointers, strict=True)], doc_idx


def test_megatron_export_to_s3_reads_back(built: dict, s3_bucket: str, tmp_path: Path) -> None:
    out = f"{s3_bucket}/exports/prose-megatron"
    assert main(["corpus", "export", built["spec"], out, "--store", built["store"], "--format", "megatron"]) == 0
    s3fs.S3FileSystem(skip_instance_cache=True).get(out.removeprefix("s3://") + "/", str(tmp_path / "m"),
                                                    recursive=True)
    code, seqs, doc_idx = read_megatron(tmp_path / "m" / "prose")
    assert code == 8  # uint16: the vocabulary fits
    assert doc_idx.tolist() == list(range(len(seqs) + 1))  # one sequence per document
    ids = pq.read_table(tmp_path / "m" / "documents.parquet").column("doc_id").to_pylist()
    assert sorted(ids) == sorted(built["docs"]) and len(seqs) == len(ids)
    for doc_id, seq in zip(ids, seqs, strict=True):
        assert np.array_equal(seq, built["docs"][doc_id]), doc_id
    record = json.loads((tmp_path / "m" / "export.json").read_text())
    assert record["version"] == built["spec"].split("@")[1] and record["tokens"] == sum(map(len, seqs))


def test_hf_export_loads_with_datasets(built: dict, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = open_dataset(built["store"], built["spec"])
    out = tmp_path / "hf"
    seen: list[int] = []
    result = export_version(ds, "hf", str(out), hf_file_tokens=5000, on_tokens=seen.append)
    assert len(result.files) > 3 and sum(seen) == ds.manifest.n_tokens  # several Parquet files
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len(built["docs"])
    for row in loaded:
        assert row["input_ids"] == built["docs"][row["doc_id"]].tolist(), row["doc_id"]
    with pytest.raises(ConfigError, match="already holds an export"):
        export_version(ds, "hf", str(out))
    again = export_version(ds, "hf", str(out), overwrite=True)  # one file now: the old ones are gone
    assert again.files[0] == "data/train-00000.parquet" and sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000.parquet"]
    with pytest.raises(ConfigError, match="unknown export format 'csv'"):
        export_version(ds, "csv", str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="is a file"):
        export_version(ds, "hf", str(out / "export.json"))


def _rows(card: str, first: str, columns: int) -> list[list[str]]:
    """Cells of the card's table rows whose first cell ends with ``first``, in tables of ``columns`` columns."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in card.splitlines()
            if line.startswith("| ") and line.count("|") == columns + 1]
    return [r for r in rows if r[0].endswith(first)]


def test_card(built: dict, tmp_path: Path, texts: list[str]) -> None:
    out = tmp_path / "card"
    assert main(["corpus", "show", built["spec"], "--store", built["store"], "--card", str(out)]) == 0
    card = (out / "README.md").read_text()
    png = (out / "token_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and "![token-length histogram](token_lengths.png)" in card
    m = built["manifest"]
    assert f"| license | {LICENSE} |" in card and built["spec"].split("@")[1] in card and m.tokenizer.sha256 in card
    (dedup,) = _rows(card, "dedup: exact", 4)
    assert int(dedup[1]) - int(dedup[2]) == 1 and dedup[3] == "1"
    lengths = [len(t) for t in built["docs"].values()]
    assert f"max {max(lengths):,} over {len(lengths):,} documents" in card
    # documents kept per input file: a.jsonl's duplicate was removed
    for name, count in (("a.jsonl", (len(texts) + 1) // 2), ("b.jsonl", len(texts) // 2)):
        (row,) = _rows(card, f"in/{name}", 3)
        assert row[1] == f"{count:,}"
    (configured,) = _rows(card, "/in", 3)
    assert configured[1:] == [f"{len(texts):,}", f"{sum(lengths):,}"]


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    if len(needle) > len(hay):
        return False
    return bool((np.lib.stride_tricks.sliding_window_view(hay, len(needle)) == needle).all(axis=1).any())


def _runs_of(fragments: list[np.ndarray], docs: list[np.ndarray]) -> bool:
    """Whether the fragments, in order, split into consecutive non-empty runs, one per document
    in order, each fragment contained in its run's document (a short fragment may occur in two
    documents by chance, so every split is tried)."""
    ok = {(0, 0)}  # (fragments placed, documents started)
    for frag in fragments:
        ok = {(i + 1, j2) for i, j in ok for j2 in (j, j + 1)
              if 1 <= j2 <= len(docs) and _contains(docs[j2 - 1], frag)}
    return (len(fragments), len(docs)) in ok


def test_mix_inspect_decode(built: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = blend_spec(built["store"], {"prose": 1.0}, seq_len=200, gbs=4)
    spec["sources"]["prose"]["dataset"] = built["spec"]
    blend, dss = resolve(spec)
    decoded = decode_first_samples(blend, dss, 4)
    assert [d.sample for d in decoded] == [0, 1, 2, 3]
    ds = dss[0]
    shard_of = {s.path: i for i, s in enumerate(ds.manifest.shards)}
    for d in decoded:
        # the pieces named hold the window's tokens; each stretch between document ends is a run
        # of the tokens of the document named for it (in order)
        fragments, pieces = [], []
        for shard, block, start, stop in d.pieces:
            blk = ds.read_block(BlockRef(shard_of[shard], block))
            pieces.append(blk.tokens[start:stop])
            cuts = [e for e in blk.doc_ends.tolist() if start < e < stop]
            fragments += [blk.tokens[a:b] for a, b in zip([start, *cuts], [*cuts, stop], strict=True)]
        assert np.array_equal(np.concatenate(pieces), d.tokens)
        docs = [built["docs"][doc_id] for doc_id, _ in d.documents]
        assert _runs_of(fragments, docs), d.documents
    path = tmp_path / "blend.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["mix", "inspect", str(path), "--steps", "1", "--decode", "2"]) == 0
    out = capsys.readouterr().out
    assert "=== sample 0: source prose" in out and "=== sample 1: source prose" in out
    assert f"documents: {decoded[0].documents[0][0]!r}" in out
    with pytest.raises(NotFoundError):
        resolve(blend_spec(built["store"], {"nope": 1.0}))


def test_megatron_int32_tokens_for_a_large_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A vocabulary beyond uint16 is stored as uint32 and exported as Megatron's int32 (code 4)."""
    info, tj = make_tokenizer(70_000)
    docs = make_docs(5, 30, 40, vocab=70_000)
    store = str(tmp_path / "store")
    publish_documents(store, "big", docs, info, tj, PackingConfig(block_tokens=100, shard_bytes=1500))
    ds = open_dataset(store, "big@latest")
    assert ds.manifest.tokenizer.dtype == "uint32"
    export_version(ds, "megatron", str(tmp_path / "m"))
    code, seqs, _ = read_megatron(tmp_path / "m" / "big")
    ids = pq.read_table(tmp_path / "m" / "documents.parquet").column("doc_id").to_pylist()
    want = {doc_id: np.append(t, info.eos_id) for doc_id, t in docs}
    assert code == 4 and max(int(s.max()) for s in seqs) >= 1 << 16
    assert [s.tolist() for s in seqs] == [want[i].tolist() for i in ids] and sorted(ids) == sorted(want)
    with pytest.raises(SystemExit):
        main(["corpus", "export", "big@latest", str(tmp_path / "x"), "--store", store, "--format", "csv"])
    assert "invalid choice: 'csv'" in capsys.readouterr().err
