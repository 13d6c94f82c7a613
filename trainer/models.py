"""Model flavors of the study, built from torchtitan's Qwen3 decoder components.

Each flavor is a ``Qwen3Model.Config`` assembled with torchtitan's public config helpers and
wrapped in a :class:`ModelSpec` (:func:`model_spec`). Routers are swapped in through the
config tree (``MoE.Config.router``), so torchtitan's parallelize/EP/FSDP code is used as is.

Flavors: ``tiny_dense`` / ``tiny_moe`` (CPU tests), ``bench_moe`` (small bench size),
``tt_debug_moe`` (the shape of torchtitan's qwen3 ``debugmodel_moe``),
``dense_500m`` and ``moe_2b_a500m`` (study scale, GPU clusters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch import nn
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.models.common import CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.common.config_utils import (
    make_ffn_config,
    make_gqa_config,
    make_moe_config,
    make_routed_experts_config,
)
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.qwen3 import parallelize_qwen3
from torchtitan.models.qwen3.model import Qwen3Model, Qwen3TransformerBlock
from torchtitan.protocols.model_spec import ModelSpec

from trainer import cpu_compat
from trainer.attention import DocumentSDPA
from trainer.routers import CptRouter

RouterKind = Literal["aux_loss", "sinkhorn", "aux_free"]
ROUTERS: tuple[str, ...] = ("aux_loss", "sinkhorn", "aux_free")


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn_hidden: int = 0  # dense FFN width (dense flavors)
    num_experts: int = 0  # 0 = dense
    top_k: int = 0
    moe_hidden: int = 0
    max_seq_len: int = 4096


SHAPES: dict[str, Shape] = {
    "tiny_dense": Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        vocab_size=256, ffn_hidden=128),
    "tiny_moe": Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=256, num_experts=8, top_k=2, moe_hidden=64),
    "bench_moe": Shape(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                       vocab_size=2048, num_experts=8, top_k=2, moe_hidden=256),
    # same shape as torchtitan's qwen3 "debugmodel_moe" (for trainer.bench)
    "tt_debug_moe": Shape(dim=256, n_layers=8, n_heads=16, n_kv_heads=8, head_dim=128,
                          vocab_size=2048, num_experts=64, top_k=8, moe_hidden=768),
    "dense_500m": Shape(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, head_dim=64,
                        vocab_size=151936, ffn_hidden=3072, max_seq_len=8192),
    "moe_2b_a500m": Shape(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, head_dim=64,
                          vocab_size=151936, num_experts=32, top_k=4, moe_hidden=768,
                          max_seq_len=8192),
}


def _normal(std: float) -> Callable:
    return partial(nn.init.normal_, std=std)


def _norm(dim: int) -> RMSNorm.Config:
    return RMSNorm.Config(normalized_shape=dim, eps=1e-6, param_init={"weight": nn.init.ones_})


def inner_attention_config(backend: str) -> Any:
    """``sdpa``: per-document masked SDPA (works everywhere, needed on CPU); ``flex``:
    torchtitan's flex attention (CUDA)."""
    if backend == "sdpa":
        return DocumentSDPA.Config()
    if backend == "flex":
        return FlexAttention.Config()
    raise ValueError(f"unknown attention backend {backend!r} (sdpa | flex)")


def router_config(
    shape: Shape, router: str, *, aux_loss_coeff: float, z_loss_coeff: float,
    sinkhorn_iterations: int = 8,
) -> Any:
    gate = Linear.Config(in_features=shape.dim, out_features=shape.num_experts, bias=False,
                         param_init={"weight": _normal(0.02)})
    common = dict(num_experts=shape.num_experts, gate=gate, top_k=shape.top_k,
                  score_func="softmax", route_norm=True)
    if router == "aux_free":
        from torchtitan.models.common.moe import TokenChoiceTopKRouter

        return TokenChoiceTopKRouter.Config(**common)
    if router in ("aux_loss", "sinkhorn"):
        return CptRouter.Config(
            **common,
            method="topk" if router == "aux_loss" else "sinkhorn",
            aux_loss_coeff=aux_loss_coeff,
            z_loss_coeff=z_loss_coeff,
            sinkhorn_iterations=sinkhorn_iterations,
        )
    raise ValueError(f"unknown router {router!r} ({' | '.join(ROUTERS)})")


def build_model_config(
    flavor: str,
    *,
    router: str = "aux_loss",
    attention: str = "sdpa",
    aux_loss_coeff: float = 0.01,
    z_loss_coeff: float = 0.001,
    load_balance_coeff: float = 1e-3,
    vocab_size: int | None = None,
) -> Qwen3Model.Config:
    if flavor not in SHAPES:
        raise ValueError(f"unknown model flavor {flavor!r} ({' | '.join(SHAPES)})")
    s = SHAPES[flavor]
    vocab = vocab_size or s.vocab_size
    std = 0.02
    out_init = _normal(std / (2 * s.n_layers) ** 0.5)
    linear_init = {"weight": _normal(std), "bias": nn.init.zeros_}
    rope = CosSinRoPE.Config(dim=s.head_dim, max_seq_len=s.max_seq_len, theta=1_000_000.0)
    layers = []
    for _ in range(s.n_layers):
        attn = make_gqa_config(
            dim=s.dim, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
            wqkv_param_init=linear_init, wo_param_init={"weight": out_init, "bias": nn.init.zeros_},
            inner_attention=inner_attention_config(attention), fuse_qkv=True, rope=rope,
            qk_norm=_norm(s.head_dim),
        )
        block: dict[str, Any] = dict(attention_norm=_norm(s.dim), ffn_norm=_norm(s.dim),
                                     attention=attn)
        if s.num_experts:
            block["moe"] = make_moe_config(
                num_experts=s.num_experts,
                router=router_config(s, router, aux_loss_coeff=aux_loss_coeff,
                                     z_loss_coeff=z_loss_coeff),
                routed_experts=make_routed_experts_config(
                    dim=s.dim, hidden_dim=s.moe_hidden, num_experts=s.num_experts,
                    top_k=s.top_k,
                    param_init={"w1_EFD": _normal(std), "w2_EDF": out_init, "w3_EFD": _normal(std)},
                    comm_backend="standard",
                ),
                load_balance_coeff=load_balance_coeff if router == "aux_free" else None,
            )
        else:
            block["feed_forward"] = make_ffn_config(
                dim=s.dim, hidden_dim=s.ffn_hidden, w1_param_init=linear_init,
                w2w3_param_init={"weight": out_init, "bias": nn.init.zeros_},
            )
        layers.append(Qwen3TransformerBlock.Config(**block))
    return Qwen3Model.Config(
        vocab_size=vocab,
        dim=s.dim,
        norm=_norm(s.dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=s.dim,
                                        param_init={"weight": _normal(std)}),
        lm_head=Linear.Config(in_features=s.dim, out_features=vocab, param_init=linear_init),
        layers=layers,
    )


def parallelize_cpt(model: nn.Module, **kwargs: Any) -> nn.Module:
    """torchtitan's Qwen3 parallelization (FSDP2 + EP all-to-all), plus the CPU reduction fix."""
    model = parallelize_qwen3(model, **kwargs)
    cpu_compat.force_sum_reductions(model)
    return model


def model_spec(flavor: str, **kwargs: Any) -> ModelSpec:
    return ModelSpec(
        name="cpt",
        flavor=flavor,
        model=build_model_config(flavor, **kwargs),
        parallelize_fn=parallelize_cpt,
        pipelining_fn=None,
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=None,
    )
