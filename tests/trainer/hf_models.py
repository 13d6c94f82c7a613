"""Tiny random Hugging Face Qwen3 / Qwen3-MoE models, built locally with ``transformers``
(``save_pretrained``; nothing is downloaded), with a byte-level BPE ``tokenizer.json`` trained on
the demo's prose (the Python documentation topics), and helpers to compare logits."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

from moe_cpt.corpus.tokenizer import train_bpe
from moe_cpt.trainer import cpu_compat

VOCAB = 320  # the tokenizer's vocabulary (256 bytes + merges + <|endoftext|>) = the model's
TOLERANCE = 1e-4  # max |logit difference| allowed, float32 on CPU


def demo_texts(n: int = 200) -> list[str]:
    return [text for _, text in sorted(pydoc_data.topics.topics.items())][:n]


def write_tokenizer(folder: Path) -> Path:
    path = folder / "tokenizer.json"
    path.write_bytes(train_bpe(demo_texts(), VOCAB))
    return path


def hf_config(kind: str, **overrides: object) -> Qwen3Config | Qwen3MoeConfig:
    """Deliberately non-default RoPE theta and RMS eps, so a mapping that ignored them fails."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False,
                  initializer_range=0.1)
    if kind == "moe":
        return Qwen3MoeConfig(**{**common, "num_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 48, "norm_topk_prob": True,
                                 "intermediate_size": 96, **overrides})
    return Qwen3Config(**{**common, "intermediate_size": 96, **overrides})


def save_tiny_model(folder: Path, kind: str, seed: int = 0, **overrides: object) -> Path:
    """A random tiny ``Qwen3MoeForCausalLM`` (``kind="moe"``) or ``Qwen3ForCausalLM``
    (``"dense"``) saved to ``folder`` with a tokenizer.json."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def load_hf(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def sample_tokens(seed: int = 1, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


@torch.no_grad()
def our_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's logits in float32 throughout: torchtitan's grouped experts compute in bf16
    unless the trainer's CPU fp32-experts patch is installed (trainer/cpu_compat.py (j)), as
    every CPU training process does."""
    cpu_compat.install_fp32_experts()
    return model.eval()(tokens).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    diff = float((a - b).abs().max())
    print(f"{what}: max |logit diff| = {diff:.3e} (tolerance {TOLERANCE:.0e}, "
          f"logit scale {float(a.abs().max()):.3f})")
    return diff
