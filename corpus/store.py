"""The versioned object store: where dataset versions, refs and tokenizers live.

Layout under a store URL (local folder, ``file://`` or ``s3://bucket/prefix``)::

    <store>/<dataset>/<version>/manifest.json     written last: a version exists iff this exists
    <store>/<dataset>/<version>/shards/*.tar
    <store>/<dataset>/<version>/index/*.parquet   one row per document
    <store>/<dataset>/refs.json                   tags (latest, v1, v2, ...) and build keys
    <store>/_tokenizers/<sha256>.json             every tokenizer a version was built with
    <store>/_work/<dataset>/<build key>/          scratch of a build in progress (deleted after)

Versions are immutable; tags are small mutable pointers to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import fsspec

from corpus.manifest import VERSION_ID_LEN, Manifest
from cpt.errors import ConfigError, IntegrityError, NotFoundError
from cpt.fs import dumps_canonical, join, open_fs, read_json, unstrip_protocol, write_bytes_atomic

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
DEFAULT_REF = "latest"


def parse_ref(spec: str) -> tuple[str, str]:
    """``"name@ref"`` -> ``(name, ref)``; a bare name means ``name@latest``."""
    name, _, ref = spec.partition("@")
    ref = ref or DEFAULT_REF
    if not NAME_RE.match(name):
        raise ConfigError(f"invalid dataset name {name!r} in {spec!r} (letters, digits, . _ -)")
    return name, ref


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"invalid dataset name {name!r} (letters, digits, . _ - ; not starting with . _ -)")
    return name


@dataclass
class Refs:
    tags: dict[str, str] = field(default_factory=dict)
    builds: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)  # in publish order

    def to_json(self) -> dict:
        return {"tags": self.tags, "builds": self.builds, "versions": self.versions}


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
    def load_refs(self, name: str) -> Refs:
        path = self.path(name, "refs.json")
        if not self.fs.exists(path):
            return Refs()
        d = read_json(self.fs, path)
        return Refs(tags=d.get("tags", {}), builds=d.get("builds", {}), versions=d.get("versions", []))

    def save_refs(self, name: str, refs: Refs) -> None:
        write_bytes_atomic(self.fs, self.path(name, "refs.json"), dumps_canonical(refs.to_json()))

    def register_version(self, name: str, version: str, build_key: str) -> Refs:
        """Record a freshly published version: build key, next ``vN`` tag, ``latest``."""
        refs = self.load_refs(name)
        if version not in refs.versions:
            refs.versions.append(version)
            refs.tags[f"v{len(refs.versions)}"] = version
        refs.builds[build_key] = version
        refs.tags["latest"] = version
        self.save_refs(name, refs)
        return refs

    def tag(self, name: str, tag: str, version: str) -> None:
        if not TAG_RE.match(tag) or re.fullmatch(f"[0-9a-f]{{{VERSION_ID_LEN}}}", tag):
            raise ConfigError(f"invalid tag {tag!r}: start with a letter; letters, digits, . _ -")
        refs = self.load_refs(name)
        refs.tags[tag] = version
        self.save_refs(name, refs)

    # ---- lookups -------------------------------------------------------------------------
    def has_version(self, name: str, version: str) -> bool:
        return self.fs.exists(self.version_path(name, version, "manifest.json"))

    def list_datasets(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = []
        for entry in self.fs.ls(self.root, detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("_") or not NAME_RE.match(base):
                continue
            if self.fs.exists(join(entry, "refs.json")):
                names.append(base)
        return sorted(names)

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

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self.fs
