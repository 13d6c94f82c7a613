"""Router unit tests: aux and z loss vs hand-computed values, Sinkhorn balance, top-k parity."""

from __future__ import annotations

import math

import pytest
import torch

import moe_cpt.trainer  # noqa: F401  (CPU compat before torchtitan model imports)
from moe_cpt.trainer.evaluation import max_violation
from moe_cpt.trainer.models import SHAPES, router_config
from moe_cpt.trainer.routers import (
    CptRouter,
    collect_router_losses,
    router_z_loss,
    switch_aux_loss,
)


def test_switch_aux_loss_top1_hand_computed() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.75, 0.25] -> E * sum f*P = 2 * 0.75
    assert switch_aux_loss(probs, ids).item() == pytest.approx(1.5)


def test_switch_aux_loss_balanced_top2_is_one() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ids = torch.tensor([[0, 1], [3, 2]])
    # f = P = 1/4 for every expert -> 4 * 4 * (1/16) = 1
    assert switch_aux_loss(probs, ids).item() == pytest.approx(1.0)


def test_switch_aux_loss_gradient_flows_to_probs_only() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]], requires_grad=True)
    switch_aux_loss(probs, torch.tensor([[0], [0]])).backward()
    # d/dP_e of E * sum f_e * mean_t P_te = E * f_e / T
    assert torch.allclose(probs.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_router_z_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2 and ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2)


def _router(kind: str) -> torch.nn.Module:
    cfg = router_config(SHAPES["tiny_moe"], kind, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    r = cfg.build()
    torch.manual_seed(0)
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    return r


def test_aux_loss_router_topk_matches_torchtitan_router() -> None:
    ours, stock = _router("aux_loss"), _router("aux_free")
    assert isinstance(ours, CptRouter) and not isinstance(stock, CptRouter)
    x = torch.randn(2, 16, SHAPES["tiny_moe"].dim)
    s1, i1, _ = ours(x)
    s2, i2, _ = stock(x)
    assert torch.equal(i1.sort(-1).values, i2.sort(-1).values)
    assert torch.allclose(s1.sort(-1).values, s2.sort(-1).values)


def test_router_losses_collected_and_cleared() -> None:
    router = _router("aux_loss")
    router.train()
    model = torch.nn.Sequential(router)
    router(torch.randn(2, 8, SHAPES["tiny_moe"].dim))
    total, stats = collect_router_losses(model)
    assert total is not None and total.requires_grad
    assert stats["aux_loss"] >= 1.0 - 1e-6  # aux loss is minimal (1) at perfect balance
    assert total.item() == pytest.approx(0.01 * stats["aux_loss"] + 0.001 * stats["z_loss"], rel=1e-5)
    assert collect_router_losses(model)[0] is None


def test_sinkhorn_router_balances_in_training_only() -> None:
    router = _router("sinkhorn")
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # expert 0 dominates for positive inputs
    x = torch.rand(4, 64, SHAPES["tiny_moe"].dim, generator=torch.Generator().manual_seed(1))
    router.train()
    _, ids_train, _ = router(x)
    router.eval()
    _, ids_eval, _ = router(x)
    load_train = torch.bincount(ids_train.reshape(-1), minlength=8).double().numpy()
    load_eval = torch.bincount(ids_eval.reshape(-1), minlength=8).double().numpy()
    assert max_violation(load_train) < max_violation(load_eval)
    assert (ids_eval == 0).any(dim=-1).all()  # plain top-k: every token picks expert 0
