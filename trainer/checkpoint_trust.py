"""Only checkpoints that a run of this trainer wrote, unchanged, are loaded.

A torch DCP checkpoint is not data: its ``.metadata`` is read with ``pickle.load`` and non-tensor
items of the ``.distcp`` files with ``torch.load`` without ``weights_only`` (torch's DCP planner), and
torchtitan's data-loader state is a pickle too; unpickling runs code. So before anything of a
checkpoint is loaded (resume or CPT parent), every file of ``checkpoint/step-N`` is checked
against the SHA-256 digests that the run which wrote it recorded in its ``run.json`` at save time
(``checkpoint_sha256``: step -> {relative file name: hex digest}). A checkpoint with no recorded
digests, with a file added, missing or changed, a symlink, or a world-writable file or folder on
its way is refused with one :class:`UntrustedCheckpointError` line. ``run.trust_checkpoint=true``
skips the check (dangerous: only for a checkpoint you made yourself, e.g. copied by hand).

Threat model (docs/reliability.md): someone who can write files under a checkpoint folder but not
the run record (a shared or downloaded checkpoint, a planted ``step-N``) must not get code run by
a training that loads it. Out of scope: whoever can rewrite the run's ``run.json`` as well (the
same user or root), and swapping files between the check and the load (the files are checked
when the run starts, by the launcher and by every process right before it loads them).
"""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path
from typing import Any

from moe_cpt.errors import CptError

DIGEST_KEY = "checkpoint_sha256"
_CHUNK = 8 << 20

log = logging.getLogger(__name__)


class UntrustedCheckpointError(CptError):
    """A checkpoint that its run record does not vouch for."""


def digest_checkpoint(step_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``step_dir`` (relative POSIX names, sorted)."""
    root = Path(step_dir)
    out: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file():
            raise UntrustedCheckpointError(f"checkpoint {root}: {rel} is not a regular file")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def _check_modes(step_dir: Path) -> None:
    """Like OpenSSH's StrictModes: nobody but the owner may be able to swap the files."""
    for path in (step_dir.parent.parent, step_dir.parent, step_dir, *step_dir.rglob("*")):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if mode & stat.S_IWOTH and not stat.S_ISLNK(mode) and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
            raise UntrustedCheckpointError(f"checkpoint {step_dir}: {path} is writable by every "
                                           "user; refusing to load it (chmod o-w)")


def verify_checkpoint(step_dir: str | Path, step: int, record: dict[str, Any], record_path: str | Path,
                      *, trust: bool = False) -> None:
    """Raise :class:`UntrustedCheckpointError` unless the files of ``step_dir`` (checkpoint
    ``step``) are exactly those whose digests ``record`` (read from ``record_path``) holds."""
    step_dir = Path(step_dir)
    if trust:
        log.warning("run.trust_checkpoint=true: loading %s without checking it (unpickling runs "
                    "code from the checkpoint)", step_dir)
        return
    hint = "set run.trust_checkpoint=true only if you made this checkpoint yourself: loading it runs code from it"
    recorded = (record.get(DIGEST_KEY) or {}).get(str(step))
    if not isinstance(recorded, dict) or not recorded:
        raise UntrustedCheckpointError(
            f"checkpoint {step_dir} is not recorded in {record_path} (not written by that run, "
            f"or the run stopped between saving and recording it); refusing to load it ({hint})")
    _check_modes(step_dir)
    actual = digest_checkpoint(step_dir)
    changed = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
    if changed:
        what = ", ".join(f"{n} ({'added' if n not in recorded else 'missing' if n not in actual else 'changed'})"
                         for n in changed[:5])
        raise UntrustedCheckpointError(f"checkpoint {step_dir} does not match the digests recorded in "
                                       f"{record_path}: {what}; refusing to load it ({hint})")


def record_digests(record: dict[str, Any], step: int, digests: dict[str, str]) -> None:
    """Add ``step``'s digests to the ``checkpoint_sha256`` map of a run record (in place)."""
    record.setdefault(DIGEST_KEY, {})[str(step)] = digests


def saved_digests(step_dir: str | Path) -> dict[str, str]:
    """The digests of a checkpoint just written (call on rank 0 after the save returned: DCP's
    coordinator writes ``.metadata`` last, after every rank's files are complete)."""
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        raise CptError(f"checkpoint {step_dir} has no .metadata after saving")
    return digest_checkpoint(step_dir)
