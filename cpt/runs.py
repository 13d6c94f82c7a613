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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cpt.errors import ConfigError, CptError, NotFoundError
from cpt.fs import (
    dumps_canonical,
    join,
    open_fs,
    seal_event,
    unseal_event,
    unstrip_protocol,
    write_once,
)

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
BY_VERSION_DIR = "_by_version"
EVENT_FORMAT = "moe-cpt/run-event-v1"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EVENT_NAME_RE = re.compile(r"^(\d{10})-([a-z_]+)-([0-9a-f]{8})\.json$")
TERMINAL_STATUSES = ("finished", "failed")


def new_run_id() -> str:
    """A fresh run id: UTC start time + 8 random hex digits (sorts by start time)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is usable as a catalog key, else raise :class:`ConfigError`."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r} (letters, digits, . _ - ; not starting with . _ -)")
    return run_id


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- what a record says about its data ---------------------------------------------------------

@dataclass(frozen=True)
class DatasetUse:
    """One source of a run's blend: which dataset version it read, from where, how much."""

    source: str  # the blend's label for it
    dataset: str
    version: str
    store: str
    tokens: int = 0
    epochs: float | None = None

    @property
    def spec(self) -> str:
        return f"{self.dataset}@{self.version}"


def blend_sources(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resolved blend's source entries of a record (``data.blend.sources``), or ``[]``
    for a run without a store (e.g. synthetic data)."""
    data = record.get("data") or {}
    blend = data.get("blend") if isinstance(data, Mapping) else None
    sources = blend.get("sources") if isinstance(blend, Mapping) else None
    return [s for s in sources or [] if isinstance(s, Mapping) and s.get("dataset") and s.get("version")]


def dataset_uses(record: Mapping[str, Any]) -> list[DatasetUse]:
    """Every dataset version a record's blend read, with the tokens consumed from it."""
    tokens = record.get("tokens_per_source") or {}
    epochs = (record.get("data") or {}).get("epochs") or {}
    uses = []
    for s in blend_sources(record):
        name = str(s.get("name", s["dataset"]))
        ep = epochs.get(name) if isinstance(epochs, Mapping) else None
        uses.append(DatasetUse(source=name, dataset=str(s["dataset"]), version=str(s["version"]),
                               store=str(s.get("store", "")), tokens=int(tokens.get(name, 0) or 0),
                               epochs=float(ep) if isinstance(ep, int | float) else None))
    return uses


def tokens_per_source_version(record: Mapping[str, Any]) -> dict[str, int]:
    """``{"dataset@version": tokens}`` from a record's per-source token counts and its blend
    (two sources reading the same version are summed)."""
    out: dict[str, int] = {}
    for use in dataset_uses(record):
        out[use.spec] = out.get(use.spec, 0) + use.tokens
    return out


def record_stores(record: Mapping[str, Any]) -> list[str]:
    """The stores a record's blend reads from, in first-use order (empty: no catalog)."""
    stores: list[str] = []
    for s in blend_sources(record):
        url = str(s.get("store") or "")
        if url and url not in stores:
            stores.append(url)
    return stores


# ---- the fold of a run's events -----------------------------------------------------------------

@dataclass
class RunRecord:
    """A run as the catalog knows it: the fold of its events."""

    run_id: str
    record: dict[str, Any]
    events: int
    first_event_at: str = ""
    last_event_at: str = ""
    store: str = ""  # the catalog it was read from
    skipped: list[str] = field(default_factory=list)  # unreadable event objects (warned about)

    @property
    def phase(self) -> str:
        return str(self.record.get("phase") or self.record.get("kind") or "")

    @property
    def parent_run_id(self) -> str:
        return str(self.record.get("parent_run_id") or "")

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "")

    @property
    def datasets(self) -> list[DatasetUse]:
        return dataset_uses(self.record)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "store": self.store, "events": self.events,
                "first_event_at": self.first_event_at, "last_event_at": self.last_event_at,
                "skipped_events": self.skipped, "record": self.record}


def fold(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The record a sequence of event payloads describes: later keys replace earlier ones."""
    out: dict[str, Any] = {}
    for r in records:
        out.update(r)
    return out


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

def event_kind(previous: Mapping[str, Any] | None, record: Mapping[str, Any]) -> str | None:
    """Which catalog event a new snapshot of a record is, compared with the previous snapshot,
    or ``None`` if nothing the catalog tracks changed (e.g. one more step without a
    checkpoint). Events: ``start``, ``resume`` (a new segment), ``checkpoint``, the terminal
    status (``finished``/``failed``) and ``status`` (another status change)."""
    if not previous:
        return "start"
    if len(record.get("segments") or []) > len(previous.get("segments") or []):
        return "resume"
    status = record.get("status")
    if status != previous.get("status"):
        return status if status in TERMINAL_STATUSES else "status"
    if list(record.get("checkpoints") or []) != list(previous.get("checkpoints") or []):
        return "checkpoint"
    return None


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


def record_mix_stream(
    blend: Mapping[str, Any],
    tokens_per_source: Mapping[str, int],
    *,
    run_id: str | None = None,
    status: str = "running",
    kind: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Record a ``cpt mix`` stream (or mixer service) in the run catalog of every store of
    ``blend`` and return its run id.

    ``blend`` is the resolved blend's JSON (``ResolvedBlend.to_json()``: versions, weights or
    schedule, tokenizer hash, fingerprint, store of each source); ``tokens_per_source`` maps the
    blend's source labels to tokens served so far. Call it once when the stream starts
    (``run_id=None``: a new id is made and returned), then with that id whenever worth
    recording (e.g. every N batches and at the end with ``status="finished"``): each call
    appends one event holding the full snapshot, so the latest counts win. ``extra`` adds
    keys to the record (e.g. ``{"client": ..., "start_step": ...}``).
    """
    from cpt.codeversion import code_version

    new = run_id is None
    rid = check_run_id(run_id or new_run_id())
    record: dict[str, Any] = {
        "run_id": rid, "phase": "mix", "kind": "mix", "parent_run_id": "", "status": status,
        "data": {"kind": "mixer", "blend": dict(blend),
                 "source_names": [s.get("name") for s in blend.get("sources", [])]},
        "tokens_per_source": {k: int(v) for k, v in tokens_per_source.items()},
        "code": code_version(),
        **(extra or {}),
    }
    record["tokens_per_source_version"] = tokens_per_source_version(record)
    if not record_stores(record):
        raise ConfigError("record_mix_stream: the blend names no store (is it a resolved blend's JSON?)")
    publish_record(record, "start" if new else (status if status in TERMINAL_STATUSES else "update"))
    return rid


# ---- lineage and readability -------------------------------------------------------------------

@dataclass
class LineageNode:
    """One run of a lineage: the run, what it read, and where its record came from."""

    run_id: str
    record: dict[str, Any] | None  # None: not found in any catalog nor its run folder
    source: str = ""  # catalog URL or run.json path the record was read from
    depth: int = 0

    @property
    def datasets(self) -> list[DatasetUse]:
        return dataset_uses(self.record or {})

    def to_json(self) -> dict[str, Any]:
        r = self.record or {}
        return {"run_id": self.run_id, "depth": self.depth, "found": self.record is not None,
                "source": self.source, "phase": r.get("phase", ""), "status": r.get("status", ""),
                "parent_run_id": r.get("parent_run_id", ""),
                "steps": [r.get("start_step"), r.get("end_step")],
                "datasets": [{"source": u.source, "dataset": u.dataset, "version": u.version,
                              "store": u.store, "tokens": u.tokens, "epochs": u.epochs}
                             for u in self.datasets]}


def _find_record(run_id: str, catalogs: Iterable[RunCatalog]) -> tuple[dict[str, Any], str] | None:
    for c in catalogs:
        if c.exists(run_id):
            return c.get(run_id).record, c.url
    return None


def lineage(run_id: str, catalogs: Iterable[RunCatalog], max_depth: int = 64) -> list[LineageNode]:
    """``run_id`` and its ancestors (parent, grandparent, ...), nearest first, each with the
    dataset versions it consumed. A parent is looked up in ``catalogs`` (and in the catalogs
    of the stores the child's blend names), then in the run folder recorded in the child's
    ``parent.run_dir`` (``run.json``), e.g. for a pre-training run on synthetic data; a parent
    found nowhere is listed with ``record=None``. Raises :class:`NotFoundError` if ``run_id``
    itself is unknown."""
    known = list(catalogs)
    found = _find_record(run_id, known)
    if found is None:
        where = ", ".join(c.url for c in known) or "no catalog"
        raise NotFoundError(f"no run {run_id!r} in the run catalog of {where}")
    nodes = [LineageNode(run_id, found[0], found[1], 0)]
    seen = {run_id}
    while len(nodes) < max_depth:
        child = nodes[-1].record or {}
        parent_id = str(child.get("parent_run_id") or "")
        if not parent_id:
            break
        if parent_id in seen:
            log.warning("run lineage: cycle at %s", parent_id)
            break
        seen.add(parent_id)
        urls = {c.url for c in known}
        known += [RunCatalog(u) for u in record_stores(child) if u not in urls]
        hit = _find_record(parent_id, known)
        if hit is None:
            hit = _read_local_record(str((child.get("parent") or {}).get("run_dir") or ""), parent_id)
        nodes.append(LineageNode(parent_id, hit[0] if hit else None, hit[1] if hit else "", len(nodes)))
    return nodes


def _read_local_record(run_dir: str, run_id: str) -> tuple[dict[str, Any], str] | None:
    import json
    from pathlib import Path

    if not run_dir:
        return None
    path = Path(run_dir) / "run.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (record, str(path)) if record.get("run_id") == run_id else None


def check_readable(record: Mapping[str, Any]) -> None:
    """Raise :class:`NotFoundError` naming every dataset version the record's blend read that
    can no longer be opened: manifest missing or modified, a shard missing or of another size,
    or the store unreachable. A record without a store (synthetic data) passes."""
    from corpus.reader import open_dataset

    problems: list[str] = []
    for use in dataset_uses(record):
        try:
            ds = open_dataset(use.store, use.spec)
            present = {p.rstrip("/"): int(info.get("size") or 0)
                       for p, info in ds.fs.find(ds.store.version_path(use.dataset, use.version),
                                                 detail=True).items()}
            bad = [s.path for i, s in enumerate(ds.manifest.shards)
                   if present.get(ds.shard_path(i).rstrip("/")) != s.nbytes]
            if bad:
                raise NotFoundError(f"{len(bad)} shard(s) missing or resized, e.g. {bad[0]}")
        except CptError as exc:
            problems.append(f"{use.spec} (source {use.source}) in {use.store}: {exc}")
        except OSError as exc:  # store unreachable, permission denied, ...
            problems.append(f"{use.spec} (source {use.source}) in {use.store}: {type(exc).__name__}: {exc}")
    if problems:
        raise NotFoundError(
            f"run {record.get('run_id', '?')} read dataset versions that are no longer readable: "
            + "; ".join(problems))
