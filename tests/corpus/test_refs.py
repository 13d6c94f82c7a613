"""Refs under concurrent writers (real processes, local folder and the local S3 endpoint), old
``refs.json`` stores, and damaged refs: detected, listed as damaged, rebuilt by ``repair``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_cpt.cli import main
from moe_cpt.corpus.publish import publish_documents
from moe_cpt.corpus.shard_writer import PackingConfig
from moe_cpt.errors import ConfigError, IntegrityError
from moe_cpt.fs import open_fs
from moe_cpt.store.object_store import Store
from moe_cpt.store.tokenizer import tokenizer_info

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 600  # generous: the machine is shared


def _publish(store: str, name: str, tokenizer_path: Path, seed: int) -> str:
    data = tokenizer_path.read_bytes()
    rng = np.random.default_rng(seed)
    docs = [(f"s{seed}-d{i}", rng.integers(0, 200, size=50)) for i in range(20)]
    return publish_documents(store, name, docs, tokenizer_info(data, str(tokenizer_path)), data,
                             PackingConfig(256, 1 << 20))


def _store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def _go(barrier: Path, procs: list[subprocess.Popen]) -> None:
    """Start the waiting workers together (once all are ready, or one has died)."""
    deadline = time.monotonic() + DEADLINE_S
    while (len(list(barrier.glob("ready-*"))) < len(procs) and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.05)
    (barrier / "go").touch()


def _race_env(barrier: Path | None = None, read_delay_s: float = 0.05) -> dict[str, str]:
    """Workers on a slow disk (each local file read delayed) started together: any
    read-modify-write of the refs would lose updates."""
    env = {**os.environ, "RACE_READ_DELAY_S": str(read_delay_s)}
    if barrier is not None:
        env["RACE_BARRIER"] = str(barrier)
    return env


def _wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=DEADLINE_S)
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_ten_concurrent_tag_commands_keep_every_tag(kind: str, tmp_path: Path, tokenizer_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    store = _store_url(kind, tmp_path, request)
    version = _publish(store, "d", tokenizer_path, 0)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # `cpt corpus tag` (corpus subcommands only, see race_worker.corpus_cli), ten processes at once
    procs = [subprocess.Popen([sys.executable, "-m", "tests.corpus.race_worker", "cli", "corpus", "tag", "d@latest",
                               f"t{i}", "--store", store],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_race_env(barrier))
             for i in range(10)]
    _go(barrier, procs)
    results = _wait_all(procs)
    assert [rc for rc, _, _ in results] == [0] * 10, [err[-2000:] for _, _, err in results]
    refs = Store(store).load_refs("d")
    assert {f"t{i}" for i in range(10)} <= set(refs.tags)
    assert all(Store(store).resolve(f"d@t{i}") == ("d", version) for i in range(10))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_eight_concurrent_publishes_keep_every_version(kind: str, tmp_path: Path, tokenizer_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    store = _store_url(kind, tmp_path, request)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.corpus.race_worker", "publish", store, "d",
                               str(tokenizer_path), str(seed), str(barrier)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_race_env(read_delay_s=0.3))
             for seed in range(8)]
    _go(barrier, procs)
    results = _wait_all(procs)
    assert [rc for rc, _, _ in results] == [0] * 8, [err[-2000:] for _, _, err in results]
    published = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(published) == 8
    s = Store(store)
    assert set(s.list_versions("d")) == published
    refs = s.load_refs("d")
    # vN: unique, gapless, one per version, and the same on every read
    assert sorted(refs.tags[f"v{n}"] for n in range(1, 9)) == sorted(published)
    assert "v9" not in refs.tags and refs.tags["latest"] in published
    assert s.load_refs("d") == refs
    for v in published:
        assert s.resolve(f"d@{v}") == ("d", v)


def test_old_refs_json_is_read_and_extended(tmp_path: Path, tokenizer_path: Path) -> None:
    store = str(tmp_path / "store")
    first = _publish(store, "d", tokenizer_path, 0)
    # turn the store into one written by the old code: refs.json only, no ref log
    folder = tmp_path / "store" / "d"
    for slot in (folder / "_refs").iterdir():
        slot.unlink()
    (folder / "_refs").rmdir()
    (folder / "refs.json").write_text(json.dumps({"tags": {"latest": first, "v1": first, "paper": first},
                                                  "builds": {"k": first}, "versions": [first]}))
    s = Store(store)
    assert s.resolve("d@paper") == ("d", first) and s.list_datasets() == ["d"]
    second = _publish(store, "d", tokenizer_path, 1)
    refs = s.load_refs("d")
    assert refs.tags["v1"] == first and refs.tags["v2"] == second and refs.tags["latest"] == second
    assert refs.tags["paper"] == first and refs.builds["k"] == first


def _slots(store_dir: Path, name: str) -> list[Path]:
    return sorted((store_dir / name / "_refs").glob("*.json"))


def test_damaged_refs_are_detected_listed_and_repaired(tmp_path: Path, tokenizer_path: Path, capsys) -> None:
    store_dir = tmp_path / "store"
    store = str(store_dir)
    v1 = _publish(store, "d", tokenizer_path, 0)
    v2 = _publish(store, "d", tokenizer_path, 1)
    _publish(store, "other", tokenizer_path, 2)
    assert main(["corpus", "tag", "d@v1", "paper", "--store", store]) == 0
    capsys.readouterr()
    _slots(store_dir, "d")[1].write_bytes(b"")  # the publish event of v2, emptied (a crash, a bad disk)

    s = Store(store)
    with pytest.raises(IntegrityError, match="cpt corpus repair d"):
        s.resolve("d@latest")
    assert main(["corpus", "ls", "--store", store]) == 1  # still lists the store: d damaged, other fine
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "other" in out

    assert main(["corpus", "repair", "d", "--store", store]) == 1  # the emptied slot's update is reported lost
    out = capsys.readouterr().out
    assert f"registered {v2}" in out and "NOT RECOVERED" in out and "damaged" in out
    refs = s.load_refs("d")
    assert refs.versions == [v1, v2] and refs.tags["latest"] == v2 and refs.tags["paper"] == v1
    assert s.resolve("d@v2") == ("d", v2)
    assert main(["corpus", "repair", "d", "--store", store]) == 0  # nothing left to repair
    assert "nothing to repair" in capsys.readouterr().out


def test_empty_old_refs_json_is_repaired_from_manifests(tmp_path: Path, tokenizer_path: Path, capsys) -> None:
    store_dir = tmp_path / "store"
    store = str(store_dir)
    v1 = _publish(store, "d", tokenizer_path, 0)
    for slot in _slots(store_dir, "d"):
        slot.unlink()
    (store_dir / "d" / "refs.json").write_bytes(b"")  # what a crash of the old writer left
    with pytest.raises(IntegrityError, match="refs.json"):
        Store(store).resolve("d@latest")
    assert main(["corpus", "repair", "d", "--store", store]) == 1
    assert f"registered {v1}" in capsys.readouterr().out
    assert Store(store).resolve("d@latest") == ("d", v1)


def test_local_writes_leave_no_temporary_files(tmp_path: Path, tokenizer_path: Path) -> None:
    from moe_cpt.fs import write_bytes_atomic

    store = str(tmp_path / "store")
    _publish(store, "d", tokenizer_path, 0)
    fs, path = open_fs(str(tmp_path / "x.json"))
    write_bytes_atomic(fs, path, b"1")
    write_bytes_atomic(fs, path, b"2")
    assert (tmp_path / "x.json").read_bytes() == b"2"
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("name", ["x" * 300, "ok\n", "a/b", ".x", ""])
def test_bad_dataset_names_are_one_line_errors(name: str, tmp_path: Path, capsys) -> None:
    assert main(["corpus", "show", f"{name}@latest", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: invalid dataset name") and err.count("\n") == 1


@pytest.mark.parametrize("tag", ["paper\n", "t" * 300, "1abc", "a b", "0123456789abcdef"])
def test_bad_tags_are_refused(tag: str, tmp_path: Path, tokenizer_path: Path) -> None:
    store = str(tmp_path / "store")
    version = _publish(store, "d", tokenizer_path, 0)
    with pytest.raises(ConfigError, match="invalid tag"):
        Store(store).tag("d", tag, version)
    assert set(Store(store).load_refs("d").tags) == {"latest", "v1"}


def test_long_but_valid_name_round_trips(tmp_path: Path, tokenizer_path: Path) -> None:
    name = "n" * 128
    store = str(tmp_path / "store")
    version = _publish(store, name, tokenizer_path, 0)
    assert Store(store).resolve(f"{name}@latest") == (name, version)
    assert os.path.isdir(tmp_path / "store" / name)
