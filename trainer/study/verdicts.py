"""The paper's claims, checked against a study's measured numbers.

Each claim is reduced to *margins*: a number that is positive when the claim holds (e.g. the
dense model's loss minus the MoE's), one per compared group, each with a *spread*:

* with several seeds, the standard deviation over seeds of the same difference;
* with one seed, the measurement noise: for losses the eval-to-eval noise of the runs'
  val-loss curves (:func:`moe_cpt.trainer.study.curves.eval_noise`, combined in quadrature over the
  runs of the difference), for the MRI the sampling error ``sqrt(m(1-m)/N)`` of a fraction
  over ``N`` evaluation tokens.

A margin within its spread is ``inconclusive: difference within seed spread``; otherwise its sign
decides ``reproduced`` / ``not reproduced``. A claim over several groups (both routers, every
MoE, every model) is ``not reproduced`` if any group's is, ``reproduced`` if all are, else
inconclusive. Nothing here knows what a study should find: verdicts come from the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive: difference within seed spread"
NO_DATA = "inconclusive: not measured in this study"


@dataclass(frozen=True)
class Thresholds:
    """What "stays balanced" and "comes close" mean, as numbers."""

    balance_tolerance: float = 0.1  # largest rise of the normalized MRI on A over CPT
    balanced_level: float = 0.5  # largest normalized MRI on A at the end of CPT that is "balanced"
    close_tolerance: float = 0.05  # largest relative gap (CPT - re-train) / re-train val loss


def verdict(margin: float, spread: float | None) -> str:
    """``reproduced`` if the margin is positive beyond the spread, ``not reproduced`` if negative
    beyond it, else inconclusive."""
    if spread is not None and abs(margin) <= spread:
        return INCONCLUSIVE
    if margin == 0:
        return INCONCLUSIVE
    return REPRODUCED if margin > 0 else NOT_REPRODUCED


def combine(verdicts: list[str]) -> str:
    if not verdicts:
        return NO_DATA
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE


def _runs(results: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in results["runs"].values() if all(r.get(k) == v for k, v in match.items())]


def _spread(per_seed: list[float], noises: list[float]) -> float:
    """Std over seeds (>= 2 seeds), else the single run's noise."""
    if len(per_seed) > 1:
        return float(np.std(per_seed, ddof=1))
    return float(math.sqrt(sum(n * n for n in noises)))


def _group(name: str, diffs: list[float], noises: list[float], margin_of: Any) -> dict[str, Any]:
    value = float(np.mean(diffs))
    spread = _spread(diffs, noises)
    margin = margin_of(value)
    return {"group": name, "value": value, "spread": spread, "seeds": len(diffs),
            "margin": margin, "verdict": verdict(margin, spread)}


def _claim(claim: str, measure: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """A finding: the claim, how it is measured, its groups and their combined verdict."""
    return {"claim": claim, "measure": measure, "groups": groups,
            "verdict": combine([g["verdict"] for g in groups])}


def _noise(run: dict[str, Any], sources: list[str]) -> float:
    vals = [float(run.get("noise", {}).get(s, 0.0)) for s in sources]
    return float(np.mean(vals)) if vals else 0.0


def _normalized_mri(per_layer: dict[str, float], floor: float) -> float:
    """The busiest layer's MRI on the scale 0 (uniform, ``k/E``) .. 1 (every token to one expert)."""
    return (max(per_layer.values()) - floor) / (1.0 - floor)


def routers_stay_balanced(results: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    """Per router: the MRI on A over CPT, normalized by its range (``k/E`` -> 0, 1 -> 1), max over
    layers. The claim holds where its rise over CPT stays under ``balance_tolerance`` *and* it ends
    at or under ``balanced_level``: a router that was never balanced does not "stay" balanced."""
    a = results["data"]["a_label"]
    groups, per_router = [], {}
    routers = sorted({r["router"] for r in results["runs"].values() if r.get("router")})
    for router in routers:
        vs = []
        models = sorted({r["model"] for r in _runs(results, router=router, kind="cpt")})
        for model in models:
            for level in results["settings"]["replay"]:
                rises, ends, noises = [], [], []
                for r in _runs(results, model=model, kind="cpt", replay=level):
                    mri = r.get("eval_mri") or {}
                    start, end = (mri.get("start") or {}).get(a), (mri.get("end") or {}).get(a)
                    if not start or not end:
                        continue
                    floor = r["mri_floor"]
                    ends.append(_normalized_mri(end, floor))
                    rises.append(ends[-1] - _normalized_mri(start, floor))
                    m_end = max(end.values())
                    n = max(1, int(r.get("eval_tokens_per_source") or 1))
                    noises.append(math.sqrt(2 * m_end * (1 - m_end) / n) / (1.0 - floor))
                if rises:
                    end_mean = float(np.mean(ends))
                    g = _group(f"{model} r={level:g}", rises, noises,
                               lambda v, e=end_mean: min(th.balance_tolerance - v, th.balanced_level - e))
                    g["end"] = end_mean
                    groups.append(g)
                    vs.append(g["verdict"])
        per_router[router] = combine(vs)
    return {"claim": "both routers stay balanced on A after CPT",
            "measure": f"normalized MRI on A, (MRI - k/E) / (1 - k/E), max over layers: its rise over "
                       f"CPT (the value shown) holds below {th.balance_tolerance:g} and its level at the "
                       f"end of CPT (`end`) at or below {th.balanced_level:g}",
            "groups": groups, "by_router": per_router, "verdict": combine(list(per_router.values()))
            if per_router else NO_DATA}


def moe_beats_dense(results: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    """Per MoE model: its final val loss minus the dense model's (same seed), averaged over A
    and B and the replay levels, at the end of CPT; holds where negative."""
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    dense = sorted({r["model"] for r in results["runs"].values() if not r.get("router")})
    groups = []
    if dense:
        for model in sorted({r["model"] for r in results["runs"].values() if r.get("router")}):
            diffs, noises = [], []
            for seed in results["settings"]["seeds"]:
                per, nz = [], []
                for level in results["settings"]["replay"]:
                    m = _runs(results, model=model, kind="cpt", replay=level, seed=seed)
                    d = _runs(results, model=dense[0], kind="cpt", replay=level, seed=seed)
                    if not m or not d:
                        continue
                    for s in (a, b):
                        if s in m[0]["final"] and s in d[0]["final"]:
                            per.append(m[0]["final"][s] - d[0]["final"][s])
                    nz.append(math.hypot(_noise(m[0], [a, b]), _noise(d[0], [a, b])))
                if per:
                    diffs.append(float(np.mean(per)))
                    noises.append(float(np.mean(nz)))
            if diffs:
                groups.append(_group(f"{model} - {dense[0]}", diffs, noises[:1], lambda v: -v))
    return _claim("MoEs keep their advantage over the FLOP-matched dense model",
                  "final val loss of the MoE minus the dense model after CPT (mean over A, B "
                  "and replay levels); holds below 0", groups)


def replay_reduces_forgetting(results: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    """Per model: forgetting on A at the highest replay level minus at the lowest; holds where
    negative."""
    a = results["data"]["a_label"]
    levels = results["settings"]["replay"]
    groups = []
    if len(levels) > 1:
        lo, hi = min(levels), max(levels)
        for model in sorted({r["model"] for r in results["runs"].values()}):
            diffs, noises = [], []
            for seed in results["settings"]["seeds"]:
                rl = _runs(results, model=model, kind="cpt", replay=lo, seed=seed)
                rh = _runs(results, model=model, kind="cpt", replay=hi, seed=seed)
                if not rl or not rh:
                    continue
                fl, fh = (rl[0].get("forgetting") or {}).get(a), (rh[0].get("forgetting") or {}).get(a)
                if fl is None or fh is None:
                    continue
                diffs.append(fh - fl)
                noises.append(math.hypot(_noise(rl[0], [a]), _noise(rh[0], [a])))
            if diffs:
                groups.append(_group(f"{model}: r={hi:g} - r={lo:g}", diffs, noises[:1], lambda v: -v))
    return _claim("replay reduces forgetting",
                  "forgetting on A (val loss at the end of CPT minus at its start) with the "
                  "most replay minus with the least; holds below 0", groups)


def cpt_close_to_retrain(results: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    """Per model and re-train level: (CPT - re-train) / re-train final val loss, mean over A
    and B; holds below the tolerance. The compute share is CPT tokens / re-train tokens."""
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    st = results["settings"]
    groups = []
    for model in sorted({r["model"] for r in results["runs"].values()}):
        for level in st["retrain"]:
            diffs, noises = [], []
            for seed in st["seeds"]:
                c = _runs(results, model=model, kind="cpt", replay=level, seed=seed)
                r = _runs(results, model=model, kind="retrain", replay=level, seed=seed)
                if not c or not r:
                    continue
                rel = [(c[0]["final"][s] - r[0]["final"][s]) / r[0]["final"][s] for s in (a, b)
                       if s in c[0]["final"] and s in r[0]["final"] and r[0]["final"][s]]
                if rel:
                    diffs.append(float(np.mean(rel)))
                    ref = float(np.mean([r[0]["final"][s] for s in (a, b) if s in r[0]["final"]]))
                    noises.append(math.hypot(_noise(c[0], [a, b]), _noise(r[0], [a, b])) / ref)
            if diffs:
                groups.append(_group(f"{model} r={level:g}", diffs, noises[:1],
                                     lambda v: th.close_tolerance - v))
    share = st["cpt_tokens"] / (st["pretrain_tokens"] + st["cpt_tokens"])
    return {**_claim("CPT comes close to the full re-train at a fraction of the compute",
                     f"relative gap (CPT - re-train) / re-train of the final val loss, mean over "
                     f"A and B; holds below {th.close_tolerance:g}; CPT uses {share:.0%} of the "
                     f"re-train's compute (tokens, same model)", groups),
            "compute_share": share}


CLAIMS = (routers_stay_balanced, moe_beats_dense, replay_reduces_forgetting, cpt_close_to_retrain)


def findings(results: dict[str, Any], th: Thresholds | None = None) -> list[dict[str, Any]]:
    th = th or Thresholds()
    return [claim(results, th) for claim in CLAIMS]
