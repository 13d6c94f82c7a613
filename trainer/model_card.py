"""``cpt train --print-model``: a config's model shape and parameter counts next to the paper's.

The paper (Thérien et al. 2025, arXiv 2503.05029) reports a ~570M dense decoder and MoEs of
about 2B total / 500M active parameters; our study flavors are built from the same recipe
(FLOP-matched active FFN width) on torchtitan's Qwen3 decoder with the Qwen3 vocabulary, so the
counts differ (docs/trainer.md, "Differences from the paper").
"""

from __future__ import annotations

from typing import Any

PAPER_COUNTS: dict[str, str] = {
    "dense_500m": "570M dense",
    "switch_2b_a500m": "~2B total / ~500M active",
    "granular_2b_a500m": "~2B total / ~500M active",
    "tiny_dense": "CPU scale of dense_500m",
    "tiny_switch": "CPU scale of switch_2b_a500m",
    "tiny_granular": "CPU scale of granular_2b_a500m",
}


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_table(cfg: dict[str, Any]) -> str:
    """Plain-text table of ``cfg``'s model (no weights are allocated)."""
    from moe_cpt.trainer.models import parameter_counts, shape_of

    m = cfg["model"]
    flavor = m["flavor"]
    s = shape_of(flavor)
    vocab = m["vocab_size"] or s.vocab_size
    counts = parameter_counts(flavor, vocab_size=vocab)
    rows = [
        ("flavor", flavor),
        ("router", m["router"] if s.is_moe else "- (dense)"),
        ("layers x dim", f"{s.n_layers} x {s.dim}"),
        ("heads (kv) x head_dim", f"{s.n_heads} ({s.n_kv_heads}) x {s.head_dim}"),
        ("vocab", str(vocab)),
    ]
    if s.is_moe:
        rows += [("routed experts, top-k", f"{s.num_experts}, top-{s.top_k}"),
                 ("shared experts", str(s.shared_experts)),
                 ("expert FFN width", str(s.moe_hidden))]
    else:
        rows.append(("FFN width", str(s.ffn_hidden)))
    rows += [
        ("total parameters", _m(counts.total)),
        ("active parameters / token", _m(counts.active)),
        ("  of which embeddings + LM head", _m(counts.embedding)),
        ("  non-embedding active", _m(counts.non_embedding_active)),
        ("paper", PAPER_COUNTS.get(flavor, "- (not a paper flavor)")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
