"""A resume refuses unreadable recorded inputs; a new CPT phase only warns about its parent's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from moe_cpt.errors import NotFoundError
from moe_cpt.trainer.resume import check_run_inputs


def _record(store: Path) -> dict:
    return {"run_id": "20261129T000000-abcdef01", "phase": "pretrain",
            "data": {"kind": "mixer", "blend": {"sources": [
                {"name": "a", "dataset": "lang_a", "version": "0123456789abcdef", "store": str(store),
                 "weight": 1.0, "n_tokens": 10, "n_blocks": 1}]}}}


def test_resume_refuses_and_cpt_start_warns_about_unreadable_versions(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "run.json").write_text(json.dumps(_record(tmp_path / "gone-store")))
    child = tmp_path / "child"
    with caplog.at_level(logging.WARNING):
        rec = check_run_inputs(child, "cpt", str(parent))
    assert rec["run_id"] == "20261129T000000-abcdef01"
    assert "lang_a@0123456789abcdef" in caplog.text
    # the parent itself resuming (it has a checkpoint) is refused, naming the version
    (parent / "checkpoint" / "step-4").mkdir(parents=True)
    (parent / "checkpoint" / "step-4" / ".metadata").write_bytes(b"")
    with pytest.raises(NotFoundError, match="lang_a@0123456789abcdef"):
        check_run_inputs(parent, "pretrain", "")
