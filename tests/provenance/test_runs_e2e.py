"""End-to-end: the real trainer (torchrun, one process) fed by the mixer writes its run record to
the store's run catalog; a CPT phase's lineage reaches its parent's dataset versions; a run whose
recorded version was deleted refuses to resume, naming it. ~1 min on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from moe_cpt.cli import main
from moe_cpt.errors import NotFoundError
from moe_cpt.provenance.catalog import RunCatalog
from moe_cpt.provenance.lineage import lineage
from moe_cpt.provenance.record import read_run_events, read_run_record
from moe_cpt.store.object_store import Store
from moe_cpt.trainer.launcher import launch
from tests.support.mixer_store import publish

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny_moe.yaml"
COMMON = ["data.kind=mixer", "model.vocab_size=512", "parallel.nproc=1", "parallel.ep=1", "training.steps=4"]


def _blend(path: Path, store: str, weights: dict[str, float]) -> str:
    path.write_text(yaml.safe_dump({
        "store": store, "seq_len": 64, "global_batch_size": 4, "seed": 5, "holdout_tokens": 600,
        "sources": {n: {"dataset": f"{n}@latest", "weight": w} for n, w in weights.items()}}))
    return str(path)


def _train(out: Path, *overrides: str) -> dict:
    log = out.parent / f"{out.name}.log"
    rc = launch(str(CONFIG), [f"run.output_dir={out}", *COMMON, *overrides], log_path=str(log))
    assert rc == 0, log.read_text()[-6000:]
    return read_run_record(out)


def test_trainer_runs_in_the_catalog_with_lineage_and_resume_refusal(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = str(tmp_path / "store")
    new1 = publish(store, "new", 1, 300)
    replay = publish(store, "replay", 2, 100)
    pre = _train(tmp_path / "pre", f"data.blend={_blend(tmp_path / 'b1.yaml', store, {'new': 0.7, 'replay': 0.3})}")
    new2 = publish(store, "new", 3, 300)
    cpt = _train(tmp_path / "cpt", f"data.blend={_blend(tmp_path / 'b2.yaml', store, {'new': 0.9, 'replay': 0.1})}",
                 "run.phase=cpt", f"run.parent_run_dir={tmp_path / 'pre'}", "schedule.kind=constant")

    catalog = RunCatalog(store)
    assert catalog.get(pre["run_id"]).record == pre
    assert catalog.get(cpt["run_id"]).record == cpt
    assert [e["kind"] for e in read_run_events(tmp_path / "pre")] == ["start", "checkpoint", "finished"]
    assert pre["status"] == "finished" and pre["checkpoints"] == [4] and pre["code"]["git_commit"]
    tpv = pre["tokens_per_source_version"]
    assert set(tpv) == {f"new@{new1}", f"replay@{replay}"} and sum(tpv.values()) == 4 * 4 * 64
    assert cpt["parent_run_id"] == pre["run_id"]

    nodes = lineage(cpt["run_id"], [catalog])
    assert [n.run_id for n in nodes] == [cpt["run_id"], pre["run_id"]]
    assert {u.spec for u in nodes[0].datasets} == {f"new@{new2}", f"replay@{replay}"}
    assert {u.spec for u in nodes[1].datasets} == {f"new@{new1}", f"replay@{replay}"}
    assert set(catalog.runs_for_version("replay", replay)) == {pre["run_id"], cpt["run_id"]}
    assert catalog.runs_for_version("new", new1) == [pre["run_id"]]

    assert main(["runs", "show", cpt["run_id"], "--store", store]) == 0
    out = capsys.readouterr().out.split("lineage:")[1]
    assert pre["run_id"] in out and f"new@{new1}" in out and f"new@{new2}" in out

    # the pre-training run's first `new` version disappears: resuming it is refused, naming it
    os.remove(Store(store).version_path("new", new1, "manifest.json"))
    with pytest.raises(NotFoundError) as err:
        launch(str(CONFIG), [f"run.output_dir={tmp_path / 'pre'}", *COMMON[:-1], "training.steps=6",
                             f"data.blend={tmp_path / 'b1.yaml'}"])
    assert f"new@{new1}" in str(err.value) and f"replay@{replay}" not in str(err.value)
    assert read_run_record(tmp_path / "pre")["end_step"] == 4  # nothing ran
