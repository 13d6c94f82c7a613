"""The run record (``run.json``) every training run writes next to its outputs.

All writing goes through :func:`write_run_record`, so it can later be routed through a shared
``cpt.runs`` module.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUN_RECORD = "run.json"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write ``run.json`` (run id, parent run id, config, data source description
    and state, start/end step, tokens per source, checkpoints written)."""
    path = Path(run_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
