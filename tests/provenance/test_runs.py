"""The run catalog (provenance/catalog.py), the trainer's run record hook (provenance/record.py) and the
`cpt runs` / `cpt corpus show` commands, on small real stores (local folders and the local S3
endpoint), with real blends resolved by the mixer."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from moe_cpt.cli import main
from moe_cpt.errors import NotFoundError
from moe_cpt.mixer.spec import resolve
from moe_cpt.mixer.stream_record import record_mix_stream
from moe_cpt.provenance.catalog import RunCatalog
from moe_cpt.provenance.lineage import check_readable, lineage
from moe_cpt.provenance.record import (
    RUN_EVENTS,
    read_run_events,
    read_run_record,
    write_run_record,
)
from moe_cpt.provenance.schema import tokens_per_source_version
from moe_cpt.store.object_store import Store
from tests.support.mixer_store import publish, spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with ``new`` in two versions and ``replay`` in one, plus three resolved blends:
    pre-training (new v1 + replay), CPT 1 (new v2 + replay), CPT 2 (new v2 only)."""
    url = str(tmp_path_factory.mktemp("runs") / "store")
    new1 = publish(url, "new", 1, 120)
    replay = publish(url, "replay", 2, 60)
    b_pre = resolve(spec(url, {"new": 0.7, "replay": 0.3}))[0].to_json()
    new2 = publish(url, "new", 3, 120)
    b_cpt1 = resolve(spec(url, {"new": 0.8, "replay": 0.2}))[0].to_json()
    b_cpt2 = resolve(spec(url, {"new": 1.0}))[0].to_json()
    return {"url": url, "new1": new1, "new2": new2, "replay": replay,
            "pre": b_pre, "cpt1": b_cpt1, "cpt2": b_cpt2}


def _record(run_id: str, blend: dict | None, *, phase: str = "pretrain", parent: str = "",
            parent_dir: str = "", status: str = "running", end_step: int = 0,
            checkpoints: tuple[int, ...] = (), segments: int = 1,
            tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """What trainer/train.py::_write_record passes to write_run_record."""
    data = ({"kind": "mixer", "blend": blend, "source_names": [s["name"] for s in blend["sources"]],
             "epochs": {s["name"]: 0.5 for s in blend["sources"]}}
            if blend else {"kind": "SyntheticSource", "source_names": ["counting", "motifs"]})
    return {"run_id": run_id, "phase": phase, "parent_run_id": parent,
            "parent": {"run_id": parent, "run_dir": parent_dir} if parent else {},
            "config": {"training": {"steps": 8}}, "data": data, "start_step": 0,
            "segments": [{"start_step": 4 * i, "world_size": 1} for i in range(segments)],
            "end_step": end_step, "status": status,
            "tokens_per_source": tokens or {n: 64 * end_step for n in data["source_names"]},
            "checkpoints": list(checkpoints)}


def _train(run_dir: Path, run_id: str, blend: dict | None, steps: int = 6, ckpt_every: int = 3,
           **kw: Any) -> dict[str, Any]:
    """Write the record the way the trainer does: after every step, then 'finished'."""
    ckpts: list[int] = []
    write_run_record(run_dir, _record(run_id, blend, **kw))
    for step in range(1, steps + 1):
        if step % ckpt_every == 0:
            ckpts.append(step)
        write_run_record(run_dir, _record(run_id, blend, end_step=step, checkpoints=tuple(ckpts), **kw))
    write_run_record(run_dir, _record(run_id, blend, end_step=steps, checkpoints=tuple(ckpts),
                                      status="finished", **kw))
    return read_run_record(run_dir)


# ---- events append and fold ------------------------------------------------------------------

def test_events_append_and_fold(tmp_path: Path) -> None:
    cat = RunCatalog(str(tmp_path / "s"))
    cat.append("r1", {"status": "running", "end_step": 0, "phase": "pretrain"}, "start")
    cat.append("r1", {"end_step": 5, "checkpoints": [5]}, "checkpoint")
    cat.append("r1", {"status": "finished"}, "finished")
    run = cat.get("r1")
    assert run.events == 3
    assert run.record == {"status": "finished", "end_step": 5, "phase": "pretrain", "checkpoints": [5]}
    names = sorted(os.listdir(tmp_path / "s" / "_runs" / "r1"))
    assert [n.split("-")[0] for n in names] == ["0000000000", "0000000001", "0000000002"]
    assert [n.split("-")[1] for n in names] == ["start", "checkpoint", "finished"]
    assert [r.run_id for r in cat.list()] == ["r1"]
    with pytest.raises(NotFoundError, match="no run 'r2'"):
        cat.get("r2")


def test_trainer_record_goes_to_catalog_on_events_only(tmp_path: Path, store: dict) -> None:
    run_dir = tmp_path / "run"
    final = _train(run_dir, "pre-a", store["pre"], steps=6, ckpt_every=3)
    # 8 writes of run.json; the catalog and run-events.jsonl get start, 2 checkpoints, finished
    assert [e["kind"] for e in read_run_events(run_dir)] == ["start", "checkpoint", "checkpoint", "finished"]
    run = RunCatalog(store["url"]).get("pre-a")
    assert run.events == 4
    assert run.record == final
    assert final["status"] == "finished" and final["checkpoints"] == [3, 6]
    assert final["code"]["git_commit"] and "dirty" in final["code"]
    assert final["segments"][0]["code"] == final["code"]
    assert final["tokens_per_source_version"] == {
        f"new@{store['new1']}": 64 * 6, f"replay@{store['replay']}": 64 * 6}
    assert final["data"]["blend"]["tokenizer_sha256"]


def test_resume_adds_a_segment_event(tmp_path: Path, store: dict) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, "pre-res", store["pre"], steps=3, ckpt_every=3)
    write_run_record(run_dir, _record("pre-res", store["pre"], end_step=3, checkpoints=(3,), segments=2))
    kinds = [e["kind"] for e in read_run_events(run_dir)]
    assert kinds == ["start", "checkpoint", "finished", "resume"]
    rec = RunCatalog(store["url"]).get("pre-res").record
    assert rec["status"] == "running" and len(rec["segments"]) == 2
    assert all("code" in s for s in rec["segments"])


def test_synthetic_run_stays_local(tmp_path: Path, store: dict) -> None:
    before = RunCatalog(store["url"]).run_ids()
    rec = _train(tmp_path / "syn", "syn-a", None, steps=3)
    assert rec["tokens_per_source_version"] == {}
    assert RunCatalog(store["url"]).run_ids() == before
    check_readable(rec)  # nothing to open: passes


# ---- crashes never corrupt a record ------------------------------------------------------------

def test_torn_and_garbled_events_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cat = RunCatalog(str(tmp_path / "s"))
    cat.append("r1", {"status": "running", "end_step": 1}, "start")
    good = cat.get("r1").record
    folder = tmp_path / "s" / "_runs" / "r1"
    full = (folder / sorted(os.listdir(folder))[0]).read_bytes()
    (folder / "0000000001-checkpoint-0badc0de.json").write_bytes(full[: len(full) // 2])  # torn
    garbled = json.loads(full)
    garbled["event"]["record"]["status"] = "finished"  # payload no longer matches its checksum
    (folder / "0000000002-finished-0badbeef.json").write_text(json.dumps(garbled))
    (folder / ".0000000003-x.json.tmp-1234").write_bytes(b"{")  # a crashed writer's temp file
    with caplog.at_level(logging.WARNING, logger="moe_cpt.provenance.catalog"):
        run = cat.get("r1")
    assert run.record == good and run.events == 1
    assert run.skipped == ["0000000001-checkpoint-0badc0de.json", "0000000002-finished-0badbeef.json"]
    assert "ignoring unreadable event" in caplog.text and "checksum mismatch" in caplog.text
    cat.append("r1", {"end_step": 9}, "update")  # appending continues after the bad objects
    assert cat.get("r1").record["end_step"] == 9
    assert sorted(os.listdir(folder))[-1].startswith("0000000003-update-")


_WRITER = r"""
import sys
from moe_cpt.provenance.catalog import RunCatalog
cat = RunCatalog(sys.argv[1])
i = 0
while True:
    cat.append("busy", {"i": i, "blob": "x" * 200000}, "update")
    print(i, flush=True)
    i += 1
"""


def test_killed_writer_leaves_a_readable_record(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, url], stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(5):  # let it append a few events, then kill it mid-stream
            proc.stdout.readline()
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    run = RunCatalog(url).get("busy")
    folder = tmp_path / "s" / "_runs" / "busy"
    visible = [n for n in os.listdir(folder) if not n.startswith(".")]
    assert run.events == len(visible) >= 5 and run.skipped == []
    assert run.record["i"] == run.events - 1 and len(run.record["blob"]) == 200000


def test_torn_run_events_line_is_skipped_and_not_glued(tmp_path: Path, store: dict) -> None:
    run_dir = tmp_path / "run"
    write_run_record(run_dir, _record("pre-torn", store["pre"]))
    with open(run_dir / RUN_EVENTS, "ab") as f:
        f.write(b'{"kind": "checkpoint", "record": {"run_i')  # the crash
    (run_dir / "run.json").write_text('{"run_id": "pre-')  # and a torn snapshot (no fsync'd rename)
    assert read_run_record(run_dir)["run_id"] == "pre-torn"  # falls back to the events
    write_run_record(run_dir, _record("pre-torn", store["pre"], status="finished", end_step=2))
    events = read_run_events(run_dir)
    assert [e["kind"] for e in events] == ["start", "finished"]
    assert read_run_record(run_dir)["status"] == "finished"


# ---- lineage, by-version index, readability ---------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, store: dict) -> dict[str, Path]:
    """pre (new v1 + replay) -> cpt1 (new v2 + replay) -> cpt2 (new v2)."""
    base = tmp_path_factory.mktemp("chain")
    _train(base / "pre", "chain-pre", store["pre"])
    _train(base / "cpt1", "chain-cpt1", store["cpt1"], phase="cpt", parent="chain-pre",
           parent_dir=str(base / "pre"))
    _train(base / "cpt2", "chain-cpt2", store["cpt2"], phase="cpt", parent="chain-cpt1",
           parent_dir=str(base / "cpt1"), steps=3)
    return {"pre": base / "pre", "cpt1": base / "cpt1", "cpt2": base / "cpt2"}


def test_lineage_is_transitive_through_parents(chain: dict, store: dict) -> None:
    nodes = lineage("chain-cpt2", [RunCatalog(store["url"])])
    assert [n.run_id for n in nodes] == ["chain-cpt2", "chain-cpt1", "chain-pre"]
    assert [n.depth for n in nodes] == [0, 1, 2]
    versions = [sorted(u.spec for u in n.datasets) for n in nodes]
    assert versions == [
        [f"new@{store['new2']}"],
        [f"new@{store['new2']}", f"replay@{store['replay']}"],
        [f"new@{store['new1']}", f"replay@{store['replay']}"],
    ]
    assert nodes[2].datasets[0].tokens == 64 * 6


def test_lineage_falls_back_to_parent_run_folder(tmp_path: Path, store: dict) -> None:
    _train(tmp_path / "syn", "syn-parent", None, steps=2)  # synthetic: in no catalog
    _train(tmp_path / "cpt", "cpt-of-syn", store["cpt2"], phase="cpt", parent="syn-parent",
           parent_dir=str(tmp_path / "syn"), steps=2)
    _train(tmp_path / "orphan", "cpt-orphan", store["cpt2"], phase="cpt", parent="gone-run", steps=2)
    nodes = lineage("cpt-of-syn", [RunCatalog(store["url"])])
    assert [n.run_id for n in nodes] == ["cpt-of-syn", "syn-parent"]
    assert nodes[1].source == str(tmp_path / "syn" / "run.json") and nodes[1].datasets == []
    orphan = lineage("cpt-orphan", [RunCatalog(store["url"])])
    assert [(n.run_id, n.record is None) for n in orphan] == [("cpt-orphan", False), ("gone-run", True)]


def test_runs_for_version(chain: dict, store: dict) -> None:
    cat = RunCatalog(store["url"])
    assert {"chain-pre", "chain-cpt1"} <= set(cat.runs_for_version("replay", store["replay"]))
    assert "chain-cpt2" not in cat.runs_for_version("replay", store["replay"])
    assert "chain-pre" in cat.runs_for_version("new", store["new1"])
    assert "chain-pre" not in cat.runs_for_version("new", store["new2"])
    assert {"chain-cpt1", "chain-cpt2"} <= set(cat.runs_for_version("new", store["new2"]))
    assert cat.runs_for_version("new", "0" * 16) == []


def test_check_readable_names_every_lost_version(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    a = publish(url, "a", 1, 60)
    b = publish(url, "b", 2, 60)
    c = publish(url, "c", 3, 60)
    blend = resolve(spec(url, {"a": 0.4, "b": 0.3, "c": 0.3}))[0].to_json()
    rec = _train(tmp_path / "run", "lost", blend, steps=2)
    check_readable(rec)  # all there
    store = Store(url)
    os.remove(store.version_path("a", a, "manifest.json"))
    manifest = store.load_manifest("b", b)
    os.remove(store.version_path("b", b, manifest.shards[0].path))
    with pytest.raises(NotFoundError) as err:
        check_readable(rec)
    msg = str(err.value)
    assert f"a@{a}" in msg and f"b@{b}" in msg and f"c@{c}" not in msg
    assert "manifest" in msg and "shard" in msg and "\n" not in msg


def test_blend_over_two_stores_is_recorded_in_both(tmp_path: Path) -> None:
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    v1 = publish(s1, "new", 1, 60)
    v2 = publish(s2, "replay", 2, 60)
    blend = resolve({"seq_len": 64, "global_batch_size": 24, "sources": {
        "new": {"dataset": "new@latest", "store": s1, "weight": 0.5},
        "replay": {"dataset": "replay@latest", "store": s2, "weight": 0.5}}})[0].to_json()
    _train(tmp_path / "run", "two-stores", blend, steps=2)
    assert RunCatalog(s1).get("two-stores").record == RunCatalog(s2).get("two-stores").record
    assert RunCatalog(s1).runs_for_version("new", v1) == ["two-stores"]
    assert RunCatalog(s2).runs_for_version("replay", v2) == ["two-stores"]
    assert RunCatalog(s1).runs_for_version("replay", v2) == []


def test_mix_stream_records_itself(store: dict) -> None:
    blend = store["cpt1"]
    run_id = record_mix_stream(blend, {"new": 640, "replay": 128}, extra={"client": "test"})
    record_mix_stream(blend, {"new": 1280, "replay": 256}, run_id=run_id, status="finished")
    run = RunCatalog(store["url"]).get(run_id)
    assert run.events == 2 and run.phase == "mix" and run.status == "finished"
    assert run.record["client"] == "test" and run.record["code"]["git_commit"]
    assert run.record["tokens_per_source_version"] == {
        f"new@{store['new2']}": 1280, f"replay@{store['replay']}": 256}
    assert run_id in RunCatalog(store["url"]).runs_for_version("replay", store["replay"])


def test_tokens_per_source_version_sums_sources_of_one_version() -> None:
    rec = {"data": {"blend": {"sources": [
        {"name": "x", "dataset": "d", "version": "v1", "store": "s"},
        {"name": "y", "dataset": "d", "version": "v1", "store": "s"},
        {"name": "z", "dataset": "e", "version": "v2", "store": "s"}]}},
        "tokens_per_source": {"x": 5, "y": 7, "z": 1}}
    assert tokens_per_source_version(rec) == {"d@v1": 12, "e@v2": 1}


# ---- S3 ----------------------------------------------------------------------------------------

def test_s3_catalog(s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    url = f"{s3_bucket}/store"
    v = publish(url, "new", 1, 60)
    blend = resolve(spec(url, {"new": 1.0}))[0].to_json()
    rec = _train(tmp_path / "run", "s3-run", blend, steps=4, ckpt_every=2)
    cat = RunCatalog(url)
    run = cat.get("s3-run")
    assert run.events == 4 and run.record == rec
    assert cat.runs_for_version("new", v) == ["s3-run"]
    # a torn object (e.g. written by a non-atomic tool) is ignored, the record intact
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = f"{url[5:]}/_runs/s3-run/0000000009-checkpoint-deadbeef.json"
    fs.pipe_file(key, b'{"sha256": "ab", "event": {"rec')
    with caplog.at_level(logging.WARNING, logger="moe_cpt.provenance.catalog"):
        assert cat.get("s3-run").record == rec
    assert "ignoring unreadable event" in caplog.text
    check_readable(rec)
    fs.rm(f"{url[5:]}/new/{v}/manifest.json")
    with pytest.raises(NotFoundError, match=f"new@{v}"):
        check_readable(rec)


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_runs_ls_and_show(chain: dict, store: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "ls", "--store", store["url"]]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip().startswith("chain-")}
    assert set(lines) == {"chain-pre", "chain-cpt1", "chain-cpt2"}
    assert "cpt" in lines["chain-cpt1"] and "chain-pre" in lines["chain-cpt1"]
    assert "finished" in lines["chain-cpt2"] and f"new@{store['new2'][:12]}" in lines["chain-cpt2"]
    assert "0-6" in lines["chain-pre"]

    assert main(["runs", "show", "chain-cpt2", "--store", store["url"]]) == 0
    out = capsys.readouterr().out
    assert "run chain-cpt2" in out and "parent:" in out and "chain-cpt1" in out
    lineage_part = out.split("lineage:")[1]
    assert lineage_part.index("chain-cpt2") < lineage_part.index("chain-cpt1") < lineage_part.index("chain-pre")
    assert f"new@{store['new1']}" in lineage_part and f"replay@{store['replay']}" in lineage_part
    assert "384 tokens" in lineage_part  # 64 tokens x 6 steps of the pre-training run

    assert main(["runs", "show", "chain-cpt1", "--store", store["url"], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["record"]["parent_run_id"] == "chain-pre"
    assert [n["run_id"] for n in doc["lineage"]] == ["chain-cpt1", "chain-pre"]
    assert {d["version"] for d in doc["lineage"][1]["datasets"]} == {store["new1"], store["replay"]}


def test_cli_unknown_run_is_one_line_exit_2(store: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "show", "no-such-run", "--store", store["url"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: no run 'no-such-run'") and err.count("\n") == 1
    assert main(["runs", "show", "../etc", "--store", store["url"]]) == 2
    assert "invalid run id" in capsys.readouterr().err


def test_cli_runs_ls_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "ls", "--store", str(tmp_path / "empty")]) == 0
    assert "no runs in" in capsys.readouterr().out


def test_cli_corpus_show_lists_consuming_runs(chain: dict, store: dict, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal width

    def consumers(ref: str) -> str:
        assert main(["corpus", "show", ref, "--store", store["url"]]) == 0
        out = capsys.readouterr().out
        return next(ln for ln in out.splitlines() if ln.startswith("runs that read it:"))

    line = consumers(f"replay@{store['replay']}")
    assert "chain-pre" in line and "chain-cpt1" in line and "chain-cpt2" not in line
    line = consumers("new@v1")
    assert "chain-pre" in line and "chain-cpt1" not in line


def test_cli_corpus_show_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    url = str(tmp_path / "s")
    publish(url, "lonely", 1, 30)
    assert main(["corpus", "show", "lonely@latest", "--store", url]) == 0
    assert "runs that read it: none" in capsys.readouterr().out


def test_objects_are_written_once(tmp_path: Path) -> None:
    from moe_cpt.errors import CptError
    from moe_cpt.fs import open_fs, write_once

    cat = RunCatalog(str(tmp_path / "s"))
    assert cat.mark_version("d", "v1", "r1", {"run_id": "r1"}) is True
    assert cat.mark_version("d", "v1", "r1", {"run_id": "r1", "again": True}) is False
    marker = tmp_path / "s" / "_runs" / "_by_version" / "d" / "v1" / "r1"
    assert json.loads(marker.read_text()) == {"run_id": "r1"}
    fs, path = open_fs(str(tmp_path / "obj"))
    write_once(fs, path, b"first")
    with pytest.raises(CptError, match="exists already"):
        write_once(fs, path, b"second")
    assert (tmp_path / "obj").read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["obj", "s"]  # no temporary file left behind
