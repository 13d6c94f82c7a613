"""Where a mixer stream continues, and the one check of a state that comes from outside.

A :class:`MixState` is tiny and JSON-able (docs/mixer.md, "State, resume, elastic resume"); the
in-process stream (mixer/stream.py), the dataset, the service and its client all take states
through :func:`check_state`. No torch and no blend resolution here (mixer/spec.py imports
:func:`find_states`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.schedule import MixPoint

STATE_VERSION = 1
MAX_REPLAN_STEPS = 256  # how far a state's `next` may lie beyond its `step` (beyond worker dealing)


class Worker(NamedTuple):
    """One loader worker's share of a rank's stream: chunks of ``batch`` consecutive local
    positions, dealt round-robin to ``n_workers`` workers, of which this is number ``wid``."""

    wid: int
    n_workers: int
    batch: int  # the loader batch size (0 in a request to MixStream: the local batch)


def is_worker_list(value: Any) -> bool:
    """Whether ``value`` (from JSON) has the shape of a :class:`Worker`: three integers."""
    return (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in value))


@dataclass(frozen=True)
class MixState:
    """Where a stream continues: tiny, JSON-able, independent of the number of workers.

    ``point`` is the assignment state (samples served and deficits per source) at the start of
    step ``point.step``; ``next`` is the next local position of this rank (>= point.step * b).
    """

    blend: str
    world_size: int
    point: MixPoint
    next: int
    worker: Worker | None = None  # set in the per-worker states of a StatefulDataLoader

    def to_dict(self) -> dict[str, Any]:
        return {
            "mixer_state": STATE_VERSION,
            "blend": self.blend,
            "world_size": self.world_size,
            "step": self.point.step,
            "counts": list(self.point.counts),
            "deficit": list(self.point.deficit),
            "next": self.next,
            "worker": list(self.worker) if self.worker else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixState:
        """The state in ``d`` (see :meth:`to_dict`); a :class:`ConfigError` if ``d`` is none."""
        if not isinstance(d, dict) or d.get("mixer_state") != STATE_VERSION:
            raise ConfigError(f"not a mixer state (version {STATE_VERSION}): {str(d)[:200]}")
        worker = d.get("worker")
        if worker and not is_worker_list(worker):
            raise ConfigError("malformed mixer state worker")
        try:
            return cls(
                blend=d["blend"], world_size=int(d["world_size"]),
                point=MixPoint(int(d["step"]), tuple(map(int, d["counts"])), tuple(map(int, d["deficit"]))),
                next=int(d["next"]), worker=Worker(*worker) if worker else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"malformed mixer state: {type(exc).__name__}: {str(exc)[:200]}") from exc

    def global_step(self, global_batch: int) -> int:
        b = global_batch // self.world_size
        return self.next // b

    def rescaled(self, world_size: int, global_batch: int) -> MixState:
        """The same global position for a different world size (must be at a step boundary)."""
        if world_size == self.world_size:
            return self
        b_old = global_batch // self.world_size
        if self.next % b_old:
            raise ConfigError(
                f"cannot resume a mixer state taken mid-step ({self.next % b_old} of {b_old} samples "
                f"into step {self.next // b_old}) with a different world size "
                f"({self.world_size} -> {world_size}); checkpoint at step boundaries"
            )
        b_new = global_batch // world_size
        return MixState(self.blend, world_size, self.point, (self.next // b_old) * b_new, None)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One global state from per-worker states: the earliest unconsumed position wins."""
    parsed = [MixState.from_dict(s) for s in states]
    if not parsed:
        raise ConfigError("no mixer states to merge")
    best = min(parsed, key=lambda s: s.next)
    return MixState(best.blend, best.world_size, best.point, best.next, None).to_dict()


def find_states(obj: Any) -> list[dict[str, Any]]:
    """All mixer states nested anywhere in ``obj`` (e.g. a StatefulDataLoader state dict)."""
    found: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        if obj.get("mixer_state") == STATE_VERSION:
            return [obj]
        for v in obj.values():
            found += find_states(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += find_states(v)
    return found


def check_rank(rank: int, world_size: int, global_batch: int) -> None:
    """A data-parallel ``rank`` of ``world_size`` that splits ``global_batch`` evenly, or a ConfigError."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} of world size {world_size}")
    if global_batch % world_size:
        raise ConfigError(f"global_batch_size {global_batch} is not divisible by the data-parallel world size "
                          f"{world_size}")


class StateOfAnotherBlend(ConfigError):
    """A mixer state whose blend fingerprint is not the blend's (the service answers 409)."""


def check_state(state: MixState, fingerprint: str, n_sources: int, world_size: int, global_batch: int,
                worker: Worker | None = None) -> MixState:
    """``state`` checked against the blend (fingerprint, number of sources) and for consistency
    (counts sum to ``step`` x global batch, sane sizes), then rescaled to ``world_size``
    (elastic resume; refused off a step boundary). With ``worker`` (its ``batch`` resolved), the
    state's position must also lie in its step, give or take the worker dealing and
    :data:`MAX_REPLAN_STEPS` (so no state makes a stream re-plan millions of steps). The one
    check of a state that comes from outside: in-process, in the service and in its client."""
    if state.blend != fingerprint:
        raise StateOfAnotherBlend(f"mixer state belongs to blend {str(state.blend)[:64]}, not to this blend "
                                  f"{fingerprint}")
    p = state.point
    if len(p.counts) != n_sources or len(p.deficit) != n_sources:
        raise ConfigError(f"mixer state has {len(p.counts)} sources, the blend {n_sources}")
    if state.world_size < 1 or global_batch % state.world_size:
        raise ConfigError(f"mixer state has an invalid world size {state.world_size}")
    if p.step < 0 or state.next < 0 or min(p.counts) < 0 or sum(p.counts) != p.step * global_batch \
            or max(abs(d) for d in p.deficit) >= 1 << 62 or p.step >= 1 << 40:
        raise ConfigError("inconsistent mixer state (counts must sum to step x global batch)")
    state = state.rescaled(world_size, global_batch)
    if worker is not None:
        b = global_batch // world_size
        dealt = worker.n_workers * worker.batch
        if state.next < p.step * b or (state.next + dealt) // b - p.step > MAX_REPLAN_STEPS + dealt // b:
            raise ConfigError(f"inconsistent mixer state: position {state.next} is not in step {p.step}")
    return state
