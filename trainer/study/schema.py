"""The study file (``cpt study STUDY.yaml``): its schema, defaults and validation.

A study file names datasets A and B, the model/router/replay grid, token budgets, the LR
schedule and the eval settings (docs/study.md). :func:`load_study` parses and checks it without
touching data; :func:`check_data` opens A and B (``dataset@ref`` must resolve, one tokenizer).
Every problem is one :class:`~moe_cpt.errors.ConfigError` line, raised before any run starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_cpt.errors import ConfigError

TOP_KEYS = {"name", "output_dir", "store", "a", "b", "holdout_tokens", "seq_len",
            "global_batch_size", "models", "routers", "replay", "replay_mode", "retrain", "seeds",
            "tokens", "schedule", "optimizer", "eval", "parallel", "lanes", "threads_per_run",
            "overrides", "data_seed", "thresholds"}
DATASET_KEYS = {"dataset", "store", "label"}
SCHEDULE_KEYS = {"kind", "warmup_frac", "min_lr_ratio", "cooldown_frac", "const_lr_ratio",
                 "anneal_frac"}
EVAL_KEYS = {"points", "samples_per_source", "batch_size"}
SCHEDULE_KINDS = ("cosine", "cosine_inf")
REPLAY_MODES = ("seen", "fresh")


@dataclass(frozen=True)
class DatasetRef:
    """One of the study's two corpora: ``dataset@ref`` in ``store``, logged as ``label``."""

    dataset: str
    store: str
    label: str


@dataclass(frozen=True)
class ScheduleSpec:
    """LR schedule of the study; step counts are fractions of each run's steps."""

    kind: str = "cosine"
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    cooldown_frac: float = 0.1  # cosine_inf: cosine from lr to const_lr_ratio*lr (pre-training)
    const_lr_ratio: float = 0.55
    anneal_frac: float = 0.2  # cosine_inf: final anneal of CPT and re-train runs


@dataclass(frozen=True)
class EvalSpec:
    points: int = 8  # evaluations per run besides the one at its start
    samples_per_source: int = 32
    batch_size: int = 8


@dataclass(frozen=True)
class Variant:
    """One model of the grid: a flavor, and for MoE flavors a router."""

    flavor: str
    router: str  # "" for dense
    seed: int = 0
    multi_seed: bool = False

    @property
    def is_moe(self) -> bool:
        return bool(self.router)

    @property
    def design(self) -> str:
        """``dense``, ``switch``, ``granular``, ... (the flavor without its size prefix)."""
        name = self.flavor
        for prefix in ("tiny_", "bench_"):
            name = name.removeprefix(prefix)
        return name.split("_")[0]

    @property
    def model_key(self) -> str:
        """The variant without its seed: ``switch-aux_loss``, ``dense``."""
        return f"{self.design}-{self.router}" if self.router else self.design

    @property
    def key(self) -> str:
        return self.model_key + (f"-s{self.seed}" if self.multi_seed else "")


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: str  # the study file
    text: str  # its content (recorded with the study)
    output_dir: str
    a: DatasetRef
    b: DatasetRef
    holdout_tokens: int
    seq_len: int
    global_batch_size: int
    models: tuple[str, ...]
    routers: tuple[str, ...]
    replay: tuple[float, ...]
    replay_mode: str
    retrain: tuple[float, ...]  # replay levels whose CPT gets a full re-train baseline
    seeds: tuple[int, ...]
    pretrain_tokens: int
    cpt_tokens: int
    schedule: ScheduleSpec
    optimizer: dict[str, float]
    eval: EvalSpec
    nproc: int = 1
    lanes: int = 2
    threads_per_run: int = 1
    data_seed: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # moe_cpt.trainer.study.verdicts.Thresholds

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_size

    @property
    def pretrain_steps(self) -> int:
        return self.pretrain_tokens // self.tokens_per_step

    @property
    def cpt_steps(self) -> int:
        return self.cpt_tokens // self.tokens_per_step

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def variants(self) -> list[Variant]:
        """Every model variant: each dense flavor once, each MoE flavor with each router, per seed."""
        from moe_cpt.trainer.models import SHAPES

        multi = len(self.seeds) > 1
        out = []
        for seed in self.seeds:
            for flavor in self.models:
                if SHAPES[flavor].is_moe:
                    out += [Variant(flavor, r, seed, multi) for r in self.routers]
                else:
                    out.append(Variant(flavor, "", seed, multi))
        return out


def _fail(path: str, msg: str) -> ConfigError:
    return ConfigError(f"study {path}: {msg}")


def _dataset(raw: Any, key: str, store: str, path: str) -> DatasetRef:
    if isinstance(raw, str):
        raw = {"dataset": raw}
    if not isinstance(raw, dict) or "dataset" not in raw:
        raise _fail(path, f"{key} must be 'dataset@ref' or a mapping with 'dataset'")
    unknown = set(raw) - DATASET_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) in {key}: {', '.join(sorted(unknown))}")
    spec = str(raw["dataset"])
    if "@" not in spec or not spec.split("@")[0] or not spec.split("@")[1]:
        raise _fail(path, f"{key}.dataset {spec!r} must be dataset@ref (e.g. prose@latest)")
    return DatasetRef(spec, str(raw.get("store", store)), str(raw.get("label", spec.split("@")[0])))


def _int(d: dict[str, Any], key: str, default: int | None, path: str, minimum: int = 1) -> int:
    v = d.get(key, default)
    if v is None:
        raise _fail(path, f"missing {key}")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _fail(path, f"{key} must be an integer >= {minimum} (got {v!r})")
    return v


def _float(d: dict[str, Any], key: str, default: float, path: str, lo: float, hi: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise _fail(path, f"{key} must be a number in [{lo}, {hi}] (got {v!r})")
    return float(v)


def _list(d: dict[str, Any], key: str, default: list[Any], path: str) -> list[Any]:
    v = d.get(key, default)
    if not isinstance(v, list) or not v:
        raise _fail(path, f"{key} must be a non-empty list (got {v!r})")
    return v


def _replay_levels(values: list[Any], key: str, path: str) -> tuple[float, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) < 1.0:
            raise _fail(path, f"{key}: replay level {v!r} is outside [0, 1)")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise _fail(path, f"{key}: replay levels repeat ({out})")
    return tuple(out)


def parse_study(data: Any, path: str, text: str = "") -> StudySpec:
    """The :class:`StudySpec` of a parsed study file (no data is opened)."""
    from moe_cpt.trainer.models import ROUTERS, SHAPES

    if not isinstance(data, dict):
        raise _fail(path, "top level must be a mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s): {', '.join(sorted(unknown))}")
    name = str(data.get("name") or Path(path).stem)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise _fail(path, f"name {name!r} may hold only letters, digits, '-', '_', '.'")
    store = str(data.get("store", "data/store"))
    a = _dataset(data.get("a"), "a", store, path)
    b = _dataset(data.get("b"), "b", store, path)
    if a.label == b.label:
        raise _fail(path, f"a and b have the same label {a.label!r}; set a.label / b.label")
    models = tuple(str(m) for m in _list(data, "models", ["tiny_dense", "tiny_switch", "tiny_granular"], path))
    for m in models:
        if m not in SHAPES:
            raise _fail(path, f"unknown flavor {m!r} in models ({', '.join(SHAPES)})")
    routers = tuple(str(r) for r in _list(data, "routers", ["aux_loss", "sinkhorn"], path))
    for r in routers:
        if r not in ROUTERS:
            raise _fail(path, f"unknown router {r!r} ({', '.join(ROUTERS)})")
    replay = _replay_levels(_list(data, "replay", [0.0, 0.3], path), "replay", path)
    raw_retrain = data.get("retrain", "all")
    if raw_retrain == "all":
        retrain = replay
    elif raw_retrain in ("none", None, False):
        retrain = ()
    else:
        retrain = _replay_levels(raw_retrain if isinstance(raw_retrain, list) else [raw_retrain],
                                 "retrain", path)
        missing = [r for r in retrain if r not in replay]
        if missing:
            raise _fail(path, f"retrain levels {missing} are not replay levels {list(replay)}")
    mode = str(data.get("replay_mode", "seen"))
    if mode not in REPLAY_MODES:
        raise _fail(path, f"replay_mode must be one of {', '.join(REPLAY_MODES)} (got {mode!r})")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(path, f"seeds must be a list of distinct integers (got {seeds!r})")
    seq_len = _int(data, "seq_len", None, path)
    gbs = _int(data, "global_batch_size", None, path)
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or set(tokens) - {"pretrain", "cpt"}:
        raise _fail(path, "tokens must be a mapping {pretrain: N, cpt: M}")
    pre = _int(tokens, "pretrain", None, path)
    cpt = _int(tokens, "cpt", None, path)
    step = seq_len * gbs
    for key, n in (("pretrain", pre), ("cpt", cpt)):
        if n < step:
            raise _fail(path, f"tokens.{key} = {n} is smaller than one step "
                              f"(seq_len x global_batch_size = {step} tokens)")
    sched_raw = data.get("schedule", {}) or {}
    if not isinstance(sched_raw, dict) or set(sched_raw) - SCHEDULE_KEYS:
        raise _fail(path, f"schedule keys are {', '.join(sorted(SCHEDULE_KEYS))}")
    kind = str(sched_raw.get("kind", "cosine"))
    if kind not in SCHEDULE_KINDS:
        raise _fail(path, f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)} (got {kind!r})")
    d = ScheduleSpec()
    schedule = ScheduleSpec(
        kind=kind,
        warmup_frac=_float(sched_raw, "warmup_frac", d.warmup_frac, path, 0.0, 0.5),
        min_lr_ratio=_float(sched_raw, "min_lr_ratio", d.min_lr_ratio, path, 0.0, 1.0),
        cooldown_frac=_float(sched_raw, "cooldown_frac", d.cooldown_frac, path, 0.0, 0.5),
        const_lr_ratio=_float(sched_raw, "const_lr_ratio", d.const_lr_ratio, path, 0.0, 1.0),
        anneal_frac=_float(sched_raw, "anneal_frac", d.anneal_frac, path, 0.0, 1.0),
    )
    opt = data.get("optimizer", {}) or {}
    if not isinstance(opt, dict) or set(opt) - {"lr", "weight_decay"}:
        raise _fail(path, "optimizer keys are lr, weight_decay")
    optimizer = {"lr": _float(opt, "lr", 3e-3, path, 0.0, 10.0),
                 "weight_decay": _float(opt, "weight_decay", 0.1, path, 0.0, 10.0)}
    ev = data.get("eval", {}) or {}
    if not isinstance(ev, dict) or set(ev) - EVAL_KEYS:
        raise _fail(path, f"eval keys are {', '.join(sorted(EVAL_KEYS))}")
    de = EvalSpec()
    eval_spec = EvalSpec(points=_int(ev, "points", de.points, path),
                         samples_per_source=_int(ev, "samples_per_source", de.samples_per_source, path),
                         batch_size=_int(ev, "batch_size", de.batch_size, path))
    holdout = _int(data, "holdout_tokens", (eval_spec.samples_per_source + 1) * seq_len + 1, path)
    if holdout < eval_spec.samples_per_source * seq_len + 1:
        raise _fail(path, f"holdout_tokens {holdout} hold fewer than eval.samples_per_source "
                          f"({eval_spec.samples_per_source}) windows of seq_len {seq_len}")
    par = data.get("parallel", {}) or {}
    if not isinstance(par, dict) or set(par) - {"nproc"}:
        raise _fail(path, "parallel keys are nproc")
    overrides = data.get("overrides", {}) or {}
    if not isinstance(overrides, dict):
        raise _fail(path, "overrides must be a mapping of run config keys (e.g. {model: {vocab_size: 8192}})")
    thresholds = data.get("thresholds", {}) or {}
    allowed = {"balance_tolerance", "balanced_level", "close_tolerance"}
    if not isinstance(thresholds, dict) or set(thresholds) - allowed:
        raise _fail(path, f"thresholds keys are {', '.join(sorted(allowed))}")
    thresholds = {k: _float(thresholds, k, 0.0, path, 0.0, 1.0) for k in thresholds}
    spec = StudySpec(
        name=name, path=path, text=text,
        output_dir=str(data.get("output_dir", f"runs/study/{name}")), a=a, b=b,
        holdout_tokens=holdout, seq_len=seq_len, global_batch_size=gbs, models=models,
        routers=routers, replay=replay, replay_mode=mode, retrain=retrain,
        seeds=tuple(int(s) for s in seeds), pretrain_tokens=pre, cpt_tokens=cpt,
        schedule=schedule, optimizer=optimizer, eval=eval_spec,
        nproc=_int(par, "nproc", 1, path), lanes=_int(data, "lanes", 2, path),
        threads_per_run=_int(data, "threads_per_run", 1, path),
        data_seed=_int(data, "data_seed", 1, path, minimum=0), overrides=overrides,
        thresholds=thresholds,
    )
    for key, steps in (("pretrain", spec.pretrain_steps), ("cpt", spec.cpt_steps)):
        if steps < eval_spec.points:
            raise _fail(path, f"tokens.{key} gives {steps} steps, fewer than eval.points "
                              f"({eval_spec.points})")
    return spec


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file (no data opened; see :func:`check_data`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {p} not found")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"study {p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return parse_study(data, str(p), text)


@dataclass(frozen=True)
class PinnedData:
    """A and B pinned to version ids (``name@version``), with their tokenizer and vocabulary."""

    a: str
    b: str
    tokenizer_sha256: str
    vocab_size: int

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "tokenizer_sha256": self.tokenizer_sha256,
                "vocab_size": self.vocab_size}


def check_data(spec: StudySpec) -> PinnedData:
    """Open A and B: each ``dataset@ref`` must resolve, both must share one tokenizer, and each
    must hold its held-out split plus at least one training window."""
    from moe_cpt.mixer.spec import _open

    opened = []
    for key, ref in (("a", spec.a), ("b", spec.b)):
        try:
            opened.append(_open(ref.store, ref.dataset, ref.label))
        except ConfigError as exc:
            raise _fail(spec.path, f"{key}: {exc}") from exc
        except Exception as exc:  # NotFoundError, StoreError: name what was asked for
            raise _fail(spec.path, f"{key}: cannot open {ref.dataset} in {ref.store}: {exc}") from exc
    da, db = opened
    ta, tb = da.manifest.tokenizer, db.manifest.tokenizer
    if ta.sha256 != tb.sha256:
        raise _fail(spec.path, f"a ({da.spec}) and b ({db.spec}) were tokenized with different "
                               f"tokenizers ({ta.sha256[:12]} vs {tb.sha256[:12]})")
    need = spec.holdout_tokens + spec.seq_len + 1
    for ds in (da, db):
        if ds.manifest.n_tokens < need:
            raise _fail(spec.path, f"{ds.spec} holds {ds.manifest.n_tokens} tokens, fewer than "
                                   f"holdout_tokens + one window ({need})")
    return PinnedData(f"{da.name}@{da.version}", f"{db.name}@{db.version}", ta.sha256,
                      int(ta.vocab_size))
