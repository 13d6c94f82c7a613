"""A Hugging Face Qwen3 / Qwen3-MoE ``config.json`` <-> the fields of a model shape.

Light module (no torch): the config validation and the launcher read an imported model's shape
through it (``model.flavor: hf:DIR``, :func:`moe_cpt.trainer.models.shape_of`). Only configs whose model
our decoder computes exactly are accepted; anything else is one :class:`ConfigError` line naming
the key (e.g. ``decoder_sparse_step`` > 1: dense and MoE layers interleaved, which our models do
not build). The fields mapped (HF name -> ours):

=========================== ==========================================================
``hidden_size``             ``dim``
``num_hidden_layers``       ``n_layers``
``num_attention_heads``     ``n_heads``
``num_key_value_heads``     ``n_kv_heads``
``head_dim``                ``head_dim`` (default ``hidden_size / num_attention_heads``)
``vocab_size``              ``vocab_size``
``intermediate_size``       ``ffn_hidden`` (dense Qwen3)
``num_experts``             ``num_experts`` (or ``num_local_experts``; no shared experts)
``num_experts_per_tok``     ``top_k``
``moe_intermediate_size``   ``moe_hidden`` (each routed expert's SwiGLU width)
``norm_topk_prob``          ``route_norm`` (renormalize the top-k softmax gates)
``max_position_embeddings`` ``max_seq_len`` (RoPE table length)
``rope_theta``              ``rope_theta`` (also read from ``rope_parameters``)
``rms_norm_eps``            ``norm_eps``
=========================== ==========================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_cpt.errors import ConfigError

HF_CONFIG = "config.json"
MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder (or that file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / HF_CONFIG
    if not p.is_file():
        raise ConfigError(f"{p} not found (a Hugging Face model folder holds config.json)")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise ConfigError(f"{p} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be an object")
    return data


def rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE base: ``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x);
    a scaled RoPE (YaRN, linear, dynamic, ...) is refused."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if params else "default"
    if kind not in ("default", None):
        raise ConfigError(f"config.json: rope type {kind!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json has no rope_theta")
    return float(theta)


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json has no {key!r}")
    return cfg[key]


def _refuse_unsupported(cfg: dict[str, Any], moe: bool) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    if cfg.get("attention_bias"):
        raise ConfigError("config.json: attention_bias=true is not supported (no q/k/v/o biases)")
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ConfigError("config.json: sliding-window attention is not supported")
    if moe:
        if int(cfg.get("decoder_sparse_step", 1)) != 1:
            raise ConfigError(f"config.json: decoder_sparse_step={cfg['decoder_sparse_step']} "
                              "(dense and MoE layers interleaved) is not supported; every layer "
                              "must be MoE (decoder_sparse_step=1)")
        if cfg.get("mlp_only_layers"):
            raise ConfigError(f"config.json: mlp_only_layers={cfg['mlp_only_layers']} (dense "
                              "layers in a MoE model) is not supported; it must be empty")
        if cfg.get("shared_expert_intermediate_size"):
            raise ConfigError("config.json: shared experts are not supported for a Qwen3-MoE import")


def shape_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The :class:`moe_cpt.trainer.models.Shape` fields of a Qwen3 / Qwen3-MoE ``config.json``."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported "
                          f"({' | '.join(MODEL_TYPES)})")
    moe = model_type == "qwen3_moe"
    _refuse_unsupported(cfg, moe)
    dim, n_heads = int(_require(cfg, "hidden_size")), int(_require(cfg, "num_attention_heads"))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"config.json: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {n_kv}")
    fields: dict[str, Any] = dict(
        dim=dim, n_layers=int(_require(cfg, "num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=int(cfg.get("head_dim") or dim // n_heads),
        vocab_size=int(_require(cfg, "vocab_size")),
        max_seq_len=int(cfg.get("max_position_embeddings") or 4096),
        rope_theta=rope_theta(cfg), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )
    if moe:
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # transformers 5 name
        if not experts:
            raise ConfigError("config.json has no 'num_experts'")
        fields.update(num_experts=int(experts),
                      top_k=int(_require(cfg, "num_experts_per_tok")),
                      moe_hidden=int(_require(cfg, "moe_intermediate_size")),
                      route_norm=bool(cfg.get("norm_topk_prob", False)))
    else:
        fields.update(ffn_hidden=int(_require(cfg, "intermediate_size")))
    return fields


def hf_config_of(shape: Any, route_norm: bool, base: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """A ``config.json`` for ``shape`` (a :class:`moe_cpt.trainer.models.Shape`) that ``transformers``
    loads as ``Qwen3MoeForCausalLM`` / ``Qwen3ForCausalLM``; ``base`` (the imported model's
    config) supplies the keys we do not model (token ids, dtype, ...); ``route_norm``: whether
    the run renormalized the top-k gates (``norm_topk_prob``). Embeddings are untied: our model
    has its own LM head."""
    if shape.shared_experts:
        raise ConfigError("a model with shared experts has no Qwen3-MoE equivalent in "
                          "transformers; it cannot be exported")
    model_type = "qwen3_moe" if shape.is_moe else "qwen3"
    out = {k: v for k, v in (base or {}).items() if not k.startswith("_")}
    if out.get("model_type") not in (None, model_type):
        out = {}
    out.pop("rope_scaling", None)
    out.update(
        model_type=model_type, architectures=[MODEL_TYPES[model_type]],
        hidden_size=shape.dim, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_seq_len, rms_norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
        use_sliding_window=False,
    )
    if shape.is_moe:
        out.pop("num_local_experts", None)
        out.update(num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                   moe_intermediate_size=shape.moe_hidden, decoder_sparse_step=1,
                   norm_topk_prob=bool(route_norm),
                   mlp_only_layers=[], intermediate_size=out.get("intermediate_size")
                   or shape.moe_hidden * shape.top_k)
    else:
        out.update(intermediate_size=shape.ffn_hidden)
        out.pop("layer_types", None)
    return out
