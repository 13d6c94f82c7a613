"""Version ids are deterministic, rebuilds are no-ops, publish is atomic, verify catches corruption."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_cpt.cli import main
from moe_cpt.corpus.build import build_dataset
from moe_cpt.corpus.config import ExecutorConfig, load_config
from moe_cpt.errors import IntegrityError, NotFoundError
from moe_cpt.store import open_dataset
from moe_cpt.store.object_store import Store
from moe_cpt.store.reader import BlockRef
from moe_cpt.store.verify import verify_version
from tests.corpus.helpers import write_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_config(tmp_path: Path, texts: list[str], tokenizer_path: Path) -> Path:
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "in" / "a.jsonl", records[::2])
    write_jsonl(tmp_path / "in" / "b.jsonl", records[1::2])
    return write_config(tmp_path / "c.yaml", name="small", inputs=["in"], tokenizer=str(tokenizer_path),
                        dedup={"exact": True, "minhash": {"enabled": True}})


def test_version_id_is_deterministic_and_rebuild_is_noop(tmp_path: Path, small_config: Path) -> None:
    cfg = load_config(small_config)
    a = build_dataset(cfg, str(tmp_path / "s1"), ExecutorConfig(workers=1))
    b = build_dataset(cfg, str(tmp_path / "s2"), ExecutorConfig(workers=2))
    assert a.version == b.version and not a.skipped and not b.skipped
    again = build_dataset(cfg, str(tmp_path / "s1"), ExecutorConfig(workers=2))
    assert again.skipped and again.version == a.version
    store = Store(str(tmp_path / "s1"))
    assert store.list_versions("small") == [a.version]
    assert store.resolve("small@v1") == ("small", a.version)
    assert store.resolve(f"small@{a.version[:8]}") == ("small", a.version)
    assert not store.fs.exists(store.path("_work", "small"))  or not store.fs.ls(store.path("_work", "small"))
    # a changed config is a different version
    cfg2 = load_config(small_config, {"packing": {"block_tokens": 999, "shard_bytes": 16384}})
    c = build_dataset(cfg2, str(tmp_path / "s1"), ExecutorConfig(workers=1))
    assert c.version != a.version
    assert store.resolve("small@latest") == ("small", c.version)
    assert store.resolve("small@v1") == ("small", a.version)
    with pytest.raises(NotFoundError, match="unknown ref 'v9'"):
        store.resolve("small@v9")
    with pytest.raises(NotFoundError, match="no dataset 'nope'"):
        store.resolve("nope@latest")


def test_manifest_records_what_went_in(tmp_path: Path, small_config: Path, tokenizer_path: Path) -> None:
    result = build_dataset(load_config(small_config), str(tmp_path / "s"), ExecutorConfig(workers=1))
    m = result.manifest
    assert {Path(i["url"]).name for i in m.inputs} == {"a.jsonl", "b.jsonl"}
    assert all(i["size"] > 0 and i["mtime"] for i in m.inputs)
    assert m.tokenizer.dtype == "uint16"
    store = Store(str(tmp_path / "s"))
    assert store.fs.cat_file(store.path(m.tokenizer.store_path)) == tokenizer_path.read_bytes()
    assert m.build["code"]["package"] and "created_at" in m.build
    for shard in m.shards:
        assert sum(b.n_tokens for b in shard.blocks) == shard.n_tokens


def _big_inputs(folder: Path, texts: list[str]) -> None:
    rng = random.Random(1)
    vocab = sorted({w for t in texts for w in t.split()})
    for f in range(2):
        recs = [{"id": f"{f}-{i}", "text": " ".join(rng.choice(vocab) for _ in range(400))} for i in range(1500)]
        write_jsonl(folder / f"part{f}.jsonl", recs)


def test_killed_build_leaves_no_version_and_rerun_resumes(tmp_path: Path, texts: list[str], tokenizer_path: Path) -> None:
    _big_inputs(tmp_path / "in", texts)
    cfg_path = write_config(tmp_path / "c.yaml", name="big", inputs=["in"], tokenizer=str(tokenizer_path),
                            dedup={"exact": True, "minhash": {"enabled": False}})
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "moe_cpt.cli", "corpus", "build", str(cfg_path), "--store", str(store_dir),
           "--workers", "1", "--keep-work"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    marker = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(store_dir.glob("_work/big/*/logs/tokenize/completions/00000"))
        if found:
            marker = found[0]
            break
        time.sleep(0.01)
    assert marker is not None, "build finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(str(store_dir))
    assert store.list_versions("big") == []
    with pytest.raises(NotFoundError):
        open_dataset(str(store_dir), "big@latest")
    work = marker.parents[3]
    done_before = (work / "logs" / "tokenize" / "stats" / "00000.json").stat().st_mtime_ns
    exact_before = (work / "logs" / "dedup-signatures" / "stats" / "00001.json").stat().st_mtime_ns

    result = build_dataset(load_config(cfg_path), str(store_dir), ExecutorConfig(workers=1), keep_work=True)
    assert store.list_versions("big") == [result.version]
    assert result.manifest.n_docs == 3000
    # finished tasks were not redone
    assert (work / "logs" / "tokenize" / "stats" / "00000.json").stat().st_mtime_ns == done_before
    assert (work / "logs" / "dedup-signatures" / "stats" / "00001.json").stat().st_mtime_ns == exact_before
    assert verify_version(open_dataset(str(store_dir), "big")).ok


def test_verify_catches_a_flipped_byte(tmp_path: Path, small_config: Path, capsys) -> None:
    store_dir = str(tmp_path / "s")
    result = build_dataset(load_config(small_config), store_dir, ExecutorConfig(workers=1))
    ds = open_dataset(store_dir, "small")
    assert verify_version(ds).ok
    shard = result.manifest.shards[0]
    block = shard.blocks[1]
    path = Path(store_dir) / "small" / result.version / shard.path
    data = bytearray(path.read_bytes())
    data[block.tokens_offset + 3] ^= 0x01
    path.write_bytes(bytes(data))

    report = verify_version(ds)
    assert not report.ok
    assert any(shard.path in p and "file checksum" in p for p in report.problems)
    assert any(shard.path in p and block.key in p for p in report.problems)
    assert sum(block.key in p for p in report.problems) == 1  # only the damaged block
    with pytest.raises(IntegrityError, match=f"{shard.path} block {block.key}: checksum mismatch"):
        ds.read_block(BlockRef(0, 1))
    assert main(["corpus", "verify", "small@latest", "--store", store_dir]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT" in err and block.key in err


def test_cli_ls_show_tag(tmp_path: Path, small_config: Path, capsys) -> None:
    store_dir = str(tmp_path / "s")
    assert main(["corpus", "build", str(small_config), "--store", store_dir, "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["corpus", "ls", "--store", store_dir]) == 0
    out = capsys.readouterr().out
    assert "small" in out and "latest" in out
    assert main(["corpus", "tag", "small@latest", "paper-v1", "--store", store_dir]) == 0
    assert main(["corpus", "show", "small@paper-v1", "--store", store_dir]) == 0
    out = capsys.readouterr().out
    assert "dedup: exact" in out and "dedup: minhash" in out and "tokens" in out
    assert main(["corpus", "verify", "small@paper-v1", "--store", store_dir]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["corpus", "show", "small@nope", "--store", store_dir]) == 2
    assert "unknown ref 'nope'" in capsys.readouterr().err
