"""The user-facing run config (YAML) and its translation into torchtitan's ``Trainer.Config``.

A config file is a nested mapping (see ``trainer/configs/*.yaml`` and docs/trainer.md);
command-line overrides are ``dotted.key=value`` with YAML-parsed values. Unknown keys are an
error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from moe_cpt.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    # aux_loss_coeff / z_loss_coeff: null = the router's preset (moe_cpt.trainer.models.ROUTER_PRESETS);
    # route_norm: null = renormalize the top-k gates only for k > 1
    "model": {"flavor": "tiny_moe", "router": "aux_loss", "attention": "sdpa",
              "aux_loss_coeff": None, "z_loss_coeff": None, "load_balance_coeff": 0.001,
              "sinkhorn_tol": 0.01, "sinkhorn_max_iters": 100, "route_norm": None,
              "vocab_size": None},
    "data": {"kind": "synthetic", "blend": "", "seed": 0, "weights": [0.5, 0.5],
             "service_url": "", "service_token_env": ""},
    "training": {"steps": 20, "seq_len": 64, "local_batch_size": 2, "global_batch_size": -1,
                 "seed": 0, "max_norm": 1.0, "mixed_precision_param": "float32",
                 "deterministic": False},
    "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
    "schedule": {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "decay_ratio": None,
                 # cosine_inf only (trainer/schedules.py)
                 "cooldown_steps": 0, "anneal_steps": 0, "const_lr_ratio": 0.55,
                 "anneal_type": "linear"},
    "parallel": {"nproc": 2, "dp_shard": -1, "ep": 1},
    "checkpoint": {"enable": True, "interval": 10, "keep_latest_k": 0},
    "eval": {"interval": 0, "samples_per_source": 32, "batch_size": 8, "reference_routing": ""},
    "metrics": {"log_freq": 1, "tensorboard": False},
    "run": {"output_dir": "runs/default", "run_id": "", "name": "", "phase": "pretrain",
            "parent_run_dir": "", "parent_step": -1, "load_optimizer": False,
            "init_from_full": True, "fail_at_step": 0, "trust_checkpoint": False},
}

# The type of the keys whose default is None (null = "auto"); every other key has its default's type.
NULLABLE_TYPES: dict[str, type] = {
    "model.aux_loss_coeff": float, "model.z_loss_coeff": float, "model.route_norm": bool,
    "model.vocab_size": int, "schedule.decay_ratio": float,
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list"}


def _merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = _typed(where, base[key], value)
    return out


def _typed(key: str, default: Any, value: Any) -> Any:
    """``value`` if it has the type of ``key`` (its default's, or :data:`NULLABLE_TYPES`; a
    float key also takes an integer or a numeric string such as YAML's ``1e-4``), else one
    :class:`ConfigError` line naming the key and the expected type."""
    want = NULLABLE_TYPES.get(key) if default is None else type(default)
    if want is None or (default is None and value is None):
        return value
    if want is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        expected = _TYPE_NAMES.get(want, want.__name__) + (" or null" if default is None else "")
        raise ConfigError(f"config key {key!r} must be {expected}, not {value!r} "
                          f"({type(value).__name__})")
    return value


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: bad value ({exc})") from exc
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Defaults <- file <- overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        cfg = _merge(cfg, loaded)
    for text in overrides:
        cfg = _merge(cfg, parse_override(text))
    _check_lists(cfg)
    validate(cfg)
    return cfg


def _check_lists(cfg: dict[str, Any]) -> None:
    weights = cfg["data"]["weights"]
    if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
        raise ConfigError(f"config key 'data.weights' must be a list of numbers, not {weights!r}")


def validate(cfg: dict[str, Any]) -> None:
    from moe_cpt.trainer.models import ROUTERS, shape_of

    m, t, p = cfg["model"], cfg["training"], cfg["parallel"]
    shape = shape_of(m["flavor"])  # a SHAPES name or hf:DIR; ConfigError if unknown
    if m["router"] not in ROUTERS:
        raise ConfigError(f"model.router {m['router']!r} unknown ({', '.join(ROUTERS)})")
    _validate_schedule(cfg["schedule"], int(t["steps"]))
    _validate_router(m, shape, int(p["ep"]))
    if cfg["data"]["kind"] not in ("synthetic", "mixer"):
        raise ConfigError("data.kind must be 'synthetic' or 'mixer'")
    d = cfg["data"]
    if d["kind"] == "mixer" and not (d["blend"] or d["service_url"]):
        raise ConfigError("data.kind=mixer needs data.blend (a blend spec file) or "
                          "data.service_url (a mixer service)")
    if d["service_url"] and d["kind"] != "mixer":
        raise ConfigError("data.service_url needs data.kind=mixer")
    if int(p["nproc"]) < 1:
        raise ConfigError("parallel.nproc must be >= 1")
    dp = int(p["nproc"]) if int(p["dp_shard"]) == -1 else int(p["dp_shard"])
    g = int(t["global_batch_size"])
    if g > 0 and g % (int(t["local_batch_size"]) * dp):
        raise ConfigError(
            f"training.global_batch_size {g} must be a multiple of local_batch_size x DP "
            f"({t['local_batch_size']} x {dp})"
        )
    if cfg["run"]["phase"] not in ("pretrain", "cpt"):
        raise ConfigError("run.phase must be 'pretrain' or 'cpt'")
    if cfg["run"]["phase"] == "cpt" and not cfg["run"]["parent_run_dir"]:
        raise ConfigError("run.phase=cpt needs run.parent_run_dir")


def _validate_schedule(sched: dict[str, Any], steps: int) -> None:
    from moe_cpt.trainer.schedules import SCHEDULES

    if sched["kind"] not in SCHEDULES:
        raise ConfigError(f"schedule.kind must be one of {', '.join(SCHEDULES)}")
    if sched["kind"] != "cosine_inf":
        return
    phases = {k: int(sched[k]) for k in ("warmup_steps", "cooldown_steps", "anneal_steps")}
    if any(v < 0 for v in phases.values()):
        raise ConfigError("schedule: warmup_steps, cooldown_steps and anneal_steps must be >= 0")
    if sum(phases.values()) > steps:
        raise ConfigError(f"schedule: warmup_steps + cooldown_steps + anneal_steps "
                          f"({sum(phases.values())}) exceed training.steps ({steps})")
    if sched["anneal_type"] not in ("linear", "exponential"):
        raise ConfigError("schedule.anneal_type must be 'linear' or 'exponential'")
    if not 0.0 < float(sched["min_lr_ratio"]) <= float(sched["const_lr_ratio"]) <= 1.0:
        raise ConfigError("schedule: need 0 < min_lr_ratio <= const_lr_ratio <= 1 for cosine_inf")


def _validate_router(m: dict[str, Any], shape: Any, ep: int) -> None:
    if float(m["sinkhorn_tol"]) <= 0 or int(m["sinkhorn_max_iters"]) < 1:
        raise ConfigError("model.sinkhorn_tol must be > 0 and model.sinkhorn_max_iters >= 1")
    if m["route_norm"] not in (None, True, False):
        raise ConfigError("model.route_norm must be true, false or null (auto: k > 1)")
    if shape.is_moe and ep > 1 and shape.num_experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide the {shape.num_experts} routed "
                          f"experts of model.flavor={m['flavor']}")


def to_trainer_config(cfg: dict[str, Any]) -> Any:
    """Build the ``CptTrainer.Config`` (a torchtitan ``Trainer.Config``)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import DebugConfig

    from moe_cpt.trainer import cpu_compat
    from moe_cpt.trainer.data import CptDataLoader, NullTokenizer
    from moe_cpt.trainer.models import model_spec, shape_of
    from moe_cpt.trainer.schedules import lr_scheduler_config
    from moe_cpt.trainer.step_metrics import StepMetrics
    from moe_cpt.trainer.train import CptTrainer, EvalConfig, RunConfig

    m, d, t, p = cfg["model"], cfg["data"], cfg["training"], cfg["parallel"]
    vocab = m["vocab_size"] or shape_of(m["flavor"]).vocab_size
    spec = model_spec(
        m["flavor"], router=m["router"], attention=m["attention"],
        aux_loss_coeff=_optional_float(m["aux_loss_coeff"]),
        z_loss_coeff=_optional_float(m["z_loss_coeff"]),
        load_balance_coeff=float(m["load_balance_coeff"]), vocab_size=vocab,
        sinkhorn_tol=float(m["sinkhorn_tol"]), sinkhorn_max_iters=int(m["sinkhorn_max_iters"]),
        route_norm=m["route_norm"],
    )
    run = cfg["run"]
    training = TrainingConfig(
        local_batch_size=int(t["local_batch_size"]),
        global_batch_size=int(t["global_batch_size"]),
        seq_len=int(t["seq_len"]),
        steps=int(t["steps"]),
        max_norm=float(t["max_norm"]),
        mixed_precision_param=t["mixed_precision_param"],
    )
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=int(p["dp_shard"]),
        expert_parallel_degree=int(p["ep"]),
    )
    cpu_compat.adapt_config(training, parallelism)
    return CptTrainer.Config(
        model_spec=spec,
        dump_folder=str(run["output_dir"]),
        tokenizer=NullTokenizer.Config(vocab_size=vocab),
        dataloader=CptDataLoader.Config(kind=d["kind"], blend=str(d["blend"]), seed=int(d["seed"]),
                                        vocab_size=vocab, weights=[float(w) for w in d["weights"]],
                                        service_url=str(d["service_url"]),
                                        service_token_env=str(d["service_token_env"])),
        loss=CrossEntropyLoss.Config(),
        optimizer=default_adamw(lr=float(cfg["optimizer"]["lr"]),
                                weight_decay=float(cfg["optimizer"]["weight_decay"])),
        lr_scheduler=lr_scheduler_config(cfg["schedule"]),
        metrics=StepMetrics.Config(log_freq=int(cfg["metrics"]["log_freq"]),
                                   enable_tensorboard=bool(cfg["metrics"]["tensorboard"]),
                                   disable_color_printing=True),
        training=training,
        parallelism=parallelism,
        checkpoint=CheckpointManager.Config(
            enable=bool(cfg["checkpoint"]["enable"]),
            interval=int(cfg["checkpoint"]["interval"]),
            keep_latest_k=int(cfg["checkpoint"]["keep_latest_k"]),
            last_save_model_only=False,
        ),
        activation_checkpoint=None,  # no activation checkpointing at these sizes
        debug=DebugConfig(seed=int(t["seed"]), deterministic=bool(t["deterministic"])),
        run=RunConfig(run_id=str(run["run_id"]), name=str(run["name"]), phase=run["phase"],
                      parent_run_dir=str(run["parent_run_dir"]),
                      parent_step=int(run["parent_step"]),
                      load_optimizer=bool(run["load_optimizer"]),
                      init_from_full=bool(run["init_from_full"]),
                      fail_at_step=int(run["fail_at_step"]),
                      trust_checkpoint=bool(run["trust_checkpoint"])),
        evaluation=EvalConfig(interval=int(cfg["eval"]["interval"]),
                              samples_per_source=int(cfg["eval"]["samples_per_source"]),
                              batch_size=int(cfg["eval"]["batch_size"]),
                              reference_routing=str(cfg["eval"]["reference_routing"])),
        user_config=cfg,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
