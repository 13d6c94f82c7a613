"""trainer/hf_config.py: Qwen3 / Qwen3-MoE config.json <-> our model shape, and the configs we
refuse (each with one ConfigError line naming the key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_cpt.errors import ConfigError
from moe_cpt.trainer.hf_config import hf_config_of, read_hf_config, shape_fields
from moe_cpt.trainer.models import Shape

MOE = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320,
       "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
       "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "norm_topk_prob": False, "intermediate_size": 128}


def test_moe_fields_and_round_trip() -> None:
    shape = Shape(**shape_fields(MOE))
    assert (shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (64, 2, 4, 2, 16)
    assert (shape.num_experts, shape.top_k, shape.moe_hidden) == (8, 2, 32)
    assert (shape.rope_theta, shape.norm_eps, shape.max_seq_len, shape.route_norm) == (5e5, 1e-5, 256, False)
    back = hf_config_of(shape, route_norm=False, base=MOE)
    assert Shape(**shape_fields(back)) == shape and back["architectures"] == ["Qwen3MoeForCausalLM"]
    assert back["tie_word_embeddings"] is False


def test_transformers5_names() -> None:
    """transformers 5 writes num_local_experts and rope_parameters."""
    cfg = {k: v for k, v in MOE.items() if k not in ("num_experts", "rope_theta")}
    cfg.update(num_local_experts=8, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert shape_fields(cfg) == shape_fields(MOE)


def test_dense_fields() -> None:
    cfg = {**{k: v for k, v in MOE.items() if "expert" not in k and k != "norm_topk_prob"},
           "model_type": "qwen3", "layer_types": ["full_attention"] * 2}
    shape = Shape(**shape_fields(cfg))
    assert not shape.is_moe and shape.ffn_hidden == 128
    assert hf_config_of(shape, route_norm=False)["architectures"] == ["Qwen3ForCausalLM"]


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_refused(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        shape_fields({**MOE, **change})


def test_read_hf_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MOE))
    assert read_hf_config(tmp_path) == read_hf_config(tmp_path / "config.json") == MOE
