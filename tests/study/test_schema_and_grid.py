"""Study files: validation (bad files fail before any run starts, one `cpt: error:` line) and
the runs derived from a good one (names, parents, blends, schedules, configs the trainer accepts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_cpt.cli import main
from moe_cpt.errors import ConfigError
from moe_cpt.trainer.config import load_config
from moe_cpt.trainer.study.grid import derive_runs, level_tag
from moe_cpt.trainer.study.runner import prepare
from moe_cpt.trainer.study.schema import PinnedData, load_study, parse_study
from tests.study.helpers import make_store, micro_study, write_study

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_store(tmp_path_factory.mktemp("study_store"))


def _cli_error(tmp_path: Path, study: dict[str, Any], capsys: pytest.CaptureFixture) -> str:
    path = write_study(tmp_path / "bad.yaml", study)
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: ") and err.count("\n") == 1, err
    assert not (Path(study["output_dir"]) / "runs").exists()  # nothing started
    return err


@pytest.mark.parametrize("change, message", [
    ({"a": "lang_a@nope"}, "lang_a@nope"),
    ({"b": "no_such_dataset@latest"}, "no_such_dataset"),
    ({"replay": [0.0, 1.0]}, "replay level 1.0 is outside [0, 1)"),
    ({"replay": [-0.1]}, "outside [0, 1)"),
    ({"models": ["tiny_dense", "tiny_nope"]}, "unknown flavor 'tiny_nope'"),
    ({"tokens": {"pretrain": 100, "cpt": 1024}}, "smaller than one step"),
    ({"b": "other_tok@latest"}, "different tokenizers"),
    ({"routers": ["magic"]}, "unknown router 'magic'"),
    ({"bogus": 1}, "unknown key(s): bogus"),
    ({"retrain": [0.5]}, "not replay levels"),
])
def test_bad_study_files_fail_before_any_run(tmp_path: Path, store: str, capsys: pytest.CaptureFixture,
                                              change: dict[str, Any], message: str) -> None:
    err = _cli_error(tmp_path, micro_study(store, tmp_path / "s", **change), capsys)
    assert message in err, err


def test_missing_study_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["study", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.startswith("cpt: error: study file")


def _plans(store: str, tmp_path: Path, **change: Any) -> list:
    spec = parse_study(micro_study(store, tmp_path / "s", **change), "micro.yaml", "x")
    return derive_runs(spec, PinnedData("lang_a@v1", "lang_b@v1", "sha", 256))


def test_grid_has_every_run_with_parents_and_names(tmp_path: Path, store: str) -> None:
    plans = _plans(store, tmp_path)
    keys = [p.key for p in plans]
    assert keys == ["dense/pretrain", "dense/cpt-r0", "dense/cpt-r0.3", "dense/retrain-r0.3",
                    "switch-aux_loss/pretrain", "switch-aux_loss/cpt-r0", "switch-aux_loss/cpt-r0.3",
                    "switch-aux_loss/retrain-r0.3"]
    by = {p.key: p for p in plans}
    assert by["switch-aux_loss/cpt-r0.3"].parent == "switch-aux_loss/pretrain"
    assert by["dense/retrain-r0.3"].parent is None
    assert [p.steps for p in plans[:4]] == [8, 4, 4, 12]
    for p in plans:
        assert p.config["run"]["name"] == p.name == f"micro/{p.key}"
        assert p.config["run"]["output_dir"] == p.output_dir
        for src in p.blend["sources"].values():
            assert src["holdout_tokens"] == 600  # the same split of A (and B) everywhere
        assert list(p.blend["sources"]) == ["lang_a", "lang_b"]
    cpt = by["dense/cpt-r0.3"]
    assert cpt.config["run"]["phase"] == "cpt"
    assert cpt.config["run"]["parent_run_dir"] == by["dense/pretrain"].output_dir
    a = cpt.blend["sources"]["lang_a"]
    assert a["weight"] == 0.3 and a["replay"] == "seen" and a["seen_by"] == by["dense/pretrain"].output_dir
    assert cpt.blend["sources"]["lang_b"]["weight"] == 0.7
    assert "replay" not in by["dense/cpt-r0"].blend["sources"]["lang_a"]  # weight 0: eval only
    assert by["dense/pretrain"].blend["sources"]["lang_b"]["weight"] == 0.0
    # re-train: A and B in the amounts pre-training + the r=0.3 CPT consumed (8 + 0.3*4 : 0.7*4)
    rt = by["dense/retrain-r0.3"].blend["sources"]
    assert rt["lang_a"]["weight"] == pytest.approx(9.2 / 12) and rt["lang_b"]["weight"] == pytest.approx(2.8 / 12)
    assert by["switch-aux_loss/pretrain"].config["model"] == {"flavor": "tiny_switch", "router": "aux_loss",
                                                              "vocab_size": 256}


def test_grid_crosses_moe_flavors_with_routers_and_seeds(tmp_path: Path, store: str) -> None:
    plans = _plans(store, tmp_path, models=["tiny_dense", "tiny_switch", "tiny_granular"],
                   routers=["aux_loss", "sinkhorn"], seeds=[0, 1], retrain="all")
    pre = [p.key for p in plans if p.kind == "pretrain"]
    assert len(pre) == 10 and "granular-sinkhorn-s1/pretrain" in pre and "dense-s0/pretrain" in pre
    assert len([p for p in plans if p.kind == "retrain"]) == 20
    assert {p.config["training"]["seed"] for p in plans} == {0, 1}


def test_schedules_rewarm_or_continue_the_infinite_schedule(tmp_path: Path, store: str) -> None:
    by = {p.key: p for p in _plans(store, tmp_path, tokens={"pretrain": 25600, "cpt": 10240})}
    assert by["dense/cpt-r0"].config["schedule"]["kind"] == "cosine"
    assert by["dense/cpt-r0"].config["schedule"]["warmup_steps"] >= 1  # re-warm
    inf = {p.key: p for p in _plans(store, tmp_path, tokens={"pretrain": 25600, "cpt": 10240},
                                    schedule={"kind": "cosine_inf", "anneal_frac": 0.25})}
    pre, cpt, rt = (inf[k].config["schedule"] for k in ("dense/pretrain", "dense/cpt-r0", "dense/retrain-r0.3"))
    assert pre["anneal_steps"] == 0 and pre["warmup_steps"] > 0 and pre["cooldown_steps"] > 0
    assert cpt["warmup_steps"] == 0 and cpt["cooldown_steps"] == 0 and cpt["anneal_steps"] == 10
    assert rt["anneal_steps"] == 10 and rt["warmup_steps"] == pre["warmup_steps"]


def test_prepare_writes_configs_the_trainer_accepts(tmp_path: Path, store: str) -> None:
    spec = load_study(write_study(tmp_path / "micro.yaml", micro_study(store, tmp_path / "s")))
    study = prepare(spec)
    assert study.data.a.startswith("lang_a@") and "latest" not in study.data.a  # pinned
    for p in study.plans:
        cfg = load_config(p.config_path)
        assert cfg["run"]["name"] == p.name and cfg["data"]["blend"] == p.blend_path
        assert yaml.safe_load(Path(p.blend_path).read_text()) == p.blend
    again = prepare(spec)  # restarting keeps the study id and the pinned versions
    assert again.study_id == study.study_id and again.data == study.data
    other = micro_study(store, tmp_path / "s", replay=[0.0, 0.3, 0.5])
    with pytest.raises(ConfigError, match="another study file"):
        prepare(load_study(write_study(tmp_path / "other.yaml", other)))


def test_level_tags() -> None:
    assert [level_tag(x) for x in (0.0, 0.3, 0.25, 0.05)] == ["r0", "r0.3", "r0.25", "r0.05"]


def test_dry_run_prints_every_command_and_config(tmp_path: Path, store: str,
                                                capsys: pytest.CaptureFixture) -> None:
    path = write_study(tmp_path / "micro.yaml", micro_study(store, tmp_path / "s"))
    assert main(["study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n## micro/") == 8 and out.count("-m moe_cpt.trainer ") == 8
    assert "(after dense/pretrain)" in out and "replay: seen" in out
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_progress_shows_state_step_and_eta(tmp_path: Path, store: str) -> None:
    import io
    import json as _json
    import time

    from moe_cpt.trainer.study.runner import Lane, Progress, run_states

    study = prepare(load_study(write_study(tmp_path / "micro.yaml", micro_study(store, tmp_path / "s"))))
    assert {v["state"] for v in run_states(study).values()} == {"queued"}
    plan = study.plans[0]
    Path(plan.output_dir).mkdir(parents=True)
    (Path(plan.output_dir) / "steps.jsonl").write_text(
        "".join(_json.dumps({"step": s}) + "\n" for s in (1, 2)) + '{"step": 3, "lo')  # torn tail
    lane = Lane(plan, proc=None, log=None, started=time.monotonic() - 10.0, start_step=0)  # type: ignore[arg-type]
    states = {p.key: "queued" for p in study.plans} | {plan.key: "running"}
    stream = io.StringIO()
    progress = Progress(study, stream)
    rows = progress.rows(states, {plan.key: lane})
    name, state, detail = rows[0]
    assert name == "micro/dense/pretrain" and state == "running"
    assert detail.startswith("step 2/8, ETA ") and 25 <= float(detail.split("ETA ")[1].split()[0]) <= 40
    progress.update(states, {plan.key: lane})
    out = stream.getvalue()
    assert "[study] micro/dense/pretrain: running" in out and "[study] micro/dense/cpt-r0: queued" in out
    assert "0 done, 1 running, 7 queued, 0 failed; micro/dense/pretrain: step 2/8" in out
