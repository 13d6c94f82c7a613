"""The paper's elements checked against their definitions on hand-built inputs.

MRI, routing saturation, Sinkhorn-Knopp's stopping rule, the top-1 gate gradient, the shared
expert and parameter counts, the router presets and the infinite LR schedule (docs/trainer.md,
"The paper's elements").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_cpt.trainer  # noqa: F401  (CPU compat before torchtitan model imports)
from moe_cpt.trainer import cpu_compat
from moe_cpt.trainer.config import load_config
from moe_cpt.trainer.evaluation import EvalResult, routing_saturation
from moe_cpt.trainer.models import (
    ROUTER_PRESETS,
    SHAPES,
    TINY_FFN,
    build_model_config,
    parameter_counts,
    router_config,
)
from moe_cpt.trainer.routers import CptRouter, sinkhorn_knopp
from moe_cpt.trainer.routing_metrics import (
    MoECounts,
    changed_fraction,
    max_violation,
    mri,
    mri_from_counts,
    saturation,
)
from moe_cpt.trainer.schedules import cosine_inf_factor, lr_scheduler_config

# ---- MRI -------------------------------------------------------------------------------------


def test_mri_balanced_routing_is_k_over_e() -> None:
    # 8 tokens, E = 4, k = 2: every expert in exactly 4 of the 8 top-2 sets
    ids = np.array([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2], [0, 1], [2, 3]])
    assert mri(ids, 4) == pytest.approx(2 / 4)
    assert max_violation(np.bincount(ids.reshape(-1), minlength=4)) == 0.0


def test_mri_collapsed_routing_is_one() -> None:
    ids = np.array([[3, 0], [3, 1], [3, 2], [3, 0]])  # expert 3 in every token's set
    assert mri(ids, 4) == 1.0


def test_mri_top1_hand_computed() -> None:
    ids = np.array([[0], [0], [0], [1], [2], [2], [3], [3]])  # 3 of 8 tokens on expert 0
    assert mri(ids, 4) == pytest.approx(3 / 8)
    assert mri_from_counts(np.array([3, 1, 2, 2]), top_k=1) == pytest.approx(3 / 8)


def test_mri_bounds_on_random_routings() -> None:
    rng = np.random.default_rng(0)
    for k, e in ((1, 8), (3, 31), (4, 32)):
        ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(500)])
        assert k / e - 1e-12 <= mri(ids, e) <= 1.0


# ---- routing saturation ----------------------------------------------------------------------


def test_saturation_identical_is_one_and_disjoint_is_zero() -> None:
    ref = np.array([[0, 1, 2], [3, 4, 5]])
    assert saturation(ref, ref) == 1.0
    assert saturation(ref[:, ::-1], ref) == 1.0  # a set: order does not matter
    assert saturation(np.array([[3, 4, 5], [0, 1, 2]]), ref) == 0.0


def test_saturation_partial_overlap_hand_computed() -> None:
    ref = np.array([[0, 1, 2], [3, 4, 5]])
    now = np.array([[0, 1, 7], [3, 8, 9]])  # 2/3 and 1/3 of the experts kept
    assert saturation(now, ref) == pytest.approx(0.5)
    assert changed_fraction(now, ref) == 1.0  # both sets changed
    assert changed_fraction(ref, ref) == 0.0


def test_saturation_per_source_and_layer_from_an_eval_result() -> None:
    ref = {"layers.0": np.array([[0], [1], [2], [3]]), "layers.1": np.array([[0], [0], [1], [1]])}
    now = {"layers.0": np.array([[0], [1], [0], [0]]), "layers.1": np.array([[0], [0], [1], [1]])}
    result = EvalResult(routing=now, source_rows={"a": (0, 2), "b": (2, 4)})
    sat = routing_saturation(result, ref)
    assert sat["saturation/a/layers.0"] == 1.0 and sat["saturation/b/layers.0"] == 0.0
    assert sat["saturation/b/layers.1"] == 1.0
    assert sat["saturation/b/overall"] == pytest.approx(0.5)
    assert sat["saturation/a/overall"] == 1.0


# ---- Sinkhorn --------------------------------------------------------------------------------


def _skewed_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g)
    logits[:, 0] += 3.0  # nearly every token prefers expert 0
    return logits


def _column_error(log_plan: torch.Tensor) -> float:
    t, e = log_plan.shape
    return float((log_plan.exp().sum(0) / (t / e) - 1).abs().max())


def test_sinkhorn_stops_at_the_tolerance_and_meets_it() -> None:
    logits = _skewed_logits()
    result = sinkhorn_knopp(logits, tol=0.01, max_iters=1000)
    assert 1 <= result.iterations < 1000
    assert result.error <= 0.01
    assert _column_error(result.log_plan) == pytest.approx(result.error, abs=1e-5)
    # one round fewer has not converged yet: it stopped at the first round meeting the tolerance
    before = sinkhorn_knopp(logits, tol=0.01, max_iters=result.iterations - 1)
    assert before.error > 0.01
    # rows stay distributions; a tighter tolerance takes more rounds
    assert torch.allclose(result.log_plan.exp().sum(1), torch.ones(512), atol=1e-5)
    tighter = sinkhorn_knopp(logits, tol=1e-4, max_iters=1000)
    assert tighter.iterations > result.iterations and tighter.error <= 1e-4


def test_sinkhorn_max_iterations_bound() -> None:
    result = sinkhorn_knopp(_skewed_logits(), tol=1e-12, max_iters=3)
    assert result.iterations == 3 and result.error > 1e-12


def test_sinkhorn_balances_the_choice_on_skewed_logits() -> None:
    logits = _skewed_logits()
    raw = torch.bincount(logits.argmax(-1), minlength=8).double().numpy()
    plan = sinkhorn_knopp(logits, tol=0.01).log_plan
    chosen = torch.bincount(plan.argmax(-1), minlength=8).double().numpy()
    assert max_violation(raw) > 3.0 and max_violation(chosen) < 0.25


def test_sinkhorn_router_uses_configured_tolerance() -> None:
    shape = SHAPES["tiny_switch"]
    router = router_config(shape, "sinkhorn", sinkhorn_tol=0.01, sinkhorn_max_iters=50).build()
    assert isinstance(router, CptRouter) and router.sinkhorn_tol == 0.01
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    router.train()
    router(torch.rand(2, 64, shape.dim, generator=torch.Generator().manual_seed(1)))
    assert 1 <= router.last_sinkhorn_iterations <= 50


# ---- router presets, top-1 gradient, shared expert -------------------------------------------


def test_router_presets_match_the_paper() -> None:
    assert ROUTER_PRESETS["aux_loss"].aux_loss_coeff == 0.01
    assert ROUTER_PRESETS["aux_loss"].z_loss_coeff == 0.001
    assert ROUTER_PRESETS["sinkhorn"].aux_loss_coeff == 0.0
    sink = router_config(SHAPES["tiny_switch"], "sinkhorn")
    assert (sink.aux_loss_coeff, sink.z_loss_coeff) == (0.0, 0.0)
    pbtk = router_config(SHAPES["tiny_switch"], "aux_loss")
    assert (pbtk.aux_loss_coeff, pbtk.z_loss_coeff) == (0.01, 0.001)
    explicit = router_config(SHAPES["tiny_switch"], "sinkhorn", z_loss_coeff=0.001)
    assert explicit.z_loss_coeff == 0.001  # an explicit value wins over the preset


def test_top1_gates_are_not_renormalized_but_topk_gates_are() -> None:
    assert router_config(SHAPES["tiny_switch"], "aux_loss").route_norm is False
    assert router_config(SHAPES["tiny_granular"], "aux_loss").route_norm is True


def _gate_grads(flavor: str, **kwargs: object) -> list[float]:
    cpu_compat.apply()
    torch.manual_seed(0)
    model = build_model_config(flavor, router="aux_loss", aux_loss_coeff=0.0, z_loss_coeff=0.0,
                               **kwargs).build()
    model.init_weights(buffer_device=None)
    model.train()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)).backward()
    return [float(p.grad.abs().sum()) for n, p in model.named_parameters() if "router.gate" in n]


def test_tiny_switch_gate_gets_gradient_from_the_lm_loss_alone() -> None:
    grads = _gate_grads("tiny_switch")
    assert len(grads) == SHAPES["tiny_switch"].n_layers and all(g > 0 for g in grads)
    # the bug this fixes: renormalized top-1 gates are 1 (up to float rounding): no gradient
    broken = _gate_grads("tiny_switch", route_norm=True)
    assert max(broken) < 1e-4 * min(grads)


def test_granular_has_one_shared_expert_and_it_is_counted() -> None:
    s = SHAPES["tiny_granular"]
    assert (s.num_experts, s.top_k, s.shared_experts, s.moe_hidden) == (31, 3, 1, TINY_FFN // 4)
    model = build_model_config("tiny_granular").build()
    moe = model.layers["0"].moe
    assert moe.shared_experts is not None
    assert moe.shared_experts.w1.weight.shape == (s.moe_hidden, s.dim)
    counts = parameter_counts("tiny_granular")
    assert counts.shared_experts == s.n_layers * 3 * s.dim * s.moe_hidden
    per_expert = 3 * s.dim * s.moe_hidden
    assert counts.routed_experts == s.n_layers * s.num_experts * per_expert
    assert counts.active == counts.total - s.n_layers * (s.num_experts - s.top_k) * per_expert
    assert parameter_counts("tiny_switch").shared_experts == 0


def test_moe_flavors_are_flop_matched_to_dense() -> None:
    for scale in (("tiny_dense", "tiny_switch", "tiny_granular"),
                  ("dense_500m", "switch_2b_a500m", "granular_2b_a500m")):
        dense, switch, granular = (parameter_counts(f) for f in scale)
        # the FFN parameters a token uses equal the dense FFN's; the gates add E x dim a layer
        for flavor, moe in zip(scale[1:], (switch, granular), strict=True):
            s = SHAPES[flavor]
            assert moe.active - s.n_layers * s.num_experts * s.dim == dense.active
            assert moe.total > 3 * dense.total
    study = parameter_counts("granular_2b_a500m")
    assert 1.9e9 < study.total < 2.4e9 and 0.45e9 < study.active < 0.7e9


def test_moe_counts_give_the_mri_of_the_routers_choices() -> None:
    cpu_compat.apply()
    torch.manual_seed(0)
    model = build_model_config("tiny_granular").build()
    model.init_weights(buffer_device=None)
    model.train()
    counts = MoECounts(model)
    captured: dict[str, torch.Tensor] = {}
    for name, moe in counts.layers.items():
        moe.router.register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name, out[1].reshape(-1, 3)))
    model(torch.randint(0, 256, (2, 32)))
    counts.snapshot()
    step = counts.take().numpy()
    metrics = counts.step_metrics(step)
    for name, ids in captured.items():
        assert metrics[f"router/{name}/mri"] == pytest.approx(mri(ids.numpy(), 31))
    assert metrics["router/mri_max"] == max(metrics[f"router/{n}/mri"] for n in captured)
    assert all(float(m.tokens_per_expert_E.sum()) == 0 for m in counts.layers.values())


# ---- infinite schedule -----------------------------------------------------------------------

ETA_MAX, ETA_CONST, ETA_MIN = 3e-4, 1.65e-4, 3e-5
W, C, A, T = 10, 40, 30, 200


def _factor(t: int, anneal: int = A, kind: str = "linear") -> float:
    return cosine_inf_factor(t, total_steps=T, warmup_steps=W, cooldown_steps=C,
                             anneal_steps=anneal, const_ratio=ETA_CONST / ETA_MAX,
                             min_ratio=ETA_MIN / ETA_MAX, anneal_type=kind)


def test_cosine_inf_values_equal_the_formula() -> None:
    assert ETA_MAX * _factor(W) == pytest.approx(ETA_MAX)  # warmup end
    assert ETA_MAX * _factor(W // 2) == pytest.approx(ETA_MAX * (W // 2) / W)
    assert ETA_MAX * _factor(W + C) == pytest.approx(ETA_CONST)  # cooldown end
    mid_cool = W + C // 2
    assert ETA_MAX * _factor(mid_cool) == pytest.approx(ETA_CONST + (ETA_MAX - ETA_CONST) * 0.5)
    assert ETA_MAX * _factor(W + C // 4) == pytest.approx(
        ETA_CONST + (ETA_MAX - ETA_CONST) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert ETA_MAX * _factor((W + C + T - A) // 2) == pytest.approx(ETA_CONST)  # mid-constant
    assert ETA_MAX * _factor(T - A) == pytest.approx(ETA_CONST)  # last constant step
    assert ETA_MAX * _factor(T - A // 3) == pytest.approx(
        ETA_CONST - (ETA_CONST - ETA_MIN) * (A - A // 3) / A)  # inside the anneal
    assert ETA_MAX * _factor(T) == pytest.approx(ETA_MIN)  # after the anneal
    assert ETA_MAX * _factor(T, kind="exponential") == pytest.approx(ETA_MIN)
    assert ETA_MAX * _factor(T - A // 2, kind="exponential") == pytest.approx(
        ETA_CONST * (ETA_MIN / ETA_CONST) ** 0.5)
    # pre-training: no anneal, the LR stays at eta_const to the end
    assert ETA_MAX * _factor(T, anneal=0) == pytest.approx(ETA_CONST)


def _schedule(**over: object) -> dict:
    sched = load_config(None, ["schedule.kind=cosine_inf", "training.steps=200"])["schedule"].to_dict()
    sched.update(over)
    return sched


def test_cosine_inf_through_torchtitans_scheduler_container() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=ETA_MAX)
    cfg = lr_scheduler_config(_schedule(warmup_steps=W, cooldown_steps=C, anneal_steps=A,
                                        const_lr_ratio=ETA_CONST / ETA_MAX,
                                        min_lr_ratio=ETA_MIN / ETA_MAX))

    class _Opts(list):
        def __init__(self, o: torch.optim.Optimizer) -> None:
            super().__init__([o])

    sched = cfg.build(optimizers=_Opts(opt), training_steps=T).schedulers[0]
    lrs = []
    for _ in range(T):  # the LR training step t runs with, as torchtitan logs it
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [ETA_MAX * _factor(t) for t in range(1, T + 1)]
    assert np.allclose(lrs, expected, rtol=1e-9)
    assert lrs[W - 1] == pytest.approx(ETA_MAX) and lrs[-1] == pytest.approx(ETA_MIN)


def test_cpt_under_cosine_inf_starts_at_eta_const() -> None:
    f = [cosine_inf_factor(t, total_steps=50, warmup_steps=0, cooldown_steps=0, anneal_steps=10,
                           const_ratio=0.55, min_ratio=0.1) for t in range(1, 51)]
    assert f[0] == 0.55 and f[39] == 0.55 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))


@pytest.mark.parametrize("override, message", [
    (["schedule.anneal_steps=300"], "exceed training.steps"),
    (["schedule.anneal_type=cubic"], "anneal_type"),
    (["schedule.const_lr_ratio=0.05"], "min_lr_ratio <= const_lr_ratio"),
    (["model.sinkhorn_tol=0"], "sinkhorn_tol"),
])
def test_bad_science_settings_fail_with_one_line(override: list[str], message: str) -> None:
    from moe_cpt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["schedule.kind=cosine_inf", *override])


def test_ep_must_divide_the_routed_experts() -> None:
    from moe_cpt.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide the 31 routed experts"):
        load_config(None, ["model.flavor=tiny_granular", "parallel.ep=2"])

