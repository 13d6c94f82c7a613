"""The routing metrics of the study, as pure functions of expert counts or top-k expert sets.

* **MRI**, maximum routing imbalance (Thérien et al. 2025, arXiv 2503.05029, sec. 3): per MoE
  layer, ``MRI = max_i |{x : i in E(x)}| / |X|``, the largest fraction of the tokens ``X`` whose
  top-k expert set ``E(x)`` contains one expert ``i``. Perfect balance gives ``k / E``, every
  token sharing one expert gives 1.
* **MaxVio** (Wang et al. 2024, "Auxiliary-loss-free load balancing", arXiv 2408.15664):
  ``max_i load_i / mean_i load_i - 1``; 0 when balanced.
* **Routing saturation** against a reference checkpoint (OLMoE, Muennighoff et al. 2024,
  arXiv 2409.02060, sec. 5): ``mean_x |E_now(x) ∩ E_ref(x)| / k`` over the same tokens; 1 when
  every token keeps its experts, 0 when every token's experts changed.
* **Routing change** (ours, kept beside saturation): the fraction of tokens whose top-k set
  differs from the reference at all.

:class:`MoECounts` reads the per-expert token counts that torchtitan's ``MoE`` layer already
accumulates in training (``tokens_per_expert_E``: for each expert, the tokens whose top-k set
contains it), which is exactly the numerator of the MRI.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_cpt.trainer.routers import local_tensor


def mri_from_counts(counts_E: np.ndarray, top_k: int) -> float:
    """MRI from per-expert token counts (each token counted once for each of its k experts)."""
    counts = np.asarray(counts_E, dtype=np.float64)
    tokens = counts.sum() / top_k
    return float(counts.max() / tokens) if tokens > 0 else 0.0


def expert_counts(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens per expert of top-k expert ids ``(T, K)`` (ids of one token are distinct)."""
    return np.bincount(np.asarray(ids_TK).reshape(-1), minlength=num_experts)


def mri(ids_TK: np.ndarray, num_experts: int) -> float:
    return mri_from_counts(expert_counts(ids_TK, num_experts), np.asarray(ids_TK).shape[-1])


def max_violation(counts: np.ndarray) -> float:
    """``max load / mean load - 1`` (0 when perfectly balanced)."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean()
    return float(counts.max() / mean - 1.0) if mean > 0 else 0.0


def saturation_per_token(ids_TK: np.ndarray, ref_TK: np.ndarray) -> np.ndarray:
    """``|E_now(x) ∩ E_ref(x)| / k`` for every token ``x`` (both ``(T, K)``)."""
    now, ref = np.asarray(ids_TK), np.asarray(ref_TK)
    if now.shape != ref.shape:
        raise ValueError(f"routings of different shapes {now.shape} vs {ref.shape}")
    shared = (now[:, :, None] == ref[:, None, :]).any(-1).sum(-1)
    return shared / now.shape[-1]


def saturation(ids_TK: np.ndarray, ref_TK: np.ndarray) -> float:
    return float(saturation_per_token(ids_TK, ref_TK).mean())


def changed_fraction(ids_TK: np.ndarray, ref_TK: np.ndarray) -> float:
    """Fraction of tokens whose top-k *set* differs from the reference's."""
    now = np.sort(np.asarray(ids_TK), axis=-1)
    ref = np.sort(np.asarray(ref_TK), axis=-1)
    return float(np.any(now != ref, axis=-1).mean())


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``layer name -> MoE module`` (``layers.0``, ...), for modules with torchtitan's
    ``tokens_per_expert_E`` counter."""
    return {name.removesuffix(".moe"): m for name, m in model.named_modules()
            if name.endswith(".moe") and hasattr(m, "tokens_per_expert_E")}


class MoECounts:
    """Per-step expert counts of a model's MoE layers, from ``tokens_per_expert_E``.

    :meth:`snapshot` after a training forward keeps the counter's current value (it
    accumulates over the step's microbatches; torchtitan's aux-free balancing hook resets it
    before the optimizer step, so it is read during the step, not after); :meth:`take` returns
    the step's ``(layers, experts)`` counts of this rank and resets the counters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.top_k = {name: int(m.router.top_k) for name, m in self.layers.items()}
        self._last: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def snapshot(self) -> None:
        if self.layers:
            self._last = torch.stack([local_tensor(m.tokens_per_expert_E).float().clone()
                                      for m in self.layers.values()])

    @torch.no_grad()
    def take(self) -> torch.Tensor | None:
        last, self._last = self._last, None
        for m in self.layers.values():
            local_tensor(m.tokens_per_expert_E).zero_()
        return last

    def step_metrics(self, counts_LE: np.ndarray) -> dict[str, float]:
        """``router/<layer>/mri``, ``router/<layer>/max_vio`` and ``router/mri_max`` from the
        step's global counts."""
        out: dict[str, float] = {}
        for (name, k), counts in zip(self.top_k.items(), counts_LE, strict=True):
            out[f"router/{name}/mri"] = mri_from_counts(counts, k)
            out[f"router/{name}/max_vio"] = max_violation(counts)
        if out:
            out["router/mri_max"] = max(v for key, v in out.items() if key.endswith("/mri"))
        return out
