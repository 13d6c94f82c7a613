"""Evaluation on fixed held-out batches: loss per source, router balance, routing change.

* val loss per source: mean next-token cross-entropy on a fixed batch of each source;
* router balance per MoE layer: per-expert token fractions and ``MaxVio = max load / mean
  load - 1``, over all validation tokens (pooled) and on each source's distribution;
* routing change vs a reference: fraction of tokens whose top-k expert *set* differs from the
  reference routing (same batch, other weights), per layer and overall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.models.common.moe import TokenChoiceTopKRouter


@dataclass
class EvalResult:
    val_loss: dict[str, float] = field(default_factory=dict)
    expert_fractions: dict[str, list[float]] = field(default_factory=dict)
    max_vio: dict[str, float] = field(default_factory=dict)
    routing: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (T, K) sorted ids
    # per validation source: layer -> fractions / MaxVio on that source's tokens only
    source_expert_fractions: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source_max_vio: dict[str, dict[str, float]] = field(default_factory=dict)

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
        return out


def max_violation(counts: np.ndarray) -> float:
    """``max load / mean load - 1`` (0 when perfectly balanced)."""
    mean = counts.mean()
    return float(counts.max() / mean - 1.0) if mean > 0 else 0.0


def routing_change(current: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of tokens whose top-k expert set changed, per layer and ``overall``."""
    changed: dict[str, float] = {}
    total_changed, total = 0, 0
    for layer, ids in current.items():
        ref = reference.get(layer)
        if ref is None or ref.shape != ids.shape:
            continue
        diff = np.any(ids != ref, axis=-1)
        changed[layer] = float(diff.mean())
        total_changed += int(diff.sum())
        total += diff.size
    if total:
        changed["overall"] = total_changed / total
    return changed


def _balance(ids: np.ndarray, num_experts: int) -> tuple[list[float], float]:
    """Per-expert token fractions and MaxVio of top-k assignments ``ids`` (T, K)."""
    counts = np.bincount(ids.reshape(-1), minlength=num_experts).astype(np.float64)
    return (counts / counts.sum()).round(6).tolist(), max_violation(counts)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    forward_kwargs: Callable[[torch.Tensor], dict[str, Any]],
) -> EvalResult:
    """Run ``model`` on each source's fixed batch ``(tokens[B, L+1], positions[B, L+1])``."""
    routers = {
        name.removesuffix(".moe.router"): m
        for name, m in model.named_modules()
        if isinstance(m, TokenChoiceTopKRouter)
    }
    # layer -> source -> top-k ids of that source's batch
    captured: dict[str, dict[str, torch.Tensor]] = {name: {} for name in routers}
    current = [""]

    def hook(name: str) -> Callable:
        def _hook(module: nn.Module, args: Any, output: Any) -> None:
            ids = local_tensor(output[1])
            captured[name][current[0]] = ids.reshape(-1, ids.shape[-1]).sort(dim=-1).values.cpu()

        return _hook

    handles = [r.register_forward_hook(hook(name)) for name, r in routers.items()]
    was_training = model.training
    model.eval()
    result = EvalResult()
    try:
        for source, (tokens, positions) in batches.items():
            current[0] = source
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            logits = model(inputs, **forward_kwargs(positions[:, :-1]))
            logits = local_tensor(logits).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            result.val_loss[source] = float(loss)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, router in routers.items():
        if not captured[name]:
            continue
        per_source = {src: ids.numpy() for src, ids in captured[name].items()}
        ids = np.concatenate(list(per_source.values()))
        result.expert_fractions[name], result.max_vio[name] = _balance(ids, router.num_experts)
        result.routing[name] = ids
        for src, src_ids in per_source.items():
            fractions, vio = _balance(src_ids, router.num_experts)
            result.source_expert_fractions.setdefault(src, {})[name] = fractions
            result.source_max_vio.setdefault(src, {})[name] = vio
    return result
