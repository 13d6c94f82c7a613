"""Huge documents as blocks (corpus/blocks.py, corpus/json_stream.py): the streaming JSON decoder,
block-aware hashing/normalization, and a build whose version does not depend on the block size."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import orjson
import pytest
import xxhash

from moe_cpt.corpus import blocks
from moe_cpt.corpus.blocks import (
    block_documents,
    ends_document,
    piece_bounds,
    starts_document,
    text_blocks,
)
from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.corpus.dedup import exact_config
from moe_cpt.corpus.json_stream import ByteSource, Malformed, scan_record, string_pieces
from moe_cpt.corpus.minhash_sigs import ExactHasher
from moe_cpt.corpus.tokenize_step import _ContentHasher, content_hash
from moe_cpt.errors import InputDataError
from tests.corpus.helpers import read_back, write_config, write_jsonl

ONE = ExecutorConfig(workers=1)


def _chunks(data: bytes, n: int):
    return (data[i : i + n] for i in range(0, len(data), n))


def _escaped_line(record: dict) -> bytes:
    """``record`` as a JSON line with é and 😀 written as \\u escapes (a surrogate pair)."""
    line = orjson.dumps(record) + b"\n"
    return line.replace("é".encode(), b"\\u00e9").replace("😀".encode(), b"\\ud83d\\ude00")


def _stream(line: bytes, chunk: int, piece: int, text_key: str = "text", id_key: str = "id"):
    scan = scan_record(ByteSource(_chunks(line, chunk)), text_key, id_key)
    if scan.text_offset is None:
        return scan, None
    again = ByteSource(_chunks(line, chunk))
    again.seek(scan.text_offset)
    return scan, list(string_pieces(again, piece))


# ---- the streaming JSON decoder -------------------------------------------------------------------
TEXT = 'héllo "w" \\orld\n😀 tab\t{"not": "a key"} ' * 7 + "end😀"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
@pytest.mark.parametrize("piece", [16, 17, 19, 23, 1 << 20])
def test_escapes_and_pairs_straddling_chunks_and_pieces_decode_as_orjson(chunk: int, piece: int) -> None:
    line = _escaped_line({"meta": {"a": [1, -2.5e3, 'x"}{[', {"b": None, "c": [True, False]}], "q": '\\"}'},
                          "id": "doc-1", "text": TEXT, "after": {"text": 5}})
    assert b"\\ud83d\\ude00" in line and b"\\u00e9" in line
    scan, parts = _stream(line, chunk, piece)
    assert scan.kind == "dict" and scan.doc_id == "doc-1" and scan.keys == ["meta", "id", "text", "after"]
    assert "".join(parts) == TEXT == orjson.loads(line)["text"]
    if piece < 100:
        assert len(parts) > 5 and all(len(p.encode()) <= piece for p in parts)


def test_keys_in_any_order_and_ids_of_any_scalar_type() -> None:
    for rec in ({"text": TEXT, "id": 7}, {"id": 1.5, "x": [], "text": TEXT}, {"text": TEXT, "id": None},
                {"text": TEXT}):
        scan, parts = _stream(_escaped_line(rec), 3, 16)
        assert "".join(parts) == TEXT
        assert scan.has_id == ("id" in rec) and (not scan.has_id or scan.doc_id == rec["id"])


def test_a_space_free_text_is_cut_keeping_utf8_and_escapes_whole() -> None:
    text = ("日本語の文章😀é\\\"" * 50)
    scan, parts = _stream(_escaped_line({"text": text}), 4, 16)
    assert "".join(parts) == text and len(parts) > 20


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "abc', "unterminated string"),
    (b'{"text": "a\\x"}', "bad string content"),
    (b'{"text": "a", }', "expected a string key"),
    (b'{"a": [1, 2}, "text": "x"}', "expected ',' or ']'"),
    (b'{"text": "a"} x', "unexpected data"),
    (b'{"text": "\xff"}', "invalid UTF-8"),
    (b'{"text": "ab\ncd"}', "unterminated string"),
    (b'{"text": tru}', "expected a JSON value"),
    (b'{"text": "\\ud83d"}', "bad string content"),  # a lone surrogate, as orjson
    (b'{"text": "x"', "expected ',' or '}'"),
])
def test_malformed_and_truncated_lines_are_refused(line: bytes, reason: str) -> None:
    with pytest.raises(Malformed, match=reason.replace("[", r"\[").replace("]", r"\]")):
        _stream(line, 3, 16)


def test_text_not_a_string_missing_text_and_not_an_object_are_reported() -> None:
    assert _stream(b'{"text": {"a": "}"}}', 2, 16)[0].text_kind == "dict"
    assert _stream(b'{"text": 5}', 2, 16)[0].text_kind == "int"
    scan = _stream(b'{"id": 1, "body": "x"}', 2, 16)[0]
    assert scan.text_kind is None and scan.keys == ["id", "body"]
    assert _stream(b'[1, "x"]', 2, 16)[0].kind == "list"


# ---- blocks --------------------------------------------------------------------------------------
def test_text_blocks_cut_where_piece_bounds_cuts_the_whole_text(texts: list[str]) -> None:
    text = " ".join(texts)[:60_000]
    bounds = piece_bounds(text, 5000)
    want = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    segments = [text[i : i + 777] for i in range(0, len(text), 777)]
    assert list(text_blocks(segments, 5000)) == want and len(want) > 10
    docs = list(block_documents(segments, "d", {"file_path": "f"}, 5000))
    assert [d.text for d in docs] == want and {d.id for d in docs} == {"d"}
    assert [d.metadata["block"] for d in docs] == list(range(len(want)))
    assert [ends_document(d) for d in docs] == [False] * (len(want) - 1) + [True]
    assert [starts_document(d) for d in docs] == [True] + [False] * (len(want) - 1)
    (small,) = block_documents([text[:4000]], "s", {"file_path": "f"}, 5000)
    assert small.metadata == {"file_path": "f"} and starts_document(small) and ends_document(small)


def test_streamed_hashes_equal_the_whole_texts_hashes(texts: list[str]) -> None:
    text = (" ".join(texts) + " 😀 é\u0301 ") * 3
    parts = list(text_blocks([text], 3000))
    assert len(parts) > 3
    exact = ExactHasher(exact_config())
    whole = xxhash.xxh64_intdigest(text)  # datatrove's exact-dedup hash (utils/hashes/xxhash.py)
    ch = _ContentHasher()
    for p in parts:
        exact.update(p)
        ch.update(p)
    assert exact.intdigest() == whole
    assert ch.hexdigest() == content_hash(text)


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_normalizing_blocks_equals_normalizing_the_whole_text(form: str) -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ae \n\tK\u0301\u0308\u00a8\u1100\u1161\u11a8\ufb01\u2126")
    text = "".join(rng.choice(alphabet, size=50_000))
    parts = list(text_blocks([text], 1000))
    assert len(parts) > 20
    assert "".join(unicodedata.normalize(form, p) for p in parts) == unicodedata.normalize(form, text)


# ---- builds ----------------------------------------------------------------------------------------
def _huge_inputs(tmp: Path, texts: list[str], chars: int) -> dict[str, str]:
    rng = np.random.default_rng(1)
    words = np.array(sorted({w for t in texts for w in t.split()}))
    huge = " ".join(words[rng.integers(0, len(words), size=chars // 6)])[:chars].strip()
    near = huge.split(" ")
    near[len(near) // 2] += "X"
    docs = {"huge": huge, "normal-0": texts[0], "copy-of-huge": huge, "normal-1": texts[1],
            "near-huge": " ".join(near)}
    write_jsonl(tmp / "in" / "a.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    write_jsonl(tmp / "in" / "b.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[2:40])])
    return docs


@pytest.mark.slow
def test_a_version_does_not_depend_on_the_block_size(tmp_path: Path, texts: list[str], tokenizer_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _huge_inputs(tmp_path, texts, 3_000_000)
    cfg = load_config(write_config(tmp_path / "c.yaml", name="b", inputs=["in"], tokenizer=str(tokenizer_path),
                                   dedup={"exact": True, "minhash": {"enabled": True}},
                                   packing={"block_tokens": 4096, "shard_bytes": 1 << 22}))
    monkeypatch.setattr(blocks, "BLOCK_CHARS", 1 << 23)  # the 3M-char document flows whole
    whole = build_dataset(cfg, str(tmp_path / "s1"), ONE)
    monkeypatch.undo()  # default: the line is parsed whole, the document flows as 3 blocks
    default = build_dataset(cfg, str(tmp_path / "s3"), ONE)
    monkeypatch.setattr(blocks, "BLOCK_CHARS", 1 << 16)  # its 3 MB line is streamed, in 46 blocks
    blocked = build_dataset(cfg, str(tmp_path / "s2"), ONE)
    assert blocked.version == whole.version == default.version
    assert blocked.manifest.stats == whole.manifest.stats == default.manifest.stats
    got1, got2 = read_back(str(tmp_path / "s1"), "b"), read_back(str(tmp_path / "s2"), "b")
    assert set(got1) == set(got2) and all(np.array_equal(got1[k], got2[k]) for k in got1)
    assert "huge" in got1 and "copy-of-huge" not in got1 and "near-huge" not in got1
    assert len(got1["huge"]) > 100_000 and {"normal-0", "normal-1"} <= set(got1)
    stages = {s["stage"]: s for s in whole.manifest.stats["stages"]}
    assert stages["dedup: exact"]["dropped"] == 1 and stages["dedup: minhash"]["dropped"] >= 1
    assert stages["read"]["docs_out"] == len(docs) + 38


def test_a_malformed_streamed_line_emits_nothing_and_is_skipped_or_fails(
        tmp_path: Path, texts: list[str], tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks, "BLOCK_CHARS", 1 << 14)  # lines over 64 KiB are streamed
    long_text = (" ".join(texts) * 3)[:200_000]
    good = orjson.dumps({"id": "long-ok", "text": long_text}).decode()
    bad = orjson.dumps({"id": "long-bad", "text": long_text, "x": 1}).decode()[:-1] + ', "y": }'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join([good, bad, '{"id": "s", "text": "short doc"}']) + "\n")
    for policy in ("fail", "skip"):
        cfg = load_config(write_config(tmp_path / f"{policy}.yaml", name=policy, inputs=["in"], tasks=1,
                                       tokenizer=str(tokenizer_path), on_bad_record=policy))
        if policy == "fail":
            at = len(bad.encode()) - 1  # the "}" where a value should be
            with pytest.raises(InputDataError, match=rf"a\.jsonl:2: malformed JSON \(expected a JSON value at byte {at} "):
                build_dataset(cfg, str(tmp_path / "store"), ONE)
            continue
        result = build_dataset(cfg, str(tmp_path / "store"), ONE)
        assert result.manifest.stats["bad_records_skipped"] == 1
        got = read_back(str(tmp_path / "store"), "skip")
        assert set(got) == {"long-ok", "s"}


# ---- readers ----------------------------------------------------------------------------------------
def _read(reader) -> list:
    return list(reader.run(None, 0, 1))


def test_a_long_text_file_is_decoded_in_blocks_and_checked_first(tmp_path: Path, texts: list[str]) -> None:
    from moe_cpt.corpus.readers import TextFileReader

    text = ("é😀 " + " ".join(texts) + "\n") * 3
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text, encoding="utf-8")
    docs = _read(TextFileReader(str(tmp_path / "in"), "*.txt", "fail", block_chars=4096))
    assert len(docs) > 4 * len(text.encode()) // (4 * 4096) and "".join(d.text for d in docs) == text
    assert [d.metadata["block"] for d in docs] == list(range(len(docs))) and docs[-1].metadata["last_block"]
    assert [d.text for d in docs] == list(text_blocks([text], 4096))
    bad = text.encode() + b"tail \xff\n"
    (tmp_path / "in" / "a.txt").write_bytes(bad)
    with pytest.raises(InputDataError, match=rf"a\.txt:{text.count(chr(10)) + 1}: invalid UTF-8 at byte {len(bad) - 2}"):
        _read(TextFileReader(str(tmp_path / "in"), "*.txt", "fail", block_chars=4096))


def test_a_long_parquet_cell_is_cut_into_blocks(tmp_path: Path, texts: list[str]) -> None:
    from moe_cpt.corpus.readers import StrictParquetReader
    from tests.corpus.helpers import write_parquet

    long = " ".join(texts)
    write_parquet(tmp_path / "in" / "a.parquet", [{"id": "s", "text": "short"}, {"id": "l", "text": long}])
    docs = _read(StrictParquetReader(str(tmp_path / "in"), "*.parquet", "text", "id", "fail", block_chars=2048))
    assert docs[0].text == "short" and "block" not in docs[0].metadata
    assert "".join(d.text for d in docs[1:]) == long and len(docs) > 5 and {d.id for d in docs[1:]} == {"l"}


@pytest.mark.parametrize("compression", [None, "gz", "zst"])
def test_long_jsonl_lines_are_streamed_after_short_ones(tmp_path: Path, texts: list[str],
                                                         compression: str | None) -> None:
    from moe_cpt.corpus.readers import StrictJsonlReader

    long = " ".join(texts) + " é😀"
    records = [{"id": "s0", "text": "short one"}, {"text": long, "id": "l1"}, {"id": "s2", "text": "short two"},
               {"x": {"text": "}"}, "text": long[::-1]}]
    name = "a.jsonl" + (f".{compression}" if compression else "")
    write_jsonl(tmp_path / "in" / name, records, compression)
    assert len(long.encode()) > 4 * 2048  # so lines 2 and 4 are streamed
    docs = _read(StrictJsonlReader(str(tmp_path / "in"), "*", "text", "id", "fail", block_chars=2048))
    by_id: dict[str, list] = {}
    for d in docs:
        by_id.setdefault(d.id, []).append(d)
    assert list(by_id) == ["s0", "l1", "s2", f"{name}:4"]  # no id: file:line, as for short lines
    assert "".join(d.text for d in by_id["l1"]) == long and len(by_id["l1"]) > 4
    assert "".join(d.text for d in list(by_id.values())[3]) == long[::-1]
    assert by_id["s2"][0].text == "short two" and "block" not in by_id["s2"][0].metadata


def test_the_dedup_filter_drops_every_block_of_a_removed_document_and_counts_documents(tmp_path: Path) -> None:
    from datatrove.data import Document

    from moe_cpt.corpus.dedup_filter import ExactBlockFilter, MinhashBlockFilter
    from moe_cpt.errors import CptError

    (tmp_path / "exact" / "0000").mkdir(parents=True)
    (tmp_path / "exact" / "0000" / "00000.c4_dup").write_bytes(np.array([1, 3], "<u4").tobytes())
    (tmp_path / "mh").mkdir()
    (tmp_path / "mh" / "000000.remove").write_bytes(np.array([0], "<u4").tobytes())

    def stream():
        yield Document(text="a", id="d0")
        yield from block_documents(["x y " * 40], "d1", {}, 50)  # removed by exact: all its blocks
        yield from block_documents(["p q " * 40], "d2", {}, 50)
        yield Document(text="b", id="d3")
        yield Document(text="c", id="d4")

    exact = ExactBlockFilter(str(tmp_path / "exact"))
    mh = MinhashBlockFilter(str(tmp_path / "mh"))
    out = list(mh(exact(stream(), 0, 1), 0, 1))
    assert [d.id for d in out] == ["d2"] * 4 + ["d4"]
    assert exact.stats.stats["forwarded"].total == 3 and exact.stats.stats["dropped"].total == 2
    assert mh.stats.stats["forwarded"].total == 2 and mh.stats.stats["dropped"].total == 1
    with pytest.raises(CptError, match="removals name document 3"):
        list(ExactBlockFilter(str(tmp_path / "exact"))(iter([Document(text="a", id="d0")]), 0, 1))


def test_a_min_chars_above_the_bound_is_refused(tmp_path: Path, tokenizer_path: Path) -> None:
    from moe_cpt.corpus.config import MAX_MIN_CHARS
    from moe_cpt.errors import ConfigError

    assert MAX_MIN_CHARS * 16 <= blocks.BLOCK_CHARS  # a blocked document is far longer than any min_chars
    path = write_config(tmp_path / "c.yaml", name="m", inputs=["in"], tokenizer=str(tokenizer_path),
                        clean={"min_chars": MAX_MIN_CHARS + 1})
    with pytest.raises(ConfigError, match=f"clean.min_chars must be at most {MAX_MIN_CHARS}"):
        load_config(path)
