"""What a run continues from, and the check that its recorded inputs are still readable.

A run continues from its own latest checkpoint (resume: the output folder already has one) or,
as a CPT phase, from a parent run. Either way the run record of that run (``run.json``) names
the dataset versions it trained on. A resume needs them (the mixer state continues their
stream): :func:`moe_cpt.provenance.lineage.check_readable` refuses to go on when one of them
can no longer be read (``NotFoundError`` naming it). A new CPT phase needs only the parent's
checkpoint: unreadable parent versions are a warning. Light module (no torch): the launcher
calls it before starting any process, the trainer again in each process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_cpt.errors import NotFoundError
from moe_cpt.provenance.lineage import check_readable
from moe_cpt.provenance.record import read_run_record

CHECKPOINT_FOLDER = "checkpoint"

log = logging.getLogger(__name__)


def latest_step(checkpoint_dir: Path) -> int:
    """The newest complete DCP checkpoint step under ``checkpoint_dir`` (-1: none)."""
    steps = [int(p.name.split("-")[1]) for p in checkpoint_dir.glob("step-*")
             if p.name.split("-")[1].isdigit() and (p / ".metadata").exists()]
    return max(steps) if steps else -1


def is_resume(output_dir: str | Path, checkpoint_folder: str = CHECKPOINT_FOLDER) -> bool:
    return latest_step(Path(output_dir) / checkpoint_folder) >= 0


def warn_parent_inputs(record: dict[str, Any]) -> None:
    """A CPT phase needs only its parent's checkpoint, not the parent's data: an unreadable
    parent dataset version is reported (lineage can no longer be re-read) but does not stop it."""
    try:
        check_readable(record)
    except NotFoundError as exc:
        log.warning("parent run: %s (the CPT phase starts from its checkpoint anyway)", exc)


def check_run_inputs(output_dir: str | Path, phase: str, parent_run_dir: str,
                     checkpoint_folder: str = CHECKPOINT_FOLDER) -> dict[str, Any]:
    """Check the inputs of the run this one continues from; returns that run's record
    (``{}`` for a fresh pre-training run)."""
    if is_resume(output_dir, checkpoint_folder):
        record = read_run_record(output_dir)
        check_readable(record)
        return record
    if phase == "cpt" and parent_run_dir and Path(parent_run_dir).is_dir():
        record = read_run_record(parent_run_dir)
        warn_parent_inputs(record)
        return record
    return {}


def checkpoint_to_load(output_dir: str | Path, phase: str, parent_run_dir: str, parent_step: int = -1,
                       checkpoint_folder: str = CHECKPOINT_FOLDER) -> tuple[Path, int, Path] | None:
    """``(step folder, step, run folder whose record vouches for it)`` of the checkpoint this run
    will load: its own latest (resume), or the parent's ``parent_step`` (latest if -1) for a new
    CPT phase; None if it loads none."""
    own = Path(output_dir) / checkpoint_folder
    if is_resume(output_dir, checkpoint_folder):
        step = latest_step(own)
        return own / f"step-{step}", step, Path(output_dir)
    if phase == "cpt" and parent_run_dir and Path(parent_run_dir).is_dir():
        folder = Path(parent_run_dir) / checkpoint_folder
        step = parent_step if parent_step >= 0 else latest_step(folder)
        if step >= 0 and (folder / f"step-{step}").is_dir():
            return folder / f"step-{step}", step, Path(parent_run_dir)
    return None


def check_checkpoint(output_dir: str | Path, phase: str, parent_run_dir: str, parent_step: int = -1,
                     checkpoint_folder: str = CHECKPOINT_FOLDER, *, trust: bool = False) -> int:
    """Refuse (``UntrustedCheckpointError``) a checkpoint to load that the run record of the run
    which wrote it does not vouch for (``moe_cpt.trainer.checkpoint_trust``); returns its step (-1: none)."""
    from moe_cpt.trainer.checkpoint_trust import verify_checkpoint

    found = checkpoint_to_load(output_dir, phase, parent_run_dir, parent_step, checkpoint_folder)
    if found is None:
        return -1
    path, step, run_dir = found
    verify_checkpoint(path, step, read_run_record(run_dir), run_dir / "run.json", trust=trust)
    return step


def recorded_blend(record: dict[str, Any]) -> dict[str, Any]:
    """The resolved mixer blend a run record holds (``{}`` if the run was not mixer-fed)."""
    data = record.get("data") or {}
    blend = data.get("blend")
    return blend if data.get("kind") == "mixer" and isinstance(blend, dict) else {}
