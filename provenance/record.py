"""The local run recorder: ``run.json`` and ``run-events.jsonl`` in a run's output folder.

All writing goes through a :class:`RunRecorder` (one per run, held by the trainer's rank 0):

* ``run.json``: an atomic snapshot (temporary file + rename), rewritten every step; the trainer
  reads it back on resume. Snapshots that are catalog events are also fsynced.
* ``run-events.jsonl``: append-only history next to it, one fsynced line per event that the
  run catalog tracks (start, resume, checkpoint, status change: :func:`~moe_cpt.provenance.schema.event_kind`);
  a torn last line after a crash is ignored on read, and :func:`read_run_record` falls back to
  it if ``run.json`` is unreadable.
* the run catalog (:mod:`moe_cpt.provenance.catalog`) of every store the run's blend reads
  (mixer runs), on the same events. Runs on synthetic data have no store and stay local.

The recorder keeps the last snapshot in memory, so a step costs one write, not a re-read.
Before resuming, the trainer calls :func:`moe_cpt.provenance.lineage.check_readable` on the
previous record.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from moe_cpt.codeversion import code_version
from moe_cpt.errors import CptError
from moe_cpt.fs import atomic_write_file
from moe_cpt.provenance.catalog import publish_record
from moe_cpt.provenance.schema import event_kind, now, tokens_per_source_version

RUN_RECORD = "run.json"
RUN_EVENTS = "run-events.jsonl"

log = logging.getLogger(__name__)

def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The run's latest record: ``run.json``, or if that is unreadable the last complete
    line of ``run-events.jsonl``; ``{}`` for a new run."""
    path = Path(run_dir) / RUN_RECORD
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            log.warning("%s is unreadable (%s); using %s", path, exc, RUN_EVENTS)
    events = read_run_events(run_dir)
    return dict(events[-1]["record"]) if events else {}


def read_run_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The complete events of ``run-events.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / RUN_EVENTS
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        try:
            ev = json.loads(line)
            if isinstance(ev, dict) and isinstance(ev.get("record"), dict):
                out.append(ev)
                continue
        except ValueError:
            pass
        log.warning("%s line %d is incomplete; ignored", path, i + 1)
    return out


class RunRecorder:
    """Writes one run's record: ``run.json`` every call, events when the catalog tracks the
    change. Starts from what the folder already holds (a resumed run)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.previous: dict[str, Any] = read_run_record(self.run_dir)

    def write(self, record: dict[str, Any]) -> Path:
        """Write ``record`` (run id, parent run id, config, data source description and state,
        start/end step, tokens per source, checkpoints written), adding ``code`` (git commit +
        dirty flag, also per segment) and ``tokens_per_source_version``; on a start, resume,
        checkpoint or status change also append it to ``run-events.jsonl`` and to the run
        catalog of every store its blend reads. A catalog that cannot be written is logged, not
        fatal: the next event carries the full snapshot again."""
        path = self.run_dir / RUN_RECORD
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = dict(record)
        _add_code(record, self.previous)
        record["tokens_per_source_version"] = tokens_per_source_version(record)
        data = json.dumps(record, indent=2, sort_keys=True, default=str)
        kind = event_kind(self.previous, record)
        atomic_write_file(path, data.encode(), durable=kind is not None)
        snapshot = json.loads(data)  # what run.json holds (JSON types only)
        self.previous = snapshot
        if kind is not None:
            _append_event(self.run_dir / RUN_EVENTS, kind, snapshot)
            try:
                publish_record(snapshot, kind)
            except (CptError, OSError) as exc:
                log.warning("run %s: could not write the run catalog (%s)", record.get("run_id"), exc)
        return path


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """One write of ``record`` into ``run_dir`` (:meth:`RunRecorder.write`) by a fresh recorder."""
    return RunRecorder(run_dir).write(record)


def _add_code(record: dict[str, Any], previous: dict[str, Any]) -> None:
    """``code`` of the current segment, recorded on each segment; computed once per segment
    (reused from the previous snapshot while the segment is the same)."""
    segments = [dict(s) for s in record.get("segments") or []]
    old = previous.get("segments") or []
    for i, seg in enumerate(segments):
        if "code" not in seg and i < len(old) and old[i].get("start_step") == seg.get("start_step"):
            if "code" in old[i]:
                seg["code"] = old[i]["code"]
    if segments and "code" not in segments[-1]:
        segments[-1]["code"] = record.get("code") or code_version()
    if segments:
        record["segments"] = segments
    if "code" not in record:
        record["code"] = segments[-1]["code"] if segments else (previous.get("code") or code_version())


def _append_event(path: Path, kind: str, record: dict[str, Any]) -> None:
    line = json.dumps({"kind": kind, "time": now(), "record": record}, sort_keys=True) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:  # a crash may have left a torn last line: start a new one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
