"""The paper's recipe end to end on CPU: real ``torchrun``, 2 gloo processes, real mixer blends.

For each design (``tiny_granular`` + ``aux_loss``, FSDP=2 with EP=1 since EP must divide its
31 routed experts; ``tiny_switch`` + ``sinkhorn``, FSDP=2 x EP=2):

P  pre-training on ``lang_a`` under ``cosine_inf`` without the anneal (8 steps);
C  CPT from P's last (pre-anneal) checkpoint on 70% ``lang_b`` + 30% replay of the ``lang_a``
   windows P consumed (``replay: seen``), continuing at eta_const and annealing at its end.

Checked: per-step MRI per layer in ``steps.jsonl`` and in ``metrics.jsonl`` train rows, per
source eval MRI and routing saturation, the LR of every step against the schedule's formula,
and the replay mode in the CPT run's record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from moe_cpt.trainer.data import sample_hash
from moe_cpt.trainer.launcher import launch
from moe_cpt.trainer.models import SHAPES
from moe_cpt.trainer.schedules import cosine_inf_factor
from tests.support.languages import lang_a, lang_b, publish_language

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
LR = 0.01
PRE = dict(steps=8, warmup=1, cooldown=3, anneal=0)
CPT = dict(steps=6, warmup=0, cooldown=0, anneal=3)
DESIGNS = {  # config file, router, EP degree
    "granular": ("tiny_granular.yaml", "aux_loss", 1),
    "switch": ("tiny_switch.yaml", "sinkhorn", 2),
}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _blend(path: Path, store: str, sources: dict[str, dict[str, Any]]) -> Path:
    spec = {"store": store, "seq_len": 64, "global_batch_size": 4, "seed": 5,
            "holdout_tokens": 1200, "sources": sources}
    path.write_text(yaml.safe_dump(spec))
    return path


def _schedule_args(s: dict[str, int]) -> list[str]:
    return [f"training.steps={s['steps']}", "schedule.kind=cosine_inf",
            f"schedule.warmup_steps={s['warmup']}", f"schedule.cooldown_steps={s['cooldown']}",
            f"schedule.anneal_steps={s['anneal']}", "schedule.const_lr_ratio=0.55",
            "schedule.min_lr_ratio=0.1"]


def _train(config: str, out: Path, *overrides: str) -> Path:
    log = out.parent / f"{out.name}.log"
    rc = launch(str(CONFIGS / config), [f"run.output_dir={out}", "data.kind=mixer",
                                        f"optimizer.lr={LR}", "eval.samples_per_source=16",
                                        "eval.batch_size=4", *overrides], log_path=str(log))
    if rc != 0:
        raise AssertionError(f"run {out.name} exited {rc}:\n{log.read_text()[-6000:]}")
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("science_store") / "store")
    publish_language(url, "lang_a", lang_a, 300, seed=1)
    publish_language(url, "lang_b", lang_b, 300, seed=2)
    return url


@pytest.fixture(scope="module", params=sorted(DESIGNS))
def runs(request: pytest.FixtureRequest, store: str,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    design = request.param
    config, router, ep = DESIGNS[design]
    root = tmp_path_factory.mktemp(f"science_{design}")
    common = (f"model.router={router}", f"parallel.ep={ep}", "checkpoint.interval=4",
              "eval.interval=4")
    pre_blend = _blend(root / "pre.yaml", store,
                       {"lang_a": {"dataset": "lang_a@latest", "weight": 1.0}})
    pre = _train(config, root / "pretrain", f"data.blend={pre_blend}", *common,
                 *_schedule_args(PRE))
    cpt_blend = _blend(root / "cpt.yaml", store, {
        "lang_b": {"dataset": "lang_b@latest", "weight": 0.7},
        "lang_a": {"dataset": "lang_a@latest", "weight": 0.3, "replay": "seen",
                   "seen_by": str(pre)},
    })
    cpt = _train(config, root / "cpt", f"data.blend={cpt_blend}", "run.phase=cpt",
                 f"run.parent_run_dir={pre}", *common, "eval.interval=3", *_schedule_args(CPT))
    return design, pre, cpt


def _expected_lrs(s: dict[str, int]) -> list[float]:
    return [LR * cosine_inf_factor(t, total_steps=s["steps"], warmup_steps=s["warmup"],
                                   cooldown_steps=s["cooldown"], anneal_steps=s["anneal"],
                                   const_ratio=0.55, min_ratio=0.1)
            for t in range(1, s["steps"] + 1)]


def test_lr_follows_the_infinite_schedule_in_both_phases(runs: tuple[str, Path, Path]) -> None:
    _, pre, cpt = runs
    pre_lrs = [r["lr/AdamW"] for r in _jsonl(pre / "steps.jsonl")]
    cpt_lrs = [r["lr/AdamW"] for r in _jsonl(cpt / "steps.jsonl")]
    assert pre_lrs == pytest.approx(_expected_lrs(PRE), rel=1e-6)
    assert cpt_lrs == pytest.approx(_expected_lrs(CPT), rel=1e-6)
    assert pre_lrs[-1] == pytest.approx(0.55 * LR)  # pre-training ends before any anneal
    assert cpt_lrs[0] == pytest.approx(0.55 * LR)  # CPT continues at eta_const, no re-warm
    assert cpt_lrs[-1] == pytest.approx(0.1 * LR)  # ... and anneals to eta_min


def test_mri_is_logged_every_step(runs: tuple[str, Path, Path]) -> None:
    design, pre, cpt = runs
    shape = SHAPES[DESIGNS[design][0].removesuffix(".yaml")]
    low = shape.top_k / shape.num_experts
    for out, steps in ((pre, PRE["steps"]), (cpt, CPT["steps"])):
        rows = _jsonl(out / "steps.jsonl")
        train_rows = [r for r in _jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
        assert [r["step"] for r in rows] == [r["step"] for r in train_rows] == list(
            range(1, steps + 1))
        for row in (*rows, *train_rows):
            layers = [row[f"router/layers.{i}/mri"] for i in range(shape.n_layers)]
            assert all(low - 1e-9 <= v <= 1.0 for v in layers), layers
            assert row["router/mri_max"] == max(layers)
            assert row["router/layers.0/max_vio"] >= 0.0


def test_eval_mri_and_saturation_per_source(runs: tuple[str, Path, Path]) -> None:
    design, pre, cpt = runs
    shape = SHAPES[DESIGNS[design][0].removesuffix(".yaml")]
    evals = [r for r in _jsonl(cpt / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    for e in evals:
        for src in ("lang_a", "lang_b"):
            for i in range(shape.n_layers):
                assert shape.top_k / shape.num_experts - 1e-9 <= e[
                    f"router_by_source/{src}/layers.{i}/mri"] <= 1.0
                assert 0.0 <= e[f"saturation/{src}/layers.{i}"] <= 1.0
            assert e[f"router_by_source/{src}/mri_max"] >= e[f"router_by_source/{src}/layers.0/mri"]
    # the reference is the parent checkpoint (the CPT's first evaluation): identical at step 0
    assert evals[0]["saturation/lang_a/overall"] == 1.0
    assert evals[-1]["saturation/lang_b/overall"] < 1.0  # CPT on lang_b moved its routing
    assert "forgetting/lang_a" in evals[-1]


def test_cpt_records_seen_replay_and_its_parent(runs: tuple[str, Path, Path]) -> None:
    _, pre, cpt = runs
    record = json.loads((cpt / "run.json").read_text())
    parent = json.loads((pre / "run.json").read_text())
    assert record["parent_run_id"] == parent["run_id"]
    assert record["parent"]["step"] == PRE["steps"]
    sources = {s["name"]: s for s in record["data"]["blend"]["sources"]}
    replay = sources["lang_a"]["replay"]
    assert replay["mode"] == "seen"
    assert replay["parent_run_id"] == parent["run_id"] and replay["seen_step"] == PRE["steps"]
    assert "replay" not in sources["lang_b"] or sources["lang_b"]["replay"] in (None, {},
                                                                                "fresh")


def _global_samples(blend: dict[str, Any], steps: int) -> list[list[dict[str, Any]]]:
    """The global samples of each step of a recorded blend, read on one rank."""
    from moe_cpt.mixer.dataset import MixedDataset

    it = iter(MixedDataset(blend, rank=0, world_size=1))
    return [[next(it) for _ in range(4)] for _ in range(steps)]  # global batch 4


def _fingerprint(samples: list[dict[str, Any]]) -> int:
    return sample_hash(torch.from_numpy(np.stack([s["tokens"] for s in samples])))


def test_seen_replay_draws_only_windows_the_parent_consumed(
        runs: tuple[str, Path, Path]) -> None:
    """Checked against the parent's recorded per-step data fingerprints: the parent's stream,
    rebuilt from its recorded blend, matches what it logged it consumed; every replayed
    lang_a window of the CPT run is one of those windows."""
    _, pre, cpt = runs
    parent_record = json.loads((pre / "run.json").read_text())
    parent_steps = _global_samples(parent_record["data"]["blend"], PRE["steps"])
    assert [_fingerprint(s) for s in parent_steps] == [
        r["data_fingerprint"] for r in _jsonl(pre / "steps.jsonl")]
    seen = {bytes(np.asarray(s["tokens"], dtype=np.int64)) for step in parent_steps
            for s in step}
    record = json.loads((cpt / "run.json").read_text())
    names = [s["name"] for s in record["data"]["blend"]["sources"]]
    cpt_steps = _global_samples(record["data"]["blend"], CPT["steps"])
    assert [_fingerprint(s) for s in cpt_steps] == [
        r["data_fingerprint"] for r in _jsonl(cpt / "steps.jsonl")]
    replayed = [s for step in cpt_steps for s in step if names[s["source"]] == "lang_a"]
    assert len(replayed) >= 4  # 30% of 24 samples
    assert all(bytes(np.asarray(s["tokens"], dtype=np.int64)) in seen for s in replayed)
