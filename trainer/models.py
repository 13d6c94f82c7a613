"""Model flavors of the study, built from torchtitan's Qwen3 decoder components.

Each flavor is a ``Qwen3Model.Config`` assembled with torchtitan's public config helpers and
wrapped in a :class:`ModelSpec` (:func:`model_spec`). Routers are swapped in through the
config tree (``MoE.Config.router``), so torchtitan's parallelize/EP/FSDP code is used as is.

The study's three designs (Thérien et al. 2025, arXiv 2503.05029), at two scales:

* dense, FLOP-matched to the MoEs' active parameters: ``dense_500m`` / ``tiny_dense``;
* Switch-style MoE (Fedus et al. 2021): 8 experts, top-1, each expert as wide as the dense
  FFN: ``switch_2b_a500m`` / ``tiny_switch``;
* granular DeepSeek-style MoE (Dai et al. 2024): 31 routed experts + 1 shared expert, top-3,
  each expert a quarter of the dense FFN width (active FFN width = dense):
  ``granular_2b_a500m`` / ``tiny_granular``.

Others: ``tiny_moe`` (8 experts top-2, the earlier CPU test shape, kept), ``bench_moe`` (small
bench size), ``tt_debug_moe`` (the shape of torchtitan's qwen3 ``debugmodel_moe``),
``moe_2b_a500m`` (32 experts top-4 without a shared expert: the earlier study shape, kept for
old configs; not one of the paper's designs).
:func:`parameter_counts` gives total and active parameters (``cpt train --print-model``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
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

from moe_cpt.errors import ConfigError
from moe_cpt.trainer import cpu_compat, hf_config
from moe_cpt.trainer.attention import DocumentSDPA
from moe_cpt.trainer.routers import CptRouter

HF_FLAVOR_PREFIX = "hf:"  # model.flavor: hf:DIR = the shape of DIR/config.json
RouterKind = Literal["aux_loss", "sinkhorn", "aux_free"]
ROUTERS: tuple[str, ...] = ("aux_loss", "sinkhorn", "aux_free")


@dataclass(frozen=True)
class RouterPreset:
    """The paper's settings of a router (used where the config leaves a coefficient unset)."""

    aux_loss_coeff: float
    z_loss_coeff: float


ROUTER_PRESETS: dict[str, RouterPreset] = {
    "aux_loss": RouterPreset(aux_loss_coeff=0.01, z_loss_coeff=0.001),  # PBTk
    "sinkhorn": RouterPreset(aux_loss_coeff=0.0, z_loss_coeff=0.0),  # SBTk: no balancing loss
    "aux_free": RouterPreset(aux_loss_coeff=0.0, z_loss_coeff=0.0),  # expert-bias balancing
}


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
    shared_experts: int = 0  # always-on experts of width moe_hidden (DeepSeek-style)
    max_seq_len: int = 4096
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6  # RMSNorm epsilon (all norms)
    route_norm: bool | None = None  # the model's own top-k renormalization (HF norm_topk_prob)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


_TINY = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=256)
_STUDY = Shape(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, head_dim=64, vocab_size=151936,
               max_seq_len=8192)
TINY_FFN = 128  # dense FFN width at CPU scale
STUDY_FFN = 3072  # dense FFN width at study scale

SHAPES: dict[str, Shape] = {
    "tiny_dense": replace(_TINY, ffn_hidden=TINY_FFN),
    "tiny_switch": replace(_TINY, num_experts=8, top_k=1, moe_hidden=TINY_FFN),
    "tiny_granular": replace(_TINY, num_experts=31, top_k=3, moe_hidden=TINY_FFN // 4,
                             shared_experts=1),
    "tiny_moe": Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      vocab_size=256, num_experts=8, top_k=2, moe_hidden=64),
    "bench_moe": Shape(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                       vocab_size=2048, num_experts=8, top_k=2, moe_hidden=256),
    # same shape as torchtitan's qwen3 "debugmodel_moe" (for moe_cpt.bench.train_bench)
    "tt_debug_moe": Shape(dim=256, n_layers=8, n_heads=16, n_kv_heads=8, head_dim=128,
                          vocab_size=2048, num_experts=64, top_k=8, moe_hidden=768),
    "dense_500m": replace(_STUDY, ffn_hidden=STUDY_FFN),
    "switch_2b_a500m": replace(_STUDY, num_experts=8, top_k=1, moe_hidden=STUDY_FFN),
    "granular_2b_a500m": replace(_STUDY, num_experts=31, top_k=3, moe_hidden=STUDY_FFN // 4,
                                 shared_experts=1),
    "moe_2b_a500m": Shape(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, head_dim=64,
                          vocab_size=151936, num_experts=32, top_k=4, moe_hidden=768,
                          max_seq_len=8192),
}


def _normal(std: float) -> Callable:
    return partial(nn.init.normal_, std=std)


def _norm(dim: int, eps: float = 1e-6) -> RMSNorm.Config:
    return RMSNorm.Config(normalized_shape=dim, eps=eps, param_init={"weight": nn.init.ones_})


def shape_of(flavor: str) -> Shape:
    """The shape of ``flavor``: a name of :data:`SHAPES`, or ``hf:DIR`` for the shape of the
    Hugging Face ``DIR/config.json`` (an imported model: trainer/hf_checkpoint.py); raises
    :class:`moe_cpt.errors.ConfigError` for an unknown name or a config we cannot represent."""
    if flavor.startswith(HF_FLAVOR_PREFIX):
        return Shape(**hf_config.shape_fields(hf_config.read_hf_config(
            flavor[len(HF_FLAVOR_PREFIX):])))
    if flavor not in SHAPES:
        raise ConfigError(f"model.flavor {flavor!r} unknown ({', '.join(SHAPES)}, "
                          f"or {HF_FLAVOR_PREFIX}DIR of an imported Hugging Face model)")
    return SHAPES[flavor]


def inner_attention_config(backend: str) -> Any:
    """``sdpa``: per-document masked SDPA (works everywhere, needed on CPU); ``flex``:
    torchtitan's flex attention (CUDA)."""
    if backend == "sdpa":
        return DocumentSDPA.Config()
    if backend == "flex":
        return FlexAttention.Config()
    raise ValueError(f"unknown attention backend {backend!r} (sdpa | flex)")


def default_route_norm(top_k: int) -> bool:
    """Renormalize the top-k gate values only for k > 1: with k = 1 the renormalized gate is
    exactly 1 and the router would get no gradient from the LM loss."""
    return top_k > 1


def router_config(
    shape: Shape, router: str, *, aux_loss_coeff: float | None = None,
    z_loss_coeff: float | None = None, sinkhorn_tol: float = 0.01,
    sinkhorn_max_iters: int = 100, route_norm: bool | None = None,
) -> Any:
    """The router of ``shape``'s MoE layers. Unset coefficients / ``route_norm`` take the
    router's preset (:data:`ROUTER_PRESETS`) / :func:`default_route_norm`."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r} ({' | '.join(ROUTERS)})")
    preset = ROUTER_PRESETS[router]
    aux = preset.aux_loss_coeff if aux_loss_coeff is None else aux_loss_coeff
    z = preset.z_loss_coeff if z_loss_coeff is None else z_loss_coeff
    gate = Linear.Config(in_features=shape.dim, out_features=shape.num_experts, bias=False,
                         param_init={"weight": _normal(0.02)})
    if route_norm is None:
        route_norm = shape.route_norm
    norm = default_route_norm(shape.top_k) if route_norm is None else route_norm
    common = dict(num_experts=shape.num_experts, gate=gate, top_k=shape.top_k,
                  score_func="softmax", route_norm=norm)
    if router == "aux_free":
        from torchtitan.models.common.moe import TokenChoiceTopKRouter

        return TokenChoiceTopKRouter.Config(**common)
    return CptRouter.Config(
        **common,
        method="topk" if router == "aux_loss" else "sinkhorn",
        aux_loss_coeff=aux,
        z_loss_coeff=z,
        sinkhorn_tol=sinkhorn_tol,
        sinkhorn_max_iters=sinkhorn_max_iters,
    )


def build_model_config(
    flavor: str,
    *,
    router: str = "aux_loss",
    attention: str = "sdpa",
    aux_loss_coeff: float | None = None,
    z_loss_coeff: float | None = None,
    load_balance_coeff: float = 1e-3,
    vocab_size: int | None = None,
    sinkhorn_tol: float = 0.01,
    sinkhorn_max_iters: int = 100,
    route_norm: bool | None = None,
) -> Qwen3Model.Config:
    s = shape_of(flavor)
    vocab = vocab_size or s.vocab_size
    std = 0.02
    out_init = _normal(std / (2 * s.n_layers) ** 0.5)
    linear_init = {"weight": _normal(std), "bias": nn.init.zeros_}
    rope = CosSinRoPE.Config(dim=s.head_dim, max_seq_len=s.max_seq_len, theta=s.rope_theta)
    layers = []
    for _ in range(s.n_layers):
        attn = make_gqa_config(
            dim=s.dim, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
            wqkv_param_init=linear_init, wo_param_init={"weight": out_init, "bias": nn.init.zeros_},
            inner_attention=inner_attention_config(attention), fuse_qkv=True, rope=rope,
            qk_norm=_norm(s.head_dim, s.norm_eps),
        )
        block: dict[str, Any] = dict(attention_norm=_norm(s.dim, s.norm_eps),
                                     ffn_norm=_norm(s.dim, s.norm_eps), attention=attn)
        if s.is_moe:
            block["moe"] = make_moe_config(
                num_experts=s.num_experts,
                router=router_config(s, router, aux_loss_coeff=aux_loss_coeff,
                                     z_loss_coeff=z_loss_coeff, sinkhorn_tol=sinkhorn_tol,
                                     sinkhorn_max_iters=sinkhorn_max_iters,
                                     route_norm=route_norm),
                routed_experts=make_routed_experts_config(
                    dim=s.dim, hidden_dim=s.moe_hidden, num_experts=s.num_experts,
                    top_k=s.top_k,
                    param_init={"w1_EFD": _normal(std), "w2_EDF": out_init, "w3_EFD": _normal(std)},
                    comm_backend="standard",
                ),
                shared_experts=_shared_experts_config(s, linear_init, out_init),
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
        norm=_norm(s.dim, s.norm_eps),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=s.dim,
                                        param_init={"weight": _normal(std)}),
        lm_head=Linear.Config(in_features=s.dim, out_features=vocab, param_init=linear_init),
        layers=layers,
    )


def _shared_experts_config(s: Shape, linear_init: dict, out_init: Callable) -> Any:
    """``s.shared_experts`` always-on experts as one SwiGLU FFN of ``shared_experts x
    moe_hidden`` width (the same function as that many separate experts summed)."""
    if not s.shared_experts:
        return None
    return make_ffn_config(
        dim=s.dim, hidden_dim=s.shared_experts * s.moe_hidden, w1_param_init=linear_init,
        w2w3_param_init={"weight": out_init, "bias": nn.init.zeros_},
    )


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # per token: everything but the routed experts a token does not use
    embedding: int  # token embedding + LM head
    routed_experts: int
    shared_experts: int

    @property
    def non_embedding_active(self) -> int:
        return self.active - self.embedding


def parameter_counts(flavor: str, vocab_size: int | None = None) -> ParameterCounts:
    """Exact counts from the model built on the meta device (no memory, no init)."""
    s = shape_of(flavor)
    with torch.device("meta"):
        model = build_model_config(flavor, router="aux_loss", vocab_size=vocab_size).build()
    total = routed = shared = embedding = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if ".routed_experts." in name:
            routed += n
        elif ".shared_experts." in name:
            shared += n
        elif name.startswith(("tok_embeddings", "lm_head")):
            embedding += n
    active = total - routed + (routed * s.top_k // s.num_experts if s.is_moe else 0)
    return ParameterCounts(total=total, active=active, embedding=embedding,
                           routed_experts=routed, shared_experts=shared)


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
