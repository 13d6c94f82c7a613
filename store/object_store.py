"""The versioned object store: where dataset versions, refs and tokenizers live.

Layout under a store URL (local folder, ``file://`` or ``s3://bucket/prefix``)::

    <store>/<dataset>/<version>/manifest.json     written last: a version exists iff this exists
    <store>/<dataset>/<version>/shards/*.tar
    <store>/<dataset>/<version>/index/*.parquet   one row per document
    <store>/<dataset>/_refs/<seq>.json            ref log: publish / tag / repair events, write-once
    <store>/<dataset>/refs.json                   (older stores) base state of the ref log, read only
    <store>/_tokenizers/<sha256>.json             every tokenizer a version was built with
    <store>/_work/<dataset>/<build key>/          scratch of a build in progress (deleted after)

Versions are immutable; tags are small mutable pointers to them, kept as the fold of an
append-only log of write-once events (:mod:`moe_cpt.store.refs`): concurrent writers never lose an update.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import fsspec

from moe_cpt.errors import ConfigError, CptError, IntegrityError, NotFoundError, StoreError
from moe_cpt.fs import is_local, join, open_fs, read_json, unstrip_protocol
from moe_cpt.store.manifest import VERSION_ID_LEN, Manifest
from moe_cpt.store.refs import Refs, RefStore

MAX_NAME_LEN = 128
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LEN - 1}}}")
TAG_RE = re.compile(rf"[A-Za-z][A-Za-z0-9._-]{{0,{MAX_NAME_LEN - 1}}}")
VERSION_RE = re.compile(f"[0-9a-f]{{{VERSION_ID_LEN}}}")
DEFAULT_REF = "latest"
__all__ = ["DatasetListing", "RepairReport", "Refs", "Store", "check_name", "check_tag", "parse_ref"]


DEFAULT_STORE = "data/store"


def default_store() -> str:
    """The store the commands use without ``--store``: ``$CPT_STORE``, else ``data/store``."""
    return os.environ.get("CPT_STORE", DEFAULT_STORE)


def _is_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def parse_ref(spec: str) -> tuple[str, str]:
    """``"name@ref"`` -> ``(name, ref)``; a bare name means ``name@latest``."""
    name, _, ref = spec.partition("@")
    ref = ref or DEFAULT_REF
    if not _is_name(name):
        raise ConfigError(f"invalid dataset name {name[:160]!r} in {spec[:160]!r} "
                          f"(letters, digits, . _ -; at most {MAX_NAME_LEN} characters)")
    if not _is_name(ref):
        raise ConfigError(f"invalid ref {ref[:160]!r} in {spec[:160]!r} (a tag or a version id)")
    return name, ref


def check_name(name: str) -> str:
    """``name`` if it is a valid dataset name (the whole string matches), else ConfigError."""
    if not _is_name(name):
        shown = name[:160] if isinstance(name, str) else name
        raise ConfigError(f"invalid dataset name {shown!r} (letters, digits, . _ - ; not starting with . _ -; "
                          f"at most {MAX_NAME_LEN} characters)")
    return name


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid tag: a letter, then letters, digits, . _ - (whole string, at
    most 128 characters), and not shaped like a version id."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or VERSION_RE.fullmatch(tag):
        shown = tag[:160] if isinstance(tag, str) else tag
        raise ConfigError(f"invalid tag {shown!r}: start with a letter; letters, digits, . _ -; "
                          f"at most {MAX_NAME_LEN} characters")
    return tag


@dataclass
class RepairReport:
    """What ``cpt corpus repair`` found and did."""

    name: str
    damaged: str = ""  # the damage found in the ref state ("" if none)
    registered: list[str] = field(default_factory=list)  # versions re-registered from their manifests
    unreadable: list[str] = field(default_factory=list)  # version folders with a damaged manifest
    missing: list[str] = field(default_factory=list)  # versions the refs list whose manifest is gone
    lost: str = ""  # what is known to be unrecoverable
    changed: bool = False  # whether a repair event was written


@dataclass
class DatasetListing:
    """One dataset of :meth:`Store.list_datasets`, with the problem found reading it (if any)."""

    name: str
    problem: str = ""
    versions: list[str] = field(default_factory=list)


class Store:
    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self.fs, self.root = open_fs(url)

    # ---- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return unstrip_protocol(self.fs, self.path(*parts))

    def version_path(self, name: str, version: str, *parts: str) -> str:
        return self.path(name, version, *parts)

    def work_path(self, name: str, build_key: str) -> str:
        return self.path("_work", name, build_key)

    def tokenizer_relpath(self, sha256: str) -> str:
        return f"_tokenizers/{sha256}.json"

    # ---- refs ----------------------------------------------------------------------------
    def refs_log(self, name: str) -> RefStore:
        return RefStore(self.fs, self.path(check_name(name)), name)

    def load_refs(self, name: str) -> Refs:
        """The folded ref state; IntegrityError naming `cpt corpus repair` if it is damaged."""
        return self.refs_log(name).load()

    def register_version(self, name: str, version: str, build_key: str) -> Refs:
        """Record a freshly published version: build key, next ``vN`` tag, ``latest``.

        One write-once event; concurrent publishes each get their own slot (none is lost)."""
        log = self.refs_log(name)
        log.append("publish", {"version": version, "build_key": build_key})
        return self.load_refs(name)

    def tag(self, name: str, tag: str, version: str) -> None:
        check_tag(tag)
        log = self.refs_log(name)
        log.append("tag", {"tag": tag, "version": version})

    # ---- lookups -------------------------------------------------------------------------
    def has_version(self, name: str, version: str) -> bool:
        path = self.version_path(name, version, "manifest.json")
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def list_datasets(self) -> list[str]:
        """Names of the datasets in the store (folders holding a ref log or refs.json)."""
        return [d.name for d in self.scan_datasets(with_versions=False)]

    def scan_datasets(self, with_versions: bool = True) -> list[DatasetListing]:
        """Every dataset in the store; one whose refs are damaged is listed with the problem
        instead of failing the whole listing."""
        self.check_bucket()
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("_") or not _is_name(base) or not self.refs_log(base).exists():
                continue
            item = DatasetListing(base)
            if with_versions:
                try:
                    item.versions = self.list_versions(base)
                except CptError as exc:
                    item.problem = str(exc)
            out.append(item)
        return sorted(out, key=lambda d: d.name)

    # ---- buckets -------------------------------------------------------------------------
    def bucket(self) -> str | None:
        """The bucket of an object-store URL (None for a local store)."""
        return None if is_local(self.fs) else self.root.split("/", 1)[0]

    def check_bucket(self, create: bool = False) -> None:
        """StoreError if the store's bucket does not exist (it is created with ``create``).
        Transport errors (endpoint down, no credentials) propagate as raised, so library callers
        can retry them; the CLI turns them into one line (:func:`moe_cpt.fs.store_errors`)."""
        bucket = self.bucket()
        if bucket is None:
            return

        def probe() -> bool:
            self.fs.invalidate_cache(bucket)
            try:
                self.fs.ls(bucket, detail=False)
                return True
            except FileNotFoundError:
                return False

        if probe():
            return
        if not create:
            raise StoreError(f"bucket {bucket!r} of store {self.url} does not exist "
                             "(create it, or pass --create-bucket to `cpt corpus build`)")
        self.fs.mkdir(bucket)

    def list_versions(self, name: str) -> list[str]:
        """Published versions of ``name`` (those whose manifest exists), oldest first."""
        return [v for v in self.load_refs(name).versions if self.has_version(name, v)]

    def resolve(self, spec: str) -> tuple[str, str]:
        """``"name@ref"`` -> ``(name, version id)``; ref is a tag, a version id or its prefix."""
        name, ref = parse_ref(spec)
        refs = self.load_refs(name)
        if not refs.versions:
            raise NotFoundError(f"no dataset {name!r} in store {self.url} (see `cpt corpus ls --store {self.url}`)")
        if ref in refs.tags:
            version = refs.tags[ref]
        else:
            matches = [v for v in refs.versions if v.startswith(ref)] if len(ref) >= 6 else []
            if len(matches) != 1:
                known = ", ".join(sorted(refs.tags)) or "none"
                raise NotFoundError(
                    f"unknown ref {ref!r} for dataset {name!r} (tags: {known}; or a version id)"
                    if not matches
                    else f"ref {ref!r} of {name!r} is ambiguous: {', '.join(matches)}"
                )
            version = matches[0]
        if not self.has_version(name, version):
            raise NotFoundError(f"{name}@{ref} points to version {version}, whose manifest is missing from {self.url}")
        return name, version

    def load_manifest(self, name: str, version: str) -> Manifest:
        path = self.version_path(name, version, "manifest.json")
        d = read_json(self.fs, path)
        try:
            manifest = Manifest.from_json(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise NotFoundError(f"{unstrip_protocol(self.fs, path)} is not a valid manifest: {exc}") from exc
        if manifest.version_id() != version:
            raise IntegrityError(
                f"manifest of {name}@{version} hashes to {manifest.version_id()}: it was modified"
            )
        return manifest

    # ---- repair --------------------------------------------------------------------------
    def repair(self, name: str) -> RepairReport:
        """Rebuild the ref state of ``name`` from the manifests present.

        Appends one ``repair`` event that voids every damaged slot (and an unreadable
        ``refs.json``) and registers every version with a valid manifest that the remaining
        refs do not list (oldest ``published_at`` first). Reports what it could not recover.
        """
        check_name(name)
        log = self.refs_log(name).read()
        report = RepairReport(name=name, damaged=log.damage.describe())
        known = set(log.refs.versions)
        found: list[tuple[str, str, str]] = []  # (published_at, version, build key)
        for version in self._version_dirs(name):
            try:
                m = self.load_manifest(name, version)
            except CptError as exc:
                report.unreadable.append(f"{version}: {exc}")
                continue
            if version not in known:
                found.append((str(m.build.get("published_at") or m.build.get("created_at") or ""), version,
                              str(m.build.get("build_key") or "")))
        found.sort()
        for version in log.refs.versions:
            if not self.has_version(name, version):
                report.missing.append(version)
        if log.damage:
            report.lost = ("the updates in the damaged slots (tags, or publishes of versions whose manifest "
                           "is gone) cannot be recovered; set such tags again with `cpt corpus tag`")
        if not found and not log.damage:
            return report
        body = {"void_slots": log.damage.slots, "void_base": bool(log.damage.base),
                "publish": [{"version": v, "build_key": k} for _, v, k in found]}
        self.refs_log(name).append("repair", body)
        report.registered = [v for _, v, _ in found]
        report.changed = True
        return report

    def _version_dirs(self, name: str) -> list[str]:
        folder = self.path(name)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if VERSION_RE.fullmatch(n) and self.fs.exists(join(folder, n, "manifest.json")))

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self.fs
