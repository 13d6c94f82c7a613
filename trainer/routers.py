"""MoE routers compared by the study, as drop-in replacements of torchtitan's router config.

* ``aux_loss``: top-k over softmax scores, with the Switch-Transformer auxiliary
  load-balancing loss and the ST-MoE router z-loss (:class:`CptRouter`, ``method="topk"``).
* ``sinkhorn``: Sinkhorn-balanced assignment during training (as Megatron-LM's sinkhorn
  router): the expert *choice* is the top-k of the Sinkhorn-normalized logits, the gate
  *values* still come from the softmax (``method="sinkhorn"``). Evaluation uses plain top-k.
* ``aux_free``: torchtitan's own ``TokenChoiceTopKRouter`` with the MoE layer's
  ``load_balance_coeff`` (auxiliary-loss-free expert-bias balancing), unchanged.

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


def _local(t: torch.Tensor) -> torch.Tensor:
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


def sinkhorn(logits_TE: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Sinkhorn-Knopp in log space: returns log of a ``(T, E)`` matrix whose rows sum to 1 and
    whose columns sum to ``T / E`` (approximately, after ``iterations`` rounds), i.e. a
    balanced soft assignment close to ``softmax(logits)``."""
    num_tokens, num_experts = logits_TE.shape
    log_p = logits_TE.float()
    col_target = math.log(num_tokens / num_experts)
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + col_target
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


class CptRouter(TokenChoiceTopKRouter):
    """Softmax token-choice router with optional Sinkhorn assignment and aux/z losses."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        method: Literal["topk", "sinkhorn"] = "topk"
        aux_loss_coeff: float = 0.01
        z_loss_coeff: float = 0.001
        sinkhorn_iterations: int = 8

    def __init__(self, config: Config):
        super().__init__(config)
        self.method = config.method
        self.aux_loss_coeff = config.aux_loss_coeff
        self.z_loss_coeff = config.z_loss_coeff
        self.sinkhorn_iterations = config.sinkhorn_iterations
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
            local = _local(logits_BLE).detach()
            b, seq, e = local.shape
            balanced = sinkhorn(local.reshape(b * seq, e), self.sinkhorn_iterations)
            balanced = balanced.reshape(b, seq, e)
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

        if self.training:
            local_logits = _local(logits_BLE)
            e = local_logits.shape[-1]
            logits_TE = local_logits.reshape(-1, e)
            probs_TE = _local(scores_BLE).reshape(-1, e)
            ids_TK = _local(topk_ids_BLK).reshape(-1, self.top_k)
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
        term = router.aux_loss_coeff * router.aux_loss + router.z_loss_coeff * router.z_loss
        total = term if total is None else total + term
        aux_values.append(float(router.aux_loss.detach()))
        z_values.append(float(router.z_loss.detach()))
        router.aux_loss = None
        router.z_loss = None
    stats: dict[str, float] = {}
    if aux_values:
        stats["aux_loss"] = sum(aux_values) / len(aux_values)
        stats["z_loss"] = sum(z_values) / len(z_values)
    return total, stats
