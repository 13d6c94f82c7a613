"""Build from JSONL on S3 into a store on S3 (a real local S3 endpoint over HTTP, via s3fs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import s3fs

from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.errors import ConfigError
from moe_cpt.store import open_dataset
from moe_cpt.store.verify import verify_version
from tests.corpus.helpers import assert_roundtrip, write_config, write_jsonl


def test_build_and_read_on_s3(tmp_path: Path, s3_bucket: str, texts: list[str], tokenizer_path: Path) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    records = [{"id": f"s{i}", "text": t} for i, t in enumerate(texts)]
    local = write_jsonl(tmp_path / "a.jsonl.gz", records, "gz")
    bucket = s3_bucket.removeprefix("s3://")
    fs.put_file(str(local), f"{bucket}/raw/prose/a.jsonl.gz")
    fs.put_file(str(tokenizer_path), f"{bucket}/tokenizers/tok.json")
    cfg = load_config(write_config(tmp_path / "c.yaml", name="prose", inputs=[f"{s3_bucket}/raw/prose/"],
                                   tokenizer=f"{s3_bucket}/tokenizers/tok.json",
                                   dedup={"exact": True, "minhash": {"enabled": True}}))
    store = f"{s3_bucket}/store"
    result = build_dataset(cfg, store, ExecutorConfig(workers=1))
    assert result.manifest.inputs[0]["url"].startswith("s3://") and result.manifest.inputs[0]["etag"]
    assert fs.exists(f"{bucket}/store/prose/{result.version}/manifest.json")
    assert not fs.exists(f"{bucket}/store/_work/prose")
    ds = open_dataset(store, "prose@latest")
    assert verify_version(ds).ok
    assert_roundtrip(store, "prose@latest", tokenizer_path.read_bytes(), {r["id"]: r["text"] for r in records},
                     deduped=True)
    assert build_dataset(cfg, store, ExecutorConfig(workers=1)).skipped


def test_missing_bucket_is_a_clear_error(tmp_path: Path, s3_server, tokenizer_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", name="x", inputs=["s3://no-such-bucket/raw/"],
                                   tokenizer=str(tokenizer_path)))
    with pytest.raises(ConfigError, match="no-such-bucket"):
        build_dataset(cfg, str(tmp_path / "store"), ExecutorConfig(workers=1))
