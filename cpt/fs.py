"""fsspec helpers shared by every stage: URL -> filesystem, small JSON objects, atomic writes.

S3 endpoints and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which botocore reads
itself, so the same commands work against AWS S3, MinIO or the local test server.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from cpt.errors import CptError, NotFoundError


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` or ``s3://`` URL."""
    try:
        return url_to_fs(url)
    except ImportError as exc:  # e.g. s3fs missing
        raise CptError(f"cannot open {url!r}: {exc}") from exc


def join(base: str, *parts: str) -> str:
    """Join URL/path components with '/' (works for local paths and object-store keys)."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def unstrip_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of ``path`` on ``fs`` (``s3://bucket/key`` or a plain local path)."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def absolute_url(url: str) -> str:
    """``url`` unchanged for object stores; a local path (or ``file://`` URL) made absolute, so a
    recorded store still names the same folder when read from another working directory."""
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url.removeprefix("file://"))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError as exc:
        raise NotFoundError(f"{unstrip_protocol(fs, path)} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise CptError(f"{unstrip_protocol(fs, path)} is not valid JSON: {exc}") from exc


def dumps_canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace variance) for hashing and storing."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object so that readers see either nothing/the old object or the whole new one.

    On object stores a single PUT is atomic already; on local disk we write a temporary file in
    the same folder and rename it over the target.
    """
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{id(data):x}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
