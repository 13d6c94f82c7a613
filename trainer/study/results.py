"""Every number of a study, read from its finished runs (``results.json``).

Only what training computed goes in (losses, forgetting, MRI, saturation, tokens): no wall
times, ids or paths, so a study that was killed and restarted gives the same file as an
uninterrupted one. Wall times are kept apart (``timings.json``, shown in the report).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_cpt.trainer.study import curves
from moe_cpt.trainer.study.grid import RunPlan
from moe_cpt.trainer.study.runner import Study


def _f(v: Any) -> float | None:
    return None if v is None or not isinstance(v, int | float) else float(v)


def _shape(flavor: str) -> tuple[int, int]:
    from moe_cpt.trainer.models import SHAPES

    s = SHAPES[flavor]
    return s.top_k, s.num_experts


def run_results(study: Study, p: RunPlan) -> dict[str, Any]:
    """One run's numbers: eval curve, finals, forgetting, eval MRI, saturation, train MRI."""
    a, b = study.spec.a.label, study.spec.b.label
    rec = curves.run_record(p.output_dir)
    interval = int(p.config["eval"]["interval"])
    rows = curves.eval_rows(p.output_dir, curves.planned_eval_steps(p.steps, interval))
    tps = study.spec.tokens_per_step
    offset = study.spec.pretrain_steps * tps if p.kind == "cpt" else 0
    curve = []
    for r in rows:
        point: dict[str, Any] = {"step": int(r["step"]), "tokens": offset + int(r["step"]) * tps}
        for s in (a, b):
            if f"val_loss/{s}" in r:
                point[s] = float(r[f"val_loss/{s}"])
        curve.append(point)
    out: dict[str, Any] = {
        "name": p.name, "kind": p.kind, "variant": p.variant.key, "model": p.variant.model_key,
        "flavor": p.variant.flavor, "router": p.variant.router, "seed": p.variant.seed,
        "replay": p.replay, "parent": p.parent, "steps": p.steps, "tokens": p.steps * tps,
        "finished": rec.get("status") == "finished" and int(rec.get("end_step", -1)) == p.steps,
        "tokens_per_source": rec.get("tokens_per_source") or {},
        "curve": curve,
        "final": {s: curve[-1][s] for s in (a, b) if curve and s in curve[-1]},
        "noise": {s: curves.eval_noise([c[s] for c in curve if s in c]) for s in (a, b)},
    }
    if p.kind == "cpt" and rows:
        last = rows[-1]
        start = rec.get("val_loss_at_start") or {}
        out["forgetting"] = {}
        for s in (a, b):
            v = _f(last.get(f"forgetting/{s}"))
            if v is None and s in start and f"val_loss/{s}" in last:
                v = float(last[f"val_loss/{s}"]) - float(start[s])
            if v is not None:
                out["forgetting"][s] = v
    if p.variant.is_moe and rows:
        k, e = _shape(p.variant.flavor)
        out["mri_floor"] = k / e
        out["eval_mri"] = {
            "start": {s: curves.layer_values(rows[0], f"router_by_source/{s}", "mri") for s in (a, b)},
            "end": {s: curves.layer_values(rows[-1], f"router_by_source/{s}", "mri") for s in (a, b)},
        }
        names = curves.source_names(rec) or [a, b]
        ref = curves.routing(p.output_dir, 0)
        now = curves.routing(p.output_dir, int(rows[-1]["step"]))
        out["saturation"] = curves.saturation_by_source(now, ref, names) if ref and now else {}
        out["eval_tokens_per_source"] = study.spec.eval.samples_per_source * study.spec.seq_len
        out["train_mri"] = [
            {"step": int(r["step"]), **curves.layer_values(r, "router", "mri")}
            for r in curves.step_rows(p.output_dir)]
    return out


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def collect(study: Study) -> dict[str, Any]:
    """The whole ``results.json``: settings, every run, and the tables of the report."""
    spec = study.spec
    a, b = spec.a.label, spec.b.label
    runs = {p.key: run_results(study, p) for p in study.plans}
    models = list(dict.fromkeys(p.variant.model_key for p in study.plans))
    out: dict[str, Any] = {
        "study": spec.name,
        "data": {"a": study.data.a, "b": study.data.b, "a_label": a, "b_label": b},
        "settings": {"pretrain_steps": spec.pretrain_steps, "cpt_steps": spec.cpt_steps,
                     "tokens_per_step": spec.tokens_per_step,
                     "pretrain_tokens": spec.pretrain_steps * spec.tokens_per_step,
                     "cpt_tokens": spec.cpt_steps * spec.tokens_per_step,
                     "replay": list(spec.replay), "retrain": list(spec.retrain),
                     "replay_mode": spec.replay_mode, "seeds": list(spec.seeds),
                     "schedule": spec.schedule.kind, "models": models,
                     "eval_tokens_per_source": spec.eval.samples_per_source * spec.seq_len},
        "runs": runs,
    }
    out["tables"] = tables(out)
    return out


def _by(results: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in results["runs"].values() if all(r.get(k) == v for k, v in match.items())]


def tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The report's tables as rows (mean over seeds where a study has several; ``n`` seeds)."""
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    st = results["settings"]
    models = st["models"]

    def agg(rows: list[dict[str, Any]], get: Any) -> tuple[float | None, float | None, int]:
        vals = [v for v in (get(r) for r in rows) if v is not None]
        if not vals:
            return None, None, 0
        return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None), len(vals)

    final, forgetting, gap, moe_dense, mri = [], [], [], [], []
    for m in models:
        phases = [("pretrain", None)] + [("cpt", r) for r in st["replay"]] + \
                 [("retrain", r) for r in st["retrain"]]
        for kind, level in phases:
            rows = _by(results, model=m, kind=kind, replay=level)
            if not rows:
                continue
            row: dict[str, Any] = {"model": m, "run": kind if level is None else f"{kind} r={level:g}"}
            for s in (a, b):
                row[s], row[f"{s}_sd"], row["n"] = agg(rows, lambda r, s=s: r["final"].get(s))
            final.append(row)
        for level in st["replay"]:
            rows = _by(results, model=m, kind="cpt", replay=level)
            if rows:
                mean, sd, n = agg(rows, lambda r: (r.get("forgetting") or {}).get(a))
                fb, _, _ = agg(rows, lambda r: (r.get("forgetting") or {}).get(b))
                forgetting.append({"model": m, "replay": level, f"forgetting_{a}": mean,
                                   f"forgetting_{a}_sd": sd, f"change_{b}": fb, "n": n})
        for level in st["retrain"]:
            pairs = _pairs(results, m, level)
            if pairs:
                row = {"model": m, "replay": level,
                       "compute_share": st["cpt_tokens"] / (st["pretrain_tokens"] + st["cpt_tokens"])}
                for s in (a, b):
                    diffs = [c["final"][s] - r["final"][s] for c, r in pairs
                             if s in c["final"] and s in r["final"]]
                    row[f"gap_{s}"] = _mean(diffs)
                    row[f"gap_{s}_sd"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
                row["n"] = len(pairs)
                gap.append(row)
    dense = [m for m in models if not any(r["router"] for r in _by(results, model=m))]
    for m in models:
        if m in dense or not dense:
            continue
        for kind, level in [("pretrain", None)] + [("cpt", r) for r in st["replay"]]:
            row = {"model": m, "dense": dense[0], "run": kind if level is None else f"{kind} r={level:g}"}
            for s in (a, b):
                diffs = []
                for r in _by(results, model=m, kind=kind, replay=level):
                    d = _by(results, model=dense[0], kind=kind, replay=level, seed=r["seed"])
                    if d and s in r["final"] and s in d[0]["final"]:
                        diffs.append(r["final"][s] - d[0]["final"][s])
                row[f"diff_{s}"] = _mean(diffs)
                row[f"diff_{s}_sd"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
            moe_dense.append(row)
    for m in models:
        for level in st["replay"]:
            rows = [r for r in _by(results, model=m, kind="cpt", replay=level) if r.get("eval_mri")]
            if not rows:
                continue
            row = {"model": m, "replay": level, "floor": rows[0]["mri_floor"]}
            for s in (a, b):
                for when in ("start", "end"):
                    row[f"{s}_{when}"], _, _ = agg(
                        rows, lambda r, s=s, w=when: max(r["eval_mri"][w][s].values())
                        if r["eval_mri"][w].get(s) else None)
            mri.append(row)
    return {"final_val_loss": final, "forgetting": forgetting, "cpt_vs_retrain": gap,
            "moe_minus_dense": moe_dense, "mri_before_after": mri}


def _pairs(results: dict[str, Any], model: str, level: float) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(CPT run, re-train run) of one model and replay level, per seed."""
    out = []
    for c in _by(results, model=model, kind="cpt", replay=level):
        r = _by(results, model=model, kind="retrain", replay=level, seed=c["seed"])
        if r:
            out.append((c, r[0]))
    return out
