"""Every run of a study, derived from its :class:`~moe_cpt.trainer.study.schema.StudySpec`.

Per model variant (and seed):

* ``<variant>/pretrain`` on A (B in the blend at weight 0, so its val loss is measured too);
* ``<variant>/cpt-r<level>`` on B from the pre-training run's last checkpoint, one per replay
  level: A at weight ``level`` (``replay: seen`` of the windows the parent consumed, or a fresh
  shuffle), B at ``1 - level``; LR re-warmed and re-decayed (``cosine``) or continued at the
  constant LR and annealed (``cosine_inf``);
* ``<variant>/retrain-r<level>`` for each re-train level: from scratch on A+B for the
  pre-training plus CPT steps, A and B in the proportions pre-training + that CPT consumed
  (A: ``P + level*C`` tokens, B: ``(1 - level)*C``), with the pre-training schedule.

Every run's config is a plain ``cpt train`` config (validated by ``moe_cpt.trainer.config``), its blend
a plain mixer spec; both are written into the study folder before anything starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_cpt.trainer.study.schema import PinnedData, StudySpec, Variant

PHASE_SEED_OFFSET = {"pretrain": 0, "cpt": 1, "retrain": 2}


@dataclass(frozen=True)
class RunPlan:
    """One run of the study."""

    key: str  # <variant.key>/<tag>, unique in the study
    name: str  # <study>/<key>: run.name, shown by `cpt runs ls`
    kind: str  # pretrain | cpt | retrain
    variant: Variant
    replay: float | None  # CPT / re-train: the replay level it belongs to
    steps: int
    output_dir: str
    config_path: str
    blend_path: str
    config: dict[str, Any] = field(compare=False)
    blend: dict[str, Any] = field(compare=False)
    parent: str | None = None  # key of the run whose checkpoint it starts from

    @property
    def depends_on(self) -> tuple[str, ...]:
        return (self.parent,) if self.parent else ()

    @property
    def tag(self) -> str:
        return self.key.split("/", 1)[1]


def level_tag(level: float) -> str:
    """``0.3`` -> ``r0.3``, ``0.0`` -> ``r0``."""
    return "r" + (f"{level:.4f}".rstrip("0").rstrip(".") or "0")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _frac_steps(frac: float, steps: int, minimum: int = 0) -> int:
    return max(minimum if frac > 0 else 0, round(frac * steps))


def schedule_for(spec: StudySpec, kind: str) -> dict[str, Any]:
    """The ``schedule`` section of a run of ``kind`` (pretrain | cpt | retrain)."""
    s = spec.schedule
    p, c = spec.pretrain_steps, spec.cpt_steps
    if s.kind == "cosine":
        steps = {"pretrain": p, "cpt": c, "retrain": p + c}[kind]
        warm = _frac_steps(s.warmup_frac, p if kind == "retrain" else steps, 1)
        return {"kind": "cosine", "warmup_steps": warm, "min_lr_ratio": s.min_lr_ratio}
    base = {"kind": "cosine_inf", "const_lr_ratio": s.const_lr_ratio, "min_lr_ratio": s.min_lr_ratio,
            "anneal_type": "linear"}
    warm = _frac_steps(s.warmup_frac, p, 1)
    cool = _frac_steps(s.cooldown_frac, p, 1)
    anneal = _frac_steps(s.anneal_frac, c, 1)
    if kind == "pretrain":  # ends before the anneal: the checkpoint CPT continues from
        return {**base, "warmup_steps": warm, "cooldown_steps": cool, "anneal_steps": 0}
    if kind == "cpt":  # continues at the constant LR, anneals at its end
        return {**base, "warmup_steps": 0, "cooldown_steps": 0, "anneal_steps": anneal}
    return {**base, "warmup_steps": warm, "cooldown_steps": cool, "anneal_steps": anneal}


def _source(dataset: str, store: str, weight: float, holdout: int, **extra: Any) -> dict[str, Any]:
    return {"dataset": dataset, "store": store, "weight": round(float(weight), 9),
            "holdout_tokens": holdout, **extra}


def blend_for(spec: StudySpec, data: PinnedData, kind: str, level: float | None, seed: int,
              parent_dir: str = "") -> dict[str, Any]:
    """The mixer spec of a run: sources A then B (the same order in every run, so evaluation
    rows and routing files line up), A's held-out split the same everywhere."""
    p, c = spec.pretrain_tokens, spec.cpt_tokens
    h = spec.holdout_tokens
    a_store, b_store = str(Path(spec.a.store).absolute()) if "://" not in spec.a.store else spec.a.store, \
        str(Path(spec.b.store).absolute()) if "://" not in spec.b.store else spec.b.store
    if kind == "pretrain":
        wa, wb = 1.0, 0.0
    elif kind == "cpt":
        wa, wb = float(level or 0.0), 1.0 - float(level or 0.0)
    else:
        r = float(level or 0.0)
        wa, wb = (p + r * c) / (p + c), (1.0 - r) * c / (p + c)
    extra: dict[str, Any] = {}
    if kind == "cpt" and wa > 0 and spec.replay_mode == "seen":
        extra = {"replay": "seen", "seen_by": parent_dir}
    sources = {spec.a.label: _source(data.a, a_store, wa, h, **extra),
               spec.b.label: _source(data.b, b_store, wb, h)}
    return {"seq_len": spec.seq_len, "global_batch_size": spec.global_batch_size,
            "seed": spec.data_seed + 100 * seed + PHASE_SEED_OFFSET[kind], "sources": sources}


def config_for(spec: StudySpec, data: PinnedData, variant: Variant, kind: str, steps: int,
               output_dir: str, blend_path: str, name: str, parent_dir: str = "") -> dict[str, Any]:
    """The ``cpt train`` config of one run (the study's ``overrides`` merged last)."""
    interval = max(1, steps // spec.eval.points)
    nproc = spec.nproc
    cfg: dict[str, Any] = {
        "model": {"flavor": variant.flavor, "router": variant.router or "aux_loss",
                  "vocab_size": data.vocab_size or None},
        "data": {"kind": "mixer", "blend": blend_path},
        "training": {"steps": steps, "seq_len": spec.seq_len,
                     "local_batch_size": max(1, spec.global_batch_size // nproc),
                     "global_batch_size": spec.global_batch_size, "seed": variant.seed},
        "optimizer": dict(spec.optimizer),
        "schedule": schedule_for(spec, kind),
        "parallel": {"nproc": nproc, "ep": expert_parallel(variant.flavor, nproc)},
        "checkpoint": {"enable": True, "interval": interval, "keep_latest_k": 2},
        "eval": {"interval": interval, "samples_per_source": spec.eval.samples_per_source,
                 "batch_size": spec.eval.batch_size},
        "metrics": {"log_freq": 1},
        "run": {"output_dir": output_dir, "name": name,
                "phase": "cpt" if kind == "cpt" else "pretrain"},
    }
    if kind == "cpt":
        cfg["run"]["parent_run_dir"] = parent_dir
    return _merge(cfg, spec.overrides)


def expert_parallel(flavor: str, nproc: int) -> int:
    """The largest EP degree dividing both the routed experts and the processes (1 for dense;
    the granular flavors' 31 experts give 1: FSDP only)."""
    from moe_cpt.trainer.models import SHAPES

    shape = SHAPES[flavor]
    return math.gcd(shape.num_experts, nproc) if shape.is_moe else 1


def study_dir(spec: StudySpec) -> Path:
    return Path(spec.output_dir).absolute()


def derive_runs(spec: StudySpec, data: PinnedData) -> list[RunPlan]:
    """All runs of the study in dependency order (each pre-training before its CPT runs)."""
    root = study_dir(spec)
    plans: list[RunPlan] = []

    def plan(variant: Variant, kind: str, level: float | None, steps: int,
             parent: RunPlan | None = None) -> RunPlan:
        tag = kind if level is None else f"{kind}-{level_tag(level)}"
        key = f"{variant.key}/{tag}"
        out = str(root / "runs" / variant.key / tag)
        safe = key.replace("/", "__")
        cfg_path, blend_path = str(root / "configs" / f"{safe}.yaml"), str(root / "blends" / f"{safe}.yaml")
        parent_dir = parent.output_dir if parent else ""
        blend = blend_for(spec, data, kind, level, variant.seed, parent_dir)
        cfg = config_for(spec, data, variant, kind, steps, out, blend_path,
                         f"{spec.name}/{key}", parent_dir)
        return RunPlan(key=key, name=f"{spec.name}/{key}", kind=kind, variant=variant,
                       replay=level, steps=steps, output_dir=out, config_path=cfg_path,
                       blend_path=blend_path, config=cfg, blend=blend,
                       parent=parent.key if parent else None)

    for v in spec.variants():
        pre = plan(v, "pretrain", None, spec.pretrain_steps)
        plans.append(pre)
        plans += [plan(v, "cpt", r, spec.cpt_steps, pre) for r in spec.replay]
        plans += [plan(v, "retrain", r, spec.pretrain_steps + spec.cpt_steps) for r in spec.retrain]
    return plans


def check_configs(plans: list[RunPlan]) -> None:
    """Validate every run's config with the trainer's own rules (unknown keys, types, router /
    flavor / EP, schedule phases against the steps): one ConfigError naming the run."""
    from moe_cpt.errors import ConfigError
    from moe_cpt.trainer.config import check_config

    for p in plans:
        try:
            check_config(p.config)
        except ConfigError as exc:
            raise ConfigError(f"run {p.name}: {exc}") from exc
