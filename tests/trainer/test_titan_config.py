"""The typed config tree (issue 13) and the ``torchtitan:`` pass-through (issue 12.3), on CPU
without processes: defaults written once, the run record's plain dict, one-line errors for the
pass-through, what reaches torchtitan's ``Trainer.Config``, the ``DataSource`` seam, and that
every shipped config loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from torchtitan.config import CompileConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.dataset import MixedDataset
from moe_cpt.mixer.service.client import ServiceMixedDataset
from moe_cpt.trainer import cli
from moe_cpt.trainer.config import CptConfig, DataSection, EvalSection, RunSection, load_config
from moe_cpt.trainer.data import CptDataLoader
from moe_cpt.trainer.data_source import DataSource
from moe_cpt.trainer.study.grid import check_configs, derive_runs
from moe_cpt.trainer.study.schema import PinnedData, load_study
from moe_cpt.trainer.synthetic_data import SyntheticSource
from moe_cpt.trainer.titan_config import to_trainer_config
from moe_cpt.trainer.train import CptTrainer

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
TINY = CONFIGS / "tiny_moe.yaml"


def test_sections_are_typed_and_read_like_the_old_dict() -> None:
    cfg = load_config(TINY, ["model.router=sinkhorn", "optimizer.lr=1e-4"])
    assert isinstance(cfg, CptConfig) and cfg.model.router == "sinkhorn"
    assert cfg["model"]["router"] == cfg.model.router and cfg["optimizer"].get("lr") == 1e-4
    assert cfg["schedule"].get("nope", "x") == "x" and "router" in cfg["model"] and "x" not in cfg
    assert dict(cfg["optimizer"].items()) == {"lr": 1e-4, "weight_decay": 0.1}
    with pytest.raises(KeyError):
        cfg["model"]["nope"]
    plain = cfg.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # the run record stores it as JSON
    assert plain["model"]["router"] == "sinkhorn" and plain["torchtitan"] == {}
    assert set(plain) == {"model", "data", "training", "optimizer", "schedule", "parallel",
                          "checkpoint", "eval", "metrics", "run", "torchtitan"}


def test_each_default_is_written_once() -> None:
    """The trainer's run/eval configs are the config sections; the data loader's defaults are
    read from the data section; TensorBoard is on by default."""
    fields = CptTrainer.Config.__dataclass_fields__
    assert fields["run"].default_factory is RunSection  # type: ignore[attr-defined]
    assert fields["evaluation"].default_factory is EvalSection  # type: ignore[attr-defined]
    loader, data = CptDataLoader.Config(), DataSection()
    for key in ("kind", "blend", "seed", "weights", "service_url", "service_token_env"):
        assert getattr(loader, key) == getattr(data, key), key
    cfg = load_config(None)
    assert cfg.metrics.tensorboard is True
    built = to_trainer_config(cfg)
    assert built.metrics.enable_tensorboard and built.run is cfg.run and built.evaluation is cfg.eval
    assert built.user_config == cfg.to_dict()


def test_torchtitan_sections_reach_the_trainer_config() -> None:
    cfg = load_config(TINY, ["torchtitan.activation_checkpoint.mode=full",
                             "torchtitan.activation_checkpoint.preserve_rng_state=false",
                             "torchtitan.compile.enable=true", "torchtitan.compile.components=[model]",
                             "torchtitan.metrics.enable_wandb=true", "torchtitan.training.gc_freq=7",
                             "torchtitan.comm.init_timeout_seconds=60"])
    built = to_trainer_config(cfg)
    assert isinstance(built.activation_checkpoint, FullAC.Config)
    assert built.activation_checkpoint.preserve_rng_state is False
    assert built.compile == CompileConfig(enable=True, components=["model"])
    assert built.metrics.enable_wandb and built.metrics.log_freq == cfg.metrics.log_freq
    assert built.training.gc_freq == 7 and built.training.steps == cfg.training.steps  # ours kept
    assert built.comm.init_timeout_seconds == 60
    assert to_trainer_config(load_config(TINY)).activation_checkpoint is None  # default: no AC
    selective = load_config(TINY, ["torchtitan.activation_checkpoint={mode: selective}"])
    assert isinstance(to_trainer_config(selective).activation_checkpoint, SelectiveAC.Config)


def test_override_and_file_merge_inside_the_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(TINY.read_text() + "torchtitan:\n  compile: {enable: true, backend: eager}\n")
    cfg = load_config(path, ["torchtitan.compile.components=[loss]"])
    assert cfg.torchtitan == {"compile": {"enable": True, "backend": "eager", "components": ["loss"]}}


@pytest.mark.parametrize("override, message", [
    ("torchtitan.compile.enbale=true",
     "unknown config key 'torchtitan.compile.enbale' (not a field of torchtitan's CompileConfig)"),
    ("torchtitan.activation_checkpoint.mode=half", "'torchtitan.activation_checkpoint.mode' must be one of"),
    ("torchtitan.activation_checkpoint={mode: full, budget: 1}", "unknown config key "
     "'torchtitan.activation_checkpoint.budget' (not a field of torchtitan's FullAC.Config)"),
    ("torchtitan.compile.enable=3", "'torchtitan.compile.enable' must be true or false, not 3"),
    ("torchtitan.parallelism.fsdp_reshard_after_forward=sometimes",
     "'torchtitan.parallelism.fsdp_reshard_after_forward' must be one of 'default', 'always', 'never'"),
    ("torchtitan.compile.enable_async_tensor_parallel=true", "torchtitan.compile: Async TP requires"),
    ("torchtitan.training.steps=5", "'torchtitan.training.steps' is set by training.steps"),
    ("torchtitan.parallelism.expert_parallel_degree=2", "is set by parallel.ep"),
    ("torchtitan.metrics.enable_tensorboard=false", "is set by metrics.tensorboard"),
    ("torchtitan.optimizer.eps=1e-6", "'torchtitan.optimizer' is not passed through"),
    ("torchtitan.float8.enable=true", "unknown config key 'torchtitan.float8' (torchtitan sections"),
    ("torchtitan.compile=5", "'torchtitan.compile' must be a mapping"),
    ("torchtitan=5", "'torchtitan' must be a mapping"),
    ("torchtitan.parallelism.tensor_parallel_degree=4", "leaves no whole data-parallel degree"),
    ("torchtitan.parallelism.tensor_parallel_degree=3", "leaves no whole data-parallel degree"),
    ("parallel.dp_shard=1", "parallel.dp_shard=1 x TP x PP x CP x DP replicate (1) must equal "
     "parallel.nproc=2"),
    ("torchtitan.activation_checkpoint.mode=memory_budget",
     "torchtitan: Memory budget activation checkpointing requires the model to be compiled"),
])
def test_pass_through_errors_are_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parallel_degrees_of_the_pass_through_enter_the_batch_check() -> None:
    cfg = load_config(TINY, ["torchtitan.parallelism.tensor_parallel_degree=2", "parallel.ep=1",
                             "training.global_batch_size=2"])
    assert cfg.dp_degree() == 1  # 2 processes, TP 2
    with pytest.raises(ConfigError, match=r"local_batch_size x DP \(2 x 2\)"):
        load_config(TINY, ["training.global_batch_size=2"])


def test_data_sources_satisfy_the_protocol() -> None:
    synthetic = SyntheticSource(seq_len=8, vocab_size=32, global_batch_size=2, rank=0, world_size=1,
                                seed=0, weights=(0.5, 0.5))
    assert isinstance(synthetic, DataSource)
    members = ("source_names", "seq_len", "global_batch_size", "__iter__", "state_dict",
               "load_state_dict", "describe", "validation_samples")
    for cls in (MixedDataset, ServiceMixedDataset):
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    assert not isinstance(object(), DataSource)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "paper").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_train_configs_dry_run(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(path), "--dry-run"])
    assert args.func(args) == 0
    assert "torch.distributed.run" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((CONFIGS / "study").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_give_runs_the_trainer_accepts(path: Path) -> None:
    """Study files are not `cpt train` configs: their runs' configs are checked by the same
    typed tree (moe_cpt.trainer.study.grid.check_configs)."""
    plans = derive_runs(load_study(path), PinnedData("a@v1", "b@v1", "sha", 8192))
    check_configs(plans)
    assert plans
