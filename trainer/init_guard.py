"""Guard against torchtitan's silent CPU init bug (issue item i).

On CPU, DTensor random init fills every rank's shard with the same values, so expert-parallel
experts become copies of each other. :func:`init_from_full` initializes an unsharded copy of
the model from a fixed seed (identical on every rank) and loads it into the sharded model;
:func:`experts_distinct` checks that no two experts of a layer are equal after init.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtitan.models.common.moe import GroupedExperts


def init_from_full(model: nn.Module, model_config: object, seed: int) -> None:
    """Overwrite ``model``'s (possibly sharded) weights with a seeded unsharded init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            full = model_config.build()  # type: ignore[attr-defined]
            full.init_weights(buffer_device=None)
    state = dict(full.named_parameters())
    state.update(full.named_buffers())
    with torch.no_grad():
        for name, target in [*model.named_parameters(), *model.named_buffers()]:
            source = state.get(name.replace("_checkpoint_wrapped_module.", ""))
            if source is None:
                continue
            if isinstance(target, DTensor):
                # slice locally on every rank (the full tensor is identical everywhere)
                local = distribute_tensor(source.to(target.dtype), target.device_mesh,
                                          target.placements, src_data_rank=None).to_local()
                target.to_local().copy_(local)
            else:
                target.copy_(source.to(target.dtype))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def experts_distinct(model: nn.Module) -> bool:
    """True when, in every MoE layer, all experts' ``w1`` weights differ (collective under
    FSDP/EP: every rank must call it)."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            w = _full(module.w1_EFD.detach()).reshape(module.num_experts, -1)
            if torch.unique(w, dim=0).shape[0] != module.num_experts:
                return False
    return True
