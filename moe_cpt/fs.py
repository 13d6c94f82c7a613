"""fsspec helpers shared by every stage: URL -> filesystem, small JSON objects, atomic writes
(:func:`atomic_write_file`, :func:`write_bytes_atomic`, :func:`write_once`: the only ones).

S3 endpoints and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which botocore reads
itself, so the same commands work against AWS S3, MinIO or the local test server.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from moe_cpt.errors import CptError, NotFoundError, StoreError
from moe_cpt.extras import install_hint, missing_extra
from moe_cpt.hashing import sha256_hex


def s3_retry_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """s3fs options with retries in one layer: botocore makes one attempt per request (unless
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` say otherwise) and s3fs's own retry loop is off;
    callers retry with jittered exponential backoff (``moe_cpt.mixer.blocks.retry_call``, docs/reliability.md)."""
    env = os.environ if env is None else env
    if "AWS_MAX_ATTEMPTS" in env or "AWS_RETRY_MODE" in env:
        return {}
    return {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}}}


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` or ``s3://`` URL."""
    s3 = url.startswith(("s3://", "s3a://"))
    try:
        fs, path = url_to_fs(url, **(s3_retry_options() if s3 else {}))
    except ImportError as exc:  # e.g. s3fs missing
        extra = missing_extra(exc)
        reason = f"it needs the {extra} extra: {install_hint(extra)}" if extra else str(exc)
        raise CptError(f"cannot open {url!r}: {reason}") from exc
    if s3:
        fs.retries = 1  # s3fs's own retry loop (a class attribute): one attempt
    return fs, path


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


def seal_event(payload: dict[str, Any]) -> bytes:
    """The bytes of a write-once event object: the payload with the SHA-256 of its canonical
    JSON, so a reader can tell a whole event from a torn or edited one (:func:`unseal_event`)."""
    return dumps_canonical({"sha256": sha256_hex(dumps_canonical(payload)), "event": payload})


def unseal_event(raw: bytes) -> dict[str, Any]:
    """The payload of :func:`seal_event` bytes; :class:`ValueError` if they are not a whole,
    unmodified event."""
    try:
        outer = json.loads(raw)
        payload = outer["event"]
        digest = outer["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not an event object ({exc})") from exc
    if not isinstance(payload, dict) or sha256_hex(dumps_canonical(payload)) != digest:
        raise ValueError("checksum mismatch")
    return payload


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(folder: str, name: str, parts: Iterable[bytes | memoryview], durable: bool) -> str:
    """Write ``parts`` to a fresh hidden temporary file in ``folder`` (fsynced if ``durable``);
    return its path."""
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "xb") as f:
        for part in parts:
            f.write(part)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return tmp


def atomic_write_file(path: str | os.PathLike[str], data: bytes | Iterable[bytes | memoryview], *,
                      durable: bool = True) -> None:
    """Replace the local file ``path`` so that readers see the old or the whole new content.

    The bytes (``data``, or its parts in order) go to a uniquely named temporary file in the
    same folder, which is renamed over ``path``. With ``durable`` (the default) the file and then
    the folder are fsynced, so after a power loss ``path`` is the old or the new content, never
    empty or partial; ``durable=False`` is for caches and snapshots that a crash may lose.
    """
    folder, name = os.path.split(os.fspath(path))
    folder = folder or "."
    parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    tmp = _write_temp(folder, name, parts, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        _fsync_folder(folder)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object so that readers see either nothing/the old object or the whole new one:
    a single PUT on object stores (atomic already), :func:`atomic_write_file` on local disk."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        atomic_write_file(path, data)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ObjectExistsError(CptError):
    """A write-once object exists already."""


def write_once(fs: Any, path: str, data: bytes) -> None:
    """Create the object ``path`` holding ``data``, all or nothing, never replacing one.

    On S3 this is a single conditional PUT (``If-None-Match: *``): the store itself refuses a
    second creation, so of any number of concurrent writers exactly one succeeds. On local disk
    the bytes go to a hidden temporary file in the same folder, are fsynced, and are hard-linked
    to ``path`` (which fails if ``path`` exists), then the folder is fsynced: after a crash
    ``path`` is either absent or complete. Raises :class:`ObjectExistsError` (a
    :class:`CptError`) if ``path`` exists.
    """
    if not is_local(fs):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError as exc:
            raise ObjectExistsError(f"{unstrip_protocol(fs, path)} exists already (write-once)") from exc
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _write_temp(folder, name, (data,), durable=True)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise ObjectExistsError(f"{path} exists already (write-once)") from exc
    finally:
        _unlink_quietly(tmp)
    _fsync_folder(folder)


# ---- object store failures as one line ----------------------------------------------------------

def describe_store_error(exc: BaseException, url: str) -> str | None:
    """A one-line description of an object-store failure (endpoint down, no credentials, access
    denied, no such bucket), or None if ``exc`` is not one."""
    try:
        import botocore.exceptions as bx
    except ImportError:  # no S3 support installed: nothing to translate
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return (f"no credentials for the object store of {url} (set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or an AWS profile)")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return f"cannot reach the object store at {endpoint} for {url}: {exc}"
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"the object store at {endpoint} refused access to {url} ({code}): check the credentials"
        return f"the object store at {endpoint} failed a request for {url}: {code or exc}"
    if isinstance(exc, PermissionError):
        return f"permission denied for {url}: {exc}"
    return None


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Turn object-store failures raised inside the block into one-line :class:`StoreError` s."""
    try:
        yield
    except CptError:
        raise
    except Exception as exc:
        chain: BaseException | None = exc
        while chain is not None:
            message = describe_store_error(chain, url)
            if message:
                raise StoreError(message) from exc
            chain = chain.__cause__ or chain.__context__
        raise


def try_flock(path: str | os.PathLike[str], mode: int = 0o644) -> tuple[int | None, bytes]:
    """Open (create) ``path`` and take an exclusive, non-blocking ``flock`` on it: ``(fd, b"")``,
    or ``(None, what the current holder wrote into the file)`` when another process holds it.
    The kernel drops the lock when the holder's descriptor closes, however it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 65536, 0)
        except OSError:
            holder = b""
        os.close(fd)
        return None, holder
    return fd, b""


def write_holder(fd: int, text: str) -> None:
    """Replace the content of a held lock file with ``text`` (who holds it), durably."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)
