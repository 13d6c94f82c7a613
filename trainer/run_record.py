"""The run record (``run.json``) every training run writes next to its outputs.

All writing goes through :func:`write_run_record`:

* ``run.json``: an atomic snapshot (temporary file, fsync, rename), rewritten every step; the
  trainer reads it back on resume.
* ``run-events.jsonl``: append-only history next to it, one fsynced line per event that the
  run catalog tracks (start, resume, checkpoint, status change); a torn last line after a
  crash is ignored on read, and :func:`read_run_record` falls back to it if ``run.json`` is
  unreadable.
* the run catalog (:mod:`cpt.runs`) of every store the run's blend reads (mixer runs), on the
  same events. Runs on synthetic data have no store and stay local.

Before resuming, the trainer calls :func:`check_inputs_readable` on the previous record.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cpt import runs
from cpt.codeversion import code_version
from cpt.errors import CptError

RUN_RECORD = "run.json"
RUN_EVENTS = "run-events.jsonl"

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return runs.new_run_id()


def check_inputs_readable(record: dict[str, Any]) -> None:
    """Raise :class:`cpt.errors.NotFoundError` naming every dataset version the (previous)
    run record says the run read that can no longer be opened; call it before resuming."""
    runs.check_readable(record)


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


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write ``run.json`` (run id, parent run id, config, data source description
    and state, start/end step, tokens per source, checkpoints written), adding ``code`` (git
    commit + dirty flag, also per segment) and ``tokens_per_source_version``; on a start,
    resume, checkpoint or status change also append it to ``run-events.jsonl`` and to the run
    catalog of every store its blend reads. A catalog that cannot be written is logged, not
    fatal: the next event carries the full snapshot again."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_RECORD
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_run_record(run_dir)
    record = dict(record)
    _add_code(record, previous)
    record["tokens_per_source_version"] = runs.tokens_per_source_version(record)
    data = json.dumps(record, indent=2, sort_keys=True, default=str)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    kind = runs.event_kind(previous, record)
    if kind is not None:
        snapshot = json.loads(data)  # what run.json holds (JSON types only)
        _append_event(run_dir / RUN_EVENTS, kind, snapshot)
        try:
            runs.publish_record(snapshot, kind)
        except (CptError, OSError) as exc:
            log.warning("run %s: could not write the run catalog (%s)", record.get("run_id"), exc)
    return path


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
    line = json.dumps({"kind": kind, "time": runs.now(), "record": record}, sort_keys=True) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:  # a crash may have left a torn last line: start a new one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
