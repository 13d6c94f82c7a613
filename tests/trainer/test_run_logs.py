"""Run logs read one row per step across resumed segments (provenance/logs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from moe_cpt.provenance.logs import evals, read_rows, steps, train_rows


def _write(path: Path, rows: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def test_resumed_segment_rows_replace_the_first_segments(tmp_path: Path) -> None:
    # segment 0 ran steps 1-3 and crashed; segment 1 resumed from the step-2 checkpoint
    rows = [{"step": s, "loss": 10 - s, "segment": 0} for s in (1, 2, 3)]
    rows += [{"step": s, "loss": 20 - s, "segment": 1} for s in (3, 4)]
    _write(tmp_path / "steps.jsonl", rows, torn='{"step": 5, "lo')
    got = steps(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["segment"] for r in got] == [0, 0, 1, 1]
    assert got[2]["loss"] == 17  # step 3 from the resumed segment


def test_metrics_kinds_are_separate_and_legacy_rows_are_evals(tmp_path: Path) -> None:
    rows = [{"step": 0, "val_loss/a": 5.0},  # written before rows had kind/segment
            {"kind": "train", "step": 1, "router/mri_max": 0.3, "segment": 0},
            {"kind": "train", "step": 2, "router/mri_max": 0.4, "segment": 0},
            {"kind": "eval", "step": 2, "val_loss/a": 4.0, "segment": 0},
            {"kind": "eval", "step": 2, "val_loss/a": 4.0, "segment": 1},
            {"kind": "train", "step": 3, "router/mri_max": 0.5, "segment": 1}]
    _write(tmp_path / "metrics.jsonl", rows)
    assert [(r["step"], r.get("segment", 0)) for r in evals(tmp_path)] == [(0, 0), (2, 1)]
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2, 3]
    assert len(read_rows(tmp_path / "metrics.jsonl")) == 5
    assert steps(tmp_path / "missing") == []
