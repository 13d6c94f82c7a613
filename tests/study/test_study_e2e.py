"""The micro study end to end, with real trainings (one process per run, 2 lanes): dense + Switch
(aux_loss), pre-training, CPT at 0% and 30% seen replay, the re-train at 30%; 8 runs of 4-12 steps
on the two synthetic languages of tests/support/languages.py.

* ``clean``: the study runs uninterrupted;
* ``killed``: the same study (another folder) is SIGKILLed, runner and trainings together, while
  a run is past a checkpoint, then started again: finished runs are skipped, the interrupted run
  resumes from its checkpoint, and ``results.json`` equals the clean study's.

The report is then loaded in headless Chromium: every figure has a non-zero natural size; a
screenshot is kept (pytest's tmp path and ``outputs/study-report.png``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from moe_cpt.cli import main
from moe_cpt.provenance.catalog import RunCatalog
from moe_cpt.provenance.record import read_run_record
from moe_cpt.trainer.study import plots
from tests.study.helpers import make_store, micro_study, write_study

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("study_e2e")


@pytest.fixture(scope="module")
def store(root: Path) -> str:
    return make_store(root)


@pytest.fixture(scope="module")
def clean(root: Path, store: str) -> Path:
    path = write_study(root / "clean.yaml", micro_study(store, root / "clean"))
    assert main(["study", str(path), "--lanes", "2"]) == 0
    return root / "clean"


def _run_dirs(study: Path) -> list[Path]:
    return sorted(p for p in (study / "runs").glob("*/*") if p.is_dir())


def _interrupted_past_checkpoint(study: Path) -> Path | None:
    """Once some run finished: a run that is not finished, has a checkpoint, and has logged a
    step after it."""
    from moe_cpt.trainer.study.runner import _current_step

    records = {d: read_run_record(d) for d in _run_dirs(study) if (d / "run.json").exists()}
    if not any(r.get("status") == "finished" for r in records.values()):
        return None
    for d in _run_dirs(study):
        rec = read_run_record(d) if (d / "run.json").exists() else {}
        ckpts = [int(p.name.split("-")[1]) for p in (d / "checkpoint").glob("step-*")]
        if rec.get("status") == "running" and ckpts and _current_step(str(d)) > max(ckpts):
            return d
    return None


@pytest.fixture(scope="module")
def killed(root: Path, store: str) -> dict[str, Any]:
    out = root / "killed"
    path = write_study(root / "killed.yaml", micro_study(store, out))
    log = open(root / "killed-first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moe_cpt.cli", "study", str(path)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            victim = _interrupted_past_checkpoint(out)
            if victim is not None:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and every training it started
        proc.wait()
        log.close()
    assert victim is not None, f"no run was caught mid-way:\n{(root / 'killed-first.log').read_text()[-3000:]}"
    time.sleep(1.0)  # let the killed trainings' processes disappear
    before = {d.relative_to(out).as_posix(): read_run_record(d) for d in _run_dirs(out)
              if (d / "run.json").exists()}
    assert main(["study", str(path)]) == 0  # restart: skip, resume, run the rest
    return {"dir": out, "victim": victim.relative_to(out / "runs").as_posix(), "before": before}


def _results(study: Path) -> dict[str, Any]:
    return json.loads((study / "report" / "results.json").read_text())


def test_clean_study_runs_the_grid_and_writes_the_report(clean: Path, store: str) -> None:
    res = _results(clean)
    assert sorted(res["runs"]) == sorted([
        "dense/pretrain", "dense/cpt-r0", "dense/cpt-r0.3", "dense/retrain-r0.3",
        "switch-aux_loss/pretrain", "switch-aux_loss/cpt-r0", "switch-aux_loss/cpt-r0.3",
        "switch-aux_loss/retrain-r0.3"])
    for key, r in res["runs"].items():
        assert r["finished"], key
        assert [c["step"] for c in r["curve"]] == [0, r["steps"] // 2, r["steps"]], key
        assert set(r["final"]) == {"lang_a", "lang_b"}
    runs = res["runs"]
    assert runs["dense/pretrain"]["tokens_per_source"] == {"lang_a": 8 * 256, "lang_b": 0}
    assert runs["dense/cpt-r0"]["tokens_per_source"]["lang_a"] == 0
    assert 0 < runs["dense/cpt-r0.3"]["tokens_per_source"]["lang_a"] < 4 * 256
    # CPT starts from its parent's weights: its first eval equals the parent's last
    assert runs["dense/cpt-r0"]["curve"][0]["lang_a"] == pytest.approx(runs["dense/pretrain"]["final"]["lang_a"], abs=1e-5)
    assert runs["dense/cpt-r0.3"]["curve"][0]["tokens"] == res["settings"]["pretrain_tokens"]
    # 100% B: A is forgotten and B learned
    assert runs["dense/cpt-r0"]["forgetting"]["lang_a"] > 0 > runs["dense/cpt-r0"]["forgetting"]["lang_b"]
    moe = runs["switch-aux_loss/cpt-r0.3"]
    assert set(moe["eval_mri"]["end"]["lang_a"]) == {"layers.0", "layers.1"}
    assert all(0.125 <= v <= 1 for v in moe["eval_mri"]["end"]["lang_a"].values())
    assert set(moe["saturation"]["lang_a"]) == {"layers.0", "layers.1"}
    assert len(moe["train_mri"]) == 4 and "layers.0" in moe["train_mri"][0]
    assert [f["claim"] for f in res["findings"]] == [
        "both routers stay balanced on A after CPT",
        "MoEs keep their advantage over the FLOP-matched dense model",
        "replay reduces forgetting",
        "CPT comes close to the full re-train at a fraction of the compute"]
    for f in res["findings"]:
        assert f["verdict"] in ("reproduced", "not reproduced",
                                "inconclusive: difference within seed spread"), f
        assert f["groups"]
    report = clean / "report"
    for name in plots.PLOTS:
        assert (report / f"{name}.png").stat().st_size > 1000, name
    page = (report / "index.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(plots.PLOTS)  # self-contained:
    assert "src='http" not in page and "<link" not in page and "<script" not in page  # nothing fetched
    md = (report / "results.md").read_text()
    assert "## Findings" in md and "| dense | cpt r=0.3 |" in md
    timings = json.loads((report / "timings.json").read_text())
    assert len(timings) == 8 and all(t["wall_s"] and t["wall_s"] > 0 for t in timings)
    # the study and its runs are recorded: study.json and the store's run catalog
    study = json.loads((clean / "study.json").read_text())
    assert study["status"] == "finished" and len(study["runs"]) == 8
    catalog = RunCatalog(store)
    srec = catalog.get(study["study_id"]).record
    assert srec["phase"] == "study" and srec["status"] == "finished"
    for r in study["runs"]:
        rec = catalog.get(r["run_id"]).record
        assert rec["name"] == r["name"] and rec["status"] == "finished"
    cpt_rec = catalog.get(next(r["run_id"] for r in study["runs"] if r["key"] == "dense/cpt-r0.3")).record
    pre_id = next(r["run_id"] for r in study["runs"] if r["key"] == "dense/pretrain")
    assert cpt_rec["parent_run_id"] == pre_id
    seen = [s for s in cpt_rec["data"]["blend"]["sources"] if s["name"] == "lang_a"][0]
    assert seen["replay"]["mode"] == "seen" and seen["replay"]["parent_run_id"] == pre_id


def test_killed_and_restarted_study_equals_the_clean_one(clean: Path, killed: dict[str, Any]) -> None:
    out = killed["dir"]
    victim = read_run_record(out / "runs" / killed["victim"])
    assert victim["status"] == "finished" and len(victim["segments"]) == 2  # resumed once
    assert victim["segments"][1]["start_step"] > 0  # from its checkpoint, not from scratch
    for rel, before in killed["before"].items():
        after = read_run_record(out / rel)
        if before.get("status") == "finished":  # skipped on restart
            assert len(after["segments"]) == len(before["segments"]) == 1, rel
    assert any(b.get("status") == "finished" for b in killed["before"].values())
    assert _results(out) == _results(clean)


def test_report_rebuilds_without_training(clean: Path, capsys: pytest.CaptureFixture) -> None:
    before = _results(clean)
    shutil.rmtree(clean / "report")
    assert main(["study", "report", str(clean)]) == 0
    assert f"report: {clean / 'report' / 'index.html'}" in capsys.readouterr().out
    assert _results(clean) == before


def test_runs_compare_draws_study_runs(clean: Path, store: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    study = json.loads((clean / "study.json").read_text())
    ids = [r["run_id"] for r in study["runs"] if r["key"].startswith("dense/cpt")]
    out = tmp_path / "cmp.png"
    assert main(["runs", "compare", *ids, "--store", store, "--out", str(out), "--json"]) == 0
    curves = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [c["label"] for c in curves] == ["micro/dense/cpt-r0", "micro/dense/cpt-r0.3"]
    assert [s for s, _ in curves[0]["train_loss"]] == [1, 2, 3, 4]
    assert out.stat().st_size > 1000
    assert main(["runs", "ls", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "micro/dense/cpt-r0.3" in listing and "study" in listing


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.fail("headless Chromium is needed to check the report (`apt-get install chromium`; "
                ".ci/run installs it)")


def test_report_in_a_real_browser(clean: Path, tmp_path: Path) -> None:
    browser = _chromium()
    page = tmp_path / "index.html"
    probe = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');"
             "p.id='natural-sizes';p.textContent=[...document.images].map(i=>i.id+'='+i.naturalWidth"
             "+'x'+i.naturalHeight).join(' ');document.body.appendChild(p);});</script>")
    page.write_text((clean / "report" / "index.html").read_text().replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'id="natural-sizes"' in dom, dom[-2000:]
    sizes = dom.split('id="natural-sizes">')[1].split("<")[0].split()
    assert sorted(s.split("=")[0] for s in sizes) == sorted(f"fig-{n}" for n in plots.PLOTS)
    for s in sizes:
        w, h = (int(x) for x in s.split("=")[1].split("x"))
        assert w > 0 and h > 0, s
    shot = tmp_path / "study-report.png"
    subprocess.run([browser, *flags, "--window-size=1280,4000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10000
    artifacts = REPO / "outputs"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "study-report.png")
