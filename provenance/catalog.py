"""The run catalog: which dataset versions every training run (and ``cpt mix`` stream) consumed.

Layout under a store URL (local folder, ``file://`` or ``s3://bucket/prefix``)::

    <store>/_runs/<run_id>/<seq>-<kind>-<nonce>.json          one write-once event object
    <store>/_runs/_by_version/<dataset>/<version>/<run_id>    write-once marker: run used version

The catalog is append-only: a writer never rewrites or deletes an object, it only adds new ones
(a random nonce in each event name makes two writers unable to collide, even after a crash and a
resume). Each event object is written in one atomic step (a single PUT on S3; a temporary file,
fsync and rename on local disk) and carries the SHA-256 of its payload, so a reader sees either a
whole event or none; a torn or garbled object (a crash of a non-atomic writer, a hand edit) is
skipped with a warning and never corrupts the record. The record of a run is the fold (shallow
merge, in sequence order) of its events' ``record`` payloads.

A blend may span several stores: the record goes to the catalog of every store one of its
sources lives in, and each version's marker to the store that holds that version.
"""

from __future__ import annotations

import logging
import posixpath
import re
import uuid
from collections.abc import Mapping
from typing import Any

from moe_cpt.errors import ConfigError, CptError, NotFoundError
from moe_cpt.fs import (
    dumps_canonical,
    join,
    open_fs,
    seal_event,
    unseal_event,
    unstrip_protocol,
    write_once,
)
from moe_cpt.provenance.schema import (
    RUN_ID_RE,
    RunRecord,
    check_run_id,
    dataset_uses,
    fold,
    now,
    record_stores,
)

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
BY_VERSION_DIR = "_by_version"
EVENT_FORMAT = "moe-cpt/run-event-v1"
EVENT_NAME_RE = re.compile(r"^(\d{10})-([a-z_]+)-([0-9a-f]{8})\.json$")

# ---- the catalog of one store -------------------------------------------------------------------

class RunCatalog:
    """The append-only run catalog of one store (``<store>/_runs``)."""

    def __init__(self, store_url: str):
        self.url = store_url.rstrip("/") or store_url
        self.fs, root = open_fs(self.url)
        self.root = join(root, RUNS_DIR)

    def _run_dir(self, run_id: str) -> str:
        return join(self.root, check_run_id(run_id))

    def _ls(self, path: str) -> list[str]:
        """Base names in ``path``, listed afresh (other processes append: no cached listing)."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    def _event_names(self, run_id: str) -> list[str]:
        return sorted(n for n in self._ls(self._run_dir(run_id)) if EVENT_NAME_RE.match(n))

    def append(self, run_id: str, event: Mapping[str, Any], kind: str = "update") -> str:
        """Add one event (a partial or full record: its keys replace the folded record's) to
        ``run_id``; returns the new object's URL. Never overwrites: the name holds a sequence
        number one past the last event seen and a random nonce."""
        check_run_id(run_id)
        if not re.fullmatch(r"[a-z_]+", kind):
            raise ConfigError(f"invalid run event kind {kind!r} (lowercase letters and _)")
        names = self._event_names(run_id)
        seq = int(EVENT_NAME_RE.match(names[-1]).group(1)) + 1 if names else 0  # type: ignore[union-attr]
        payload = {"format": EVENT_FORMAT, "run_id": run_id, "seq": seq, "kind": kind,
                   "time": now(), "record": dict(event)}
        data = seal_event(payload)
        path = join(self._run_dir(run_id), f"{seq:010d}-{kind}-{uuid.uuid4().hex[:8]}.json")
        write_once(self.fs, path, data)
        return unstrip_protocol(self.fs, path)

    def _read_event(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as f:
                payload = unseal_event(f.read())
            if not isinstance(payload.get("record"), dict):
                raise ValueError("no record")
            return payload
        except ValueError as exc:
            log.warning("run catalog: ignoring unreadable event %s (%s)", unstrip_protocol(self.fs, path), exc)
            return None

    def exists(self, run_id: str) -> bool:
        """Whether the catalog holds at least one event object of ``run_id``."""
        return bool(self._event_names(run_id))

    def get(self, run_id: str) -> RunRecord:
        """The folded record of ``run_id``; :class:`NotFoundError` if the catalog has no event
        of it (or none readable)."""
        names = self._event_names(run_id)
        events, skipped = [], []
        for n in names:
            ev = self._read_event(join(self._run_dir(run_id), n))
            if ev is None:
                skipped.append(n)
            else:
                events.append(ev)
        if not events:
            extra = f" ({len(skipped)} unreadable event(s))" if skipped else ""
            raise NotFoundError(f"no run {run_id!r} in the run catalog of {self.url}{extra} "
                                f"(see `cpt runs ls --store {self.url}`)")
        return RunRecord(run_id=run_id, record=fold(e["record"] for e in events), events=len(events),
                         first_event_at=str(events[0].get("time", "")),
                         last_event_at=str(events[-1].get("time", "")), store=self.url, skipped=skipped)

    def run_ids(self) -> list[str]:
        """Ids of the runs with an event folder, sorted (ids from :func:`new_run_id` sort by
        start time)."""
        return sorted(i for i in self._ls(self.root) if RUN_ID_RE.match(i))

    def list(self) -> list[RunRecord]:
        """Every run in this catalog (runs without a readable event are skipped with a warning)."""
        out = []
        for run_id in self.run_ids():
            try:
                out.append(self.get(run_id))
            except NotFoundError as exc:
                log.warning("run catalog: %s", exc)
        return out

    # ---- by-version index ------------------------------------------------------------------
    def _marker(self, dataset: str, version: str, run_id: str) -> str:
        return join(self.root, BY_VERSION_DIR, dataset, version, check_run_id(run_id))

    def mark_version(self, dataset: str, version: str, run_id: str, info: Mapping[str, Any]) -> bool:
        """Write the marker "``run_id`` consumed ``dataset@version``" once; ``False`` if it
        was there already."""
        path = self._marker(dataset, version, run_id)
        self.fs.invalidate_cache(posixpath.dirname(path))
        try:
            write_once(self.fs, path, dumps_canonical(dict(info)))
        except CptError:  # marked already (by this run earlier, or another writer): same fact
            if not self.fs.exists(path):
                raise
            return False
        return True

    def runs_for_version(self, dataset: str, version: str) -> list[str]:
        """Ids of the runs that consumed ``dataset@version`` (one listing, no record reads)."""
        return sorted(i for i in self._ls(join(self.root, BY_VERSION_DIR, dataset, version)) if RUN_ID_RE.match(i))


# ---- writing a record to every store it read --------------------------------------------------

def publish_record(record: Mapping[str, Any], kind: str) -> list[str]:
    """Append ``record`` (a full snapshot) as a ``kind`` event to the catalog of every store
    its blend reads, and mark each version it reads in that version's store. Returns the
    stores written; ``[]`` for a record without a store (synthetic data)."""
    run_id = check_run_id(str(record.get("run_id") or ""))
    stores = record_stores(record)
    for url in stores:
        catalog = RunCatalog(url)
        catalog.append(run_id, record, kind)
        for use in dataset_uses(record):
            if use.store == url:
                catalog.mark_version(use.dataset, use.version, run_id,
                                     {"run_id": run_id, "source": use.source, "phase": record.get("phase", ""),
                                      "marked_at": now()})
    return stores
