"""The verdict logic on constructed results: every verdict follows from the numbers."""

from __future__ import annotations

from typing import Any

import pytest

from moe_cpt.trainer.study.verdicts import (
    INCONCLUSIVE,
    NO_DATA,
    NOT_REPRODUCED,
    REPRODUCED,
    Thresholds,
    combine,
    cpt_close_to_retrain,
    findings,
    moe_beats_dense,
    replay_reduces_forgetting,
    routers_stay_balanced,
    verdict,
)


def _run(model: str, kind: str, replay: float | None, seed: int, a: float, b: float, *,
         router: str = "", forgetting: float | None = None, mri: tuple[float, float] | None = None,
         noise: float = 0.0) -> dict[str, Any]:
    r: dict[str, Any] = {"model": model, "kind": kind, "replay": replay, "seed": seed, "router": router,
                         "final": {"A": a, "B": b}, "noise": {"A": noise, "B": noise}}
    if forgetting is not None:
        r["forgetting"] = {"A": forgetting}
    if mri is not None:
        r["mri_floor"] = 0.125
        r["eval_mri"] = {"start": {"A": {"layers.0": mri[0]}}, "end": {"A": {"layers.0": mri[1]}}}
        r["eval_tokens_per_source"] = 100000
    return r


def results(seeds: tuple[int, ...] = (0,), *, moe_delta: float = -0.2, forget: tuple[float, float] = (0.5, 0.2),
            gap: float = 0.01, mri_rise: float = 0.02, spread: float = 0.0, noise: float = 0.0) -> dict[str, Any]:
    runs = {}
    for s in seeds:
        jitter = spread * (1 if s % 2 else -1)
        for model, router, delta in (("dense", "", 0.0), ("switch-aux_loss", "aux_loss", moe_delta),
                                     ("switch-sinkhorn", "sinkhorn", moe_delta)):
            d = delta + (jitter if router else 0.0)
            runs[f"{model}-{s}/pretrain"] = _run(model, "pretrain", None, s, 3.0 + d, 5.0, router=router, noise=noise)
            for level, f in zip((0.0, 0.3), forget, strict=True):
                mri = (0.3, 0.3 + mri_rise + (jitter if router else 0)) if router else None
                runs[f"{model}-{s}/cpt-{level}"] = _run(
                    model, "cpt", level, s, 3.0 + f + d, 2.0 + d, router=router,
                    forgetting=f + (jitter if not router else 0.0), mri=mri, noise=noise)
            base = 3.0 + forget[1] + d
            runs[f"{model}-{s}/retrain-0.3"] = _run(model, "retrain", 0.3, s, base / (1 + gap), (2.0 + d) / (1 + gap),
                                                    router=router, noise=noise)
    return {"data": {"a_label": "A", "b_label": "B"}, "runs": runs,
            "settings": {"replay": [0.0, 0.3], "retrain": [0.3], "seeds": list(seeds),
                         "pretrain_tokens": 2000, "cpt_tokens": 1000}}


def test_verdict_and_combine() -> None:
    assert verdict(0.5, 0.1) == REPRODUCED and verdict(-0.5, 0.1) == NOT_REPRODUCED
    assert verdict(0.05, 0.1) == INCONCLUSIVE and verdict(-0.05, 0.1) == INCONCLUSIVE
    assert verdict(0.05, None) == REPRODUCED and verdict(0.0, 0.0) == INCONCLUSIVE
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, NOT_REPRODUCED]) == NOT_REPRODUCED
    assert combine([]) == NO_DATA


def test_all_claims_reproduced_on_results_that_show_them() -> None:
    f = findings(results())
    assert [x["verdict"] for x in f] == [REPRODUCED] * 4
    assert f[0]["by_router"] == {"aux_loss": REPRODUCED, "sinkhorn": REPRODUCED}
    assert f[3]["compute_share"] == pytest.approx(1 / 3)


def test_each_claim_fails_when_its_numbers_say_so() -> None:
    th = Thresholds()
    assert moe_beats_dense(results(moe_delta=0.2), th)["verdict"] == NOT_REPRODUCED
    g = moe_beats_dense(results(moe_delta=0.2), th)["groups"][0]
    assert g["value"] == pytest.approx(0.2) and g["margin"] == pytest.approx(-0.2)
    assert replay_reduces_forgetting(results(forget=(0.2, 0.5)), th)["verdict"] == NOT_REPRODUCED
    assert cpt_close_to_retrain(results(gap=0.2), th)["verdict"] == NOT_REPRODUCED
    bal = routers_stay_balanced(results(mri_rise=0.5), th)
    assert bal["verdict"] == NOT_REPRODUCED
    assert bal["groups"][0]["value"] == pytest.approx(0.5 / (1 - 0.125))
    # a threshold is a parameter, not a constant: a laxer tolerance accepts the same rise
    lax = Thresholds(balance_tolerance=0.6, balanced_level=0.9)
    assert routers_stay_balanced(results(mri_rise=0.5), lax)["verdict"] == REPRODUCED


def test_a_router_never_balanced_does_not_stay_balanced() -> None:
    r = results(mri_rise=0.0)
    for run in r["runs"].values():  # no rise over CPT, but 90% of A's tokens go to one expert
        if "eval_mri" in run:
            run["eval_mri"] = {"start": {"A": {"layers.0": 0.9, "layers.1": 0.2}},
                               "end": {"A": {"layers.0": 0.9, "layers.1": 0.2}}}
    bal = routers_stay_balanced(r, Thresholds())
    g = bal["groups"][0]
    assert g["value"] == pytest.approx(0.0) and g["end"] == pytest.approx((0.9 - 0.125) / (1 - 0.125))
    assert g["margin"] == pytest.approx(0.5 - g["end"]) and bal["verdict"] == NOT_REPRODUCED
    # balanced at the end (normalized 0.4 <= 0.5) with no rise: the claim holds
    for run in r["runs"].values():
        if "eval_mri" in run:
            run["eval_mri"]["start"]["A"]["layers.0"] = run["eval_mri"]["end"]["A"]["layers.0"] = 0.475
    assert routers_stay_balanced(r, Thresholds())["verdict"] == REPRODUCED


def test_differences_within_the_seed_spread_are_inconclusive() -> None:
    # the MoE-dense difference is -0.05 on average but flips sign between seeds
    r = results(seeds=(0, 1, 2, 3), moe_delta=-0.05, spread=0.3)
    f = moe_beats_dense(r, Thresholds())
    assert f["groups"][0]["seeds"] == 4 and f["groups"][0]["spread"] > 0.05
    assert f["verdict"] == INCONCLUSIVE
    # the same mean difference with a small spread is decisive
    assert moe_beats_dense(results(seeds=(0, 1, 2, 3), moe_delta=-0.05, spread=0.001),
                           Thresholds())["verdict"] == REPRODUCED


def test_single_seed_uses_the_eval_noise_as_spread() -> None:
    quiet = replay_reduces_forgetting(results(forget=(0.30, 0.28)), Thresholds())
    noisy = replay_reduces_forgetting(results(forget=(0.30, 0.28), noise=0.05), Thresholds())
    assert quiet["verdict"] == REPRODUCED and noisy["verdict"] == INCONCLUSIVE
    assert noisy["groups"][0]["spread"] == pytest.approx((0.05 ** 2 * 2) ** 0.5)


def test_missing_parts_of_the_grid_are_not_measured() -> None:
    r = results()
    r["runs"] = {k: v for k, v in r["runs"].items() if not k.startswith("dense")}
    r["settings"]["retrain"] = []
    assert moe_beats_dense(r, Thresholds())["verdict"] == NO_DATA
    assert cpt_close_to_retrain(r, Thresholds())["verdict"] == NO_DATA
    r["settings"]["replay"] = [0.3]
    assert replay_reduces_forgetting(r, Thresholds())["verdict"] == NO_DATA
