"""Evaluation on fixed held-out sets: loss per source, router balance, routing saturation.

Definitions in :mod:`moe_cpt.trainer.routing_metrics`.

* val loss per source: mean next-token cross-entropy on a fixed held-out set of each source
  (``eval.samples_per_source`` windows, run ``eval.batch_size`` windows per forward);
* router balance per MoE layer: per-expert token fractions and MaxVio over all validation
  tokens (pooled), and on each source's tokens: fractions, MaxVio and the **MRI**;
* against a reference routing of the same tokens (the run's first evaluation, for CPT the
  parent checkpoint, or ``eval.reference_routing``): **routing saturation** per source, per
  layer and overall, and the routing-change fraction (pooled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchtitan.models.common.moe import TokenChoiceTopKRouter

from moe_cpt.trainer.routers import local_tensor
from moe_cpt.trainer.routing_metrics import (
    changed_fraction,
    expert_counts,
    max_violation,
    mri,
    saturation_per_token,
)

__all__ = ["EvalResult", "evaluate", "local_tensor", "max_violation", "routing_change",
           "routing_saturation"]


@dataclass
class EvalResult:
    val_loss: dict[str, float] = field(default_factory=dict)
    expert_fractions: dict[str, list[float]] = field(default_factory=dict)
    max_vio: dict[str, float] = field(default_factory=dict)
    routing: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (T, K) sorted ids
    # per validation source: layer -> fractions / MaxVio on that source's tokens only
    source_expert_fractions: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source_max_vio: dict[str, dict[str, float]] = field(default_factory=dict)
    source_mri: dict[str, dict[str, float]] = field(default_factory=dict)
    # rows of each source in the pooled ``routing`` arrays (sources in evaluation order)
    source_rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"val_loss/{k}": v for k, v in self.val_loss.items()}
        for layer, vio in self.max_vio.items():
            out[f"router/{layer}/max_vio"] = vio
            out[f"router/{layer}/expert_fractions"] = self.expert_fractions[layer]
        if self.max_vio:
            out["router/max_vio_mean"] = float(np.mean(list(self.max_vio.values())))
        for source, vios in self.source_max_vio.items():
            for layer, vio in vios.items():
                out[f"router_by_source/{source}/{layer}/max_vio"] = vio
                out[f"router_by_source/{source}/{layer}/expert_fractions"] = (
                    self.source_expert_fractions[source][layer])
            if vios:
                out[f"router_by_source/{source}/max_vio_mean"] = float(np.mean(list(vios.values())))
        for source, mris in self.source_mri.items():
            for layer, value in mris.items():
                out[f"router_by_source/{source}/{layer}/mri"] = value
            if mris:
                out[f"router_by_source/{source}/mri_max"] = max(mris.values())
        return out


def routing_change(current: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of tokens whose top-k expert set changed, per layer and ``overall``."""
    changed: dict[str, float] = {}
    total_changed, total = 0.0, 0
    for layer, ids in current.items():
        ref = reference.get(layer)
        if ref is None or ref.shape != ids.shape:
            continue
        changed[layer] = changed_fraction(ids, ref)
        total_changed += changed[layer] * len(ids)
        total += len(ids)
    if total:
        changed["overall"] = total_changed / total
    return changed


def routing_saturation(result: EvalResult, reference: dict[str, np.ndarray]) -> dict[str, float]:
    """``saturation/<source>/<layer>`` and ``saturation/<source>/overall`` (mean over the
    source's tokens and layers) of ``result`` against a reference routing of the same
    evaluation tokens; layers whose reference has another shape are left out."""
    out: dict[str, float] = {}
    for source, (start, stop) in result.source_rows.items():
        per_layer = {}
        for layer, ids in result.routing.items():
            ref = reference.get(layer)
            if ref is None or ref.shape != ids.shape:
                continue
            per_layer[layer] = saturation_per_token(ids[start:stop], ref[start:stop]).mean()
            out[f"saturation/{source}/{layer}"] = float(per_layer[layer])
        if per_layer:
            out[f"saturation/{source}/overall"] = float(np.mean(list(per_layer.values())))
    return out


def _balance(ids: np.ndarray, num_experts: int) -> tuple[list[float], float]:
    """Per-expert token fractions and MaxVio of top-k assignments ``ids`` (T, K)."""
    counts = expert_counts(ids, num_experts).astype(np.float64)
    return (counts / counts.sum()).round(6).tolist(), max_violation(counts)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    forward_kwargs: Callable[[torch.Tensor], dict[str, Any]],
    batch_size: int = 0,
) -> EvalResult:
    """Run ``model`` on each source's fixed set ``(tokens[N, L+1], positions[N, L+1])``,
    ``batch_size`` windows per forward (0: all at once)."""
    routers = {
        name.removesuffix(".moe.router"): m
        for name, m in model.named_modules()
        if isinstance(m, TokenChoiceTopKRouter)
    }
    # layer -> source -> top-k ids of that source's batches
    captured: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in routers}
    current = [""]

    def hook(name: str) -> Callable:
        def _hook(module: nn.Module, args: Any, output: Any) -> None:
            ids = local_tensor(output[1])
            ids = ids.reshape(-1, ids.shape[-1]).sort(dim=-1).values.cpu()
            captured[name].setdefault(current[0], []).append(ids)

        return _hook

    handles = [r.register_forward_hook(hook(name)) for name, r in routers.items()]
    was_training = model.training
    model.eval()
    result = EvalResult()
    try:
        for source, (tokens, positions) in batches.items():
            current[0] = source
            step = batch_size if batch_size > 0 else len(tokens)
            loss_sum, count = 0.0, 0
            for i in range(0, len(tokens), step):
                inputs, labels = tokens[i:i + step, :-1], tokens[i:i + step, 1:]
                logits = model(inputs, **forward_kwargs(positions[i:i + step, :-1]))
                logits = local_tensor(logits).float()
                loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  labels.reshape(-1), reduction="sum"))
                count += labels.numel()
            result.val_loss[source] = loss_sum / count
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, router in routers.items():
        if not captured[name]:
            continue
        per_source = {src: torch.cat(parts).numpy() for src, parts in captured[name].items()}
        ids = np.concatenate(list(per_source.values()))
        result.expert_fractions[name], result.max_vio[name] = _balance(ids, router.num_experts)
        result.routing[name] = ids
        row = 0
        for src, src_ids in per_source.items():
            fractions, vio = _balance(src_ids, router.num_experts)
            result.source_expert_fractions.setdefault(src, {})[name] = fractions
            result.source_max_vio.setdefault(src, {})[name] = vio
            result.source_mri.setdefault(src, {})[name] = mri(src_ids, router.num_experts)
            result.source_rows[src] = (row, row + len(src_ids))
            row += len(src_ids)
    return result
