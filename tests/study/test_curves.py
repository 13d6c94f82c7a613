"""Curve readers: one row per step over resumed segments, the planned eval steps only,
saturation per source from routing files, tolerant of missing keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_cpt.trainer.study import curves


def _write(path: Path, rows: list[dict], torn: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"step": 9, "lo' if torn else ""))


def test_resumed_segments_give_one_row_per_step(tmp_path: Path) -> None:
    # segment 0 ran steps 1-5 (checkpoint at 4), was killed; segment 1 resumed at 4
    rows = [{"step": s, "loss": 10 - s, "segment": 0} for s in range(1, 6)]
    rows += [{"step": s, "loss": 10 - s + 0.5, "segment": 1} for s in range(5, 9)]
    _write(tmp_path / "steps.jsonl", rows, torn=True)
    got = curves.step_rows(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert got[4]["loss"] == 5.5 and got[4]["segment"] == 1  # the latest segment's row wins


def test_eval_rows_keep_the_planned_steps(tmp_path: Path) -> None:
    rows = [{"kind": "eval", "step": s, "val_loss/a": 1.0, "segment": 0} for s in (0, 4)]
    rows += [{"kind": "train", "step": 5, "loss": 3.0, "segment": 0}]
    rows += [{"step": 6, "val_loss/a": 0.9, "segment": 1},  # a resumed segment's start (no kind)
             {"kind": "eval", "step": 8, "val_loss/a": 0.8, "segment": 1}]
    _write(tmp_path / "metrics.jsonl", rows)
    assert [r["step"] for r in curves.eval_rows(tmp_path)] == [0, 4, 6, 8]
    planned = curves.planned_eval_steps(8, 4)
    assert planned == {0, 4, 8}
    assert [r["step"] for r in curves.eval_rows(tmp_path, planned)] == [0, 4, 8]
    assert curves.planned_eval_steps(10, 4) == {0, 4, 8, 10}


def test_layer_values_in_layer_order_and_tolerant() -> None:
    row = {"router_by_source/a/layers.10/mri": 0.5, "router_by_source/a/layers.2/mri": 0.3,
           "router_by_source/a/layers.2/max_vio": 1.0, "router_by_source/b/layers.0/mri": 0.9,
           "router_by_source/a/mri_max": 0.5}
    assert list(curves.layer_values(row, "router_by_source/a", "mri").items()) == [
        ("layers.2", 0.3), ("layers.10", 0.5)]
    assert curves.layer_values({}, "router", "mri") == {}


def test_saturation_by_source_splits_rows_per_source() -> None:
    ref = {"layers.0": np.array([[0, 1], [2, 3], [0, 1], [2, 3]])}
    now = {"layers.0": np.array([[0, 1], [2, 3], [1, 5], [6, 7]])}  # source a kept, b: half, none
    sat = curves.saturation_by_source(now, ref, ["a", "b"])
    assert sat == {"a": {"layers.0": 1.0}, "b": {"layers.0": pytest.approx(0.25)}}
    assert curves.saturation_by_source(now, {}, ["a", "b"]) == {"a": {}, "b": {}}


def test_routing_file_missing_is_empty(tmp_path: Path) -> None:
    assert curves.routing(tmp_path, 0) == {}
    (tmp_path / "routing").mkdir()
    np.savez(tmp_path / "routing" / "step-0.npz", **{"layers.0": np.zeros((4, 1), dtype=np.int64)})
    assert curves.routing(tmp_path, 0)["layers.0"].shape == (4, 1)


def test_eval_noise() -> None:
    assert curves.eval_noise([1.0, 0.9]) == 0.0
    smooth = [5 - 0.1 * i for i in range(10)]
    assert curves.eval_noise(smooth) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = [5 - 0.1 * i + float(rng.normal(0, 0.05)) for i in range(200)]
    assert 0.03 < curves.eval_noise(noisy) < 0.07
