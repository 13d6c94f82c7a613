"""The refs of a dataset (tags, ``vN`` numbers, build keys) as an append-only log of write-once slots.

Layout::

    <store>/<dataset>/_refs/<seq:010d>.json   one event per slot: publish | tag | repair
    <store>/<dataset>/refs.json               (stores written before the log) the base state

A writer never rewrites an object. To record an event it *claims* the next free slot with a
create-if-absent write (:func:`moe_cpt.fs.write_once`: ``If-None-Match: *`` on S3, ``link(2)`` on
local disk); if another writer took that slot first, it tries the next one. So every accepted
update lands in exactly one slot, none is lost, and slots fill without gaps: a slot is only
tried once the one before it exists. The ref state is the deterministic fold of ``refs.json``
(if any) and the slots in order, so every reader computes the same tags, and a version's
``vN`` is fixed once its publish slot exists (``N`` counts the distinct versions published up
to and including that slot).

Each slot carries the SHA-256 of its payload (:func:`moe_cpt.fs.seal_event`). A slot that does not
read back whole is *damage*: the fold refuses (:class:`~moe_cpt.errors.IntegrityError`) rather than
guess which tag it moved, until ``cpt corpus repair NAME`` appends a ``repair`` event that voids
the damaged slots and re-registers every version whose manifest is present.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from moe_cpt.errors import ConfigError, CptError, IntegrityError
from moe_cpt.fs import ObjectExistsError, seal_event, unseal_event, unstrip_protocol, write_once

REFS_DIR = "_refs"
LEGACY_REFS = "refs.json"
EVENT_FORMAT = "moe-cpt/ref-event-v1"
SLOT_RE = re.compile(r"^(\d{10})\.json$")
KINDS = ("publish", "tag", "repair")
MAX_CLAIM_TRIES = 100_000


@dataclass
class Refs:
    """The folded ref state of one dataset."""

    tags: dict[str, str] = field(default_factory=dict)
    builds: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)  # in publish order: versions[N-1] is vN

    def to_json(self) -> dict:
        return {"tags": self.tags, "builds": self.builds, "versions": self.versions}

    def publish(self, version: str, build_key: str) -> None:
        if version not in self.versions:
            self.versions.append(version)
            self.tags[f"v{len(self.versions)}"] = version
        if build_key:
            self.builds[build_key] = version
        self.tags["latest"] = version


@dataclass
class Damage:
    """What could not be read back from a dataset's ref state."""

    slots: list[str] = field(default_factory=list)  # slot names that are not whole events
    base: str = ""  # why refs.json is unreadable ("" if fine or absent)

    def __bool__(self) -> bool:
        return bool(self.slots or self.base)

    def describe(self) -> str:
        parts = [f"slot {s} unreadable" for s in self.slots]
        if self.base:
            parts.insert(0, f"{LEGACY_REFS}: {self.base}")
        return "; ".join(parts)


@dataclass
class RefLog:
    """Everything read from a dataset's ref state: the fold, and any damage found."""

    refs: Refs
    damage: Damage
    slots: int  # number of slots present
    events: list[dict[str, Any]] = field(default_factory=list)


def writer_identity() -> dict[str, Any]:
    """Who writes an event: user, host, pid and time (for humans; the fold does not use them)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(),
            "time": datetime.now(UTC).isoformat(timespec="seconds")}


class RefStore:
    """The ref log of one dataset at ``<dataset folder>`` on ``fs``."""

    def __init__(self, fs: Any, dataset_dir: str, name: str):
        self.fs = fs
        self.dir = dataset_dir
        self.name = name
        self.log_dir = posixpath.join(dataset_dir, REFS_DIR)

    def exists(self) -> bool:
        return bool(self._slot_names()) or self._exists(posixpath.join(self.dir, LEGACY_REFS))

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    def _slot_names(self) -> list[str]:
        self.fs.invalidate_cache(self.log_dir)
        try:
            entries = self.fs.ls(self.log_dir, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (posixpath.basename(e.rstrip("/")) for e in entries) if SLOT_RE.match(n))

    # ---- reading --------------------------------------------------------------------------
    def _read_base(self, damage: Damage) -> Refs:
        path = posixpath.join(self.dir, LEGACY_REFS)
        if not self._exists(path):
            return Refs()
        try:
            with self.fs.open(path, "rb") as f:
                d = json.loads(f.read())
            refs = Refs(tags=dict(d.get("tags", {})), builds=dict(d.get("builds", {})),
                        versions=list(d.get("versions", [])))
            if not all(isinstance(v, str) for v in [*refs.tags.values(), *refs.builds.values(), *refs.versions]):
                raise ValueError("a ref that is not a version id")
            return refs
        except (ValueError, TypeError, AttributeError) as exc:
            damage.base = f"not a readable refs file ({exc})"
            return Refs()

    def _read_slot(self, slot: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(posixpath.join(self.log_dir, slot), "rb") as f:
                payload = unseal_event(f.read())
            if payload.get("format") != EVENT_FORMAT or payload.get("kind") not in KINDS:
                raise ValueError("not a ref event")
            return payload
        except ValueError:
            return None

    def read(self) -> RefLog:
        """Fold ``refs.json`` and every slot; damage is reported, not raised (see :meth:`load`)."""
        damage = Damage()
        base = self._read_base(damage)
        names = self._slot_names()
        events: list[dict[str, Any]] = []
        for n in names:
            ev = self._read_slot(n)
            if ev is None:
                damage.slots.append(n)
            else:
                events.append(ev)
        voided: set[str] = set()
        void_base = False
        for ev in events:
            if ev["kind"] == "repair":
                voided.update(ev.get("void_slots", []))
                void_base = void_base or bool(ev.get("void_base"))
        damage.slots = [s for s in damage.slots if s not in voided]
        if void_base:
            damage.base = ""
            base = Refs()
        refs = base
        for ev in events:
            apply_event(refs, ev)
        return RefLog(refs=refs, damage=damage, slots=len(names), events=events)

    def load(self) -> Refs:
        """The fold; :class:`IntegrityError` if any part of the ref state is damaged."""
        log = self.read()
        if log.damage:
            raise IntegrityError(
                f"the refs of dataset {self.name!r} are damaged ({log.damage.describe()}) in "
                f"{unstrip_protocol(self.fs, self.dir)}; run `cpt corpus repair {self.name}` to rebuild "
                "them from the manifests present")
        return log.refs

    # ---- writing --------------------------------------------------------------------------
    def append(self, kind: str, body: Mapping[str, Any]) -> str:
        """Record one event in the next free slot; returns the slot's name."""
        if kind not in KINDS:
            raise ConfigError(f"unknown ref event kind {kind!r}")
        names = self._slot_names()
        seq = int(SLOT_RE.match(names[-1]).group(1)) + 1 if names else 0  # type: ignore[union-attr]
        for _ in range(MAX_CLAIM_TRIES):
            slot = f"{seq:010d}.json"
            payload = {"format": EVENT_FORMAT, "dataset": self.name, "seq": seq, "kind": kind,
                       "by": writer_identity(), **dict(body)}
            try:
                write_once(self.fs, posixpath.join(self.log_dir, slot), seal_event(payload))
                return slot
            except ObjectExistsError:
                seq += 1  # another writer took this slot: ours goes after it
        raise CptError(f"could not claim a ref slot for {self.name!r} after {MAX_CLAIM_TRIES} tries")


def apply_event(refs: Refs, ev: Mapping[str, Any]) -> None:
    """Fold one event into ``refs`` (the one rule every reader applies in slot order)."""
    if ev["kind"] == "publish":
        refs.publish(str(ev["version"]), str(ev.get("build_key") or ""))
    elif ev["kind"] == "tag":
        refs.tags[str(ev["tag"])] = str(ev["version"])
    elif ev["kind"] == "repair":
        for item in ev.get("publish", []):
            refs.publish(str(item["version"]), str(item.get("build_key") or ""))
