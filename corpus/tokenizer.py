"""Tokenizers: load any HF ``tokenizer.json`` (local or object store), or train a byte-level BPE.

The identity of a tokenizer is the sha256 of its ``tokenizer.json`` bytes; it is recorded in every
manifest so the mixer can refuse to blend datasets tokenized differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_cpt.errors import ConfigError
from moe_cpt.fs import open_fs
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.manifest import TokenizerInfo

T = TypeVar("T")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
DEFAULT_EOS = "<|endoftext|>"


def read_tokenizer_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ConfigError(f"tokenizer file {url!r} does not exist") from exc


def tokenizer_from_bytes(data: bytes, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ConfigError(f"{where} is not a valid HF tokenizer.json: {exc}") from exc


def tokenizer_info(data: bytes, name: str, eos_token: str | None = None) -> TokenizerInfo:
    """Identity + EOS + token dtype of a tokenizer, from its ``tokenizer.json`` bytes."""
    tok = tokenizer_from_bytes(data, name)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for cand in candidates:
        eos_id = tok.token_to_id(cand)
        if eos_id is not None:
            break
    else:
        wanted = repr(eos_token) if eos_token else f"any of {', '.join(EOS_CANDIDATES)}"
        raise ConfigError(f"tokenizer {name} has no EOS token {wanted}; set `eos_token` in the config")
    sha = sha256_hex(data)
    return TokenizerInfo(
        name=name,
        sha256=sha,
        vocab_size=vocab_size,
        eos_token=cand,
        eos_id=int(eos_id),
        dtype="uint16" if vocab_size <= 1 << 16 else "uint32",
        store_path=f"_tokenizers/{sha}.json",
    )


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
