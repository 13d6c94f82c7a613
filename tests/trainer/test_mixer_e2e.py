"""End-to-end on real mixer blends: real `torchrun`, 2 gloo processes, FSDP=2 x EP=2 tiny MoE.

Two dataset versions of two synthetic "languages" (tests/support/languages.py) are published
into a temporary store, then:

P  pre-training on ``lang_a`` only (8 steps, warmup + cosine);
C  CPT from P's final checkpoint on 95% ``lang_b`` + 5% ``lang_a`` (4 steps, LR re-warmed),
   killed right after step 3 (checkpoint at step 2) and restarted, after a new ``lang_b``
   version was published (``@latest`` moved: the restart must keep the recorded version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_cpt.errors import NotFoundError
from moe_cpt.provenance import logs as run_logs
from moe_cpt.trainer.data import sample_hash
from moe_cpt.trainer.launcher import launch
from tests.support.languages import lang_a, lang_b, publish_language, write_blend

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "tiny_moe.yaml"
G, SEQ = 4, 64  # tiny_moe.yaml: global batch 4, seq_len 64


def _launch(out: Path, *overrides: str, expect_rc: int | None = 0) -> Path:
    log = out.parent / f"{out.name}.log"
    rc = launch(str(CONFIG), [f"run.output_dir={out}", "data.kind=mixer", *overrides],
                log_path=str(log))
    if expect_rc is not None and rc != expect_rc:
        raise AssertionError(f"run {out.name} exited {rc}:\n{log.read_text()[-6000:]}")
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _evals(out: Path) -> list[dict[str, Any]]:
    """The eval rows of metrics.jsonl (per-log-step rows are ``kind: train``)."""
    return [r for r in _jsonl(out / "metrics.jsonl") if r.get("kind") != "train"]


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer_mixer_e2e")


@pytest.fixture(scope="module")
def store(root: Path) -> str:
    url = str(root / "store")
    publish_language(url, "lang_a", lang_a, 300, seed=1)
    publish_language(url, "lang_b", lang_b, 300, seed=2)
    return url


@pytest.fixture(scope="module")
def pretrain(root: Path, store: str) -> Path:
    blend = write_blend(root / "pretrain.yaml", store, {"lang_a": 1.0})
    return _launch(root / "pretrain", f"data.blend={blend}")


CPT_ARGS = ("run.phase=cpt", "training.steps=4", "checkpoint.interval=2", "eval.interval=2",
            "schedule.warmup_steps=2")


@pytest.fixture(scope="module")
def cpt(root: Path, store: str, pretrain: Path) -> Path:
    blend = write_blend(root / "cpt.yaml", store, {"lang_b": 0.95, "lang_a": 0.05})
    out = root / "cpt"
    args = (f"data.blend={blend}", f"run.parent_run_dir={pretrain}", *CPT_ARGS)
    _launch(out, *args, "run.fail_at_step=3", expect_rc=None)
    assert [r["step"] for r in _jsonl(out / "steps.jsonl")] == [1, 2, 3]
    publish_language(store, "lang_b", lang_b, 300, seed=3)  # lang_b@latest moves
    return _launch(out, *args)


def test_pretrain_on_mixer_blend(pretrain: Path) -> None:
    from moe_cpt.mixer.dataset import MixedDataset

    steps = _jsonl(pretrain / "steps.jsonl")
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    for r in steps:  # one source: its per-source train loss is the loss
        assert r["loss/lang_a"] == pytest.approx(r["loss"], rel=1e-5)
    evals = _evals(pretrain)
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["val_loss/lang_a"] < evals[0]["val_loss/lang_a"] - 0.5
    for key in ("train/loss/lang_a", "router_by_source/lang_a/layers.0/max_vio",
                "router_by_source/lang_a/layers.1/expert_fractions"):
        assert key in evals[-1], key
    assert not any(k.startswith("forgetting/") for k in evals[-1])  # pre-training run

    rec = _record(pretrain)
    ds = MixedDataset(str(pretrain.parent / "pretrain.yaml"))
    assert rec["data"]["kind"] == "mixer"
    assert rec["data"]["source_versions"] == ds.source_versions == [
        f"lang_a@{ds.blend.sources[0].version}"]
    assert rec["data"]["blend"]["fingerprint"] == ds.blend.fingerprint
    assert rec["data"]["state"]["step"] == 8
    ds.load_state_dict(rec["data"]["state"])  # the recorded state (W=2) on one rank
    assert rec["data"]["epochs"] == ds.epochs() and 0 < rec["data"]["epochs"]["lang_a"] < 1
    assert rec["tokens_per_source"] == {"lang_a": 8 * G * SEQ}


def test_cpt_rewarms_lr_records_parent_and_logs_forgetting(pretrain: Path, cpt: Path) -> None:
    steps = _jsonl(cpt / "steps.jsonl")
    lrs = [r["lr/AdamW"] for r in steps if r["step"] in (1, 2)]
    assert lrs == pytest.approx([0.005, 0.01])  # re-warmed from the parent's decayed LR
    assert lrs[0] > _jsonl(pretrain / "steps.jsonl")[-1]["lr/AdamW"]
    for r in steps:  # per-source train losses are the token-weighted parts of the step loss
        parts = [(r[f"loss/{n}"], r["tokens_by_source"][i])
                 for i, n in enumerate(("lang_a", "lang_b")) if f"loss/{n}" in r]
        assert sum(w for _, w in parts) == r["tokens"] == G * SEQ
        assert sum(v * w for v, w in parts) / r["tokens"] == pytest.approx(r["loss"], rel=1e-5)
    assert any("loss/lang_a" in r for r in steps) and all("loss/lang_b" in r for r in steps)

    rec = _record(cpt)
    assert rec["phase"] == "cpt" and rec["parent_run_id"] == _record(pretrain)["run_id"]
    assert rec["parent"]["step"] == 8
    assert [v.split("@")[0] for v in rec["data"]["source_versions"]] == ["lang_a", "lang_b"]
    assert set(rec["tokens_per_source"]) == {"lang_a", "lang_b"}

    evals = _evals(cpt)
    parent_final = _evals(pretrain)[-1]
    # same held-out tokens of lang_a in both blends, same weights at the CPT start
    assert evals[0]["val_loss/lang_a"] == pytest.approx(parent_final["val_loss/lang_a"], abs=1e-5)
    start = rec["val_loss_at_start"]
    for e in evals:
        for name in ("lang_a", "lang_b"):
            assert e[f"forgetting/{name}"] == pytest.approx(e[f"val_loss/{name}"] - start[name])
    assert evals[0]["forgetting/lang_a"] == 0.0
    assert evals[-1]["forgetting/lang_a"] > 0.1  # 95% lang_b: lang_a is forgotten ...
    assert evals[-1]["forgetting/lang_b"] < -0.1  # ... while lang_b is learned
    assert "router_by_source/lang_b/layers.0/max_vio" in evals[-1]


def test_cpt_resume_continues_the_recorded_mixer_stream(store: str, cpt: Path) -> None:
    from moe_cpt.mixer.dataset import MixedDataset

    steps = _jsonl(cpt / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 3, 4]  # crashed after 3, resumed from 2
    assert [r["segment"] for r in steps] == [0, 0, 0, 1, 1]  # each row names its segment
    deduped = run_logs.steps(cpt)  # readers see one row per step, the last segment's
    assert [(r["step"], r["segment"]) for r in deduped] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert steps[3]["loss"] == steps[2]["loss"]
    assert steps[3]["data_fingerprint"] == steps[2]["data_fingerprint"]
    rec = _record(cpt)
    assert [s["start_step"] for s in rec["segments"]] == [0, 2]
    # the restart kept the recorded lang_b version although @latest moved meanwhile
    latest_b = MixedDataset(str(cpt.parent / "cpt.yaml")).source_versions[1]
    assert rec["data"]["source_versions"][1] != latest_b
    # every step consumed exactly the recorded blend's global samples (read here on 1 rank)
    ds = MixedDataset(rec["data"]["blend"], rank=0, world_size=1)
    it = iter(ds)
    expected = [sample_hash(torch.from_numpy(np.stack([next(it)["tokens"] for _ in range(G)])))
                for _ in range(4)]
    assert [r["data_fingerprint"] for r in steps if r is not steps[2]] == expected
    evals = _evals(cpt)
    assert rec["val_loss_at_start"]["lang_a"] == evals[0]["val_loss/lang_a"]  # kept on resume


def test_resume_refuses_when_a_recorded_version_was_deleted(
        store: str, cpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_cpt.trainer import worker

    version = _record(cpt)["data"]["source_versions"][0].split("@")[1]
    version_dir = Path(store) / "lang_a" / version
    moved = version_dir.with_name("deleted")
    version_dir.rename(moved)
    try:
        with pytest.raises(NotFoundError, match=f"lang_a@{version}"):
            launch(str(CONFIG), [f"run.output_dir={cpt}", "data.kind=mixer",
                                 f"data.blend={cpt.parent / 'cpt.yaml'}",
                                 f"run.parent_run_dir={cpt.parent / 'pretrain'}", *CPT_ARGS,
                                 "training.steps=6"])
        # the per-process entry point (direct torchrun use) refuses with one line too
        rc = worker.main([str(CONFIG), f"run.output_dir={cpt}", "data.kind=mixer",
                          f"data.blend={cpt.parent / 'cpt.yaml'}", "parallel.nproc=1",
                          "parallel.ep=1", f"run.parent_run_dir={cpt.parent / 'pretrain'}",
                          *CPT_ARGS, "training.steps=6"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("cpt: error: run ") and f"lang_a@{version}" in err[-1]
    finally:
        moved.rename(version_dir)
