"""The run record schema: run ids, what a record says about the data it read, the fold of a
run's events, and which snapshot changes are catalog events. Pure functions over the record
(a JSON mapping, as ``run.json`` holds it): no I/O.

A record (docs/runs.md) carries ``run_id``, ``phase`` (or ``kind`` for a mix stream),
``parent_run_id``, ``status``, ``data`` (``kind`` and, for mixer-fed runs, the resolved ``blend``
whose ``sources`` name dataset, version and store), ``tokens_per_source``, ``segments`` and
``checkpoints``; stages add keys of their own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from moe_cpt.errors import ConfigError

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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
