"""A checkpoint is loaded only if the run that wrote it recorded its files' digests (issue 11.7).

The attack from the review: a hand-made ``.metadata`` (a pickle whose ``__reduce__`` runs a
command) under ``run.parent_run_dir`` ran the command when a CPT run started. Now ``cpt train``
refuses it before torchrun starts, and a worker started directly refuses it before loading;
the command never runs. The happy path (recorded checkpoints resume and seed CPT runs) is the
e2e tests' (test_e2e.py, test_mixer_e2e.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_cpt.trainer.checkpoint_trust import (
    DIGEST_KEY,
    UntrustedCheckpointError,
    digest_checkpoint,
    verify_checkpoint,
)
from moe_cpt.trainer.launcher import launch
from moe_cpt.trainer.resume import check_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "trainer" / "configs" / "tiny_moe.yaml"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what unpickling it runs
        return (os.system, (f"touch {self.marker}",))


def _malicious_parent(tmp_path: Path, marker: Path, *, recorded: bool = False) -> Path:
    parent = tmp_path / "parent"
    step = parent / "checkpoint" / "step-4"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (step / "__0_0.distcp").write_bytes(b"\0" * 64)
    record = {"run_id": "20261129T000000-deadbeef", "phase": "pretrain", "checkpoints": [4]}
    if recorded:  # digests of *other* files: the attacker swapped .metadata afterwards
        record[DIGEST_KEY] = {"4": {".metadata": "0" * 64, "__0_0.distcp": "1" * 64}}
    (parent / "run.json").write_text(json.dumps(record))
    return parent


def _cpt_args(tmp_path: Path, parent: Path) -> list[str]:
    return [f"run.output_dir={tmp_path / 'cpt'}", "run.phase=cpt", f"run.parent_run_dir={parent}",
            "parallel.nproc=1", "parallel.ep=1", "training.steps=2"]


@pytest.mark.parametrize("recorded", [False, True], ids=["unrecorded", "altered"])
def test_cpt_train_refuses_a_planted_parent_checkpoint(tmp_path: Path, recorded: bool) -> None:
    marker = tmp_path / "pwned"
    parent = _malicious_parent(tmp_path, marker, recorded=recorded)
    with pytest.raises(UntrustedCheckpointError, match="refusing to load it") as info:
        launch(str(CONFIG), _cpt_args(tmp_path, parent))
    assert "\n" not in str(info.value)
    assert ("does not match the digests" if recorded else "is not recorded") in str(info.value)
    assert not marker.exists() and not (tmp_path / "cpt").exists()


def test_a_worker_started_directly_refuses_before_unpickling(tmp_path: Path) -> None:
    """``python -m trainer`` (what torchrun runs) checks again in the process itself."""
    marker = tmp_path / "pwned"
    parent = _malicious_parent(tmp_path, marker)
    done = subprocess.run([sys.executable, "-m", "moe_cpt.trainer", str(CONFIG), *_cpt_args(tmp_path, parent)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("cpt: error:")]
    assert len(errors) == 1 and "is not recorded" in errors[0], done.stderr[-3000:]
    assert not marker.exists()


def test_trust_checkpoint_override_skips_the_check(tmp_path: Path) -> None:
    parent = _malicious_parent(tmp_path, tmp_path / "pwned")
    assert check_checkpoint(tmp_path / "cpt", "cpt", str(parent), trust=True) == 4  # nothing loaded here


def test_recorded_digests_accept_the_files_and_refuse_any_change(tmp_path: Path) -> None:
    step = tmp_path / "run" / "checkpoint" / "step-3"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"meta")
    (step / "__0_0.distcp").write_bytes(b"rank0")
    record = {DIGEST_KEY: {"3": digest_checkpoint(step)}}
    verify_checkpoint(step, 3, record, "run.json")  # untouched: accepted
    with pytest.raises(UntrustedCheckpointError, match="not recorded"):
        verify_checkpoint(step, 2, record, "run.json")
    (step / "__1_0.distcp").write_bytes(b"extra")
    with pytest.raises(UntrustedCheckpointError, match=r"__1_0.distcp \(added\)"):
        verify_checkpoint(step, 3, record, "run.json")
    (step / "__1_0.distcp").unlink()
    (step / "__0_0.distcp").write_bytes(b"rank1")
    with pytest.raises(UntrustedCheckpointError, match=r"__0_0.distcp \(changed\)"):
        verify_checkpoint(step, 3, record, "run.json")
    (step / "__0_0.distcp").write_bytes(b"rank0")
    step.chmod(0o777)
    try:
        with pytest.raises(UntrustedCheckpointError, match="writable by every user"):
            verify_checkpoint(step, 3, record, "run.json")
    finally:
        step.chmod(0o755)
    (step / "link").symlink_to(step / ".metadata")
    with pytest.raises(UntrustedCheckpointError, match="not a regular file"):
        verify_checkpoint(step, 3, record, "run.json")


def test_every_torch_load_in_the_repo_is_weights_only() -> None:
    offenders = []
    code = ("bench", "corpus", "cpt", "infra", "mixer", "tests", "trainer")  # not data/ (demo inputs)
    for path in (p for top in code for p in (ROOT / top).rglob("*.py")):
        text = path.read_text(errors="replace")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start():text.find(")", m.end()) + 1]
            if "weights_only=True" not in call and path.name != Path(__file__).name:
                offenders.append(f"{path.relative_to(ROOT)}: {call[:80]}")
        if re.search(r"^\s*(import pickle|from pickle import)", text, re.M) and path.name != Path(__file__).name:
            offenders.append(f"{path.relative_to(ROOT)}: imports pickle")
    assert not offenders, offenders
