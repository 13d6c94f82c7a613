"""The user-facing run config (YAML): a typed tree of dataclasses, one per section.

A config file is a nested mapping (see ``trainer/configs/*.yaml`` and docs/trainer.md);
command-line overrides are ``dotted.key=value`` with YAML-parsed values. Every default is written
once, here, as a dataclass field; a key's type is its field's annotation. Unknown keys and values
of the wrong type are one :class:`~moe_cpt.errors.ConfigError` line naming the key, so a typo never
silently falls back to a default.

The ``torchtitan:`` section passes torchtitan's own ``Trainer.Config`` sections through
(``activation_checkpoint``, ``compile``, ``metrics``, ``parallelism``, ...), validated by
torchtitan's config classes (:mod:`moe_cpt.trainer.titan_sections`). Our study keys stay on top: a
``torchtitan:`` field that one of our keys sets (``torchtitan.training.steps``) is an error
naming our key. :func:`moe_cpt.trainer.titan_config.to_trainer_config` builds torchtitan's
``Trainer.Config`` from the tree.

Callers written against the old dict config keep working: a section reads like a mapping
(``cfg["model"]["router"]``, ``.get``), and :meth:`CptConfig.to_dict` is the plain dict the run
record stores.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_cpt.errors import ConfigError
from moe_cpt.trainer.models import ROUTERS, shape_of
from moe_cpt.trainer.schedules import SCHEDULES
from moe_cpt.trainer.titan_sections import check_sections, titan_degrees


class Section:
    """Read access by key, for callers written against the dict config (``cfg["model"]["x"]``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in _hints(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in _hints(type(self))

    def __iter__(self) -> Iterator[str]:
        return iter(_hints(type(self)))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self]

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data (JSON-ready)."""
        return copy.deepcopy(dataclasses.asdict(self))  # type: ignore[call-overload]


@dataclass
class ModelSection(Section):
    flavor: str = "tiny_moe"
    router: str = "aux_loss"
    attention: str = "sdpa"
    aux_loss_coeff: float | None = None  # null = the router's preset (moe_cpt.trainer.models.ROUTER_PRESETS)
    z_loss_coeff: float | None = None  # null = the router's preset
    load_balance_coeff: float = 0.001
    sinkhorn_tol: float = 0.01
    sinkhorn_max_iters: int = 100
    route_norm: bool | None = None  # null = renormalize the top-k gates only for k > 1
    vocab_size: int | None = None  # null = the flavor's


@dataclass
class DataSection(Section):
    kind: str = "synthetic"  # synthetic | mixer
    blend: str = ""  # mixer: a blend spec file
    seed: int = 0
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])  # synthetic sources
    service_url: str = ""  # mixer service instead of the in-process mixer
    service_token_env: str = ""  # env variable holding the service's bearer token


@dataclass
class TrainingSection(Section):
    steps: int = 20
    seq_len: int = 64
    local_batch_size: int = 2
    global_batch_size: int = -1  # -1 = local_batch_size x DP
    seed: int = 0
    max_norm: float = 1.0
    mixed_precision_param: str = "float32"
    deterministic: bool = False


@dataclass
class OptimizerSection(Section):
    lr: float = 3e-3
    weight_decay: float = 0.1


@dataclass
class ScheduleSection(Section):
    kind: str = "cosine"  # moe_cpt.trainer.schedules.SCHEDULES
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    decay_ratio: float | None = None
    # cosine_inf only (trainer/schedules.py)
    cooldown_steps: int = 0
    anneal_steps: int = 0
    const_lr_ratio: float = 0.55
    anneal_type: str = "linear"


@dataclass
class ParallelSection(Section):
    nproc: int = 2
    dp_shard: int = -1  # -1 = the ranks left over
    ep: int = 1


@dataclass
class CheckpointSection(Section):
    enable: bool = True
    interval: int = 10
    keep_latest_k: int = 0


@dataclass
class EvalSection(Section):
    interval: int = 0  # 0 = only at start and end
    samples_per_source: int = 32
    batch_size: int = 8  # windows per eval forward
    reference_routing: str = ""  # .npz of a reference routing; default: this run's start


@dataclass
class MetricsSection(Section):
    log_freq: int = 1
    tensorboard: bool = True  # torchtitan's TensorBoard logger, OUTPUT/tb/


@dataclass
class RunSection(Section):
    output_dir: str = "runs/default"
    run_id: str = ""
    name: str = ""  # a human label (e.g. study/variant), shown by `cpt runs ls`
    phase: str = "pretrain"  # pretrain | cpt
    parent_run_dir: str = ""  # cpt: output folder of the run to continue from
    parent_step: int = -1  # cpt: checkpoint step of the parent (-1 = latest)
    load_optimizer: bool = False  # cpt: also restore the parent's optimizer state
    init_from_full: bool = True  # seeded unsharded init (guards the CPU DTensor init bug)
    fail_at_step: int = 0  # testing: exit abruptly right after this step
    trust_checkpoint: bool = False  # DANGEROUS: load a checkpoint its run.json does not vouch for


@dataclass
class CptConfig(Section):
    """The whole run config."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    run: RunSection = field(default_factory=RunSection)
    # torchtitan's own Trainer.Config sections, by their field names (trainer/titan_sections.py)
    torchtitan: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dp_degree(self) -> int:
        """The data-parallel degree: ``parallel.dp_shard`` (-1: the ranks left after TP, PP,
        CP and DP replication) times torchtitan's ``data_parallel_replicate_degree``."""
        other, replicate = titan_degrees(self.torchtitan)
        shard = self.parallel.dp_shard
        if shard == -1:
            shard = self.parallel.nproc // (other * replicate)
        return shard * replicate

    def vocab_size(self) -> int:
        """``model.vocab_size``, or the flavor's."""
        return self.model.vocab_size or shape_of(self.model.flavor).vocab_size


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of numbers"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(node: Section, update: dict[str, Any], path: str = "") -> None:
    """Set ``update``'s keys on ``node`` (in place), each checked against its field's type."""
    hints = _hints(type(node))
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key {where!r}")
        want = hints[key]
        current = getattr(node, key)
        if isinstance(current, Section):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping")
            _merge(current, value, where + ".")
        elif typing.get_origin(want) is dict:  # the torchtitan pass-through: merged, checked later
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping")
            setattr(node, key, _merge_plain(current, value, where))
        else:
            setattr(node, key, _typed(where, want, value))


def _merge_plain(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_plain(out[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _typed(key: str, want: Any, value: Any) -> Any:
    """``value`` if it has the type ``want`` (``X | None`` takes null; a float key also takes
    an integer or a numeric string such as YAML's ``1e-4``; ``list[float]`` a list of
    numbers), else one :class:`ConfigError` line naming the key and the expected type."""
    nullable = isinstance(want, types.UnionType) and type(None) in typing.get_args(want)
    if nullable:
        if value is None:
            return None
        want = next(a for a in typing.get_args(want) if a is not type(None))
    if typing.get_origin(want) is list:
        if isinstance(value, list) and all(_is_number(v) for v in value):
            return [float(v) for v in value]
        want = list
    elif want is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif want is float and _is_number(value):
        return value
    elif isinstance(value, want) and (want is bool or not isinstance(value, bool)):
        return value
    expected = _TYPE_NAMES.get(want, getattr(want, "__name__", str(want))) + \
        (" or null" if nullable else "")
    raise ConfigError(f"config key {key!r} must be {expected}, not {value!r} "
                      f"({type(value).__name__})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping (one ConfigError line if missing or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return loaded


def check_config(*updates: dict[str, Any]) -> CptConfig:
    """Defaults <- each mapping in turn, typed and validated."""
    cfg = CptConfig()
    for update in updates:
        _merge(cfg, update)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> CptConfig:
    """Defaults <- file <- overrides, validated."""
    loaded = [read_yaml(path)] if path is not None else []
    return check_config(*loaded, *(parse_override(text) for text in overrides))


def validate(cfg: CptConfig) -> None:
    m, t, p, d = cfg.model, cfg.training, cfg.parallel, cfg.data
    shape = shape_of(m.flavor)  # a SHAPES name or hf:DIR; ConfigError if unknown
    if m.router not in ROUTERS:
        raise ConfigError(f"model.router {m.router!r} unknown ({', '.join(ROUTERS)})")
    _validate_schedule(cfg.schedule, t.steps)
    _validate_router(m, shape, p.ep)
    if d.kind not in ("synthetic", "mixer"):
        raise ConfigError("data.kind must be 'synthetic' or 'mixer'")
    if d.kind == "mixer" and not (d.blend or d.service_url):
        raise ConfigError("data.kind=mixer needs data.blend (a blend spec file) or "
                          "data.service_url (a mixer service)")
    if d.service_url and d.kind != "mixer":
        raise ConfigError("data.service_url needs data.kind=mixer")
    if p.nproc < 1:
        raise ConfigError("parallel.nproc must be >= 1")
    check_sections(cfg.torchtitan)
    other, replicate = titan_degrees(cfg.torchtitan)
    if p.nproc % (other * replicate) or p.nproc < other * replicate:
        raise ConfigError(f"parallel.nproc={p.nproc} leaves no whole data-parallel degree next to "
                          f"the torchtitan.parallelism degrees (TP x PP x CP x DP replicate = "
                          f"{other * replicate})")
    if p.dp_shard != -1 and p.dp_shard * other * replicate != p.nproc:
        raise ConfigError(f"parallel.dp_shard={p.dp_shard} x TP x PP x CP x DP replicate "
                          f"({other * replicate}) must equal parallel.nproc={p.nproc}")
    dp = cfg.dp_degree()
    g = t.global_batch_size
    if g > 0 and g % (t.local_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size {g} must be a multiple of local_batch_size x DP "
            f"({t.local_batch_size} x {dp})"
        )
    if cfg.run.phase not in ("pretrain", "cpt"):
        raise ConfigError("run.phase must be 'pretrain' or 'cpt'")
    if cfg.run.phase == "cpt" and not cfg.run.parent_run_dir:
        raise ConfigError("run.phase=cpt needs run.parent_run_dir")


def _validate_schedule(sched: ScheduleSection, steps: int) -> None:
    if sched.kind not in SCHEDULES:
        raise ConfigError(f"schedule.kind must be one of {', '.join(SCHEDULES)}")
    if sched.kind != "cosine_inf":
        return
    phases = {"warmup_steps": sched.warmup_steps, "cooldown_steps": sched.cooldown_steps,
              "anneal_steps": sched.anneal_steps}
    if any(v < 0 for v in phases.values()):
        raise ConfigError("schedule: warmup_steps, cooldown_steps and anneal_steps must be >= 0")
    if sum(phases.values()) > steps:
        raise ConfigError(f"schedule: warmup_steps + cooldown_steps + anneal_steps "
                          f"({sum(phases.values())}) exceed training.steps ({steps})")
    if sched.anneal_type not in ("linear", "exponential"):
        raise ConfigError("schedule.anneal_type must be 'linear' or 'exponential'")
    if not 0.0 < sched.min_lr_ratio <= sched.const_lr_ratio <= 1.0:
        raise ConfigError("schedule: need 0 < min_lr_ratio <= const_lr_ratio <= 1 for cosine_inf")


def _validate_router(m: ModelSection, shape: Any, ep: int) -> None:
    if m.sinkhorn_tol <= 0 or m.sinkhorn_max_iters < 1:
        raise ConfigError("model.sinkhorn_tol must be > 0 and model.sinkhorn_max_iters >= 1")
    if shape.is_moe and ep > 1 and shape.num_experts % ep:
        raise ConfigError(f"parallel.ep={ep} does not divide the {shape.num_experts} routed "
                          f"experts of model.flavor={m.flavor}")
