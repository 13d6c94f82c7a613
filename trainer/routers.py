"""MoE routers compared by the study, as drop-in replacements of torchtitan's router config.

The paper (Thérien et al. 2025, arXiv 2503.05029) compares two token-choice routers:

* ``aux_loss`` ("PBTk", penalty-balanced top-k): top-k over softmax scores, with the
  Switch-Transformer auxiliary load-balancing loss (Fedus et al. 2021, eq. 4, generalized to
  top-k) and the ST-MoE router z-loss (Zoph et al. 2022, eq. 5) added to the LM loss
  (:class:`CptRouter`, ``method="topk"``). Preset: aux 0.01, z 0.001.
* ``sinkhorn`` ("SBTk", Sinkhorn-balanced top-k, as Megatron-LM's sinkhorn router and
  Clark et al. 2022): during training the expert *choice* is the top-k of the
  Sinkhorn-Knopp-normalized logits, iterated until the column marginals are within
  ``sinkhorn_tol`` of ``T/E`` (the paper: 0.01) or ``sinkhorn_max_iters``; the gate *values*
  still come from the softmax. No balancing loss: preset aux 0 and z 0 (Sinkhorn makes the
  choice balanced, nothing is added to the loss; a z-loss can be switched on explicitly with
  ``model.z_loss_coeff``). Evaluation uses plain top-k of the softmax.
* ``aux_free``: torchtitan's own ``TokenChoiceTopKRouter`` with the MoE layer's
  ``load_balance_coeff`` (auxiliary-loss-free expert-bias balancing), unchanged.

Gate values: with ``route_norm`` the top-k scores are renormalized to sum to 1. With top-1 that
makes every gate exactly 1 and the LM loss sends no gradient to the router, so the presets use
``route_norm`` only for k > 1 (Switch Transformer scales the expert output by the raw softmax
probability, Fedus et al. 2021 eq. 2).

The auxiliary losses are computed in the router's forward on the local tokens and kept on
the module (:attr:`CptRouter.aux_loss`, :attr:`CptRouter.z_loss`); the trainer adds
``aux_loss_coeff * aux + z_loss_coeff * z`` of every layer to the LM loss
(:func:`collect_router_losses`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import TokenChoiceTopKRouter


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def switch_aux_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss generalized to top-k.

    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the ``T*K`` assignments that went to
    expert ``e`` and ``P_e`` the mean router probability of ``e``. Equals 1 when perfectly
    balanced, ``E`` when every token picks the same expert with probability 1.
    """
    num_tokens, num_experts = probs_TE.shape
    k = topk_ids_TK.shape[-1]
    counts_E = torch.zeros(num_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(
        0, topk_ids_TK.reshape(-1), torch.ones_like(topk_ids_TK, dtype=probs_TE.dtype).reshape(-1)
    )
    f_E = counts_E / (num_tokens * k)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * p_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@dataclass(frozen=True)
class SinkhornResult:
    log_plan: torch.Tensor  # (T, E) log of the balanced plan: rows sum to 1, columns ~ T/E
    iterations: int  # column + row normalizations done
    error: float  # max_e |column sum_e / (T/E) - 1| of the returned plan


def sinkhorn_knopp(logits_TE: torch.Tensor, tol: float = 0.01,
                   max_iters: int = 100) -> SinkhornResult:
    """Sinkhorn-Knopp in log space on ``exp(logits)``: alternately scale the columns to sum to
    ``T / E`` and the rows to sum to 1, until the column marginals of the row-normalized plan
    are within ``tol`` of ``T / E`` (``max_e |c_e E / T - 1| <= tol``: the relative change the
    next column scaling would make) or ``max_iters`` rounds were done. The result is the
    balanced soft assignment closest to ``softmax(logits)`` in KL (Cuturi 2013)."""
    num_tokens, num_experts = logits_TE.shape
    log_p = logits_TE.float() - torch.logsumexp(logits_TE.float(), dim=1, keepdim=True)
    col_target = math.log(num_tokens / num_experts)
    error = _column_error(log_p, col_target)
    iterations = 0
    while error > tol and iterations < max_iters:
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + col_target
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        iterations += 1
        error = _column_error(log_p, col_target)
    return SinkhornResult(log_p, iterations, error)


def _column_error(log_p: torch.Tensor, col_target: float) -> float:
    return float((torch.logsumexp(log_p, dim=0) - col_target).exp().sub(1.0).abs().max())


class CptRouter(TokenChoiceTopKRouter):
    """Softmax token-choice router with optional Sinkhorn assignment and aux/z losses."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        method: Literal["topk", "sinkhorn"] = "topk"
        aux_loss_coeff: float = 0.01
        z_loss_coeff: float = 0.001
        sinkhorn_tol: float = 0.01
        sinkhorn_max_iters: int = 100

    def __init__(self, config: Config):
        super().__init__(config)
        self.method = config.method
        self.aux_loss_coeff = config.aux_loss_coeff
        self.z_loss_coeff = config.z_loss_coeff
        self.sinkhorn_tol = config.sinkhorn_tol
        self.sinkhorn_max_iters = config.sinkhorn_max_iters
        self.last_sinkhorn_iterations = 0  # of the last training forward (logged)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def forward(
        self, x_BLD: torch.Tensor, expert_bias_E: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fp32_gate = (
            torch.autocast(device_type="cuda", dtype=torch.float32)
            if x_BLD.device.type == "cuda"
            else contextlib.nullcontext()  # CPU autocast has no float32 mode
        )
        with fp32_gate:
            logits_BLE = self.gate(x_BLD)
        logits_BLE = logits_BLE.float()
        scores_BLE = F.softmax(logits_BLE, dim=-1)
        choice_BLE = scores_BLE if expert_bias_E is None else scores_BLE + expert_bias_E
        if self.method == "sinkhorn" and self.training:
            local = local_tensor(logits_BLE).detach()
            b, seq, e = local.shape
            result = sinkhorn_knopp(local.reshape(b * seq, e), self.sinkhorn_tol,
                                    self.sinkhorn_max_iters)
            self.last_sinkhorn_iterations = result.iterations
            balanced = result.log_plan.reshape(b, seq, e)
            if isinstance(logits_BLE, DTensor):
                balanced = DTensor.from_local(
                    balanced, logits_BLE.device_mesh, logits_BLE.placements, run_check=False
                )
            choice_BLE = balanced
        if self.num_expert_groups is not None:
            choice_BLE = self._get_node_limited_routing_scores(choice_BLE)
        _, topk_ids_BLK = torch.topk(choice_BLE, k=self.top_k, dim=-1, sorted=False)
        topk_scores_BLK = scores_BLE.gather(dim=-1, index=topk_ids_BLK)
        if self.route_norm:
            topk_scores_BLK = topk_scores_BLK / (topk_scores_BLK.sum(-1, keepdim=True) + 1e-20)
        topk_scores_BLK = topk_scores_BLK * self.route_scale

        if self.training:  # computed for logging also when their coefficients are 0
            local_logits = local_tensor(logits_BLE)
            e = local_logits.shape[-1]
            logits_TE = local_logits.reshape(-1, e)
            probs_TE = local_tensor(scores_BLE).reshape(-1, e)
            ids_TK = local_tensor(topk_ids_BLK).reshape(-1, self.top_k)
            self.aux_loss = switch_aux_loss(probs_TE, ids_TK)
            self.z_loss = router_z_loss(logits_TE)
        return topk_scores_BLK, topk_ids_BLK, scores_BLE


def cpt_routers(model: nn.Module) -> list[CptRouter]:
    return [m for m in model.modules() if isinstance(m, CptRouter)]


def collect_router_losses(
    model: nn.Module,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Weighted sum of the routers' aux and z losses from the last forward, and their
    per-model means for logging. Clears the stored losses."""
    total: torch.Tensor | None = None
    aux_values: list[float] = []
    z_values: list[float] = []
    for router in cpt_routers(model):
        if router.aux_loss is None or router.z_loss is None:
            continue
        for coeff, value in ((router.aux_loss_coeff, router.aux_loss),
                             (router.z_loss_coeff, router.z_loss)):
            if coeff:  # a zero coefficient adds nothing (and no backward work)
                total = coeff * value if total is None else total + coeff * value
        aux_values.append(float(router.aux_loss.detach()))
        z_values.append(float(router.z_loss.detach()))
        router.aux_loss = None
        router.z_loss = None
    stats: dict[str, float] = {}
    if aux_values:
        stats["aux_loss"] = sum(aux_values) / len(aux_values)
        stats["z_loss"] = sum(z_values) / len(z_values)
    return total, stats
