"""Bad input: a clear error naming file and line, or counted and skipped; never a half version."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_cpt.cli import main
from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.errors import ConfigError, CptError
from moe_cpt.store.object_store import Store
from tests.corpus.helpers import write_config, write_jsonl

ONE = ExecutorConfig(workers=1)


def _inputs(tmp_path: Path, bad_line: bytes) -> Path:
    good = write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"g{i}", "text": f"good document number {i} " * 5} for i in range(6)])
    lines = good.read_bytes().splitlines(keepends=True)
    lines.insert(3, bad_line + b"\n")  # becomes line 4
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(lines))
    return tmp_path / "in" / "a.jsonl"


BAD_LINES = {
    "malformed": (b'{"id": "x", "text": "unterminated', "malformed JSON"),
    "utf8": (b'{"id": "x", "text": "bad \xff\xfe bytes"}', "invalid UTF-8"),
    "missing_field": (b'{"id": "x", "body": "no text here"}', "missing text field 'text'"),
    "not_object": (b'["a", "list"]', "expected a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_record_fails_naming_file_and_line(tmp_path: Path, tokenizer_path: Path, kind: str) -> None:
    bad, message = BAD_LINES[kind]
    path = _inputs(tmp_path, bad)
    cfg = load_config(write_config(tmp_path / "c.yaml", name="bad", inputs=["in"], tokenizer=str(tokenizer_path)))
    with pytest.raises(CptError) as err:
        build_dataset(cfg, str(tmp_path / "store"), ONE)
    assert f"{path}:4" in str(err.value)
    assert message in str(err.value)
    assert Store(str(tmp_path / "store")).list_versions("bad") == []


def test_bad_records_skipped_and_counted_when_configured(tmp_path: Path, tokenizer_path: Path) -> None:
    _inputs(tmp_path, BAD_LINES["malformed"][0])
    with open(tmp_path / "in" / "a.jsonl", "ab") as f:
        f.write(BAD_LINES["missing_field"][0] + b"\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", name="skip", inputs=["in"], tokenizer=str(tokenizer_path),
                                   on_bad_record="skip"))
    result = build_dataset(cfg, str(tmp_path / "store"), ONE)
    assert result.manifest.n_docs == 6
    assert result.manifest.stats["bad_records_skipped"] == 2


def test_bad_record_error_through_cli_is_one_line(tmp_path: Path, tokenizer_path: Path, capsys) -> None:
    path = _inputs(tmp_path, BAD_LINES["utf8"][0])
    cfg = write_config(tmp_path / "c.yaml", name="bad", inputs=["in"], tokenizer=str(tokenizer_path))
    code = main(["corpus", "build", str(cfg), "--store", str(tmp_path / "store"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("cpt: error:")]
    assert len(line) == 1 and f"{path}:4" in line[0] and "invalid UTF-8" in line[0]
    assert "Traceback" not in err


def test_invalid_utf8_text_file_is_named(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ok.py").write_text("print('hello world')\n" * 3)
    (tmp_path / "src" / "bad.py").write_bytes(b"x = 1\ny = '\xff'\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", name="t", tokenizer=str(tokenizer_path),
                                   inputs=[{"url": "src", "format": "text", "glob": "*.py"}]))
    with pytest.raises(CptError, match=r"bad\.py:2: invalid UTF-8"):
        build_dataset(cfg, str(tmp_path / "store"), ONE)


def test_empty_input_and_unknown_tokenizer(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = load_config(write_config(tmp_path / "c.yaml", name="e", inputs=["empty"], tokenizer=str(tokenizer_path)))
    with pytest.raises(ConfigError, match="matched no files"):
        build_dataset(cfg, str(tmp_path / "store"), ONE)
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "hello there " * 10}])
    cfg = load_config(write_config(tmp_path / "c2.yaml", name="e", inputs=["in"], tokenizer="nope/tokenizer.json"))
    with pytest.raises(ConfigError, match="tokenizer file .*nope/tokenizer.json.* does not exist"):
        build_dataset(cfg, str(tmp_path / "store"), ONE)
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    cfg = load_config(write_config(tmp_path / "c3.yaml", name="e", inputs=["in"], tokenizer="junk.json"))
    with pytest.raises(ConfigError, match="not a valid HF tokenizer.json"):
        build_dataset(cfg, str(tmp_path / "store"), ONE)


def test_config_errors_are_clear(tmp_path: Path, tokenizer_path: Path) -> None:
    bad = write_config(tmp_path / "c.yaml", name="x", inputs=["in"], tokenizer=str(tokenizer_path), shard_size=3)
    with pytest.raises(ConfigError, match="unknown key.*shard_size"):
        load_config(bad)
    bad = write_config(tmp_path / "c.yaml", name="x", inputs=[{"url": "in", "format": "csv"}], tokenizer="t.json")
    with pytest.raises(ConfigError, match="format must be one of"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
