"""Training a byte-level BPE tokenizer for a corpus (loading and identity: :mod:`moe_cpt.store.tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_cpt.errors import ConfigError
from moe_cpt.store.tokenizer import DEFAULT_EOS

T = TypeVar("T")


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> bytes:
    """Train a byte-level BPE tokenizer (GPT-2 style) and return its ``tokenizer.json`` bytes."""
    if vocab_size < 300:
        raise ConfigError("vocab_size must be at least 300 (256 bytes + merges + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batched(texts), trainer=trainer)
    return tok.to_str().encode("utf-8")


def batched(items: Iterable[T], size: int = 1000) -> Iterator[list[T]]:
    """Lists of up to ``size`` consecutive items."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
