"""Lineage: a run's ancestors (parent, grandparent, ...) with the dataset versions each
consumed, and the check that the versions a record read are still readable."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_cpt.errors import CptError, NotFoundError
from moe_cpt.provenance.catalog import RunCatalog
from moe_cpt.provenance.record import RUN_RECORD, read_run_record
from moe_cpt.provenance.schema import DatasetUse, dataset_uses, record_stores
from moe_cpt.store.verify import check_present

log = logging.getLogger(__name__)


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
    """The record in ``run_dir`` (``run.json``, or its event log if that is unreadable) if it is
    the record of ``run_id``."""
    if not run_dir:
        return None
    try:
        record = read_run_record(run_dir)
    except OSError:  # unreadable folder: the parent is listed as not found
        return None
    return (record, str(Path(run_dir) / RUN_RECORD)) if record.get("run_id") == run_id else None


def check_readable(record: Mapping[str, Any]) -> None:
    """Raise :class:`NotFoundError` naming every dataset version the record's blend read that
    can no longer be opened (:func:`moe_cpt.store.verify.check_present`: manifest missing or
    modified, a shard missing or of another size, or the store unreachable). A record without a
    store (synthetic data) passes."""
    problems: list[str] = []
    for use in dataset_uses(record):
        try:
            check_present(use.store, use.spec)
        except CptError as exc:
            problems.append(f"{use.spec} (source {use.source}) in {use.store}: {exc}")
        except OSError as exc:  # store unreachable, permission denied, ...
            problems.append(f"{use.spec} (source {use.source}) in {use.store}: {type(exc).__name__}: {exc}")
    if problems:
        raise NotFoundError(
            f"run {record.get('run_id', '?')} read dataset versions that are no longer readable: "
            + "; ".join(problems))
