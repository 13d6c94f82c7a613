"""Reading a run's JSONL logs (``steps.jsonl``, ``metrics.jsonl``) one row per step.

A run that was killed and restarted resumes from its last checkpoint, so the new segment
writes the steps after that checkpoint again (same data, same losses: resume is exact). Every
row carries the ``segment`` that wrote it (0 for the first start, +1 per restart); the reader
keeps, for each ``(kind, step)``, the row of the latest segment, in step order. Rows of logs
written before segments were recorded count as segment 0, later duplicates winning. A torn
last line (a crash mid-write) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rows(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL run log, deduplicated over resumed segments, sorted by step.
    ``kind``: only rows of that kind (``metrics.jsonl`` rows without a kind are ``eval``)."""
    p = Path(path)
    if not p.exists():
        return []
    latest: dict[tuple[str, int], tuple[int, int, dict[str, Any]]] = {}
    for order, line in enumerate(p.read_text().splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn line
        if not isinstance(row, dict) or "step" not in row:
            continue
        row_kind = str(row.get("kind", "eval" if p.name == "metrics.jsonl" else "step"))
        if kind is not None and row_kind != kind:
            continue
        key = (row_kind, int(row["step"]))
        rank = (int(row.get("segment", 0)), order)
        if key not in latest or rank >= latest[key][:2]:
            latest[key] = (*rank, row)
    return [v[2] for _, v in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def steps(run_dir: str | Path) -> list[dict[str, Any]]:
    """``steps.jsonl``: one row per training step."""
    return read_rows(Path(run_dir) / "steps.jsonl")


def evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The eval rows of ``metrics.jsonl``: one per evaluated step."""
    return read_rows(Path(run_dir) / "metrics.jsonl", kind="eval")


def train_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-log-step ``train`` rows of ``metrics.jsonl``."""
    return read_rows(Path(run_dir) / "metrics.jsonl", kind="train")
