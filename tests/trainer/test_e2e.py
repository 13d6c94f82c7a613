"""End-to-end: real `torchrun`, 2 gloo processes, FSDP=2 x EP=2 tiny MoE on synthetic data.

Runs are shared between assertions through module-scoped fixtures (each run ~10 s):
A  aux-loss router, 8 steps, checkpoints at 4 and 8 (the uninterrupted reference)
B  same config, crashes right after step 6, restarted: resumes from step 4
C  A's step-4 checkpoint resumed on ONE process (DP=1, EP=1)
D  CPT phase from A's final checkpoint (weights + optimizer), constant schedule, new blend
E/F sinkhorn and aux-free routers; G: the CPU init bug reproduced with the guard disabled
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_cpt.trainer.launcher import launch

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny_moe.yaml"


def _run(out: Path, *overrides: str, expect_rc: int | None = 0) -> Path:
    log = out.parent / f"{out.name}.log"
    rc = launch(str(CONFIG), [f"run.output_dir={out}", *overrides], log_path=str(log))
    if expect_rc is not None and rc != expect_rc:
        raise AssertionError(f"run {out.name} exited {rc}:\n{log.read_text()[-6000:]}")
    return out


def _steps(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _evals(out: Path) -> list[dict[str, Any]]:
    """The eval rows of metrics.jsonl (per-log-step rows are ``kind: train``)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") != "train"]


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer_e2e")


@pytest.fixture(scope="module")
def run_a(runs: Path) -> Path:
    return _run(runs / "a")


@pytest.fixture(scope="module")
def run_b(runs: Path, run_a: Path) -> Path:
    out = runs / "b"
    _run(out, "run.fail_at_step=6", expect_rc=None)
    first = _steps(out)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    return _run(out)


@pytest.fixture(scope="module")
def run_c(runs: Path, run_a: Path) -> Path:
    out = runs / "c"
    (out / "checkpoint").mkdir(parents=True)
    shutil.copytree(run_a / "checkpoint" / "step-4", out / "checkpoint" / "step-4")
    # a hand-copied checkpoint has no run record vouching for it: trusted explicitly
    return _run(out, "parallel.nproc=1", "parallel.ep=1", "run.trust_checkpoint=true")


@pytest.fixture(scope="module")
def run_d(runs: Path, run_a: Path) -> Path:
    return _run(runs / "d", "run.phase=cpt", f"run.parent_run_dir={run_a}",
                "run.load_optimizer=true", "training.steps=4", "schedule.kind=constant",
                "schedule.warmup_steps=2", "data.weights=[0.9,0.1]", "eval.interval=2")


def _loss_falls(out: Path) -> None:
    losses = [r["loss"] for r in _steps(out)]
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses


def test_moe_trains_with_fsdp2_ep2(run_a: Path) -> None:
    _loss_falls(run_a)
    rec = _record(run_a)
    assert rec["status"] == "finished" and rec["end_step"] == 8
    assert rec["segments"][0]["dp_size"] == 2 and rec["segments"][0]["ep_size"] == 2
    assert rec["experts_distinct_after_init"] is True
    assert rec["checkpoints"] == [4, 8]
    assert set(rec["tokens_per_source"]) == {"counting", "motifs"}
    assert sum(rec["tokens_per_source"].values()) == 8 * 4 * 64  # steps x G x seq_len
    assert rec["data"]["state"] == {"step": 8, "offset": 0}
    assert rec["run_id"] and rec["parent_run_id"] == ""


def test_metrics_per_eval_interval(run_a: Path) -> None:
    evals = _evals(run_a)
    assert [e["step"] for e in evals] == [0, 4, 8]
    last = evals[-1]
    for key in ("val_loss/counting", "val_loss/motifs", "router/layers.0/max_vio",
                "router/layers.1/expert_fractions", "routing_change/overall", "train/aux_loss",
                "train/z_loss", "train/tokens_per_s_per_rank", "train/step_time_s",
                "train/data_wait_pct", "train/lr"):
        assert key in last, key
    assert sum(last["router/layers.1/expert_fractions"]) == pytest.approx(1.0, abs=1e-4)
    assert evals[0]["routing_change/overall"] == 0.0 < last["routing_change/overall"]
    assert last["train/aux_loss"] >= 1.0 - 1e-6
    assert 0 <= last["train/data_wait_pct"] < 100
    assert evals[-1]["val_loss/counting"] < evals[0]["val_loss/counting"]
    lrs = [r["lr/AdamW"] for r in _steps(run_a)]
    assert lrs[1] == pytest.approx(0.01) and lrs[-1] < 0.003  # warmup, cosine to min LR


def test_resume_after_crash_is_bit_exact(run_a: Path, run_b: Path) -> None:
    ref = {r["step"]: r for r in _steps(run_a)}
    resumed = _steps(run_b)[6:]  # the restarted segment
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for r in resumed:
        assert r["loss"] == ref[r["step"]]["loss"]
        assert r["data_fingerprint"] == ref[r["step"]]["data_fingerprint"]
    rec = _record(run_b)
    assert [s["start_step"] for s in rec["segments"]] == [0, 4]
    assert rec["tokens_per_source"] == _record(run_a)["tokens_per_source"]


def test_resume_on_other_dp_size_continues_same_data(run_a: Path, run_c: Path) -> None:
    ref = {r["step"]: r for r in _steps(run_a)}
    steps = _steps(run_c)
    assert [r["step"] for r in steps] == [5, 6, 7, 8]
    for r in steps:
        assert r["data_fingerprint"] == ref[r["step"]]["data_fingerprint"]
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], abs=1e-3)
    assert _record(run_c)["segments"][0]["dp_size"] == 1


def test_topk_routing_identical_between_ep1_and_ep2(run_a: Path, run_c: Path) -> None:
    ep2 = np.load(run_a / "routing" / "step-4.npz")  # EP=2 run, after step 4
    ep1 = np.load(run_c / "routing" / "step-4.npz")  # EP=1 run, loaded step-4 checkpoint
    assert sorted(ep1.files) == sorted(ep2.files) == ["layers.0", "layers.1"]
    for layer in ep1.files:
        assert np.array_equal(ep1[layer], ep2[layer])


def test_cpt_phase_rewarms_lr_and_records_parent(run_a: Path, run_d: Path) -> None:
    lrs = [r["lr/AdamW"] for r in _steps(run_d)]
    parent_last_lr = _steps(run_a)[-1]["lr/AdamW"]
    assert lrs[0] == pytest.approx(0.005) and lrs[1:] == pytest.approx([0.01] * 3)
    assert lrs[0] > parent_last_lr
    rec = _record(run_d)
    assert rec["phase"] == "cpt"
    assert rec["parent_run_id"] == _record(run_a)["run_id"]
    assert rec["parent"]["step"] == 8 and rec["parent"]["load_optimizer"] is True
    evals = _evals(run_d)
    parent_final = _evals(run_a)[-1]
    # the CPT run starts from the parent's weights: same validation loss at its step 0
    assert evals[0]["val_loss/counting"] == pytest.approx(parent_final["val_loss/counting"], abs=1e-5)


@pytest.mark.parametrize("router", ["sinkhorn", "aux_free"])
def test_other_routers_train(runs: Path, router: str) -> None:
    out = _run(runs / router, f"model.router={router}", "training.steps=6",
               "checkpoint.enable=false", "eval.interval=0")
    _loss_falls(out)
    steps = _steps(out)
    if router == "sinkhorn":
        assert "aux_loss" in steps[0]
    else:
        assert "aux_loss" not in steps[0]  # aux-loss-free: bias balancing only


def test_cpu_init_bug_is_caught_by_the_guard(runs: Path) -> None:
    out = runs / "no_guard"
    rc = launch(str(CONFIG), [f"run.output_dir={out}", "run.init_from_full=false",
                              "training.steps=1"], log_path=str(runs / "no_guard.log"))
    assert rc != 0
    assert "experts are identical after init" in (runs / "no_guard.log").read_text()


def test_dense_baseline_trains_with_fsdp2(runs: Path) -> None:
    out = _run(runs / "dense", "model.flavor=tiny_dense", "parallel.ep=1", "training.steps=6",
               "checkpoint.enable=false", "eval.interval=0")
    _loss_falls(out)
    evals = _evals(out)
    assert not any(k.startswith("router/") for k in evals[-1])  # no MoE layers
