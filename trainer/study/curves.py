"""Curve readers: a run's steps, evaluations and routing files, one row per step.

A resumed run repeats the steps after its checkpoint; :func:`moe_cpt.provenance.logs.read_rows` keeps
each step's row of the latest segment (torn lines skipped). A resumed segment also evaluates
once at its first step; :func:`eval_rows` with ``planned`` keeps only the steps an
uninterrupted run evaluates (0, every ``interval``, the last), so a resumed run's curves equal
an uninterrupted run's. Missing keys are tolerated everywhere: readers return what exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from moe_cpt.provenance import logs as run_logs
from moe_cpt.provenance.record import read_run_record


def planned_eval_steps(steps: int, interval: int) -> set[int]:
    """The steps an uninterrupted run evaluates at: its start, every ``interval``, its end."""
    out = {0, steps}
    if interval > 0:
        out |= set(range(interval, steps + 1, interval))
    return out


def step_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """``steps.jsonl``, one row per step (latest segment wins)."""
    return run_logs.steps(run_dir)


def eval_rows(run_dir: str | Path, planned: set[int] | None = None) -> list[dict[str, Any]]:
    """Eval rows of ``metrics.jsonl`` (rows without ``kind`` count as eval), one per step;
    with ``planned``, only those steps."""
    return [r for r in run_logs.evals(run_dir) if planned is None or int(r["step"]) in planned]


def run_record(run_dir: str | Path) -> dict[str, Any]:
    return read_run_record(run_dir) if Path(run_dir).exists() else {}


def source_names(record: dict[str, Any]) -> list[str]:
    data = record.get("data") or {}
    names = data.get("source_names")
    if names:
        return [str(n) for n in names]
    return [str(s.get("name")) for s in (data.get("blend") or {}).get("sources") or []]


_LAYER_KEY = re.compile(r"^(?P<prefix>.+)/(?P<layer>layers\.\d+)/(?P<metric>[a-z_]+)$")


def layer_values(row: dict[str, Any], prefix: str, metric: str) -> dict[str, float]:
    """``{layer: value}`` of keys ``<prefix>/<layer>/<metric>`` in a row (layers in order)."""
    out = {}
    for k, v in row.items():
        m = _LAYER_KEY.match(k)
        if m and m["prefix"] == prefix and m["metric"] == metric and isinstance(v, int | float):
            out[m["layer"]] = float(v)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(".")[1])))


def routing(run_dir: str | Path, step: int) -> dict[str, np.ndarray]:
    """The top-k expert ids of the run's evaluation at ``step`` (``routing/step-N.npz``)."""
    p = Path(run_dir) / "routing" / f"step-{step}.npz"
    if not p.exists():
        return {}
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def saturation_by_source(now: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                         sources: list[str]) -> dict[str, dict[str, float]]:
    """``{source: {layer: saturation}}`` of a routing against a reference routing of the same
    evaluation tokens; the rows of each layer are the sources' equal blocks, in order."""
    from moe_cpt.trainer.routing_metrics import saturation_per_token

    out: dict[str, dict[str, float]] = {s: {} for s in sources}
    for layer in sorted(now, key=lambda name: int(name.split(".")[1]) if "." in name else 0):
        a, b = now[layer], ref.get(layer)
        if b is None or a.shape != b.shape or not sources or len(a) % len(sources):
            continue
        per = saturation_per_token(a, b)
        n = len(a) // len(sources)
        for i, s in enumerate(sources):
            out[s][layer] = float(per[i * n:(i + 1) * n].mean())
    return out


def eval_noise(values: list[float]) -> float:
    """Eval-to-eval noise of a curve: the standard deviation of the second differences of its
    last half, divided by sqrt(6) (white noise of std s gives second differences of std
    s*sqrt(6)); 0 with fewer than 4 points. Used as the spread of a single-seed study."""
    v = np.asarray(values[len(values) // 2:], dtype=np.float64)
    if len(v) < 3 or len(values) < 4:
        return 0.0
    return float(np.std(np.diff(v, 2)) / np.sqrt(6.0))
