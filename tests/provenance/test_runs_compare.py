"""`cpt runs ls` shows each run's name (label); `cpt runs compare RUN...` draws runs' curves side
by side, reading one row per step (resumed segments deduplicated), from run folders or run ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_cpt.cli import main
from moe_cpt.provenance.catalog import RunCatalog


def _run_folder(path: Path, run_id: str, name: str, losses: list[float], resumed_at: int = 0) -> Path:
    path.mkdir(parents=True)
    rec = {"run_id": run_id, "name": name, "phase": "cpt", "status": "finished",
           "end_step": len(losses), "config": {"run": {"output_dir": str(path)}}}
    (path / "run.json").write_text(json.dumps(rec))
    # segment 0 ran to resumed_at + 2 and was killed (checkpoint at resumed_at); the rows it wrote
    # after the checkpoint are replaced by segment 1's (here marked wrong by +1.0)
    end0 = resumed_at + 2 if resumed_at else len(losses)
    rows = [{"step": i + 1, "loss": v + (1.0 if i + 1 > resumed_at > 0 else 0.0), "segment": 0}
            for i, v in enumerate(losses[:end0])]
    if resumed_at:
        rows += [{"step": i + 1, "loss": v, "segment": 1} for i, v in enumerate(losses) if i + 1 > resumed_at]
    (path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"kind": "eval", "step": s, "val_loss/a": 5.0 - s / 10, "val_loss/b": 6.0 - s / 20,
              "segment": 0} for s in (0, 2, 4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return path


def test_compare_reads_one_row_per_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one = _run_folder(tmp_path / "one", "run-1", "s/dense/cpt-r0", [4.0, 3.0, 2.5, 2.0], resumed_at=2)
    two = _run_folder(tmp_path / "two", "run-2", "s/dense/cpt-r0.3", [4.0, 3.5, 3.0, 2.9])
    out = tmp_path / "cmp.png"
    assert main(["runs", "compare", str(one), str(two), "--out", str(out), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out.splitlines()[0])
    assert runs[0]["train_loss"] == [[1, 4.0], [2, 3.0], [3, 2.5], [4, 2.0]]  # resumed rows win
    assert runs[1]["val_loss"]["a"] == [[0, 5.0], [2, 4.8], [4, 4.6]]
    assert out.stat().st_size > 1000
    assert main(["runs", "compare", str(one), str(two), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final val loss: a 4.6000, b 5.8000" in text and "4 steps" in text


def test_compare_by_run_id_and_unknown_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    folder = _run_folder(tmp_path / "r", "run-9", "study/switch/cpt-r0", [3.0, 2.0])
    RunCatalog(str(store)).append("run-9", json.loads((folder / "run.json").read_text()), "start")
    assert main(["runs", "compare", "run-9", "--store", str(store), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.startswith("study/switch/cpt-r0  (cpt, finished, 2 steps)")
    assert main(["runs", "compare", "no-such", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: no run 'no-such'") and err.count("\n") == 1


def test_ls_shows_the_name_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    catalog = RunCatalog(str(tmp_path / "store"))
    catalog.append("run-a", {"run_id": "run-a", "name": "demo/switch-aux_loss/cpt-r0", "phase": "cpt"}, "start")
    catalog.append("run-b", {"run_id": "run-b", "name": "demo/switch-aux_loss/cpt-r0.3", "phase": "cpt"}, "start")
    catalog.append("run-c", {"run_id": "run-c", "phase": "pretrain"}, "start")
    assert main(["runs", "ls", "--store", str(tmp_path / "store")]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()
             if ln.strip().startswith("run-")}
    assert lines["run-a"][1] == "demo/switch-aux_loss/cpt-r0"
    assert lines["run-b"][1] == "demo/switch-aux_loss/cpt-r0.3"  # two CPT runs told apart
    assert lines["run-c"][1] == "-"
