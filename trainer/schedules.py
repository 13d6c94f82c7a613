"""Learning-rate schedules of the study, as torchtitan ``LRSchedulersContainer`` configs.

``cosine``, ``linear``, ``constant`` and ``wsd`` are torchtitan's own warmup-stable-decay
schedule (:func:`lr_scheduler_config`). ``cosine_inf`` is the *infinite* schedule of Ibrahim
et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language Models",
arXiv 2403.08763, sec. 7.2), used by Thérien et al. 2025 for MoE CPT. With ``t`` the 1-based
training step, ``T`` the run's steps, ``W`` warmup, ``C`` cooldown and ``A`` anneal steps:

* warmup    ``t <= W``:            ``eta = eta_max * t / W``
* cooldown  ``W < t <= W + C``:    ``eta = eta_const + (eta_max - eta_const) *
  (1 + cos(pi * (t - W) / C)) / 2``
* constant  ``W + C < t <= T - A``: ``eta = eta_const``
* anneal    ``T - A < t <= T``:    linear ``eta = eta_const - (eta_const - eta_min) *
  (t - (T - A)) / A`` (``anneal_type: exponential``: ``eta_const * (eta_min /
  eta_const) ** ((t - (T - A)) / A)``); the last step runs at ``eta_min``.

Pre-training runs it with ``A = 0`` (no anneal; its last checkpoint is the pre-anneal one); a
CPT phase continues from that checkpoint with ``W = C = 0`` (it starts at ``eta_const``, no
re-warming) and anneals at its end. ``eta_max`` is ``optimizer.lr``; ``eta_const`` and
``eta_min`` are ``const_lr_ratio`` and ``min_lr_ratio`` times it. Paper defaults: eta_max 3e-4,
eta_const 1.65e-4 (ratio 0.55), eta_min 3e-5 (ratio 0.1), warmup 1% of the steps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

from torchtitan.components.optimizer import LRSchedulersContainer

SCHEDULES = ("cosine", "linear", "constant", "wsd", "cosine_inf")


def cosine_inf_factor(
    step: int, *, total_steps: int, warmup_steps: int, cooldown_steps: int,
    anneal_steps: int, const_ratio: float, min_ratio: float,
    anneal_type: str = "linear",
) -> float:
    """``eta_t / eta_max`` of the infinite schedule at 1-based training step ``step``."""
    t = step
    if t <= warmup_steps:
        return t / warmup_steps
    if t <= warmup_steps + cooldown_steps:
        progress = (t - warmup_steps) / cooldown_steps
        return const_ratio + (1.0 - const_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    anneal_start = total_steps - anneal_steps
    if anneal_steps <= 0 or t <= anneal_start:
        return const_ratio
    progress = min(1.0, (t - anneal_start) / anneal_steps)
    if anneal_type == "exponential":
        return const_ratio * (min_ratio / const_ratio) ** progress
    return const_ratio - (const_ratio - min_ratio) * progress


class CosineInfSchedulers(LRSchedulersContainer):
    """torchtitan's scheduler container driven by :func:`cosine_inf_factor`."""

    @dataclass(kw_only=True, slots=True)
    class Config(LRSchedulersContainer.Config):
        cooldown_steps: int = 0
        anneal_steps: int = 0
        const_lr_ratio: float = 0.55
        anneal_type: Literal["linear", "exponential"] = "linear"

        def build(self, *, optimizers: Any, training_steps: int) -> CosineInfSchedulers:
            total = self.total_steps if self.total_steps is not None else training_steps
            factor = functools.partial(
                _lambda_lr_factor, total_steps=total, warmup_steps=int(self.warmup_steps),
                cooldown_steps=int(self.cooldown_steps), anneal_steps=int(self.anneal_steps),
                const_ratio=float(self.const_lr_ratio), min_ratio=float(self.min_lr_factor),
                anneal_type=self.anneal_type)
            return CosineInfSchedulers(optimizers, factor)


def _lambda_lr_factor(last_epoch: int, **kwargs: Any) -> float:
    """``LambdaLR`` counts from 0 and torchtitan steps it after each optimizer step, so training
    step ``t`` runs with ``lambda(t - 1)``."""
    return cosine_inf_factor(last_epoch + 1, **kwargs)


def lr_scheduler_config(schedule: dict[str, Any]) -> Any:
    """The torchtitan scheduler config of the user's ``schedule`` section."""
    kind = schedule["kind"]
    if kind == "cosine_inf":
        return CosineInfSchedulers.Config(
            warmup_steps=int(schedule["warmup_steps"]),
            cooldown_steps=int(schedule["cooldown_steps"]),
            anneal_steps=int(schedule["anneal_steps"]),
            const_lr_ratio=float(schedule["const_lr_ratio"]),
            min_lr_factor=float(schedule["min_lr_ratio"]),
            anneal_type=schedule["anneal_type"],
        )
    decay_ratio = schedule.get("decay_ratio")
    if kind == "constant":
        decay_ratio = 0.0  # warmup, then flat
    return LRSchedulersContainer.Config(
        warmup_steps=int(schedule["warmup_steps"]),
        decay_ratio=decay_ratio,
        decay_type="linear" if kind == "linear" else "cosine",
        min_lr_factor=float(schedule["min_lr_ratio"]),
    )
