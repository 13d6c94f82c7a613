"""Exact proportions of the source assignment (pure function, no data)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_cpt.errors import ConfigError
from moe_cpt.mixer.schedule import D, Knot, MixPoint, WeightSchedule, advance, plan_step


def sequence(schedule: WeightSchedule, gbs: int, steps: int) -> np.ndarray:
    point, out = MixPoint.start(len(schedule.names)), []
    for _ in range(steps):
        plan = plan_step(point, schedule, gbs)
        out.append(plan.sources)
        point = plan.end
    return np.concatenate(out)


weights_st = st.lists(st.floats(0.001, 1.0), min_size=2, max_size=5)


@settings(max_examples=40, deadline=None)
@given(weights_st, st.integers(1, 64), st.integers(5, 400))
def test_prefix_and_window_counts_match_weights(ws: list[float], gbs: int, window: int) -> None:
    k = len(ws)
    sched = WeightSchedule([Knot(0, tuple(ws))], [f"s{i}" for i in range(k)])
    w = np.array(sched.weights_at(0)) / D
    seq = sequence(sched, gbs, max(1, 3000 // gbs))
    onehot = np.eye(k, dtype=np.int64)[seq]
    cum = np.vstack([np.zeros(k, dtype=np.int64), np.cumsum(onehot, axis=0)])
    n = np.arange(len(seq) + 1)[:, None]
    prefix_dev = np.abs(cum - n * w).max()
    assert prefix_dev <= 1 - 1 / (2 * k - 2) + 1e-9  # Tijdeman's bound, every prefix
    L = min(window, len(seq))
    win = cum[L:] - cum[:-L]
    win_dev = np.abs(win - L * w).max()
    assert win_dev < (1 + 1e-9 if k == 2 else 2)  # any window: within one sample (two sources)


@settings(max_examples=15, deadline=None)
@given(st.floats(0.05, 0.5), st.floats(0.01, 0.2), st.integers(1, 40), st.integers(2, 30))
def test_ramp_schedule_follows_interpolated_quota(w0: float, w1: float, ramp: int, gbs: int) -> None:
    names = ["new", "replay"]
    sched = WeightSchedule([Knot(0, (1 - w0, w0)), Knot(ramp, (1 - w1, w1))], names)
    steps = ramp + 10
    seq = sequence(sched, gbs, steps)
    quota = np.cumsum(np.repeat([sched.weights_at(s)[1] for s in range(steps)], gbs)) / D
    served = np.cumsum(seq == 1)
    assert np.abs(served - quota).max() < 1
    after = seq[ramp * gbs:]
    assert abs((after == 1).sum() - len(after) * sched.weights_at(ramp)[1] / D) < 2
    assert sched.weights_at(0)[1] / D == pytest.approx(w0, abs=1e-6)
    assert sched.weights_at(ramp + 5)[1] / D == pytest.approx(w1, abs=1e-6)


def test_zero_weight_source_is_never_served_and_weights_sum_to_d() -> None:
    sched = WeightSchedule([Knot(0, (0.0, 3.0, 1.0))], ["a", "b", "c"])
    assert sum(sched.weights_at(0)) == D
    seq = sequence(sched, 16, 50)
    assert (seq == 0).sum() == 0
    assert (seq == 1).sum() == 600 and (seq == 2).sum() == 200


def test_advance_equals_stepwise_and_state_is_tiny() -> None:
    sched = WeightSchedule([Knot(0, (0.95, 0.05)), Knot(100, (0.7, 0.3))], ["a", "b"])
    p = MixPoint.start(2)
    q = advance(p, sched, 32, 250)
    r = p
    for _ in range(250):
        r = plan_step(r, sched, 32).end
    assert q == r and q.step == 250 and sum(q.counts) == 250 * 32


@pytest.mark.parametrize(
    "knots, msg",
    [
        ([Knot(0, (1.0, -0.5))], ">= 0"),
        ([Knot(0, (0.0, 0.0))], "all zero"),
        ([Knot(5, (1.0, 1.0))], "start at step 0"),
        ([Knot(0, (1.0, float("nan")))], ">= 0"),
    ],
)
def test_bad_weights_fail_with_a_clear_message(knots: list[Knot], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        WeightSchedule(knots, ["a", "b"])
