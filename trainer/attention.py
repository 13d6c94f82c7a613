"""Per-document causal attention through SDPA, for backends without flex attention (CPU).

torchtitan's language models use flex/varlen attention with per-document masks; flex has no
CPU backward (issue item e). :class:`DocumentSDPA` is an inner-attention module with the same
call signature that takes a boolean ``(B, 1, L, L)`` mask built by :func:`document_causal_mask`
from the sample's ``positions`` (restarting at 0 at each document start), or plain causal
attention when no mask is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.protocols.module import Module


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` positions -> ``(B, 1, L, L)`` bool mask: causal and inside one document."""
    doc_ids = torch.cumsum((positions == 0).to(torch.int32), dim=-1)
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    length = positions.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    return (same_doc & causal).unsqueeze(1)


class DocumentSDPA(Module):
    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()

    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks: Any = None,
        scale: float | None = None,
        enable_gqa: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        if attention_masks is None:
            out = F.scaled_dot_product_attention(
                q, k, v, scale=scale, is_causal=True, enable_gqa=enable_gqa
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_masks, scale=scale, enable_gqa=enable_gqa
            )
        return out.transpose(1, 2)
