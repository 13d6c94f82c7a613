"""Config loading/overrides, the `cpt train` CLI wiring, schedules, eval helpers, init guard."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_cpt.trainer  # noqa: F401
from moe_cpt.errors import ConfigError
from moe_cpt.trainer import cli, init_guard
from moe_cpt.trainer.config import load_config, parse_override
from moe_cpt.trainer.evaluation import max_violation, routing_change
from moe_cpt.trainer.launcher import torchrun_command
from moe_cpt.trainer.models import build_model_config
from moe_cpt.trainer.schedules import lr_scheduler_config

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("training.steps=5") == {"training": {"steps": 5}}
    assert parse_override("data.weights=[0.9,0.1]") == {"data": {"weights": [0.9, 0.1]}}
    cfg = load_config(CONFIGS / "tiny_moe.yaml", ["model.router=sinkhorn", "training.steps=3"])
    assert cfg["model"]["router"] == "sinkhorn" and cfg["training"]["steps"] == 3
    assert cfg["parallel"]["ep"] == 2  # from the file


@pytest.mark.parametrize("override, message", [
    ("training.stepz=3", "unknown config key"),
    ("model.router=nope", "model.router"),
    ("training.global_batch_size=3", "multiple of"),
    ("run.phase=cpt", "parent_run_dir"),
    ("data.kind=mixer", "needs data.blend .* or data.service_url"),
    ("data.service_url=http://mixer:8470", "data.service_url needs data.kind=mixer"),
])
def test_bad_configs_fail_with_one_clear_message(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_moe.yaml", [override])


def test_example_mixer_configs_load() -> None:
    pre = load_config(CONFIGS / "tiny_moe_mixer.yaml")
    cpt = load_config(CONFIGS / "tiny_moe_cpt.yaml")
    assert pre["data"]["kind"] == cpt["data"]["kind"] == "mixer"
    assert cpt["run"]["phase"] == "cpt" and cpt["run"]["parent_run_dir"] == pre["run"]["output_dir"]
    for cfg in (pre, cpt):
        assert (CONFIGS.parents[1] / cfg["data"]["blend"]).is_file()


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_cli_registers_train_subcommand() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(["train", "--dry-run", "c.yaml", "training.steps=2"])
    assert args.config == "c.yaml" and args.overrides == ["training.steps=2"] and args.dry_run
    assert callable(args.func)


def test_cli_dry_run_prints_torchrun_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(CONFIGS / "tiny_moe.yaml"), "training.steps=2",
                              "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node 2" in out
    assert out.strip().endswith("training.steps=2")


def test_torchrun_command() -> None:
    cmd = torchrun_command("c.yaml", ["a.b=1"], 2)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-3:] == ["moe_cpt.trainer", "c.yaml", "a.b=1"]


def _lrs(schedule: dict, steps: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = lr_scheduler_config(schedule)
    fn = cfg.build(optimizers=_Opts(opt), training_steps=steps).schedulers[0]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        fn.step()
    return out


class _Opts(list):  # the optimizers-container interface the scheduler builder needs
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__([opt])


def test_schedules_warmup_cosine_to_min_and_constant() -> None:
    cos = _lrs({"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "decay_ratio": None}, 10)
    assert cos[0] == pytest.approx(0.5) and cos[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[1:], cos[2:], strict=False))
    assert 0.1 <= cos[-1] < 0.2
    const = _lrs({"kind": "constant", "warmup_steps": 2, "min_lr_ratio": 0.1}, 10)
    assert const[:2] == pytest.approx([0.5, 1.0]) and const[2:] == pytest.approx([1.0] * 8)


def test_eval_helpers() -> None:
    assert max_violation(np.array([10.0, 10.0])) == 0.0
    assert max_violation(np.array([30.0, 10.0])) == pytest.approx(0.5)
    ref = {"l0": np.array([[0, 1], [2, 3]])}
    cur = {"l0": np.array([[0, 1], [2, 4]])}
    assert routing_change(cur, ref) == {"l0": 0.5, "overall": 0.5}


def test_experts_distinct_guard_detects_copies() -> None:
    model = build_model_config("tiny_moe").build()
    model.init_weights(buffer_device=None)
    assert init_guard.experts_distinct(model)
    experts = next(m for m in model.modules() if hasattr(m, "w1_EFD"))
    with torch.no_grad():
        experts.w1_EFD[1] = experts.w1_EFD[0]
    assert not init_guard.experts_distinct(model)
