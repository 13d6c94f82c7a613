"""Each input format builds, and tokens read back equal the tokenizer's output for every doc."""

from __future__ import annotations

from pathlib import Path

import pytest
import webdataset as wds

from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from tests.corpus.helpers import assert_roundtrip, write_config, write_jsonl, write_parquet

ONE_WORKER = ExecutorConfig(workers=1)


@pytest.mark.parametrize("compression", [None, "gz", "zst"])
def test_jsonl_roundtrip(tmp_path: Path, texts: list[str], tokenizer_path: Path, compression: str | None) -> None:
    records = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
    suffix = {None: "", "gz": ".gz", "zst": ".zst"}[compression]
    write_jsonl(tmp_path / "in" / f"a.jsonl{suffix}", records[::2], compression)
    write_jsonl(tmp_path / "in" / f"b.jsonl{suffix}", records[1::2], compression)
    cfg = load_config(write_config(tmp_path / "c.yaml", name="j", inputs=[{"url": "in", "format": "jsonl"}],
                                  tokenizer=str(tokenizer_path)))
    result = build_dataset(cfg, str(tmp_path / "store"), ONE_WORKER)
    assert result.manifest.n_docs == len(records)
    assert len(result.manifest.shards) >= 2  # small shard size forces several shards
    assert_roundtrip(str(tmp_path / "store"), "j@latest", tokenizer_path.read_bytes(),
                     {r["id"]: r["text"] for r in records})


def test_parquet_roundtrip(tmp_path: Path, texts: list[str], tokenizer_path: Path) -> None:
    records = [{"id": f"p{i}", "text": t, "extra": i} for i, t in enumerate(texts)]
    write_parquet(tmp_path / "in" / "part-0.parquet", records)
    cfg = load_config(write_config(tmp_path / "c.yaml", name="pq", inputs=[{"url": "in", "format": "parquet"}],
                                  tokenizer=str(tokenizer_path)))
    build_dataset(cfg, str(tmp_path / "store"), ONE_WORKER)
    assert_roundtrip(str(tmp_path / "store"), "pq", tokenizer_path.read_bytes(), {r["id"]: r["text"] for r in records})


def test_text_directory_roundtrip(tmp_path: Path, texts: list[str], tokenizer_path: Path) -> None:
    expected = {}
    for i, t in enumerate(texts[:40]):
        rel = f"pkg{i % 3}/mod_{i}.py"
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(f'"""{t}"""\n')
        expected[rel] = f'"""{t}"""\n'
    (tmp_path / "src" / "README.md").write_text("not matched by the glob")
    cfg = load_config(write_config(tmp_path / "c.yaml", name="src",
                                   inputs=[{"url": "src", "format": "text", "glob": "**/*.py"}],
                                   tokenizer=str(tokenizer_path)))
    build_dataset(cfg, str(tmp_path / "store"), ONE_WORKER)
    assert_roundtrip(str(tmp_path / "store"), "src", tokenizer_path.read_bytes(), expected)


def test_unicode_is_normalized_and_shards_iterate_with_webdataset(tmp_path: Path, tokenizer_path: Path) -> None:
    decomposed = "Cafe\u0301 nai\u0308ve " * 20  # NFD input
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "u", "text": decomposed}, {"id": "v", "text": "plain text " * 30}])
    cfg = load_config(write_config(tmp_path / "c.yaml", name="u", inputs=["in"], tokenizer=str(tokenizer_path)))
    result = build_dataset(cfg, str(tmp_path / "store"), ONE_WORKER)
    assert_roundtrip(str(tmp_path / "store"), "u", tokenizer_path.read_bytes(),
                     {"u": "Café naïve " * 20, "v": "plain text " * 30})
    shard_url = str(tmp_path / "store" / "u" / result.version / result.manifest.shards[0].path)
    samples = list(wds.WebDataset(shard_url, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [b.key for b in result.manifest.shards[0].blocks]
    assert all({"tokens.zst", "docs.npy"} <= set(s) for s in samples)
