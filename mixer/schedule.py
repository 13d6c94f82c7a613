"""Which source each global sample comes from: exact proportions, resumable from a few integers.

Weights are quantized to integers that sum to ``D = 2**24`` at every step (a piecewise-linear
schedule is interpolated on *prefix sums* of the knot weights and floored, so every step's
weights are non-negative and sum to exactly ``D``). Sample ``n`` of step ``s`` adds each source's
weight ``W_k(s)`` to its *deficit* ``d_k`` (quota owed minus samples served, in units of ``1/D``)
and then serves one source, chosen by Tijdeman's rule for the chairman-assignment problem: among
sources whose deficit is at least ``D/(2K-2)``, the one whose deficit would reach
``D(1 - 1/(2K-2))`` soonest. With constant weights this keeps, for every prefix of the sequence,
``|served_k - quota_k| <= 1 - 1/(2K-2)`` (Tijdeman 1980); so any window of consecutive samples
holds each source within one sample of its weight for two sources and within two samples for
more. The state at a step boundary (the sample counts and the deficits, K integers each) is all
that is needed to continue, which makes resume O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_cpt.errors import ConfigError

D = 1 << 24


@dataclass(frozen=True)
class Knot:
    step: int
    weights: tuple[float, ...]


class WeightSchedule:
    """Piecewise-linear weights over steps, quantized to integers summing to ``D`` per step."""

    def __init__(self, knots: list[Knot], names: list[str]):
        if not knots:
            raise ConfigError("a blend needs weights")
        knots = sorted(knots, key=lambda k: k.step)
        steps = [k.step for k in knots]
        if len(set(steps)) != len(steps) or steps[0] != 0:
            raise ConfigError(f"schedule knots must have distinct steps and start at step 0 (got {steps})")
        self.names = names
        self.steps = steps
        self._prefix: list[list[int]] = []
        for k in knots:
            if len(k.weights) != len(names):
                raise ConfigError(f"schedule knot at step {k.step} has {len(k.weights)} weights for {len(names)} sources")
            bad = [n for n, w in zip(names, k.weights, strict=True) if not (w >= 0) or w != w or w == float("inf")]
            if bad:
                raise ConfigError(f"weights must be finite and >= 0 (step {k.step}: {', '.join(bad)})")
            total = float(sum(k.weights))
            if total <= 0:
                raise ConfigError(f"weights at step {k.step} are all zero")
            acc, prefix = 0.0, []
            for w in k.weights:
                acc += w
                prefix.append(D if acc >= total else int(acc / total * D))
            prefix[-1] = D
            self._prefix.append(prefix)
        self.knot_weights = [
            [b - a for a, b in zip([0, *p[:-1]], p, strict=True)] for p in self._prefix
        ]

    @property
    def constant(self) -> bool:
        return len(self.steps) == 1

    def weights_at(self, step: int) -> list[int]:
        """Integer weights (sum ``D``) in force during ``step``."""
        i = int(np.searchsorted(self.steps, step, side="right")) - 1
        if i == len(self.steps) - 1:
            return self.knot_weights[i]
        s0, s1 = self.steps[i], self.steps[i + 1]
        p0, p1 = self._prefix[i], self._prefix[i + 1]
        prefix = [a + (b - a) * (step - s0) // (s1 - s0) for a, b in zip(p0, p1, strict=True)]
        return [b - a for a, b in zip([0, *prefix[:-1]], prefix, strict=True)]

    def fractions_at(self, step: int) -> list[float]:
        return [w / D for w in self.weights_at(step)]


@dataclass(frozen=True)
class MixPoint:
    """The assignment state at the start of a step: samples served and deficits per source."""

    step: int
    counts: tuple[int, ...]
    deficit: tuple[int, ...]

    @classmethod
    def start(cls, n_sources: int) -> MixPoint:
        return cls(0, (0,) * n_sources, (0,) * n_sources)


@dataclass(frozen=True)
class StepPlan:
    """The assignment of one step's ``G`` global samples."""

    step: int
    sources: np.ndarray  # (G,) int: source of each global sample of the step
    indices: np.ndarray  # (G,) int: that source's sample index (how many it served before)
    end: MixPoint


def plan_step(point: MixPoint, schedule: WeightSchedule, global_batch: int,
              memo: dict[tuple, tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[int, ...]]] | None = None
              ) -> StepPlan:
    """Assign the ``global_batch`` samples of ``point.step``; pure function of its inputs.

    ``memo``: a dict kept by the caller across steps. The choices depend only on the weights and
    the deficits (not on the counts), so a step whose ``(weights, deficits)`` were seen before
    reuses them: sources, each sample's rank among its source's samples of the step, samples
    per source and the deficits after. Same plan as without it."""
    weights = schedule.weights_at(point.step)
    if memo is not None:
        key = (tuple(weights), point.deficit, global_batch)
        hit = memo.get(key)
        if hit is None:
            plan = plan_step(point, schedule, global_batch)
            src = plan.sources
            rank = plan.indices - np.asarray(point.counts, dtype=np.int64)[src]
            served = tuple(e - c for e, c in zip(plan.end.counts, point.counts, strict=True))
            if len(memo) >= 256:
                memo.clear()
            memo[key] = (src, rank, served, plan.end.deficit)
            return plan
        src, rank, served, deficit = hit
        counts = np.asarray(point.counts, dtype=np.int64)
        end = MixPoint(point.step + 1, tuple(c + n for c, n in zip(point.counts, served, strict=True)), deficit)
        return StepPlan(point.step, src, counts[src] + rank, end)
    k_n = len(weights)
    d = list(point.deficit)
    c = list(point.counts)
    src = np.empty(global_batch, dtype=np.int64)
    idx = np.empty(global_batch, dtype=np.int64)
    if k_n == 1:
        src[:] = 0
        idx[:] = np.arange(c[0], c[0] + global_batch)
        return StepPlan(point.step, src, idx, MixPoint(point.step + 1, (c[0] + global_batch,), (0,)))
    threshold = D // (2 * k_n - 2)
    target = D - threshold
    rng_k = range(k_n)
    for i in range(global_batch):
        best = -1
        for k in rng_k:
            dk = d[k] + weights[k]
            d[k] = dk
            if dk < threshold:
                continue
            if best < 0:
                best = k
                continue
            # earlier deadline: (target - d_k) / w_k smaller; zero weight = no deadline
            wk, wb = weights[k], weights[best]
            if wk and (not wb or (target - dk) * wb < (target - d[best]) * wk):
                best = k
        if best < 0:  # cannot happen (deficits sum to D > 0 after adding weights); be safe
            best = max(rng_k, key=lambda k: d[k])
        d[best] -= D
        src[i] = best
        idx[i] = c[best]
        c[best] += 1
    return StepPlan(point.step, src, idx, MixPoint(point.step + 1, tuple(c), tuple(d)))


def advance(point: MixPoint, schedule: WeightSchedule, global_batch: int, to_step: int) -> MixPoint:
    """The state at the start of ``to_step`` (simulates the steps in between)."""
    if to_step < point.step:
        raise ValueError(f"cannot go back from step {point.step} to {to_step}")
    while point.step < to_step:
        point = plan_step(point, schedule, global_batch).end
    return point


def expected_counts(schedule: WeightSchedule, global_batch: int, steps: int) -> list[float]:
    """Exact quota per source after ``steps`` steps (served counts are within one of it)."""
    total = [0] * len(schedule.names)
    bounds = [s for s in schedule.steps if s < steps] + [steps]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        # weights are linear in the step only up to flooring; sum them step by step if short
        if b - a <= 4096:
            for s in range(a, b):
                for k, w in enumerate(schedule.weights_at(s)):
                    total[k] += w
        else:
            wa, wb = schedule.weights_at(a), schedule.weights_at(b - 1)
            for k in range(len(total)):
                total[k] += (wa[k] + wb[k]) * (b - a) // 2
    return [t * global_batch / D for t in total]
