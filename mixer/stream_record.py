"""The run record of a mix stream (``cpt mix serve``, or a client's own stream): a ``kind: mix``
run in the run catalog of every store its blend reads, written through
:func:`moe_cpt.provenance.catalog.publish_record` with the provenance schema's helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_cpt.codeversion import code_version
from moe_cpt.errors import ConfigError
from moe_cpt.provenance.catalog import publish_record
from moe_cpt.provenance.schema import (
    TERMINAL_STATUSES,
    check_run_id,
    new_run_id,
    record_stores,
    tokens_per_source_version,
)


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
