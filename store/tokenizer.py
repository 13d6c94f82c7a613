"""Tokenizers as the store knows them: load any HF ``tokenizer.json`` (local or object store)
and derive its identity.

The identity of a tokenizer is the sha256 of its ``tokenizer.json`` bytes; it is recorded in every
manifest (``TokenizerInfo``) so the mixer can refuse to blend datasets tokenized differently.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from moe_cpt.errors import ConfigError
from moe_cpt.fs import open_fs
from moe_cpt.hashing import sha256_hex
from moe_cpt.store.manifest import TokenizerInfo

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
