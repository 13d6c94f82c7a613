"""The ``torchtitan:`` config section: torchtitan's own ``Trainer.Config`` sections, passed through.

Each sub-key is a field of torchtitan's ``Trainer.Config`` and holds fields of that section's
config class, named as torchtitan names them::

    torchtitan:
      activation_checkpoint: {mode: full}          # none | full | selective | memory_budget
      compile: {enable: true, components: [model]}
      metrics: {enable_wandb: true}
      parallelism: {tensor_parallel_degree: 2}
      training: {gc_freq: 10}

Validation is torchtitan's: an unknown field, a value of the wrong type, or a value the class's
own ``__post_init__`` refuses is one :class:`~moe_cpt.errors.ConfigError` line naming the key.
``activation_checkpoint.mode`` (ours) picks torchtitan's policy class (``FullAC``,
``SelectiveAC``, ``MemoryBudgetAC``; ``none`` = no activation checkpointing, the default); the
other keys are that class's fields.

Our study keys stay on top: a torchtitan field that one of our keys sets (:data:`OWNED`, e.g.
``training.steps``) is an error naming our key, never silently one or the other. Sections the
trainer builds itself (model, tokenizer, data loader, loss, optimizer, LR schedule, validator)
are not passed through.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.config import (
    CommConfig,
    CompileConfig,
    DebugConfig,
    ParallelismConfig,
    TrainingConfig,
)
from torchtitan.distributed.activation_checkpoint import FullAC, MemoryBudgetAC, SelectiveAC
from torchtitan.tools.profiler import Profiler
from torchtitan.trainer import Trainer

from moe_cpt.errors import ConfigError
from moe_cpt.trainer import cpu_compat
from moe_cpt.trainer.step_metrics import StepMetrics

# section -> the config class of the Trainer.Config field of that name (as the trainer builds it)
SECTIONS: dict[str, Callable[[], Any]] = {
    "training": TrainingConfig,
    "parallelism": ParallelismConfig,
    "compile": CompileConfig,
    "metrics": StepMetrics.Config,
    "checkpoint": CheckpointManager.Config,
    "comm": CommConfig,
    "debug": DebugConfig,
    "profiler": Profiler.Config,
}
AC_MODES: dict[str, Callable[..., Any] | None] = {
    "none": None, "full": FullAC.Config, "selective": SelectiveAC.Config,
    "memory_budget": MemoryBudgetAC.Config,
}
# torchtitan fields our own keys set: section -> field -> our key
OWNED: dict[str, dict[str, str]] = {
    "training": {"local_batch_size": "training.local_batch_size",
                 "global_batch_size": "training.global_batch_size", "seq_len": "training.seq_len",
                 "steps": "training.steps", "max_norm": "training.max_norm",
                 "mixed_precision_param": "training.mixed_precision_param"},
    "parallelism": {"data_parallel_shard_degree": "parallel.dp_shard",
                    "expert_parallel_degree": "parallel.ep"},
    "metrics": {"log_freq": "metrics.log_freq", "enable_tensorboard": "metrics.tensorboard"},
    "checkpoint": {"enable": "checkpoint.enable", "interval": "checkpoint.interval",
                   "keep_latest_k": "checkpoint.keep_latest_k",
                   "initial_load_path": "run.parent_run_dir",
                   "initial_load_model_only": "run.load_optimizer", "load_step": "run.parent_step",
                   "last_save_model_only": "the trainer (a resume needs the full state)"},
    "debug": {"seed": "training.seed", "deterministic": "training.deterministic"},
}
NOT_PASSED = ("model_spec", "hf_assets_path", "dump_folder", "tokenizer", "dataloader", "loss",
              "optimizer", "lr_scheduler", "validator", "override")


def check_sections(sections: dict[str, Any]) -> None:
    """Validate the ``torchtitan:`` mapping: each section built with torchtitan's class, then
    together by ``Trainer.Config``'s own cross-section checks (e.g. memory-budget activation
    checkpointing needs ``compile``; with the CPU values of :func:`cpu_compat.adapt_config`)."""
    if not sections:
        return
    # the trainer's checkpoint base (no initial load): torchtitan's default warns about it
    built: dict[str, Any] = {"checkpoint": CheckpointManager.Config(initial_load_model_only=False)}
    apply_sections(built, sections)
    cpu_compat.adapt_config(built.setdefault("training", TrainingConfig()),
                            built.setdefault("parallelism", ParallelismConfig()))
    try:
        Trainer.Config(**built)
    except ValueError as exc:
        raise ConfigError(f"torchtitan: {str(exc).strip().splitlines()[0]}") from exc


def build_section(name: str, values: Any, base: Any) -> Any:
    """Section ``name`` of torchtitan's ``Trainer.Config``: ``base`` (the trainer's own value;
    None: the class's defaults) with ``values`` set, validated by the class."""
    where = f"torchtitan.{name}"
    if name not in SECTIONS and name != "activation_checkpoint":
        if name in NOT_PASSED:
            raise ConfigError(f"config key {where!r} is not passed through: the trainer builds "
                              f"torchtitan's {name} from its own keys (docs/trainer.md)")
        known = ", ".join(sorted([*SECTIONS, "activation_checkpoint"]))
        raise ConfigError(f"unknown config key {where!r} (torchtitan sections passed through: "
                          f"{known})")
    if not isinstance(values, dict):
        raise ConfigError(f"config key {where!r} must be a mapping")
    values = dict(values)
    if name == "activation_checkpoint":
        mode = values.pop("mode", "none")
        if mode not in AC_MODES:
            raise ConfigError(f"config key '{where}.mode' must be one of {', '.join(AC_MODES)}, "
                              f"not {mode!r}")
        cls = AC_MODES[mode]
        if cls is None:
            if values:
                raise ConfigError(f"{where}: mode none takes no other keys ({', '.join(values)})")
            return None
        base = None
    else:
        cls = SECTIONS[name]
        for key in values:
            if key in OWNED.get(name, {}):
                raise ConfigError(f"config key '{where}.{key}' is set by {OWNED[name][key]}; "
                                  "set that instead")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    hints = _hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}.{key}' (not a field of torchtitan's "
                              f"{cls.__qualname__})")
        if key in hints and not _matches(hints[key], value):
            raise ConfigError(f"config key '{where}.{key}' must be {_describe(hints[key])}, "
                              f"not {value!r} ({type(value).__name__})")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (ValueError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: {first}") from exc


def apply_sections(kwargs: dict[str, Any], sections: dict[str, Any]) -> None:
    """Set the ``torchtitan:`` sections on the keyword arguments of a ``Trainer.Config`` (in
    place), each onto the trainer's own value of that section if it has one."""
    for name, values in sections.items():
        kwargs[name] = build_section(name, values, kwargs.get(name))


def titan_degrees(sections: dict[str, Any]) -> tuple[int, int]:
    """(TP x PP x CP, DP replicate) of the ``torchtitan.parallelism`` section (1 when unset)."""
    par = sections.get("parallelism") or {}
    if not isinstance(par, dict):
        return 1, 1
    other = 1
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        value = par.get(key, 1)
        other *= value if isinstance(value, int) and value > 0 else 1
    replicate = par.get("data_parallel_replicate_degree", 1)
    return other, replicate if isinstance(replicate, int) and replicate > 0 else 1


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: that field is not type-checked
        return {}


def _matches(ann: Any, value: Any) -> bool:
    """Whether ``value`` fits annotation ``ann`` (as far as plain YAML values can)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is Any:
        return True
    if origin is typing.Annotated:
        return _matches(args[0], value)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in args)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin is list or ann is list:
        return isinstance(value, list) and (not args or all(_matches(args[0], v) for v in value))
    if origin is dict or ann is dict:
        return isinstance(value, dict)
    return True  # a class we cannot build from YAML here: torchtitan's own checks decide


def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    if ann in names:
        return names[ann]
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" \
            if args else "a list"
    return getattr(ann, "__name__", str(ann))
